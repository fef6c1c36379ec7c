"""The README's shell commands, checked by the programs they run, at tiny scale: the README cannot drift from the code.

Every command of every ```bash block of README.md goes to the check of its program (CHECKS): the install lines
through pip's own parser, against pyproject's extras; ``open_clip_train`` through its own parser;
``open_clip_llip eval`` run as written, with tiny data, a tiny model and a local checkpoint in place of the
README's (each stand-in checked to name what the README names); ``scripts/demo.py`` through its parser (its
``--quick`` run is tests/test_demo.py); pytest's options through pytest. A command no check knows fails the test,
so that a new command cannot slip into the README unchecked.
"""
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from conftest import REPO, write_retrieval_csv
from PIL import Image

README = REPO / 'README.md'
VENV = '.venv'  # the environment the README's first commands create, and then run from


def readme_chains():
    """The README's command lines (``a && b`` is one line of two commands), continuation lines joined, comments gone."""
    blocks = re.findall(r'^```bash\n(.*?)^```', README.read_text(), flags=re.S | re.M)
    assert blocks, 'README.md has no ```bash block'
    chains = []
    for block in blocks:
        for line in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if words:
                chains.append(words)
    return chains


def split_chain(words):
    commands = [[]]
    for word in words:
        if word == '&&':
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


class Chain:
    """What the commands before this one on its line did: the environment made, the extras installed."""

    def __init__(self):
        self.venv = False
        self.extras = set()

    def program(self, word: str) -> str:
        """A program by name; ``.venv/bin/X`` only once the line has made that environment."""
        if word.startswith(f'{VENV}/bin/'):
            assert self.venv, f'{word} runs before `python3 -m venv {VENV}` on its line'
            return word[len(VENV) + 5:]
        return word


def check_venv(chain, args, data):
    assert args == [VENV], f'the README makes an environment other than {VENV}: {args}'
    chain.venv = True


def check_pip_install(chain, args, data):
    import tomllib
    from pip._internal.commands import create_command
    options, targets = create_command('install').parse_args(args)
    declared = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies']
    assert not targets and options.editables, f'pip install {args}: the README installs this checkout, editable'
    for editable in options.editables:
        path, extras = re.fullmatch(r'([^\[]+)(?:\[([^\]]*)\])?', editable).groups()
        assert path == '.', f'pip install -e {editable}: not this checkout'
        extras = {extra.strip() for extra in (extras or '').split(',') if extra.strip()}
        assert extras <= set(declared), f'pip install -e {editable}: pyproject declares no {extras - set(declared)}'
        chain.extras |= extras


def check_demo(chain, args, data):
    assert chain.extras & {'demo', 'test'}, 'scripts/demo.py runs without the demo extra installed on its line'
    spec = importlib.util.spec_from_file_location('demo', REPO / 'scripts' / 'demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.parse_args(args).quick is False and demo.parse_args([*args, '--quick']).quick


def check_pytest(chain, args, data):
    assert 'test' in chain.extras, 'pytest runs without the test extra installed on its line'
    result = subprocess.run([sys.executable, '-m', 'pytest', *args, '--help', '--noconftest', '-p', 'no:cacheprovider'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def check_open_clip_train(chain, args, data):
    from open_clip_train.params import parse_args
    parsed = parse_args(args)
    assert open_clip.get_model_config(parsed.model) is not None, f'open_clip_train --model {parsed.model}: no such config'


def check_eval(chain, args, data):
    """``open_clip_llip eval`` as written, each of the README's names replaced by a tiny stand-in of the same kind."""
    from open_clip_llip.commands import main
    from open_clip_llip.commands.evaluate import parse_args
    used = set()

    def stand_in(word):
        if word in data['stand_ins']:
            used.add(word)
            return str(data['stand_ins'][word])
        return word

    main(['eval', *map(stand_in, args)])
    assert used == set(data['stand_ins']), f'stand-ins the README no longer names: {set(data["stand_ins"]) - used}'
    written = parse_args(args)  # the README's own names: a released tag of its config
    assert (written.model, written.pretrained) in open_clip.list_pretrained()
    results = json.loads(Path(data['stand_ins'][str(written.json)]).read_text())['results']
    assert sorted({record['temperature'] for record in results}) == sorted(written.temperatures)


# Each command the README runs, by its program and first arguments -> its check.
CHECKS = {
    ('python3', '-m', 'venv'): check_venv,
    ('pip', 'install'): check_pip_install,
    ('python', 'scripts/demo.py'): check_demo,
    ('python', '-m', 'pytest'): check_pytest,
    ('open_clip_train',): check_open_clip_train,
    ('open_clip_llip', 'eval'): check_eval,
}


@pytest.fixture(scope='module')
def data(tmp_path_factory, checkpoint):
    """Tiny stand-ins for the README's model, weights, data and output."""
    root = tmp_path_factory.mktemp('readme')
    classes = ['cat', 'dog', 'boat']
    for label, name in enumerate(classes):
        (root / 'val' / name).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (32, 32), (80 * label, 40 * i, 200)).save(root / 'val' / name / f'{i}.png')
    (root / 'classnames.txt').write_text('\n'.join(classes) + '\n')
    (root / 'templates.txt').write_text('a photo of a {}.\n')
    retrieval, _ = write_retrieval_csv(root / 'retrieval', count=6)
    stand_ins = {'Llip-ViT-B-16': 'Llip-Tiny', 'llip_b16_k32': checkpoint, 'imagenet/val': root / 'val',
                 'classnames.txt': root / 'classnames.txt', 'templates.txt': root / 'templates.txt',
                 'coco/test.csv': retrieval, 'results.json': root / 'results.json'}
    return dict(stand_ins=stand_ins)


CHAINS = readme_chains()


@pytest.mark.parametrize('words', CHAINS, ids=[' '.join(words)[:60] for words in CHAINS])
def test_readme_command_line_runs(words, data, restore_logging):
    chain = Chain()
    for command in split_chain(words):
        argv = [chain.program(command[0]), *command[1:]]
        key = next((key for key in CHECKS if tuple(argv[:len(key)]) == key), None)
        if key is None:
            pytest.fail(f'README.md runs `{shlex.join(command)}`, which tests/test_readme.py does not know how to check: '
                        'add its check to CHECKS.')
        CHECKS[key](chain, argv[len(key):], data)


def test_an_unknown_readme_command_fails_the_test(monkeypatch, tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text('```bash\npip install -e .   # fine\nopen_clip_llip index build --images x\n```\n')
    monkeypatch.setattr(sys.modules[__name__], 'README', readme)
    (first,), (second,) = map(split_chain, readme_chains())
    assert first == ['pip', 'install', '-e', '.']
    with pytest.raises(pytest.fail.Exception, match=r'`open_clip_llip index build --images x`.*add its check'):
        test_readme_command_line_runs(second, None, None)

"""With the package installed, a fresh interpreter's open_clip knows Llip — and nothing else changes."""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

LLIP_MODELS = ['Llip-Tiny', 'Llip-ViT-B-16', 'Llip-ViT-B-32', 'Llip-ViT-G-14', 'Llip-ViT-H-14', 'Llip-ViT-L-14']


def run_python(code: str, *args: str, autoload: bool = True, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OPEN_CLIP_LLIP_AUTOLOAD='1' if autoload else '0', **env)
    return subprocess.run([sys.executable, *args, '-c', textwrap.dedent(code)], env=environ,
                          capture_output=True, text=True, check=True)


def test_open_clip_knows_llip_without_any_import_of_ours(tmp_path):
    checkpoint = tmp_path / 'tiny.pt'
    out = run_python(f"""
        import json, sys, torch
        import open_clip
        assert 'open_clip_llip' in sys.modules  # activated by the import of open_clip alone
        names = [m for m in open_clip.list_models() if m.startswith('Llip')]
        model = open_clip.create_model('Llip-Tiny')
        torch.save(model.state_dict(), {str(checkpoint)!r})
        model, train_transform, val_transform = open_clip.create_model_and_transforms('Llip-ViT-B-16', device='meta')
        loaded, preprocess = open_clip.create_model_from_pretrained('Llip-Tiny', pretrained={str(checkpoint)!r})
        tokens = open_clip.get_tokenizer('Llip-ViT-L-14')(['a photo of a dog'])
        print(json.dumps([names, type(model).__name__, type(loaded).__name__, list(tokens.shape)]))
    """)
    names, built, loaded, token_shape = json.loads(out.stdout.splitlines()[-1])
    assert names == LLIP_MODELS
    assert built == loaded == 'LlipModel'
    assert token_shape == [1, 64]


@pytest.mark.parametrize('first', ['open_clip_train.train', 'open_clip_train.zero_shot', 'open_clip_train.main'])
def test_open_clip_train_modules_imported_before_open_clip_are_adapted_once_loaded(first):
    """No warning, and what the first module binds by name (evaluate, run) is already the adapted function."""
    out = run_python(f"""
        import warnings
        warnings.simplefilter('error')
        import {first}
        from open_clip_train.train import evaluate
        import open_clip_train.zero_shot
        run = getattr(open_clip_train.zero_shot, 'run', None) or open_clip_train.zero_shot.run_zero_shot_classifier
        import open_clip
        import torch
        ddp = torch.nn.parallel.DistributedDataParallel.__init__  # adapted once open_clip_train.distributed loaded
        print(evaluate.__module__, run.__module__, ddp.__module__, 'Llip-Tiny' in open_clip.list_models())
    """)
    adapter = 'open_clip_llip.integration.adapters.similarity'
    assert out.stdout.split() == [adapter, adapter, 'open_clip_llip.integration.adapters.cpu_distributed', 'True']
    assert 'could not register' not in out.stderr


def test_a_hook_that_steps_aside_leaves_the_next_hook_its_import(tmp_path, monkeypatch):
    """A module that registers a hook on itself while it loads (as open_clip, imported by one of CLIP_benchmark's task
    modules, registers hooks on all of them) puts it ahead of the others; when it steps aside at the next import, the
    hook behind it must still see that import."""
    from open_clip_llip.integration.autoload import call_after_import
    calls = types.ModuleType('hook_calls')
    calls.names = []
    monkeypatch.setitem(sys.modules, 'hook_calls', calls)
    monkeypatch.setattr(sys, 'meta_path', list(sys.meta_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / 'hooked_first.py').write_text(
        'import hook_calls\nfrom open_clip_llip.integration.autoload import call_after_import\n'
        'call_after_import(__name__, lambda module: hook_calls.names.append(module.__name__))\n')
    (tmp_path / 'hooked_second.py').write_text('')
    call_after_import('hooked_second', lambda module: calls.names.append(module.__name__))
    try:
        import hooked_first  # noqa: F401
        import hooked_second  # noqa: F401
    finally:
        for name in ('hooked_first', 'hooked_second'):
            sys.modules.pop(name, None)
    assert calls.names == ['hooked_first', 'hooked_second']


def test_python_startup_imports_none_of_torch_open_clip_or_ours():
    """The .pth hook only puts a finder on sys.meta_path: `python -c pass` imports nothing heavy."""
    startup = run_python('pass', '-X', 'importtime').stderr
    imported = {line.split('|')[-1].strip() for line in startup.splitlines() if line.startswith('import time:')}
    assert 'site' in imported
    heavy = {name for name in imported if name.split('.')[0] in ('torch', 'open_clip', 'open_clip_llip', 'numpy')}
    assert not heavy, heavy


def test_environment_variable_switches_autoload_off():
    out = run_python("""
        import sys, open_clip
        before = [m for m in open_clip.list_models() if m.startswith('Llip')]
        print(before, 'open_clip_llip' in sys.modules)
        import open_clip_llip  # the explicit alternative
        print([m for m in open_clip.list_models() if m.startswith('Llip')] == open_clip_llip.llip_model_names())
    """, autoload=False)
    assert out.stdout.split('\n')[:2] == ['[] False', 'True']


def test_every_open_clip_model_builds_exactly_as_before():
    """Same seed, same OpenCLIP models, with and without the plugin: identical classes and weights."""
    code = """
        import json, torch, open_clip
        result = {'models': open_clip.list_models()}
        for name in ['ViT-S-32', 'RN50', 'coca_ViT-B-32', 'ViT-B-16-SigLIP', 'convnext_base']:
            torch.manual_seed(0)
            model = open_clip.create_model(name)
            result[name] = [type(model).__name__, sorted(model.state_dict()),
                            float(sum(p.double().sum() for p in model.state_dict().values()))]
        print(json.dumps(result))
    """
    without = json.loads(run_python(code, autoload=False).stdout.splitlines()[-1])
    with_plugin = json.loads(run_python(code).stdout.splitlines()[-1])
    assert sorted(with_plugin.pop('models')) == sorted(without.pop('models') + LLIP_MODELS)
    assert with_plugin == without


def test_wheel_carries_configs_hook_and_entry_point(tmp_path):
    """A built wheel works on its own: configs inside, the .pth hook at its root, the plugin entry point."""
    import sysconfig
    import zipfile
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', str(tmp_path), repo],
                   check=True, capture_output=True)
    wheel, = tmp_path.glob('open_clip_llip-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
        archive.extractall(tmp_path / 'site')
    assert sorted(n for n in names if n.startswith('open_clip_llip/model_configs/')) == \
        [f'open_clip_llip/model_configs/{m}.json' for m in LLIP_MODELS]
    assert 'open_clip_llip.pth' in names
    assert '[open_clip.plugins]\nllip = open_clip_llip.integration.plugin:register' in entry_points

    # A Python without site processing, given the wheel's files before the dependencies:
    # running the wheel's .pth line must make `import open_clip` activate the wheel's package.
    site_dir = tmp_path / 'site'
    out = run_python(f"""
        import sys
        sys.path[:0] = [{str(site_dir)!r}, {sysconfig.get_paths()['purelib']!r}]
        exec(open({str(site_dir / 'open_clip_llip.pth')!r}).read())
        import open_clip, open_clip_llip
        print(open_clip_llip.__file__.startswith({str(site_dir)!r}), 'Llip-ViT-G-14' in open_clip.list_models())
    """, '-S')
    assert out.stdout.split() == ['True', 'True']

"""The patches in patches/ apply to OpenCLIP 3.3.0, pass their own tests, and make OpenCLIP find us."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import open_clip

PATCHES = sorted((Path(__file__).resolve().parents[1] / 'patches').glob('*.patch'))


@pytest.fixture(scope='module')
def patched_open_clip(tmp_path_factory):
    """A copy of the installed OpenCLIP in an upstream-shaped tree (src/open_clip, src/open_clip_train), patched."""
    import open_clip_train
    if open_clip.__version__ != '3.3.0':
        pytest.skip(f'the patches are made against OpenCLIP 3.3.0, installed is {open_clip.__version__}')
    root = tmp_path_factory.mktemp('open_clip')
    for package in (open_clip, open_clip_train):
        shutil.copytree(Path(package.__file__).parent, root / 'src' / package.__name__,
                        ignore=shutil.ignore_patterns('__pycache__'))
    for patch in PATCHES:
        subprocess.run(['git', 'apply', '--whitespace=nowarn', str(patch)], cwd=root, check=True)
    return root


def run(root, *command, **env):
    environ = dict(os.environ, PYTHONPATH=str(root / 'src'), OPEN_CLIP_LLIP_AUTOLOAD='0', **env)
    return subprocess.run([sys.executable, *command], cwd=root, env=environ, capture_output=True, text=True)


def test_patches_pass_their_own_tests(patched_open_clip):
    result = run(patched_open_clip, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests')
    assert result.returncode == 0, result.stdout + result.stderr


def test_patched_open_clip_discovers_llip_through_its_entry_point(patched_open_clip):
    """Autoload off: only the entry point can register Llip, and the stock-OpenCLIP shims stay out."""
    result = run(patched_open_clip, '-c', """if True:
        import open_clip
        from open_clip.model import CLIP
        assert open_clip.factory.CLIP is CLIP  # no stand-ins: the patches do the work
        import open_clip_train.train, open_clip_train.zero_shot
        assert open_clip_train.train.evaluate.__module__ == 'open_clip_train.train'
        assert open_clip_train.zero_shot.run.__module__ == 'open_clip_train.zero_shot'
        from types import SimpleNamespace
        model = open_clip.create_model('Llip-Tiny')
        args = SimpleNamespace(model='Llip-Tiny', distill=False, siglip=False, horovod=False, rank=0, world_size=1,
                               loss_dist_impl=None)
        assert open_clip.create_loss.__module__ == 'open_clip.factory'  # the patched one, not a shim
        print(open_clip.__file__)
        print(type(model).__name__, sorted(m for m in open_clip.list_models() if m.startswith('Llip')))
        print(type(open_clip.create_loss(args)).__name__)
    """)
    assert result.returncode == 0, result.stderr
    location, built, loss = result.stdout.splitlines()[:3]
    assert location == str(patched_open_clip / 'src' / 'open_clip' / '__init__.py')
    assert built.startswith("LlipModel ['Llip-Tiny', 'Llip-ViT-B-16'")
    assert loss == 'LlipLoss'


def test_patched_open_clip_evaluates_llip_with_its_similarity(patched_open_clip, tmp_path):
    from conftest import write_retrieval_csv
    val_csv, _ = write_retrieval_csv(tmp_path)
    result = run(patched_open_clip, '-m', 'open_clip_train.main', '--model', 'Llip-Tiny', '--val-data', str(val_csv),
                 '--dataset-type', 'csv', '--batch-size', '4', '--workers', '0', '--precision', 'fp32',
                 '--logs', str(tmp_path / 'logs'), '--name', 'eval')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'image_to_text_R@1' in (tmp_path / 'logs' / 'eval' / 'checkpoints' / 'results.jsonl').read_text()

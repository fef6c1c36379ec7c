"""The patches in patches/ apply to the installed OpenCLIP, pass their own tests, and make OpenCLIP find us;
those for CLIP_benchmark apply to the installed CLIP_benchmark, pass their own tests, and make it score Llip itself.

``patches/open_clip-3.3.0`` is made against OpenCLIP 3.3.0, ``patches/open_clip-main`` against its
main branch at 89fb801 (4.2.0.dev0); the test takes the series of
the installed version. With a patched OpenCLIP, none of our adapters may replace anything.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

SERIES = {'3.3.0': 'open_clip-3.3.0', '4.2.0.dev0': 'open_clip-main'}
PATCHES = Path(__file__).resolve().parents[1] / 'patches'
IS_MAIN = open_clip.__version__.startswith('4.')


@pytest.fixture(scope='module')
def patched_open_clip(tmp_path_factory):
    """A copy of the installed OpenCLIP in an upstream-shaped tree (src/open_clip, src/open_clip_train), patched."""
    import open_clip_train
    if open_clip.__version__ not in SERIES:
        pytest.skip(f'patches/ has series for OpenCLIP {sorted(SERIES)}, installed is {open_clip.__version__}')
    root = tmp_path_factory.mktemp('open_clip')
    for package in (open_clip, open_clip_train):
        shutil.copytree(Path(package.__file__).parent, root / 'src' / package.__name__,
                        ignore=shutil.ignore_patterns('__pycache__'))
    for patch in sorted((PATCHES / SERIES[open_clip.__version__]).glob('*.patch')):
        subprocess.run(['git', 'apply', '--whitespace=nowarn', str(patch)], cwd=root, check=True)
    return root


def run(root, *command, **env):
    environ = dict(os.environ, PYTHONPATH=str(root / 'src'), OPEN_CLIP_LLIP_AUTOLOAD='0', **env)
    return subprocess.run([sys.executable, *command], cwd=root, env=environ, capture_output=True, text=True)


def test_patches_pass_their_own_tests(patched_open_clip):
    result = run(patched_open_clip, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests')
    assert result.returncode == 0, result.stdout + result.stderr


def test_patched_open_clip_discovers_llip_through_its_entry_point(patched_open_clip):
    """Autoload off: only the entry point can register Llip, and no adapter replaces anything."""
    run_name = 'run_zero_shot_classifier' if IS_MAIN else 'run'
    result = run(patched_open_clip, '-c', f"""if True:
        import open_clip
        from open_clip.model import CLIP
        import open_clip_train.main, open_clip_train.train, open_clip_train.zero_shot
        main, wrappers = open_clip_train.main.main, []  # model_kwargs, which has no patch, may wrap it
        while hasattr(main, '__wrapped__'):
            main, wrappers = main.__wrapped__, wrappers + [main.__module__]
        assert main.__module__ == 'open_clip_train.main'  # saved whole, resumed safely by the patch
        assert 'open_clip_llip.integration.adapters.safe_checkpoints' not in wrappers, wrappers
        assert open_clip.factory.CLIP is CLIP  # no stand-ins: the patches do the work
        import torch
        assert torch.nn.parallel.DistributedDataParallel.__init__.__module__ == 'torch.nn.parallel.distributed'
        import importlib
        hub = importlib.import_module('open_clip.push_to_hf_hub')
        for function in (open_clip.create_model, open_clip.load_checkpoint, open_clip.create_loss,
                         open_clip.build_zero_shot_classifier, open_clip_train.train.evaluate,
                         open_clip_train.zero_shot.{run_name}, getattr(open_clip, 'create_task', open_clip.create_loss),
                         open_clip.push_to_hf_hub, hub.save_config_for_hf, open_clip.factory.download_pretrained):
            assert not function.__module__.startswith('open_clip_llip'), function
        assert ('Llip-ViT-B-16', 'llip_b16_k32') in open_clip.list_pretrained()  # through register_pretrained
        from types import SimpleNamespace
        model = open_clip.create_model('Llip-Tiny')
        args = SimpleNamespace(model='Llip-Tiny', distill=False, siglip=False, rank=0, world_size=1, loss_dist_impl=None)
        print(open_clip.__file__)
        print(type(model).__name__, sorted(m for m in open_clip.list_models() if m.startswith('Llip')))
        print(type(open_clip.create_loss(args)).__name__)
        if hasattr(open_clip, 'create_task'):
            print(type(open_clip.create_task(args, model).loss).__name__)
    """)
    assert result.returncode == 0, result.stderr
    location, built, *losses = result.stdout.splitlines()
    assert location == str(patched_open_clip / 'src' / 'open_clip' / '__init__.py')
    assert built.startswith("LlipModel ['Llip-Tiny', 'Llip-ViT-B-16'")
    assert losses == ['LlipLoss'] * (2 if IS_MAIN else 1)


def test_patched_open_clip_trains_and_evaluates_llip_with_its_similarity(patched_open_clip, tmp_path):
    from conftest import write_retrieval_csv
    val_csv, _ = write_retrieval_csv(tmp_path)
    result = run(patched_open_clip, '-m', 'open_clip_train.main', '--model', 'Llip-Tiny', '--train-data', str(val_csv),
                 '--val-data', str(val_csv), '--dataset-type', 'csv', '--batch-size', '4', '--epochs', '1', '--workers', '0',
                 '--precision', 'fp32', '--logs', str(tmp_path / 'logs'), '--name', 'run', CUDA_VISIBLE_DEVICES='')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'training with LlipLoss' in (tmp_path / 'logs' / 'run' / 'out.log').read_text()
    assert 'image_to_text_R@1' in (tmp_path / 'logs' / 'run' / 'checkpoints' / 'results.jsonl').read_text()


# CLIP_benchmark: patches/clip_benchmark-1.6.1 against its v1.6.1 tag, patches/clip_benchmark-main against its main
# branch at 48de38c (identical to the 1.6.2 wheel); the test takes the series of the installed version.
CLIP_BENCHMARK_SERIES = {'1.6.1': 'clip_benchmark-1.6.1', '1.6.2': 'clip_benchmark-main'}


@pytest.fixture(scope='module')
def patched_clip_benchmark(tmp_path_factory):
    """A copy of the installed CLIP_benchmark in its repository's layout (clip_benchmark/, tests/), patched."""
    from importlib.metadata import version
    clip_benchmark = pytest.importorskip('clip_benchmark', reason="CLIP_benchmark is not installed (the 'benchmark' extra)")
    installed = version('clip_benchmark')
    if installed not in CLIP_BENCHMARK_SERIES:
        pytest.skip(f'patches/ has series for CLIP_benchmark {sorted(CLIP_BENCHMARK_SERIES)}, installed is {installed}')
    root = tmp_path_factory.mktemp('clip_benchmark')
    shutil.copytree(Path(clip_benchmark.__file__).parent, root / 'clip_benchmark',
                    ignore=shutil.ignore_patterns('__pycache__'))
    for patch in sorted((PATCHES / CLIP_BENCHMARK_SERIES[installed]).glob('*.patch')):
        subprocess.run(['git', 'apply', '--whitespace=nowarn', str(patch)], cwd=root, check=True)
    return root


def run_with_clip_benchmark(root, *command):
    """Python with the patched CLIP_benchmark first on the path (and Llip activated as usual)."""
    return subprocess.run([sys.executable, *command], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True)


def test_clip_benchmark_patches_pass_their_own_tests(patched_clip_benchmark):
    result = run_with_clip_benchmark(patched_clip_benchmark, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests')
    assert result.returncode == 0, result.stdout + result.stderr
    assert '8 passed' in result.stdout


def test_patched_clip_benchmark_scores_llip_itself(patched_clip_benchmark, checkpoint, tmp_path):
    """No scoring adaptation inside llip_support(), and CLIP_benchmark's own command gives open_clip_llip eval's numbers."""
    from test_benchmark import REFUSED_TASKS, assert_same_numbers, clip_benchmark_args, eval_command_metrics, write_data
    data = write_data(tmp_path / 'data')
    runs = {dataset: clip_benchmark_args(data, checkpoint, dataset, tmp_path / f'{dataset}.json')
            for dataset in ('zeroshot', 'wds')}
    result = run_with_clip_benchmark(patched_clip_benchmark, '-c', f"""if True:
        import json, sys
        from clip_benchmark.cli import main
        from clip_benchmark.metrics import (
            {', '.join(REFUSED_TASKS)}, linear_probe, zeroshot_classification, zeroshot_retrieval)
        from open_clip_llip.integration.clip_benchmark import llip_support
        assert zeroshot_classification.__file__.startswith({str(patched_clip_benchmark)!r})
        modules = [{', '.join(REFUSED_TASKS)}, linear_probe, zeroshot_classification, zeroshot_retrieval]
        before = [dict(vars(module)) for module in modules]
        with llip_support():  # only the linear probe and the refusals of the tasks without Llip scores
            changed = sorted(f'{{module.__name__}}.{{name}}' for module, names in zip(modules, before)
                             for name, value in vars(module).items() if names.get(name) is not value)
        print(json.dumps(changed))
        for args in {list(runs.values())!r}:  # CLIP_benchmark's own command, its scoring tasks not routed
            sys.argv = ['clip_benchmark', *args]
            main()
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[0]) == [f'clip_benchmark.metrics.{task}.evaluate'
                                                          for task in sorted(('linear_probe', *REFUSED_TASKS))]
    for dataset in runs:
        theirs = json.loads((tmp_path / f'{dataset}.json').read_text())['metrics']
        assert_same_numbers(theirs, eval_command_metrics(data, checkpoint, dataset, tmp_path), dataset)

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import open_clip_llip

REPO = Path(__file__).resolve().parents[1]
# Golden tensors made with the authors' code; tests/data/README.md says what each file is.
REFERENCE = REPO / 'tests' / 'data'
GOLDEN_NAMES = ('tiny', 'tiny-norm')

# Tests spawn fresh interpreters: keep them on the CPU and quiet.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


EPS32 = 2 ** -24  # fp32 unit round-off


def batching_atol(model, value: torch.Tensor) -> float:
    """How far fp32 round-off may move ``value`` when it is computed in other batches.

    Batches of other sizes may run through differently blocked matmul kernels, which sum the same
    terms in another order. A sum of n terms reordered moves by at most n · EPS32 · Σ|terms|,
    whatever the size of the result itself (so a relative tolerance is wrong for entries near zero).
    Σ|terms| is at most the tensor's largest entry: exactly for a Gram matrix (Cauchy–Schwarz:
    Σ_k |Ṽ_ik Ṽ_jk| <= sqrt(G_ii G_jj)), and for keys, values, queries and text embeddings because
    they are projections of LayerNorm'd activations of that scale. n is the longest reduction in the
    model (the MLPs' hidden width). The bound grows with n, typical round-off with sqrt(n), which
    leaves room for the earlier layers' round-off.
    """
    n = max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return n * EPS32 * value.abs().max().item()


def reference_config(name: str) -> dict:
    """Our model config for a golden reference model (``model_class`` left out)."""
    raw = json.loads((REFERENCE / f'{name}.config.json').read_text())
    cfg = open_clip_llip.convert_authors_config(raw['model_cfg'], raw['weight_scale'])
    cfg.pop('model_class')
    return cfg


def reference_model(name: str) -> open_clip_llip.LlipModel:
    """The golden weights, loaded from the authors' released layout (``NAME.release-layout.pt``)."""
    model = open_clip_llip.LlipModel(**reference_config(name), output_dict=True)
    model.load_checkpoint(str(REFERENCE / f'{name}.release-layout.pt'))
    return model


def reference_tensors(name: str, kind: str) -> dict:
    return load_file(REFERENCE / f'{name}.{kind}.safetensors')


@pytest.fixture(params=GOLDEN_NAMES)
def golden_name(request):
    if not REFERENCE.is_dir():
        pytest.fail(f'golden reference tensors not found at {REFERENCE}')
    return request.param


@pytest.fixture
def register_config(tmp_path):
    """Register model configs with open_clip for one test: ``register_config(name, cfg)``."""
    from open_clip import factory
    added = []

    def register(name: str, cfg: dict):
        path = tmp_path / f'{name}.json'
        path.write_text(json.dumps(cfg))
        factory.add_model_config(path)
        added.append((name, path))

    yield register
    for name, path in added:
        factory._MODEL_CONFIG_PATHS.remove(path)
        factory._MODEL_CONFIGS.pop(name, None)


@pytest.fixture(scope='session')
def checkpoint(tmp_path_factory):
    """A randomly initialised Llip-Tiny saved as open_clip_train saves a state dict: a file to evaluate."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp('checkpoint') / 'llip-tiny.pt'
    torch.save(open_clip.create_model('Llip-Tiny').state_dict(), path)
    return path


def write_retrieval_csv(folder, count=12, seed=1, captions_per_image=1, name='val.csv'):
    """A tiny OpenCLIP CSV retrieval set (tab-separated filepath, title): random images, distinct captions.

    With ``captions_per_image`` > 1, each image's rows follow one another, one caption each."""
    import csv

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    names = ['goldfish', 'tench', 'shark', 'hen', 'ostrich', 'owl']
    rows = []
    for index in range(count):
        path = folder / 'images' / f'{index}.png'
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        for caption in range(captions_per_image):
            rows.append({'filepath': str(path), 'title': f'a {names[(index + caption) % 6]} next to {index + 1} '
                                                         f'{names[(index * 5 + caption) % 6]}s'})
    with open(folder / name, 'w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=['filepath', 'title'], delimiter='\t')
        writer.writeheader()
        writer.writerows(rows)
    return folder / name, rows


def _logging_levels():
    """The root logger's level and every other logger's, by name."""
    import logging
    return logging.root.level, {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                                if isinstance(logger, logging.Logger)}


def _set_logging_levels(levels):
    """Levels as ``_logging_levels`` gave them; a logger made since then gets NOTSET (its parent's)."""
    import logging
    root_level, by_name = levels
    logging.root.setLevel(root_level)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(by_name.get(name, logging.NOTSET))


@pytest.fixture(scope='session', autouse=True)
def quiet_logging_at_exit():
    """Every logger's level as it was before the suite, once it has run: open_clip_train's main and the commands'
    ``logging.basicConfig``, run in-process by module fixtures, leave loggers at INFO, and torch reports its
    compilations at INFO when the interpreter exits."""
    levels = _logging_levels()
    yield
    _set_logging_levels(levels)


@pytest.fixture
def restore_logging():
    """open_clip_train's main adds handlers to the root logger and sets every logger to its level: undo both."""
    import logging
    handlers = list(logging.root.handlers)
    levels = _logging_levels()
    yield
    for handler in set(logging.root.handlers) - set(handlers):
        logging.root.removeHandler(handler)
        handler.close()
    _set_logging_levels(levels)

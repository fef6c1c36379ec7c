import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import open_clip_llip

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / 'shared' / 'llip' / 'reference'
GOLDEN_NAMES = ('tiny', 'tiny-norm')

# Tests spawn fresh interpreters: keep them on the CPU and quiet.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


def reference_config(name: str) -> dict:
    """Our model config for a golden reference model (``model_class`` left out)."""
    raw = json.loads((REFERENCE / f'{name}.config.json').read_text())
    cfg = open_clip_llip.convert_authors_config(raw['model_cfg'], raw['weight_scale'])
    cfg.pop('model_class')
    return cfg


def reference_model(name: str) -> open_clip_llip.LlipModel:
    model = open_clip_llip.LlipModel(**reference_config(name))
    model.load_checkpoint(str(REFERENCE / f'{name}.state_dict.safetensors'))
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

"""The shipped configs match docs/method.md (Configurations) and, parameter for parameter, the authors' checkpoints."""
import json
import math

import open_clip
import pytest
import torch
from conftest import REFERENCE

from open_clip_llip import LlipModel, llip_model_names
from open_clip_llip.modeling.checkpoint import convert_state_dict
from open_clip_llip.modeling.config import CONFIG_RECORD_KEY

# config -> (the authors' checkpoint layout, K, D, τ, norm), docs/method.md (Configurations).
PAPER_CONFIGS = {
    'Llip-ViT-B-32': ('llip_b32_k64', 64, 512, 5.0, False),
    'Llip-ViT-B-16': ('llip_b16_k32', 32, 512, 5.0, False),
    'Llip-ViT-L-14': ('llip_l14_k32', 32, 768, 1.0, False),
    'Llip-ViT-H-14': ('llip_h14_k64', 64, 1024, 5.0, True),
    'Llip-ViT-G-14': ('llip_G14_k64', 64, 1280, 5.0, True),
}


@pytest.fixture(scope='module')
def official_layouts():
    return json.loads((REFERENCE / 'official_checkpoint_layouts.json').read_text())


def test_every_config_is_listed():
    assert sorted(llip_model_names()) == sorted([*PAPER_CONFIGS, 'Llip-Tiny'])


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_config_matches_method_and_official_layout(name, official_layouts):
    layout_name, tokens, embed_dim, temperature, norm = PAPER_CONFIGS[name]
    cfg = open_clip.get_model_config(name)
    assert (cfg['llip_cfg']['mixture_tokens'], cfg['embed_dim'], cfg['llip_cfg']['temperature'],
            cfg['llip_cfg']['norm'], cfg['llip_cfg']['heads']) == (tokens, embed_dim, temperature, norm, 8)
    # The authors' initialisation: their configs' logit bias, their model's default logit scale log(1 / 0.07).
    assert cfg['quick_gelu'] and cfg['init_logit_bias'] == -10 and cfg['init_logit_scale'] == math.log(1 / 0.07)

    layout = official_layouts[layout_name]
    cfg.pop('model_class')
    with torch.device('meta'):
        model = LlipModel(**cfg)
        official = convert_state_dict(
            {key: torch.empty(shape) for key, shape in layout['state_dict'].items()}, model)
    ours = model.state_dict()
    assert ours.pop(CONFIG_RECORD_KEY).device.type == 'cpu'  # our record of the config, not in the authors' layout
    assert ours.keys() == official.keys()
    for key, tensor in ours.items():
        assert tensor.shape == official[key].shape, key
    assert sum(p.numel() for p in model.parameters()) == layout['num_params']


def test_tiny_config_is_tiny():
    model = open_clip.create_model('Llip-Tiny')
    assert isinstance(model, LlipModel)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000

"""Bad input gets an error that says what was wrong and where."""
import copy

import pytest
import torch

import open_clip
from open_clip_llip import LlipModel


@pytest.fixture(scope='module')
def model():
    return open_clip.create_model('Llip-Tiny').eval()


@pytest.mark.parametrize('shape, dtype', [
    ((2, 1, 32, 32), torch.float32),  # channels
    ((2, 3, 64, 64), torch.float32),  # size
    ((3, 32, 32), torch.float32),  # no batch dimension
    ((2, 3, 32, 32), torch.uint8),  # raw pixels
])
def test_bad_images(model, shape, dtype):
    with pytest.raises(ValueError, match=r'expects float images of shape \[N, 3, 32, 32\]'):
        model.encode_image(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize('shape, dtype', [
    ((2, 32), torch.float32),  # not token ids
    ((2, 16), torch.long),  # another context length
    ((32,), torch.long),  # no batch dimension
])
def test_bad_texts(model, shape, dtype):
    with pytest.raises(ValueError, match=r'expects integer token ids of shape \[M, 32\].*get_tokenizer'):
        model.encode_text(torch.zeros(shape, dtype=dtype))


def tiny_config(**changes):
    cfg = open_clip.get_model_config('Llip-Tiny')
    cfg.pop('model_class')
    for path, value in changes.items():
        section, _, key = path.rpartition('__')
        (cfg[section] if section else cfg)[key] = value
    return cfg


@pytest.mark.parametrize('changes, message', [
    ({'llip_cfg__heads': 3}, r'embed_dim \(D = 64\) must be divisible by llip_cfg.heads \(H = 3\)'),
    ({'llip_cfg__mixture_tokens': 0}, r'mixture_tokens \(K\) must be at least 1, got 0'),
    ({'llip_cfg__temperature': 0.}, r'temperature \(τ\) must be positive'),
    ({'llip_cfg__mixture_token': 8}, r"llip_cfg has unknown key\(s\) \['mixture_token'\]"),
    ({'vision_cfg__widht': 8}, r"vision_cfg has unknown key\(s\) \['widht'\]"),
    ({'text_cfg__heads_': 8}, r"text_cfg has unknown key\(s\) \['heads_'\]"),
    ({'vision_cfg__attentional_pool': True}, r'vision_cfg.attentional_pool = True is not supported'),
    ({'vision_cfg__timm_model_name': 'vit_base_patch16_224'}, r'vision_cfg.timm_model_name'),
    ({'vision_cfg__layers': [3, 4, 6, 3]}, r'describes a ResNet'),
    ({'text_cfg__hf_model_name': 'bert-base-uncased'}, r"text_cfg.hf_model_name .* OpenCLIP's own text transformer"),
    ({'text_cfg__proj_type': 'none'}, r"text_cfg.proj_type = 'none'"),
    ({'init_logit_bias': None}, r'init_logit_bias must not be None'),
])
def test_impossible_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        LlipModel(**tiny_config(**changes))


def test_config_errors_surface_through_create_model(register_config):
    cfg = copy.deepcopy(open_clip.get_model_config('Llip-Tiny'))
    cfg['llip_cfg']['heads'] = 5
    register_config('Llip-Broken', cfg)
    with pytest.raises(ValueError, match=r'llip_cfg.heads \(H = 5\)'):
        open_clip.create_model('Llip-Broken')


def test_unknown_model_class(register_config):
    cfg = dict(open_clip.get_model_config('Llip-Tiny'), model_class='NoSuchModel')
    register_config('Llip-Unknown-Class', cfg)
    with pytest.raises(RuntimeError, match=r"model_class 'NoSuchModel', which no installed plugin registers"):
        open_clip.create_model('Llip-Unknown-Class')

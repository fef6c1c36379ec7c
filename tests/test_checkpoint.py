"""create_model(..., pretrained=PATH) loads our, the authors' and OpenCLIP CLIP checkpoints."""
import copy
import logging

import pytest
import torch

import open_clip
from open_clip_llip import LlipModel


def tiny():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny')


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class NotATensor:
    pass


@pytest.mark.parametrize('prefix', ['', 'module.', '_orig_mod.', 'module._orig_mod.'])
def test_open_clip_train_checkpoint(tmp_path, prefix):
    """What open_clip_train saves: {'epoch', 'name', 'state_dict', 'optimizer'}, DDP / compile prefixes."""
    model = tiny()
    path = tmp_path / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'run', 'state_dict': {prefix + k: v for k, v in model.state_dict().items()},
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    torch.manual_seed(1)
    loaded = open_clip.create_model('Llip-Tiny', pretrained=str(path))
    assert_same_state(loaded, model)
    loaded, preprocess = open_clip.create_model_from_pretrained('Llip-Tiny', pretrained=str(path))
    assert_same_state(loaded, model)


def clip_twin_config(image_size=32):
    """An OpenCLIP CLIP config with Llip-Tiny's towers."""
    cfg = copy.deepcopy(open_clip.get_model_config('Llip-Tiny'))
    del cfg['model_class'], cfg['llip_cfg'], cfg['init_logit_bias']
    cfg['vision_cfg']['image_size'] = image_size
    return cfg


@pytest.mark.parametrize('custom_text', [False, True])
def test_clip_checkpoint_initialises_llip(tmp_path, caplog, custom_text):
    torch.manual_seed(2)
    clip_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    clip = clip_class(**clip_twin_config())
    path = tmp_path / 'clip.pt'
    torch.save(clip.state_dict(), path)
    fresh = tiny()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        model = open_clip.create_model('Llip-Tiny', pretrained=str(path))

    clip_state = open_clip.model.convert_to_custom_text_state_dict(clip.state_dict())
    ours = model.state_dict()
    for key, value in clip_state.items():
        if key not in ('visual.class_embedding', 'visual.positional_embedding', 'visual.proj'):
            assert torch.equal(ours[key], value), key
    tokens = model.visual.num_prefix_tokens
    assert torch.equal(ours['visual.class_embedding'], clip.visual.class_embedding.expand(tokens, -1))
    positions = clip.visual.positional_embedding
    assert torch.equal(ours['visual.positional_embedding'], torch.cat([positions[:1].expand(tokens, -1), positions[1:]]))
    new = ['logit_bias', 'visual.k_proj', 'visual.v_proj', 'query_head.q_proj', 'mixer.out_proj']
    for key in new:
        assert torch.equal(ours[key], fresh.state_dict()[key]), key
    message = next(r.getMessage() for r in caplog.records if 'CLIP checkpoint' in r.getMessage())
    assert 'initialised fresh: ' + ', '.join(new) in message


def test_clip_checkpoint_of_another_image_size_is_resized(tmp_path):
    clip = open_clip.CLIP(**clip_twin_config(image_size=64))
    path = tmp_path / 'clip64.pt'
    torch.save(clip.state_dict(), path)
    model = open_clip.create_model('Llip-Tiny', pretrained=str(path))
    tokens = model.visual.num_prefix_tokens
    assert model.visual.positional_embedding.shape[0] == tokens + 8 * 8
    assert torch.equal(model.visual.positional_embedding[:tokens], clip.visual.positional_embedding[:1].expand(tokens, -1))


def test_llip_checkpoint_at_another_image_size_keeps_mixture_positions(tmp_path):
    model = tiny()
    path = tmp_path / 'llip.pt'
    torch.save(model.state_dict(), path)
    bigger = open_clip.create_model('Llip-Tiny', pretrained=str(path), force_image_size=64)
    tokens = model.visual.num_prefix_tokens
    assert bigger.visual.positional_embedding.shape[0] == tokens + 16 * 16
    assert torch.equal(bigger.visual.positional_embedding[:tokens], model.visual.positional_embedding[:tokens])
    assert torch.equal(bigger.visual.k_proj, model.visual.k_proj)


def test_checkpoint_of_another_architecture(tmp_path, register_config):
    cfg = copy.deepcopy(open_clip.get_model_config('Llip-Tiny'))
    cfg['llip_cfg']['mixture_tokens'] = 4
    register_config('Llip-Tiny-K4', cfg)
    path = tmp_path / 'k8.pt'
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ValueError, match=r'k8.pt: The checkpoint was made for another architecture \(8 image token.*'
                                         r'visual.k_proj: \[8, 64, 64\] in the checkpoint, \[4, 64, 64\] in the model'):
        open_clip.create_model('Llip-Tiny-K4', pretrained=str(path))


def test_checkpoint_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / 'pickled.pt'
    torch.save({'state_dict': tiny().state_dict(), 'extra': NotATensor()}, path)
    with pytest.raises(ValueError, match=r'holds a Python object \(test_checkpoint.NotATensor\) that only running code could rebuild, so weights_only=True refuses'):
        open_clip.create_model('Llip-Tiny', pretrained=str(path))


@pytest.mark.parametrize('content, message', [
    (b'not a checkpoint', r'Could not read .* as a checkpoint: it is corrupt or not a PyTorch file'),
    ({}, r'does not hold a state dict'),
    ({'fc.weight': torch.zeros(2, 2)}, r"neither a Llip checkpoint .* first keys are \['fc.weight'\]"),
])
def test_files_that_are_not_llip_checkpoints(tmp_path, content, message):
    path = tmp_path / 'bad.pt'
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        open_clip.create_model('Llip-Tiny', pretrained=str(path))


def test_model_load_checkpoint_method(tmp_path):
    model = tiny()
    path = tmp_path / 'm.pt'
    torch.save(model.state_dict(), path)
    other = LlipModel(**{k: v for k, v in open_clip.get_model_config('Llip-Tiny').items() if k != 'model_class'})
    other.load_checkpoint(str(path))
    assert_same_state(other, model)

"""create_model(..., pretrained=PATH) loads our, the authors' and OpenCLIP CLIP checkpoints."""
import copy
import logging

import open_clip
import pytest
import torch

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
    with pytest.raises(ValueError, match=r'k8.pt: The checkpoint was made for another architecture \(K = 8 mixture tokens.*'
                                         r'visual.k_proj: \[8, 64, 64\] in the checkpoint, \[4, 64, 64\] in the model'):
        open_clip.create_model('Llip-Tiny-K4', pretrained=str(path))


def test_checkpoint_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / 'pickled.pt'
    torch.save({'state_dict': tiny().state_dict(), 'extra': NotATensor()}, path)
    with pytest.raises(ValueError, match=r'holds a Python object \(test_checkpoint.NotATensor\) that only running code '
                                         r'could rebuild, so weights_only=True refuses'):
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


def test_force_context_length_resizes_the_text_positions_of_a_checkpoint(tmp_path):
    """As OpenCLIP's loader does for a CLIP: the positions are interpolated to the forced context length."""
    model = tiny()
    path = tmp_path / 'llip.pt'
    torch.save(model.state_dict(), path)
    loaded = open_clip.create_model('Llip-Tiny', pretrained=str(path), force_context_length=8)
    assert loaded.context_length == 8 and loaded.text.positional_embedding.shape == (8, 64)
    expected = torch.nn.functional.interpolate(model.text.positional_embedding.detach().T[None], size=8, mode='linear')
    torch.testing.assert_close(loaded.text.positional_embedding.detach(), expected[0].T)
    assert torch.equal(loaded.visual.k_proj, model.visual.k_proj)


def other_llip(tmp_path, name, **changes):
    """A checkpoint of Llip-Tiny with other llip_cfg values (the same tensor shapes, for H and τ)."""
    cfg = copy.deepcopy(open_clip.get_model_config('Llip-Tiny'))
    cfg.pop('model_class')
    cfg['llip_cfg'].update(changes)
    path = tmp_path / f'{name}.pt'
    torch.save({'epoch': 1, 'state_dict': LlipModel(**cfg).state_dict()}, path)
    return path


@pytest.mark.parametrize('changes, recorded', [
    ({'heads': 2}, r'K = 8, H = 2, τ = 5.0, norm = False'),
    ({'temperature': 1.0}, r'K = 8, H = 4, τ = 1.0, norm = False'),
])
def test_a_checkpoint_records_its_llip_config_and_another_is_refused(tmp_path, changes, recorded):
    """H and τ show in no tensor shape: the checkpoint's recorded config is compared with the model's."""
    path = other_llip(tmp_path, 'other', **changes)
    with pytest.raises(ValueError, match=rf'These weights were made for a Llip model with {recorded}, but this model '
                                         r'has K = 8, H = 4, τ = 5.0, norm = False\. Create the model from a config '
                                         r'with llip_cfg \{'):
        open_clip.create_model('Llip-Tiny', pretrained=str(path))
    with pytest.raises(ValueError, match=rf'made for a Llip model with {recorded}'):  # any load_state_dict
        tiny().load_state_dict(torch.load(path, weights_only=True)['state_dict'])


def test_checkpoints_that_record_no_config_load_as_before(tmp_path):
    """Ours from before the record, like the authors' and CLIP checkpoints, take the model's record."""
    model = tiny()
    state = model.state_dict()
    del state['llip_cfg_json']
    path = tmp_path / 'old.pt'
    torch.save(state, path)
    assert_same_state(open_clip.create_model('Llip-Tiny', pretrained=str(path)), model)
    fresh = tiny()
    fresh.load_state_dict(state)  # strict: the record is filled in, not missing
    assert_same_state(fresh, model)


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, value):
    state = tiny().state_dict()
    state['mixer.out_proj'][0, 0] = value
    state['text.ln_final.bias'][3] = value
    path = tmp_path / 'diverged.pt'
    torch.save(state, path)
    with pytest.raises(ValueError, match=r'2 tensor\(s\) of these weights hold NaN or infinite values: '
                                         r'text.ln_final.bias, mixer.out_proj\. Load a checkpoint saved before'):
        open_clip.create_model('Llip-Tiny', pretrained=str(path))


def authors_layout_state(model):
    """``model``'s weights renamed to the authors' released layout (docs/method.md, released checkpoints)."""
    names = {'visual.k_proj': 'k_proj', 'visual.v_proj': 'v_proj', 'query_head.q_proj': 'q_proj',
             'mixer.out_proj': 'pred.out_proj'}
    state = {}
    for key, value in model.state_dict().items():
        if key == 'llip_cfg_json':
            continue
        key = names.get(key, key)
        state['module.' + (key[len('text.'):] if key.startswith('text.') else key)] = value
    return {'epoch': 32, 'state_dict': state}


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('kind', ['ours', 'authors', 'clip'])
def test_half_precision_checkpoints_of_every_kind_load(tmp_path, dtype, kind):
    """Even where positions are resized (another image size), which the CPU cannot interpolate in fp16."""
    if kind == 'clip':
        torch.manual_seed(2)
        source = open_clip.CLIP(**clip_twin_config(image_size=64))
        state = source.state_dict()
    else:
        cfg = copy.deepcopy(open_clip.get_model_config('Llip-Tiny'))
        cfg.pop('model_class')
        cfg['vision_cfg']['image_size'] = 64
        torch.manual_seed(3)
        source = LlipModel(**cfg)
        state = source.state_dict() if kind == 'ours' else authors_layout_state(source)
    half = {key: value.to(dtype) if value.is_floating_point() else value
            for key, value in (state['state_dict'] if 'state_dict' in state else state).items()}
    path = tmp_path / f'{kind}.pt'
    torch.save({'state_dict': half}, path)
    model = open_clip.create_model('Llip-Tiny', pretrained=str(path))
    text_width = model.text.text_projection.shape[0]
    expected = source.text.text_projection if kind != 'clip' or hasattr(source, 'text') else source.text_projection
    torch.testing.assert_close(model.text.text_projection.detach(), expected.detach().to(dtype).float())
    assert model.visual.positional_embedding.shape[0] == 8 + 64 and text_width == 64
    assert model.visual.positional_embedding.dtype == torch.float32


def test_the_architecture_error_describes_a_clip_checkpoint_as_it_is(tmp_path):
    """A ViT-B/32-shaped CLIP into Llip-Tiny: its own class token, width, patch and D, not the model's."""
    cfg = open_clip.get_model_config('ViT-B-32')
    cfg['vision_cfg']['layers'] = cfg['text_cfg']['layers'] = 1  # the shapes that matter, quickly
    with torch.device('meta'):
        state = open_clip.CLIP(**cfg).state_dict()
    path = tmp_path / 'vit-b-32.pt'
    torch.save({key: torch.zeros(value.shape, dtype=torch.float16) for key, value in state.items()}, path)
    with pytest.raises(ValueError, match=r'made for another architecture \(a CLIP class token, vision width 768, '
                                         r'patch 32, 1 vision layers, D = 512, text width 512, 1 text layers\) than '
                                         r'this model \(K = 8 mixture tokens, vision width 64, patch 4'):
        open_clip.create_model('Llip-Tiny', pretrained=str(path))

"""Bad input gets an error that says what was wrong and where."""
import copy

import open_clip
import pytest
import torch

from open_clip_llip import LlipModel


@pytest.fixture(scope='module')
def model():
    return open_clip.create_model('Llip-Tiny', output_dict=True).eval()


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
    ((2, 16), torch.float32),  # not token ids
    ((2, 32), torch.long),  # another context length
    ((16,), torch.long),  # no batch dimension
])
def test_bad_texts(model, shape, dtype):
    with pytest.raises(ValueError, match=r'expects integer token ids of shape \[M, 16\].*get_tokenizer'):
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
    ({'llip_cfg__mixture_tokens': 0}, r'llip_cfg.mixture_tokens \(K\) must be a positive integer, got 0'),
    ({'llip_cfg__mixture_tokens': 8.0}, r'llip_cfg.mixture_tokens must be int, got 8.0'),
    ({'llip_cfg__norm': 'no'}, r"llip_cfg.norm must be bool, got 'no'"),
    ({'llip_cfg__temperature': 0.}, r'llip_cfg.temperature \(τ\) must be a finite positive number, got 0.0'),
    ({'llip_cfg__temperature': float('inf')}, r'llip_cfg.temperature \(τ\) must be a finite positive number, got inf'),
    ({'llip_cfg__temperature': '5'}, r"llip_cfg.temperature must be float, got '5'"),
    ({'embed_dim': 0}, r'embed_dim \(D\) must be a positive integer, got 0'),
    ({'quick_gelu': 'yes'}, r"quick_gelu must be true or false, got 'yes'"),
    ({'init_logit_bias': float('nan')}, r'init_logit_bias must be a finite number, got nan'),
    ({'vision_cfg__width': -64}, r'vision_cfg.width must be a positive integer, got -64'),
    ({'vision_cfg__head_width': 48}, r'vision_cfg.width \(64\) must be divisible by vision_cfg.head_width \(48\)'),
    ({'vision_cfg__image_size': [32, 0]}, r'vision_cfg.image_size must be a positive integer, got \[32, 0\]'),
    ({'vision_cfg__patch_dropout': 1.5}, r'vision_cfg.patch_dropout must be in \[0, 1\), got 1.5'),
    ({'text_cfg__context_length': '32'}, r"text_cfg.context_length must be int, got '32'"),
    ({'text_cfg__heads': 3}, r'text_cfg.width \(64\) must be divisible by text_cfg.heads \(3\)'),
    ({'llip_cfg': [8, 4]}, r'llip_cfg must be a JSON object \(a dict\), got \[8, 4\]'),
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


def test_every_problem_of_a_config_is_named_at_once():
    with pytest.raises(ValueError, match=r'Invalid Llip config: llip_cfg.heads must be int, got 4.0; '
                                         r'llip_cfg.norm must be bool, got 1; embed_dim \(D\) must be a positive '
                                         r'integer, got 64.5\.$'):
        LlipModel(**tiny_config(llip_cfg__norm=1, llip_cfg__heads=4.0, embed_dim=64.5))


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


def test_text_tower_options_that_build_another_clip_class_reach_llips_own_check(register_config):
    """An HF text tower makes OpenCLIP pick CustomTextCLIP: the config still reaches LlipModel's own check."""
    cfg = copy.deepcopy(open_clip.get_model_config('Llip-Tiny'))
    cfg['text_cfg']['hf_model_name'] = 'bert-base-uncased'
    register_config('Llip-HF-Text', cfg)
    with pytest.raises(ValueError, match=r"text_cfg.hf_model_name = 'bert-base-uncased'.* OpenCLIP's own text"):
        open_clip.create_model('Llip-HF-Text')
    assert isinstance(open_clip.create_model('Llip-Tiny', force_custom_text=True), LlipModel)


def tiny_batch(model, images, texts):
    torch.manual_seed(0)
    tokens = torch.randint(1, 1000, (texts, model.context_length))
    tokens[:, 5], tokens[:, 6:] = 49407, 0
    return torch.randn(images, 3, 32, 32), tokens


@pytest.mark.parametrize('images, texts', [(4, 3), (3, 4), (0, 0)])
def test_loss_refuses_unpaired_or_empty_batches(model, images, texts):
    from open_clip_llip import LlipLoss
    out = model(*tiny_batch(model, 4, 4))
    out.update(image_features=out['image_features'][:images], image_gram=out['image_gram'][:images],
               text_features=out['text_features'][:texts])
    with pytest.raises(ValueError, match=rf'LlipLoss needs a non-empty batch of image-text pairs: {images} image\(s\), '
                                         rf'{images} Gram matrices and {texts} text\(s\) given'):
        LlipLoss(model.mixer.temperature)(**out)


@pytest.mark.parametrize('images, texts', [(0, 2), (2, 0)])
def test_get_logits_refuses_empty_batches(model, images, texts):
    with pytest.raises(ValueError, match=rf'get_logits needs at least one image and one text; got {images} image\(s\) '
                                         rf'and {texts} text\(s\)'):
        model.get_logits(*tiny_batch(model, images, texts))


@pytest.mark.parametrize('token', [49408, -1])
def test_token_ids_outside_the_vocabulary(model, token):
    _, tokens = tiny_batch(model, 1, 2)
    tokens[1, 3] = token
    with pytest.raises(ValueError, match=r'Token ids must lie in \[0, 49408\) \(text_cfg.vocab_size\); these range '
                                         rf'from {min(token, 0)} to {max(token, 49407)}\. Tokenize with'):
        model.encode_text(tokens)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16, torch.bfloat16])
def test_float_images_of_another_dtype_are_cast_to_the_models(model, dtype):
    images, _ = tiny_batch(model, 2, 0)
    with torch.no_grad():
        expected = model.encode_image(images.to(dtype).float())
        got = model.encode_image(images.to(dtype))
    assert torch.equal(got, expected)

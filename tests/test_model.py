"""LlipModel keeps OpenCLIP's model contract and its ViT options."""
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import EPS32, batching_atol
from test_scoring import plain_cosine
from torch.utils._python_dispatch import TorchDispatchMode

from open_clip_llip import LlipLoss, LlipModel, conditioned_cosine, unpack_image

N, M = 6, 5


@pytest.fixture
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny', output_dict=True).eval()


def batch(model, n=N, m=M, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *model.visual.image_size, generator=generator)
    texts = torch.randint(1, 1000, (m, model.context_length), generator=generator)
    texts[:, 7] = model.vocab_size - 1  # EOT: the highest id, as CLIP's tokenizer guarantees
    texts[:, 8:] = 0
    return images, texts


def reference_logits(model, images, texts):
    """Plain Llip (``test_scoring.plain_cosine``, float64): materialise z[i|j] and take its cosine with t[j]."""
    keys, values = unpack_image(model.encode_image(images))
    features, queries = model.embed_text(texts)
    cosine = plain_cosine(keys, values, queries, features, model.mixer.out_proj, model.mixer.temperature)
    return (model.logit_scale.exp() * cosine + model.logit_bias).float()


def test_forward_returns_batch_first_tensors(model):
    images, texts = batch(model)
    out = model(images, texts)
    heads, tokens = model.mixer.heads, model.visual.num_prefix_tokens
    d = model.mixer.out_proj.shape[0] // heads
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        'image_features': (N, 2, heads, tokens, d), 'image_gram': (N, heads * tokens, heads * tokens),
        'text_features': (M, 2, heads, d), 'logit_scale': (), 'logit_bias': ()}
    keys, values = unpack_image(model.encode_image(images))
    features, queries = model.embed_text(texts)
    assert torch.equal(out['image_features'], torch.stack([keys, values], dim=1))
    torch.testing.assert_close(out['text_features'][:, 0], queries)  # raw: τ is applied when scoring
    torch.testing.assert_close(out['text_features'][:, 1], model.mixer.text_targets(features))
    assert model(image=images).keys() == {'image_features', 'image_gram', 'logit_scale', 'logit_bias'}
    assert model(text=texts).keys() == {'text_features', 'logit_scale', 'logit_bias'}


def test_micro_batch_outputs_concatenate_to_the_full_batch(model):
    """OpenCLIP's --accum-freq caches each micro-batch's outputs and torch.cat's them along dim 0."""
    images, texts = batch(model, N, N)
    with torch.no_grad():
        full = model(images, texts)
        halves = [model(images[:3], texts[:3]), model(images[3:], texts[3:])]
    # Round-off from the kernels' blocking, which may differ between a batch of 3 and one of 6: see batching_atol.
    for key, value in full.items():
        if key not in ('logit_scale', 'logit_bias'):
            torch.testing.assert_close(torch.cat([h[key] for h in halves]), value, rtol=0, atol=batching_atol(model, value),
                                       msg=lambda message, key=key: f'{key}: {message}')


def test_get_logits_matches_materialised_reference(model):
    images, texts = batch(model)
    image_logits, text_logits = model.get_logits(images, texts)
    assert image_logits.shape == (N, M) and text_logits.shape == (M, N)
    torch.testing.assert_close(image_logits, reference_logits(model, images, texts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_logits, image_logits.T)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_scores_and_loss_never_build_a_pairwise_embedding_tensor(model):
    """No [N, M, D] tensor: with blocks of 2 texts, nothing outgrows the largest input (the Gram)."""
    images, texts = batch(model, 48, 48)
    out = {k: v.detach().requires_grad_() for k, v in model(images, texts).items()}
    largest_input = max(v.numel() for v in out.values())
    assert largest_input < 48 * 48 * model.mixer.out_proj.shape[0]
    keys, values = out['image_features'].unbind(1)
    queries, targets = out['text_features'].unbind(1)
    with LargestTensor() as largest:
        conditioned_cosine(keys, values, out['image_gram'], queries, targets, model.mixer.temperature, block_size=2)
        LlipLoss(model.mixer.temperature, block_size=2)(**out).backward()
    assert 0 < largest.numel <= largest_input


def test_similarity_of_cpu_features_blocks_images_and_texts(model, monkeypatch):
    """As OpenCLIP's evaluation calls it: accumulated features, scored in blocks of images and texts."""
    import open_clip_llip.modeling.llip_model as llip_model
    images, texts = batch(model, 7, 5)
    with torch.no_grad():
        out = model(images, texts)
        expected = reference_logits(model, images, texts)
        monkeypatch.setattr(llip_model, '_GRAM_BLOCK_ELEMENTS', 2 * 32 * 32)  # two images per block
        cosine = model.similarity(out['image_features'], out['text_features'])
    torch.testing.assert_close(model.logit_scale.exp() * cosine + model.logit_bias, expected, rtol=1e-5, atol=1e-5)


def test_lock_image_tower_groups(model):
    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad and n.startswith('visual.')}

    model.lock_image_tower(unlocked_groups=0)
    assert trainable() == set()
    model.lock_image_tower(unlocked_groups=1)
    assert trainable() == {'visual.k_proj', 'visual.v_proj'}
    model.lock_image_tower(unlocked_groups=2)
    assert trainable() == {'visual.k_proj', 'visual.v_proj', 'visual.ln_post.weight', 'visual.ln_post.bias',
                           *{f'visual.{n}' for n, _ in model.visual.transformer.resblocks[-1].named_parameters(
                               prefix='transformer.resblocks.1')}}
    model.lock_image_tower(unlocked_groups=100)
    assert trainable() == {n for n, _ in model.named_parameters() if n.startswith('visual.')}


def test_lock_text_tower_locks_query_head_with_projection(model):
    model.lock_text_tower(unlocked_layers=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(('text.', 'query_head.')))
    assert model.mixer.out_proj.requires_grad and model.visual.k_proj.requires_grad
    model.lock_text_tower(unlocked_layers=1)
    unlocked = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(('text.', 'query_head.'))}
    assert unlocked == {'text.text_projection', 'query_head.q_proj'}


def test_grad_checkpointing_gives_the_same_gradients(model):
    images, texts = batch(model, 4, 4)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        LlipLoss(model.mixer.temperature)(**model(images, texts)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_patch_dropout_keeps_every_mixture_token():
    model = open_clip.create_model('Llip-Tiny', force_patch_dropout=0.5).train()
    images, _ = batch(model, 3, 3)
    lengths = []
    model.visual.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    model.visual.ln_pre.register_forward_hook(lambda module, args, out: lengths.append(args[0]))
    keys, values = unpack_image(model.encode_image(images))
    tokens, patches = model.visual.num_prefix_tokens, model.visual.grid_size[0] * model.visual.grid_size[1]
    assert lengths[1] == tokens + patches // 2
    # The mixture tokens enter the transformer first, unchanged by dropout.
    expected = model.visual.class_embedding + model.visual.positional_embedding[:tokens]
    torch.testing.assert_close(lengths[0][:, :tokens], expected.expand(3, -1, -1))
    assert keys.shape[2] == tokens and torch.isfinite(values).all()


def test_no_weight_decay_names_exist(model):
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and all(n in names for n in model.no_weight_decay())


def test_forward_intermediates_split_mixture_tokens(model):
    images, _ = batch(model, 2, 2)
    out = model.visual.forward_intermediates(images, indices=2, output_extra_tokens=True)
    tokens, grid = model.visual.num_prefix_tokens, model.visual.grid_size
    width = model.visual.conv1.out_channels
    assert [tuple(y.shape) for y in out['image_intermediates']] == [(2, width, *grid)] * 2
    assert [tuple(y.shape) for y in out['image_intermediates_prefix']] == [(2, tokens, width)] * 2
    keys, values = model.visual(images)
    torch.testing.assert_close(out['image_keys'], keys)
    torch.testing.assert_close(out['image_values'], values)


@pytest.mark.parametrize('precision', ['bf16', 'pure_bf16'])
def test_low_precision_models_run(precision):
    model = open_clip.create_model('Llip-Tiny', precision=precision).eval()
    images, texts = batch(model, 2, 2)
    dtype = torch.bfloat16
    image_logits, _ = model.get_logits(images.to(dtype), texts)
    assert torch.isfinite(image_logits).all()


def test_autocast_loss_is_finite(model):
    images, texts = batch(model, 4, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = LlipLoss(model.mixer.temperature)(**model.train()(images, texts))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_factory_overrides_and_transforms():
    model, train_transform, val_transform = open_clip.create_model_and_transforms(
        'Llip-Tiny', force_image_size=48, force_context_length=24)
    assert isinstance(model, LlipModel)
    assert model.visual.image_size == (48, 48) and model.context_length == 24
    assert model.visual.positional_embedding.shape[0] == model.visual.num_prefix_tokens + (48 // 4) ** 2
    from PIL import Image
    image = val_transform(Image.new('RGB', (100, 70)))
    assert image.shape == (3, 48, 48)
    tokenizer = open_clip.get_tokenizer('Llip-Tiny', context_length=24)
    keys, _ = unpack_image(model.encode_image(image[None]))
    features, _ = model.embed_text(tokenizer(['a red square']))
    assert keys.shape[0] == 1 and features.shape == (1, 64)


def test_similarity_scores_several_temperatures_from_one_gram_per_image(model, monkeypatch):
    """τ is applied when scoring: [T, N, M] for T temperatures, each equal to scoring at that τ alone."""
    images, texts = batch(model, 4, 3)
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(texts)
        grams = []
        stock_gram = model.mixer.image_gram
        monkeypatch.setattr(model.mixer, 'image_gram', lambda values: grams.append(len(values)) or stock_gram(values))
        swept = model.similarity(image_features, text_features, temperature=(1., 5., 20.))
        assert grams == [4]  # once per image, for all three temperatures
        keys, values = unpack_image(image_features)
        features, queries = model.embed_text(texts)
        for tau, scores in zip((1., 5., 20.), swept):
            z = model.mixer(keys, values, queries, temperature=tau)
            torch.testing.assert_close(scores, F.cosine_similarity(z, features[None], dim=-1), rtol=1e-5, atol=1e-6)
    assert swept.shape == (3, 4, 3)
    torch.testing.assert_close(model.similarity(image_features, text_features, 5.), swept[1])
    with pytest.raises(ValueError, match=r'Temperatures \(τ\) must be finite positive numbers, got \[0.0\]'):
        model.similarity(image_features, text_features, temperature=0.)


@pytest.mark.parametrize('encode', ['encode_image', 'encode_text'])
def test_normalize_has_a_clear_answer(model, encode):
    """OpenCLIP's everyday idiom: a Llip image (or text) is no single unit vector; the error says what to use."""
    images, texts = batch(model, 2, 2)
    with pytest.raises(ValueError, match=r'model.similarity\(.*get_logits|get_logits.*similarity'):
        getattr(model, encode)(images if encode == 'encode_image' else texts, normalize=True)


def test_non_contextual_mixing_weighs_every_token_alike_for_every_text():
    """The paper's control: llip_cfg.contextual = false, no query head, uniform mixing in every scoring path."""
    from test_bad_input import tiny_config
    torch.manual_seed(0)
    model = LlipModel(**tiny_config(llip_cfg__contextual=False), output_dict=True).eval()
    assert model.query_head is None and not any(name.startswith('query_head') for name, _ in model.named_parameters())
    images, texts = batch(model, 5, 4)
    with torch.no_grad():
        keys, values = unpack_image(model.encode_image(images))
        features, queries = model.embed_text(texts)
        assert not queries.any()
        weights = model.mixer.attention(keys, queries)
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / model.visual.num_prefix_tokens))
        z = (values.mean(dim=2).flatten(1) @ model.mixer.out_proj)[:, None]  # the same embedding for every text
        expected = F.cosine_similarity(z, features[None], dim=-1)
        scores = model.similarity(model.encode_image(images), model.encode_text(texts), temperature=(1., 5.))
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[1], expected, rtol=1e-5, atol=1e-6)  # τ changes nothing
    images, texts = batch(model, 4, 4)
    loss = LlipLoss(model.mixer.temperature)(**model.train()(images, texts))
    loss.backward()
    assert torch.isfinite(loss) and model.mixer.out_proj.grad.abs().sum() > 0
    assert model.visual.k_proj.grad is None or not model.visual.k_proj.grad.any()  # the keys no longer matter


def test_uniform_mixture_is_the_mixture_at_a_query_that_weighs_every_token_alike(model):
    """One vector per image (CLIP_benchmark's linear probe): the mixer's output for a zero query, and the mean of the
    K tokens' values through W_O, summed here token by token in float64."""
    images, _ = batch(model)
    with torch.no_grad():
        keys, values = unpack_image(model.encode_image(images))
        embedding = model.mixer.uniform_mixture(values)
        at_zero_query = model.mixer(keys, values, torch.zeros(len(images), *values.shape[1::2]))[:, 0]
    heads, tokens, d = values.shape[1:]
    out_proj = model.mixer.out_proj.detach().double().view(heads, d, -1)
    plain = sum(values[:, h, k].double() @ out_proj[h] for h in range(heads) for k in range(tokens)) / tokens
    # Round-off of a mean over K and a product over D = H·d terms, each bounded by the sum of |terms|.
    atol = (tokens + heads * d) * EPS32 * (values.abs().mean(2).flatten(1).double() @ out_proj.abs().flatten(0, 1)).max()
    assert embedding.shape == (len(images), model.mixer.out_proj.shape[0])
    torch.testing.assert_close(embedding.double(), plain, rtol=0, atol=atol.item())
    torch.testing.assert_close(at_zero_query.double(), plain, rtol=0, atol=2 * atol.item())

"""One conditioned score: every path that computes cos(z[i|j], t[j]) against a plain float64 reference.

``plain_cosine`` below is the mixer of docs/method.md written out, sharing no code with the package: per pair, the
attention softmax_k(<q, key> / τ), z = concat_h(Σ_k a·value) @ W_O materialised, and F.cosine_similarity(z, t).
``scoring.conditioned_cosine`` (the Gram form), ``LlipModel.similarity``, the loss's logits (``block_loss``,
``LlipLoss``) and the index's mixing form (``paired_cosine``, ``mixed_cosine``, ``first_stage_vectors``) are each
checked against it.

Tolerance: these run in float32, whose unit round-off is u = 2**-24; a sum of n terms computed in order is off by at
most about n·u relative to the sum of the terms' magnitudes. The longest sum behind one score is the Gram form's
|z|² = aᵀ G a, (H·K)² terms, each a product of G's entries, which are sums of D terms: n = (H·K)² + D. A cosine lies
in [−1, 1], so n·u bounds its absolute error (1024 + 64 terms for Llip-Tiny: 6.5e-5); the logits scale it by
exp(logit_scale).
"""
import open_clip
import pytest
import torch
import torch.nn.functional as F

from open_clip_llip import LlipLoss, unpack_image, unpack_text
from open_clip_llip.loss.sigmoid import block_loss
from open_clip_llip.modeling.scoring import attention, conditioned_cosine, scoring_dtype, temperatures
from open_clip_llip.search.index import first_stage_vectors, mixed_cosine, paired_cosine, text_directions

TAUS = (0.5, 5., 20.)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny').eval()


def tolerance(model) -> float:
    """n·2**-24 for the n = (H·K)² + D terms of the longest sum behind a score (module docstring)."""
    heads, tokens = model.mixer.heads, model.llip_cfg.mixture_tokens
    return ((heads * tokens) ** 2 + model.mixer.out_proj.shape[0]) * 2 ** -24


def plain_cosine(keys, values, queries, embeddings, out_proj, temperature):
    """cos(z[i|j], t[j]) in float64: keys, values [N, H, K, d], raw queries [M, H, d], text embeddings t [M, D],
    W_O [D, D] -> [N, M], z materialised ([N, M, D])."""
    keys, values, queries, embeddings, out_proj = (x.double() for x in (keys, values, queries, embeddings, out_proj))
    logits = (keys[:, None] * queries[None, :, :, None, :]).sum(-1) / temperature  # [N, M, H, K]
    weights = logits.softmax(dim=-1)
    mixed = (weights[..., None] * values[:, None]).sum(-2)  # [N, M, H, d]
    z = mixed.flatten(2) @ out_proj  # [N, M, D]
    return F.cosine_similarity(z, embeddings[None], dim=-1)


def encoded(model, images=6, texts=5, seed=0):
    """Image features [N, 2, H, K, d], text features [M, 2, H, d] and the texts' embeddings t [M, D]."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (texts, model.context_length), generator=generator)
    tokens[:, 7] = model.vocab_size - 1
    tokens[:, 8:] = 0
    with torch.no_grad():
        image_features = model.encode_image(torch.randn(images, 3, *model.visual.image_size, generator=generator))
        embeddings, queries = model.embed_text(tokens)
        return image_features, model.text_features(embeddings, queries), embeddings


def reference(model, image_features, text_features, embeddings, temperature):
    keys, values = unpack_image(image_features)
    return plain_cosine(keys, values, unpack_text(text_features)[0], embeddings, model.mixer.out_proj, temperature)


def assert_near(actual, expected, atol):
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=atol)


@pytest.mark.parametrize('block_size', [None, 2])
def test_conditioned_cosine(model, block_size):
    image_features, text_features, embeddings = encoded(model)
    keys, values = unpack_image(image_features)
    queries, targets = unpack_text(text_features)
    with torch.no_grad():
        gram = model.mixer.image_gram(values)
        for tau in TAUS:
            assert_near(conditioned_cosine(keys, values, gram, queries, targets, tau, block_size=block_size),
                        reference(model, image_features, text_features, embeddings, tau), tolerance(model))


def test_similarity(model):
    image_features, text_features, embeddings = encoded(model)
    with torch.no_grad():
        scores = model.similarity(image_features, text_features, TAUS)
        default = model.similarity(image_features.half(), text_features)  # fp16 features, scored in the mixer's fp32
    assert scores.shape == (len(TAUS), 6, 5) and default.dtype == torch.float32
    for tau, tau_scores in zip(TAUS, scores):
        assert_near(tau_scores, reference(model, image_features, text_features, embeddings, tau), tolerance(model))
    half = reference(model, image_features.half(), text_features, embeddings, model.mixer.temperature)
    assert_near(default, half, tolerance(model))


def test_loss_logits(model):
    """The PyTorch loss is Σ −log σ(±(scale·cos + bias)) of the plain cosines: its logits are the one score."""
    image_features, text_features, embeddings = encoded(model, 5, 5)
    scale, bias = torch.tensor(10.), torch.tensor(-3.)
    with torch.no_grad():
        gram = model.mixer.image_gram(unpack_image(image_features)[1])
        out = dict(image_features=image_features, image_gram=gram, text_features=text_features, logit_scale=scale,
                   logit_bias=bias)
        for tau in TAUS:
            logits = scale * reference(model, image_features, text_features, embeddings, tau) + bias
            signs = 2 * torch.eye(5, dtype=torch.float64) - 1
            plain = -F.logsigmoid(signs * logits).sum()
            block = block_loss(*unpack_image(image_features), gram, *unpack_text(text_features), scale, bias, 0, False,
                                temperature=tau)
            # Each of the 25 terms has its logit off by at most scale·n·u, and |d log σ(x) / dx| ≤ 1.
            assert_near(block, plain, 25 * scale.item() * tolerance(model))
            assert_near(LlipLoss(tau, impl='torch', block_size=2)(**out), plain / 5, 5 * scale.item() * tolerance(model))


def test_index_cosines(model):
    """The mixing form, as the index scores: every pair (``mixed_cosine``), each text's own images (``paired``)."""
    image_features, text_features, embeddings = encoded(model, 9, 4)
    chosen = torch.tensor([[3, 0, 8], [1, 1, 5], [7, 2, 4], [6, 0, 3]])  # each text's own images
    with torch.no_grad():
        for tau in (None, *TAUS):
            expected = reference(model, image_features, text_features, embeddings, tau or model.mixer.temperature)
            assert_near(mixed_cosine(model, image_features, text_features, tau), expected, tolerance(model))
            assert_near(paired_cosine(model, image_features[chosen], text_features, tau), expected.T.gather(1, chosen),
                        tolerance(model))


def test_first_stage_vectors(model):
    """<y[c], t̂> is the cosine of the image's mixture for the prototype query c with the text; t̂ is recovered from
    the text features."""
    image_features, text_features, embeddings = encoded(model, 7, 4)
    prototypes = torch.cat([torch.zeros(1, *text_features.shape[2:]), unpack_text(text_features)[0][:2]])  # [3, H, d]
    keys, values = unpack_image(image_features)
    with torch.no_grad():
        vectors = first_stage_vectors(model, image_features, prototypes)  # [N, 3, D]
        targets = text_directions(model, text_features)
    # Solving p = W_O t̂ for t̂ loses up to cond(W_O) times p's rounding (D terms of float32).
    atol = torch.linalg.cond(model.mixer.out_proj.detach().double()).item() * targets.shape[1] * 2 ** -24
    torch.testing.assert_close(targets.double(), F.normalize(embeddings.double(), dim=-1), rtol=0, atol=atol)
    for c, prototype in enumerate(prototypes):
        expected = plain_cosine(keys, values, prototype[None].expand(len(targets), -1, -1), embeddings,
                                model.mixer.out_proj, model.mixer.temperature)
        assert_near(vectors[:, c] @ targets.T, expected, tolerance(model))


def test_attention_layouts_agree(model):
    """``scoring.attention`` in its einsum layouts and its broadcast one gives the same softmax_k(<q, key> / τ)."""
    image_features, text_features, _ = encoded(model, 3, 4)
    keys, queries = unpack_image(image_features)[0], unpack_text(text_features)[0]
    plain = ((keys[:, None].double() * queries[None, :, :, None].double()).sum(-1) / 5.).softmax(-1)  # [N, M, H, K]
    with torch.no_grad():
        assert_near(model.mixer.attention(keys, queries), plain, 1e-6)
        assert_near(attention(keys, queries, 5., 'nhkd,mhd->nhkm').permute(0, 3, 1, 2), plain, 1e-6)
        paired = attention(keys[None].expand(4, -1, -1, -1, -1), queries[:, None], 5., equation=None)  # [M, N, H, K, 1]
        assert_near(paired[..., 0].transpose(0, 1), plain, 1e-6)


def test_one_rule_for_dtype_and_temperatures(model):
    half, single = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    assert scoring_dtype(half, half) == torch.float16
    assert scoring_dtype(half, single, torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert temperatures(None, 5.) == (5.,) and temperatures(2, 5.) == (2.,) and temperatures([1, 0.5]) == (1., 0.5)
    assert model.temperatures() == (model.mixer.temperature,)
    for bad in (0., -1., float('inf'), [], [1., float('nan')]):
        with pytest.raises(ValueError, match=r'Temperatures \(τ\) must be finite positive numbers'):
            temperatures(bad, 5.)
    with pytest.raises(ValueError, match='finite positive'):
        LlipLoss(0.)
    with pytest.raises(ValueError, match='one number'):
        LlipLoss((1., 2.))

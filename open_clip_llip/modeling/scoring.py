"""Llip's conditioned score, defined once: the attention, the cosine of a mixture, the dtype and τ (docs/method.md,
the mixer and the cost).

Inputs are the factors of ``open_clip_llip.modeling.features`` (N images, M texts, K mixture tokens,
H heads, d = D / H):

    keys, values  [N, H, K, d]    per image
    gram          [N, H·K, H·K]   per image: G = Ṽ Ṽᵀ (``LlipMixer.image_gram``)
    queries       [M, H, d]       per text: the raw query q
    targets       [M, H, d]       per text: p = W_O t̂ (``LlipMixer.text_targets``)

and the mixer temperature τ. For image i and text j, per head h::

    a[i,j,h,:] = softmax_k(<q[j,h], key[i,h,k]> / τ)                      (``attention``)
    u[i|j]     = concat_h(Σ_k a[i,j,h,k] · value[i,h,k]),   z[i|j] = u[i|j] @ W_O
    cos(z[i|j], t[j]) = <u, p> / |u W_O| = Σ_{h,k} a·<value, p> / sqrt(aᵀ G a)

Two forms of the last line share ``attention``, ``_EPS`` and ``scoring_dtype``:

- the Gram form (``pair_cosine``, ``conditioned_cosine``): 2·K·D + (H·K)² multiply-adds per pair
  instead of the K·D + D² of mixing and projecting z, once G is known; every image against many
  texts (``LlipModel.similarity``, the loss, zero-shot classification, retrieval);
- the mixing form (``mixture_cosine``): 2·K·D + D² per pair and no G ((H·K)²·D per image), cheaper
  for few texts per image (``open_clip_llip.search.index``).
"""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

# |z| below this counts as zero, as in F.normalize.
_EPS = 1e-12
# Elements of one [n, H·K, m] intermediate when a block size is not given (16 MiB in fp32).
_BLOCK_ELEMENTS = 1 << 22


# τ as the scoring APIs take it: one number (a float, an int, a 0-d tensor or array), several (a list or tuple of
# numbers, a 1-d tensor or array), or None for a default.
Temperature = Union[float, Sequence[float], torch.Tensor, np.ndarray, None]


def parse_temperatures(temperature: Temperature, default: Optional[float] = None) -> Tuple[Tuple[float, ...], bool]:
    """``temperature`` (else ``default``) -> (its τ values, whether it is a sequence of them).

    The one reading of τ for every API that takes it: a tensor is read on the host, so that a 0-d and a
    1-d tensor or array give what a float and a list give; a sequence, even of one, is several (scores
    with a T axis). ValueError unless it is one number or a 1-d sequence of at least one, each finite and
    positive.
    """
    given = default if temperature is None else temperature
    if isinstance(given, (torch.Tensor, np.ndarray)):
        several, values = given.ndim == 1, given.tolist()
    else:
        several, values = isinstance(given, Sequence) and not isinstance(given, str), given
    values = list(values) if several else [values]
    if not all(isinstance(value, numbers.Real) and not isinstance(value, bool) for value in values):
        got = (f'a {given.ndim}-d {type(given).__name__} of shape {list(given.shape)}'
               if isinstance(given, (torch.Tensor, np.ndarray)) else repr(given))
        raise ValueError(f'Temperatures (τ) are one number or a 1-d sequence of numbers (a list, a tuple, a 1-d tensor '
                         f'or array); got {got}.')
    taus = tuple(float(value) for value in values)
    if not taus or not all(math.isfinite(tau) and tau > 0 for tau in taus):
        raise ValueError(f'Temperatures (τ) must be finite positive numbers, got {list(taus)}.')
    return taus, several


def temperatures(temperature: Temperature, default: Optional[float] = None) -> Tuple[float, ...]:
    """The τ values to score at: ``temperature`` (one or several, ``parse_temperatures``), else ``default``."""
    return parse_temperatures(temperature, default)[0]


def single_temperature(temperature: Temperature, default: Optional[float] = None) -> float:
    """The one τ that ``temperature`` (else ``default``) gives, for APIs that score at one; ValueError for a sequence."""
    taus, several = parse_temperatures(temperature, default)
    if several:
        raise ValueError(f'One temperature (τ) is needed here: one number (a float, an int, a 0-d tensor or array); got '
                         f'a sequence of {len(taus)}, {list(taus)}. LlipModel.similarity scores several at once.')
    return taus[0]


def scoring_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype scores are computed in: the widest of the tensors' (the features' and the mixer's W_O), so that
    features accumulated in half precision are scored as precisely as the mixer allows."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def attention(keys: torch.Tensor, queries: torch.Tensor, temperature: float,
              equation: Optional[str] = 'nhkd,mhd->nmhk') -> torch.Tensor:
    """Mixing weights a = softmax_k(<q, key> / τ) (logits scaled by 1/τ only, no 1/sqrt(d)): the one place τ divides.

    ``equation`` is the einsum of keys and raw queries that lays the weights out; its output's ``k`` is the
    softmax axis. Default: keys [N, H, K, d], queries [M, H, d] -> [N, M, H, K]. ``None``: one [K, d] × [d]
    product per row, keys [..., K, d] against queries [..., d] broadcast over the leading axes -> [..., K, 1]
    (each text against its own images, without expanding the keys per text).
    """
    queries = queries / temperature
    if equation is None:
        return torch.matmul(keys, queries[..., None]).softmax(dim=-2)
    output = equation.split('->')[1]
    return torch.einsum(equation, keys, queries).softmax(dim=output.index('k') - len(output))


def mixture_norm(mixed: torch.Tensor, out_proj: torch.Tensor) -> torch.Tensor:
    """Mixtures u [..., D] -> |z| = |u W_O| [...], clamped at ``_EPS``."""
    return (mixed @ out_proj).norm(dim=-1).clamp_min(_EPS)


def mixture_cosine(mixed: torch.Tensor, targets: torch.Tensor, out_proj: torch.Tensor) -> torch.Tensor:
    """Mixtures u [..., D] and targets p [..., D] (broadcast) -> cos(z, t) = <u, p> / |u W_O| [...]: the mixing form."""
    return (mixed * targets).sum(-1) / mixture_norm(mixed, out_proj)


class _CosineOfMixture(torch.autograd.Function):
    """cos = Σ a·<value, p> / sqrt(aᵀ G a) from attention a and products <value, p> [N, H·K, M] and G -> [N, M].

    Its backward is written out (per pair, with α = g/|z| and β = −g·cos/|z|²: ∂/∂a = α·<value, p>
    + β·G a, since G is symmetric; ∂/∂<value, p> = α·a; ∂/∂G = Σ_m (β/2)·a aᵀ): it reuses the
    forward's G a, updated in place, so the backward needs one [H·K, H·K] × [H·K, M] product per
    image, not two, and one new [N, H·K, M] tensor, not three.
    """

    @staticmethod
    def forward(ctx, attn, products, gram):
        mixed = torch.bmm(gram, attn)  # G a
        sq_norm = (mixed * attn).sum(dim=1)
        rnorm = sq_norm.clamp_min(_EPS ** 2).rsqrt()
        cosine = (attn * products).sum(dim=1) * rnorm
        ctx.save_for_backward(attn, products, mixed, rnorm, cosine, sq_norm > _EPS ** 2)
        ctx.gram_dtype = gram.dtype
        return cosine

    @staticmethod
    def backward(ctx, grad):
        attn, products, mixed, rnorm, cosine, unclamped = ctx.saved_tensors
        alpha = (grad * rnorm)[:, None, :]
        beta = torch.where(unclamped, -grad * cosine * rnorm ** 2, 0.)[:, None, :]  # clamped |z|: no gradient
        grad_gram = torch.bmm(attn * (beta / 2).to(attn.dtype), attn.transpose(1, 2)).to(ctx.gram_dtype)
        grad_attn = mixed.mul_(beta).addcmul_(products, alpha)  # G a is not needed any more
        return grad_attn.to(attn.dtype), (attn * alpha).to(products.dtype), grad_gram


def pair_cosine(keys, values, gram, queries, targets, temperature: float) -> torch.Tensor:
    """cos(z[i|j], t[j]) of all N images against all M texts at once, raw queries, at τ -> [N, M]: the Gram form.
    Memory: a few [N, H·K, M] tensors.

    Laid out [N, H, K, M] so that the logits are one [N·K, d] × [d, M] product per head and
    ``G a`` one [H·K, H·K] × [H·K, M] product per image: on the CPU, blocks of a few images
    against many texts run these near matmul speed, where few texts against many images do not.
    """
    images, heads, tokens, _ = keys.shape
    # One expression each, so that einsum's [H, N, K, M]-ordered buffers die before the next is made.
    attn = attention(keys, queries, temperature, 'nhkd,mhd->nhkm').reshape(images, heads * tokens, -1)
    products = torch.einsum('nhkd,mhd->nhkm', values, targets).reshape(images, heads * tokens, -1)
    return _CosineOfMixture.apply(attn, products, gram)


def pair_block_size(count: int, heads: int, tokens: int, budget: int = _BLOCK_ELEMENTS) -> int:
    """Images (texts) per block against ``count`` texts (images): one [n, H·K, m] intermediate holds ``budget``."""
    return max(1, budget // max(1, count * heads * tokens))


def conditioned_cosine(keys, values, gram, queries, targets, temperature: Temperature,
                       block_size: Optional[int] = None) -> torch.Tensor:
    """cos(z[i|j], t[j]) at mixer temperature τ for every image i and text j -> [N, M], in blocks of texts.

    Differentiable; under autograd each block keeps its intermediates, so for training use
    ``LlipLoss``, which recomputes them in the backward pass.
    """
    temperature = single_temperature(temperature)
    num_images, heads, tokens, _ = keys.shape
    texts = block_size or pair_block_size(num_images, heads, tokens)
    blocks = [
        pair_cosine(keys, values, gram, queries[start:start + texts], targets[start:start + texts], temperature)
        for start in range(0, queries.shape[0], texts)
    ]
    return torch.cat(blocks, dim=1)

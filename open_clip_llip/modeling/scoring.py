"""Text-conditioned cosine scores for every (image, text) pair, without materialising z (METHOD §4).

Inputs are the factors of ``open_clip_llip.modeling.features`` (N images, M texts, K mixture tokens,
H heads, d = D / H):

    keys, values  [N, H, K, d]    per image
    gram          [N, H·K, H·K]   per image: G = Ṽ Ṽᵀ (``LlipMixer.image_gram``)
    queries       [M, H, d]       per text: the raw query q
    targets       [M, H, d]       per text: p = W_O t̂ (``LlipMixer.text_targets``)

and the mixer temperature τ, which divides the attention logits ``<q, key>``.

and for each pair ``cos(z[i|j], t[j]) = Σ_{h,k} a·<value, p> / sqrt(aᵀ G a)``: 2·K·D + (H·K)²
multiply-adds per pair instead of the K·D + D² of mixing and projecting z.
"""
from typing import Optional

import torch

# |z| below this counts as zero, as in F.normalize.
_EPS = 1e-12
# Elements of one [n, H·K, m] intermediate when a block size is not given (16 MiB in fp32).
_BLOCK_ELEMENTS = 1 << 22


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


def pair_cosine(keys, values, gram, queries, targets) -> torch.Tensor:
    """All N images against all M texts at once, queries already divided by τ -> [N, M]. Memory: a few
    [N, H·K, M] tensors.

    Laid out [N, H, K, M] so that the logits are one [N·K, d] × [d, M] product per head and
    ``G a`` one [H·K, H·K] × [H·K, M] product per image: on the CPU, blocks of a few images
    against many texts run these near matmul speed, where few texts against many images do not.
    """
    images, heads, tokens, _ = keys.shape
    # One expression each, so that einsum's [H, N, K, M]-ordered buffers die before the next is made.
    attn = torch.einsum('nhkd,mhd->nhkm', keys, queries).softmax(dim=2).reshape(images, heads * tokens, -1)
    products = torch.einsum('nhkd,mhd->nhkm', values, targets).reshape(images, heads * tokens, -1)
    return _CosineOfMixture.apply(attn, products, gram)


def pair_block_size(count: int, heads: int, tokens: int, budget: int = _BLOCK_ELEMENTS) -> int:
    """Images (texts) per block against ``count`` texts (images): one [n, H·K, m] intermediate holds ``budget``."""
    return max(1, budget // max(1, count * heads * tokens))


def conditioned_cosine(keys, values, gram, queries, targets, temperature: float,
                       block_size: Optional[int] = None) -> torch.Tensor:
    """cos(z[i|j], t[j]) at mixer temperature τ for every image i and text j -> [N, M], in blocks of texts.

    Differentiable; under autograd each block keeps its intermediates, so for training use
    ``LlipLoss``, which recomputes them in the backward pass.
    """
    num_images, heads, tokens, _ = keys.shape
    texts = block_size or pair_block_size(num_images, heads, tokens)
    queries = queries / temperature
    blocks = [
        pair_cosine(keys, values, gram, queries[start:start + texts], targets[start:start + texts])
        for start in range(0, queries.shape[0], texts)
    ]
    return torch.cat(blocks, dim=1)

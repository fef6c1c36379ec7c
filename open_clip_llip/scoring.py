"""Text-conditioned cosine scores for every (image, text) pair, without materialising z (METHOD §4).

Inputs are the factors ``LlipModel.forward`` returns (N images, M texts, K mixture tokens,
H heads, d = D / H):

    keys, values  [N, H, K, d]    per image
    gram          [N, H·K, H·K]   per image: G = Ṽ Ṽᵀ (``LlipMixer.image_gram``)
    queries       [M, H, d]       per text, already divided by τ (``LlipMixer.scale_queries``)
    targets       [M, H, d]       per text: p = W_O t̂ (``LlipMixer.text_targets``)

and for each pair ``cos(z[i|j], t[j]) = Σ_{h,k} a·<value, p> / sqrt(aᵀ G a)``: 2·K·D + (H·K)²
multiply-adds per pair instead of the K·D + D² of mixing and projecting z.
"""
from typing import Optional

import torch

# |z| below this counts as zero, as in F.normalize.
_EPS = 1e-12
# Elements of one [N, m, H, K] intermediate when a block size is not given (16 MiB in fp32).
_BLOCK_ELEMENTS = 1 << 22


def pair_cosine(keys, values, gram, queries, targets) -> torch.Tensor:
    """All N images against all M texts at once -> [N, M]. Memory: a few [N, M, H, K] tensors."""
    attn = torch.einsum('nhkd,mhd->nmhk', keys, queries).softmax(dim=-1)  # [N, M, H, K]
    numerator = (attn * torch.einsum('nhkd,mhd->nmhk', values, targets)).sum(dim=(-2, -1))  # [N, M]
    attn = attn.flatten(-2)  # [N, M, H·K]
    sq_norm = (torch.bmm(attn, gram) * attn).sum(dim=-1)  # aᵀ G a (G is symmetric)
    return numerator / sq_norm.clamp_min(_EPS ** 2).sqrt()


def text_block_size(num_images: int, heads: int, tokens: int, budget: int = _BLOCK_ELEMENTS) -> int:
    """Texts per block so that one [N, block, H, K] intermediate holds about ``budget`` elements."""
    return max(1, budget // max(1, num_images * heads * tokens))


def conditioned_cosine(keys, values, gram, queries, targets, block_size: Optional[int] = None) -> torch.Tensor:
    """cos(z[i|j], t[j]) for every image i and text j -> [N, M], computed in blocks of texts.

    Differentiable; under autograd each block keeps its intermediates, so for training use
    ``LlipLoss``, which recomputes them in the backward pass.
    """
    num_images, heads, tokens, _ = keys.shape
    block_size = block_size or text_block_size(num_images, heads, tokens)
    blocks = [
        pair_cosine(keys, values, gram, queries[start:start + block_size], targets[start:start + block_size])
        for start in range(0, queries.shape[0], block_size)
    ]
    return torch.cat(blocks, dim=1)

"""Llip's text query head and mixer (docs/method.md, text tower and mixer).

Notation: N images, M texts, K mixture tokens, H mixer heads, D embedding width, d = D / H.
"""
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from torch import nn

from .scoring import Temperature, attention, single_temperature


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., D] -> [..., H, d]."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


class TextQueryHead(nn.Module):
    """The text's query for the mixer: ``q = norm(e @ W_Q)``, split into H heads.

    ``e`` is the text tower's pooled output after ``ln_final`` (the EOT token), before
    ``text_projection``. Input ``[M, text_width]`` -> output ``[M, H, d]``.
    """

    def __init__(self, text_width: int, embed_dim: int, heads: int, norm: bool = False, norm_layer=LayerNorm):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Parameter(text_width ** -0.5 * torch.randn(text_width, embed_dim))
        self.q_norm = norm_layer(embed_dim) if norm else nn.Identity()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return split_heads(self.q_norm(pooled.to(self.q_proj.dtype) @ self.q_proj), self.heads)


class LlipMixer(nn.Module):
    """Mixes an image's K mixture tokens into one embedding per text (docs/method.md, mixer).

    For image i and text j, per head h (logits scaled by 1/τ only, no 1/sqrt(d))::

        a[i,j,h,:] = softmax_k(<q[j,h], key[i,h,k]> / τ)
        z[i|j]     = concat_h(Σ_k a[i,j,h,k] · value[i,h,k]) @ W_O        (W_O: [D, D], no bias)

    ``forward`` materialises ``z`` (``[N, M, D]``) and is meant for inspection. Scores never
    need it (docs/method.md, the cost): with ``p[j] = W_O t̂[j]`` and ``G[i] = Ṽ[i] Ṽ[i]ᵀ``
    (``Ṽ[i,h,k] = value[i,h,k] @ W_O[h·d:(h+1)·d]``),
    ``<z[i|j], t̂[j]> = Σ_{h,k} a·<value[i,h,k], p[j,h]>`` and ``|z[i|j]|² = aᵀ G[i] a``.
    ``image_gram`` and ``text_targets`` compute those per-image and per-text factors, which
    are all that ``open_clip_llip.modeling.scoring`` and the loss need besides the keys and raw queries.

    τ is a fixed hyper-parameter (``temperature``); scoring applies it (``scoring.attention``), and takes
    another for evaluation.
    """

    def __init__(self, embed_dim: int, heads: int, temperature: float):
        super().__init__()
        self.heads = heads
        self.temperature = temperature
        self.out_proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))

    def attention(self, keys: torch.Tensor, queries: torch.Tensor, temperature: Temperature = None):
        """Keys [N, H, K, d], raw queries [M, H, d] -> mixing weights a: [N, M, H, K] (sum to 1 over K), at τ
        (default: the mixer's), as ``scoring.attention`` computes them for every score."""
        return attention(keys, queries, single_temperature(temperature, self.temperature))

    def forward(self, keys, values, queries, temperature: Temperature = None) -> torch.Tensor:
        """Keys, values [N, H, K, d], raw queries [M, H, d] -> conditioned embeddings z: [N, M, D]."""
        mixed = torch.einsum('nmhk,nhkd->nmhd', self.attention(keys, queries, temperature), values)
        return mixed.flatten(-2).to(self.out_proj.dtype) @ self.out_proj

    def uniform_mixture(self, values: torch.Tensor) -> torch.Tensor:
        """Values [N, H, K, d] -> [N, D]: each image's embedding for a query that weighs its K tokens equally.

        What ``forward`` gives for a zero query (and in the limit τ → ∞): the mean of the K tokens'
        values, through W_O. It depends on no text, so it is one vector per image (CLIP_benchmark's
        linear probe trains on it; docs/evaluation.md says why this one).
        """
        return values.mean(dim=2).flatten(1).to(self.out_proj.dtype) @ self.out_proj

    def image_gram(self, values: torch.Tensor) -> torch.Tensor:
        """Values [N, H, K, d] -> G: [N, H·K, H·K], the Gram matrix of the values mixed through W_O."""
        out_proj = self.out_proj.view(self.heads, -1, self.out_proj.shape[1])  # [H, d, D]
        mixed = torch.einsum('nhkd,hde->nhke', values.to(out_proj.dtype), out_proj).flatten(1, 2)  # [N, HK, D]
        return mixed @ mixed.transpose(1, 2)

    def text_targets(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings t [M, D] -> p = W_O t̂ split into heads: [M, H, d] (t̂ = t / |t|)."""
        unit = F.normalize(text_embeddings.to(self.out_proj.dtype), dim=-1)
        return split_heads(unit @ self.out_proj.T, self.heads)

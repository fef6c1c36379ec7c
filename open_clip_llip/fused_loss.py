"""Llip's conditioned scores and sigmoid loss fused in Triton kernels, forward and backward (METHOD §4).

``fused_sigmoid_loss`` has the semantics of ``open_clip_llip.loss._block_loss`` over all the
texts it is given: ``Σ_{i,j} −log σ(y[i,j]·s[i,j])`` with ``s = logit_scale·cos + logit_bias``
and ``cos = Σ_{h,k} a·<value, p> / sqrt(aᵀ G a)``, ``a = softmax_k(<q, key>)`` per head.

Shapes (b images, B texts, H heads, K mixture tokens, d = D / H)::

    keys, values [b, H, K, d]   gram [b, H·K, H·K]   queries, targets [B, H, d]

Between the forward and the backward pass only the inputs and two fp32 scalars per pair are
kept (the cosine and 1/|z|: ``[b, B]`` each): the backward recomputes the attention, as
FlashAttention and Inf-CL do. Nothing of size ``[b, B, H·K]`` or ``[b, B, D]`` ever exists.

Design (for Ampere/Hopper; every block size is a power of two, padded and masked):

* A program takes one image i and a tile of texts and works on ``[heads, texts, K]`` tiles:
  3-D ``tl.dot`` calls (batched over heads) give the logits ``<q, key>`` and ``<value, p>`` of all
  its heads at once, contracting d in chunks of DC (≤ 32) so that operands stay small for d up
  to 160. Operands are loaded in the input dtype (bf16 in training), products accumulate in
  fp32, the softmax is fp32, and probabilities are rounded to the input dtype only as MMA
  operands (as FlashAttention does).
* ``aᵀ G a``: ``A G`` (``[texts, H·K] × [H·K, H·K]`` per image, the largest term) accumulates one
  *row* head h at a time: ``a_h`` (recomputed: one extra logits pass, K·D multiply-adds per pair)
  times the ``[K, K]`` blocks ``G[h, heads of the program]``, a 3-D dot batched over the output
  heads. One ``[heads, texts, K]`` accumulator is live and G (512 × 512 for G/14) is never
  needed whole in shared memory; it streams from L2, where consecutive programs share it (the
  forward grid runs texts fastest).
* Forward, grid (text tiles, images): ``cos`` and ``1/|z|`` per pair to global memory, one
  partial loss sum per program (summed by PyTorch: no atomics).
* Backward, three kernels so that each gradient has one owner and nothing is atomic
  (FlashAttention-2's split): ``_text_grad_kernel`` (a text tile × head group × block of
  channels per program, looping over images: dq, dp, and partial sums for d logit_scale and
  d logit_bias), ``_image_grad_kernel`` (an image × head group × block of channels, looping over
  text tiles: dkey, dvalue) and ``_gram_grad_kernel`` (an image × two head groups:
  ``dG = Σ_j (β/2)·a aᵀ``, upper blocks only, mirrored on store). Per pair, with ``g_s = ∂L/∂s``,
  ``g_c = g_s·scale``, ``α = g_c/|z|``, ``β = −g_c·cos/|z|²``: ``∂L/∂a = α·<value, p> + β·(G a)``,
  then the softmax backward per head, ``dq = Σ dl·key``, ``dkey = Σ dl·q``,
  ``dvalue = Σ α·a·p``, ``dp = Σ α·a·value``.
* Accumulators must stay in registers, so ``_blocks`` sizes head groups and channel blocks from
  a budget of live fp32 values per program (``_LIVE_ELEMENTS``). A program of a head group still
  recomputes the logits of every head for ``A G``; that recomputation, not the ``(H·K)²`` term,
  is what grows as groups shrink. B/16 (H 8, K 32, d 64): forward all heads × 32 texts;
  dq/dp 4 heads × 16 texts; dkey/dvalue 4 heads; dG 4-head blocks. Compiled offline for sm_90 and
  sm_80 (``triton.compile`` with a ``GPUTarget``), these use ≤ 255 registers with no spills but
  88 bytes in ``_image_grad_kernel``; the G/14 shapes (K 64, d 160 padded to 256) spill in the
  backward kernels (up to ~3 KB a thread): tuning them needs a GPU.

On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is first imported), which is how the tests check them against PyTorch; there ``_dot``
multiplies bf16 operands in fp32, which is exact, because the interpreter cannot multiply bf16.
"""
import contextlib
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .scoring import _EPS

# Whether the kernels below were built for Triton's interpreter (the CPU) rather than a GPU.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# |z|² is clamped at _EPS², as in open_clip_llip.scoring; 1/|z| is then 1/_EPS.
_EPS_SQUARED = tl.constexpr(_EPS * _EPS)
_MAX_RNORM = tl.constexpr(1. / _EPS)
_UPCAST_DOTS = tl.constexpr(INTERPRETED)


@triton.jit
def _dot(a, b, acc):
    """``tl.dot(a, b, acc)``. The interpreter multiplies bf16 operands as their raw bits, so there they go to
    fp32 first: exact, like the GPU's bf16 MMA, which sums exact products in fp32."""
    if _UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _text_tile(ptr, text_stride, j, heads, dd, B, H: tl.constexpr, D_HEAD: tl.constexpr):
    """[heads, texts, channels] tile of a text tensor [B, H, d] (rows ``text_stride`` apart); 0 outside."""
    offsets = j[None, :, None].to(tl.int64) * text_stride + heads[:, None, None] * D_HEAD + dd[None, None, :]
    mask = (j[None, :, None] < B) & (heads[:, None, None] < H) & (dd[None, None, :] < D_HEAD)
    return tl.load(ptr + offsets, mask=mask, other=0.)


@triton.jit
def _image_tile(ptr, image_offset, heads, kk, dd, H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr):
    """[heads, tokens, channels] tile of one image's keys or values [H, K, d]; 0 outside."""
    offsets = image_offset + (heads[:, None, None] * K + kk[None, :, None]) * D_HEAD + dd[None, None, :]
    mask = (heads[:, None, None] < H) & (kk[None, :, None] < K) & (dd[None, None, :] < D_HEAD)
    return tl.load(ptr + offsets, mask=mask, other=0.)


@triton.jit
def _pair_products(text_ptr, text_stride, image_ptr, image_offset, j, heads, B,
                   H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr,
                   HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr):
    """<text[j, h], image[h, k]> for the given heads -> [heads, texts, tokens] (fp32), d in chunks of DC."""
    kk = tl.arange(0, KP)
    acc = tl.zeros((HG, BJ, KP), dtype=tl.float32)
    for start in tl.static_range(0, D_HEAD, DC):
        dd = start + tl.arange(0, DC)
        image = _image_tile(image_ptr, image_offset, heads, kk, dd, H, K, D_HEAD)
        acc = _dot(_text_tile(text_ptr, text_stride, j, heads, dd, B, H, D_HEAD), tl.permute(image, (0, 2, 1)), acc)
    return acc


@triton.jit
def _attention(queries, text_stride, keys, image_offset, j, heads, B,
               H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr,
               HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr):
    """a = softmax_k(<q, key>) -> [heads, texts, tokens] (fp32); 0 for padded heads and tokens."""
    logits = _pair_products(queries, text_stride, keys, image_offset, j, heads, B, H, K, D_HEAD, HG, BJ, KP, DC)
    kk = tl.arange(0, KP)
    logits = tl.where(kk[None, None, :] < K, logits, -float('inf'))
    weights = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    attention = weights / tl.sum(weights, axis=2)[:, :, None]
    return tl.where(heads[:, None, None] < H, attention, 0.)


@triton.jit
def _gram_product(queries, text_stride, keys, image_offset, gram, gram_offset, j, heads, B,
                  H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr,
                  HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr):
    """(G a)[j] restricted to the given heads' columns -> [heads, texts, tokens] (fp32).

    Accumulated over row heads h, each ``a_h`` recomputed, so that only ``[K, K]`` blocks of G
    and one accumulator are live.
    """
    row = tl.arange(0, KP)
    col = tl.arange(0, KP)
    acc = tl.zeros((HG, BJ, KP), dtype=tl.float32)
    for h in range(H):
        head = h + tl.arange(0, 1)
        attention = _attention(queries, text_stride, keys, image_offset, j, head, B, H, K, D_HEAD, 1, BJ, KP, DC)
        offsets = gram_offset + (h * K + row[None, :, None]) * (H * K) + heads[:, None, None] * K + col[None, None, :]
        mask = (row[None, :, None] < K) & (heads[:, None, None] < H) & (col[None, None, :] < K)
        block = tl.load(gram + offsets, mask=mask, other=0.)  # G[h-rows, heads' columns] as [heads, K, K]
        acc = _dot(tl.broadcast_to(attention, (HG, BJ, KP)).to(block.dtype), block, acc)
    return acc


@triton.jit
def _signed_logits(scale_ptr, bias_ptr, cos, i, j, first_text, HAS_POSITIVES: tl.constexpr):
    """(s = scale·cos + bias, whether (i, j) is a positive pair, scale)."""
    scale = tl.load(scale_ptr).to(tl.float32)
    logits = scale * cos + tl.load(bias_ptr).to(tl.float32)
    positive = (j + first_text == i) & HAS_POSITIVES
    return logits, positive, scale


@triton.jit
def _pair_coefficients(cos_ptr, rnorm_ptr, scale_ptr, bias_ptr, grad_ptr, i, j, B, first_text,
                       HAS_POSITIVES: tl.constexpr):
    """Per pair: (∂L/∂s, cos, α = ∂L/∂numerator, β = 2·∂L/∂|z|²), each [texts], 0 for padded texts."""
    valid = j < B
    cos = tl.load(cos_ptr + i * B + j, mask=valid, other=0.)
    rnorm = tl.load(rnorm_ptr + i * B + j, mask=valid, other=0.)
    logits, positive, scale = _signed_logits(scale_ptr, bias_ptr, cos, i, j, first_text, HAS_POSITIVES)
    grad_logits = tl.load(grad_ptr).to(tl.float32) * (tl.sigmoid(logits) - tl.where(positive, 1., 0.))
    grad_logits = tl.where(valid, grad_logits, 0.)
    grad_cos = grad_logits * scale
    alpha = grad_cos * rnorm
    # |z| clamped at _EPS (rnorm == 1/_EPS) has no gradient, as with clamp_min in PyTorch.
    beta = tl.where(rnorm < _MAX_RNORM, -grad_cos * cos * rnorm * rnorm, 0.)
    return grad_logits, cos, alpha, beta


@triton.jit
def _attention_grad(queries, targets, text_stride, keys, values, image_offset, gram, gram_offset, j, heads,
                    alpha, beta, B, H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr,
                    HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr):
    """(a, ∂L/∂logits) for one image, a text tile and the given heads: [heads, texts, tokens] each."""
    attention = _attention(queries, text_stride, keys, image_offset, j, heads, B, H, K, D_HEAD, HG, BJ, KP, DC)
    products = _pair_products(targets, text_stride, values, image_offset, j, heads, B, H, K, D_HEAD, HG, BJ, KP, DC)
    mixed = _gram_product(queries, text_stride, keys, image_offset, gram, gram_offset, j, heads, B,
                          H, K, D_HEAD, HG, BJ, KP, DC)
    grad_attention = alpha[None, :, None] * products + beta[None, :, None] * mixed
    grad_logits = attention * (grad_attention - tl.sum(attention * grad_attention, axis=2)[:, :, None])
    return attention, grad_logits


@triton.jit
def _forward_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, cos_ptr, rnorm_ptr, loss_ptr,
                    B, image_stride, text_stride, first_text,
                    H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HAS_POSITIVES: tl.constexpr,
                    HP: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr):
    tile = tl.program_id(0)
    i = tl.program_id(1)
    j = tile * BJ + tl.arange(0, BJ)
    heads = tl.arange(0, HP)
    image_offset = tl.cast(i, tl.int64) * image_stride
    gram_offset = tl.cast(i, tl.int64) * (H * K) * (H * K)

    attention = _attention(queries, text_stride, keys, image_offset, j, heads, B, H, K, D_HEAD, HP, BJ, KP, DC)
    products = _pair_products(targets, text_stride, values, image_offset, j, heads, B, H, K, D_HEAD, HP, BJ, KP, DC)
    mixed = _gram_product(queries, text_stride, keys, image_offset, gram, gram_offset, j, heads, B,
                          H, K, D_HEAD, HP, BJ, KP, DC)
    numerator = tl.sum(tl.sum(attention * products, axis=2), axis=0)
    rnorm = 1. / tl.sqrt(tl.maximum(tl.sum(tl.sum(attention * mixed, axis=2), axis=0), _EPS_SQUARED))
    cos = numerator * rnorm

    logits, positive, _ = _signed_logits(scale_ptr, bias_ptr, cos, i, j, first_text, HAS_POSITIVES)
    signed = tl.where(positive, logits, -logits)
    loss = tl.maximum(-signed, 0.) + tl.log(1. + tl.exp(-tl.abs(signed)))  # −log σ(y·s), stable
    valid = j < B
    tl.store(cos_ptr + i * B + j, cos, mask=valid)
    tl.store(rnorm_ptr + i * B + j, rnorm, mask=valid)
    tl.store(loss_ptr + i * tl.num_programs(0) + tile, tl.sum(tl.where(valid, loss, 0.)))


@triton.jit
def _text_grad_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, cos_ptr, rnorm_ptr, grad_ptr,
                      grad_queries, grad_targets, grad_scale_ptr, grad_bias_ptr,
                      b, B, image_stride, text_stride, first_text,
                      H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HAS_POSITIVES: tl.constexpr,
                      HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DB: tl.constexpr, DC: tl.constexpr):
    """dq, dp [B, H, d] (fp32) for one text tile, head group and block of DB channels; partial sums
    for d scale and d bias."""
    tile = tl.program_id(0)
    group = tl.program_id(1)
    channels = tl.program_id(2)
    j = tile * BJ + tl.arange(0, BJ)
    heads = group * HG + tl.arange(0, HG)
    kk = tl.arange(0, KP)
    dd = channels * DB + tl.arange(0, DB)
    grad_q = tl.zeros((HG, BJ, DB), dtype=tl.float32)
    grad_p = tl.zeros((HG, BJ, DB), dtype=tl.float32)
    grad_scale = tl.zeros((BJ,), dtype=tl.float32)
    grad_bias = tl.zeros((BJ,), dtype=tl.float32)
    for i in range(b):
        image_offset = tl.cast(i, tl.int64) * image_stride
        gram_offset = tl.cast(i, tl.int64) * (H * K) * (H * K)
        grad_logits, cos, alpha, beta = _pair_coefficients(
            cos_ptr, rnorm_ptr, scale_ptr, bias_ptr, grad_ptr, i, j, B, first_text, HAS_POSITIVES)
        attention, grad_attn_logits = _attention_grad(
            queries, targets, text_stride, keys, values, image_offset, gram, gram_offset, j, heads, alpha, beta, B,
            H, K, D_HEAD, HG, BJ, KP, DC)
        key = _image_tile(keys, image_offset, heads, kk, dd, H, K, D_HEAD)
        value = _image_tile(values, image_offset, heads, kk, dd, H, K, D_HEAD)
        grad_q = _dot(grad_attn_logits.to(key.dtype), key, grad_q)
        grad_p = _dot((alpha[None, :, None] * attention).to(value.dtype), value, grad_p)
        grad_scale += grad_logits * cos
        grad_bias += grad_logits
    offsets = (j[None, :, None].to(tl.int64) * H + heads[:, None, None]) * D_HEAD + dd[None, None, :]
    mask = (j[None, :, None] < B) & (heads[:, None, None] < H) & (dd[None, None, :] < D_HEAD)
    tl.store(grad_queries + offsets, grad_q, mask=mask)
    tl.store(grad_targets + offsets, grad_p, mask=mask)
    if (group == 0) & (channels == 0):
        tl.store(grad_scale_ptr + tile, tl.sum(grad_scale))
        tl.store(grad_bias_ptr + tile, tl.sum(grad_bias))


@triton.jit
def _image_grad_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, cos_ptr, rnorm_ptr, grad_ptr,
                       grad_keys, grad_values, B, image_stride, text_stride, first_text,
                       H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HAS_POSITIVES: tl.constexpr,
                       HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DB: tl.constexpr, DC: tl.constexpr):
    """dkey, dvalue [b, H, K, d] (fp32) for one image, head group and block of DB channels, looping
    over all texts."""
    i = tl.program_id(0)
    group = tl.program_id(1)
    heads = group * HG + tl.arange(0, HG)
    kk = tl.arange(0, KP)
    dd = tl.program_id(2) * DB + tl.arange(0, DB)
    image_offset = tl.cast(i, tl.int64) * image_stride
    gram_offset = tl.cast(i, tl.int64) * (H * K) * (H * K)
    grad_k = tl.zeros((HG, KP, DB), dtype=tl.float32)
    grad_v = tl.zeros((HG, KP, DB), dtype=tl.float32)
    for start in range(0, B, BJ):
        j = start + tl.arange(0, BJ)
        _, _, alpha, beta = _pair_coefficients(
            cos_ptr, rnorm_ptr, scale_ptr, bias_ptr, grad_ptr, i, j, B, first_text, HAS_POSITIVES)
        attention, grad_attn_logits = _attention_grad(
            queries, targets, text_stride, keys, values, image_offset, gram, gram_offset, j, heads, alpha, beta, B,
            H, K, D_HEAD, HG, BJ, KP, DC)
        query = _text_tile(queries, text_stride, j, heads, dd, B, H, D_HEAD)
        target = _text_tile(targets, text_stride, j, heads, dd, B, H, D_HEAD)
        grad_k = _dot(tl.permute(grad_attn_logits.to(query.dtype), (0, 2, 1)), query, grad_k)
        grad_v = _dot(tl.permute((alpha[None, :, None] * attention).to(target.dtype), (0, 2, 1)), target, grad_v)
    offsets = tl.cast(i, tl.int64) * (H * K * D_HEAD) + (heads[:, None, None] * K + kk[None, :, None]) * D_HEAD + dd[None, None, :]
    mask = (heads[:, None, None] < H) & (kk[None, :, None] < K) & (dd[None, None, :] < D_HEAD)
    tl.store(grad_keys + offsets, grad_k, mask=mask)
    tl.store(grad_values + offsets, grad_v, mask=mask)


@triton.jit
def _gram_grad_kernel(keys, gram, queries, scale_ptr, bias_ptr, cos_ptr, rnorm_ptr, grad_ptr, grad_gram,
                      B, image_stride, text_stride, first_text,
                      H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HAS_POSITIVES: tl.constexpr,
                      HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr):
    """dG[i] = Σ_j (β/2)·a aᵀ [b, H·K, H·K] (fp32): rows of head group ``row_group``, columns of ``col_group``."""
    i = tl.program_id(0)
    row_group = tl.program_id(1)
    col_group = tl.program_id(2)
    if row_group <= col_group:  # dG is symmetric: the upper blocks, mirrored on store
        row_heads = row_group * HG + tl.arange(0, HG)
        col_heads = col_group * HG + tl.arange(0, HG)
        image_offset = tl.cast(i, tl.int64) * image_stride
        acc = tl.zeros((HG * KP, HG * KP), dtype=tl.float32)
        for start in range(0, B, BJ):
            j = start + tl.arange(0, BJ)
            _, _, _, beta = _pair_coefficients(
                cos_ptr, rnorm_ptr, scale_ptr, bias_ptr, grad_ptr, i, j, B, first_text, HAS_POSITIVES)
            rows = _attention(queries, text_stride, keys, image_offset, j, row_heads, B, H, K, D_HEAD, HG, BJ, KP, DC)
            cols = _attention(queries, text_stride, keys, image_offset, j, col_heads, B, H, K, D_HEAD, HG, BJ, KP, DC)
            cols = cols * (0.5 * beta)[None, :, None]
            rows = tl.reshape(tl.permute(rows, (1, 0, 2)), (BJ, HG * KP)).to(gram.dtype.element_ty)
            cols = tl.reshape(tl.permute(cols, (1, 0, 2)), (BJ, HG * KP)).to(gram.dtype.element_ty)
            acc = _dot(tl.trans(rows), cols, acc)
        r = tl.arange(0, HG * KP)
        row_head, row_token = row_group * HG + r // KP, r % KP
        col_head, col_token = col_group * HG + r // KP, r % KP
        row_index = (row_head * K + row_token)[:, None]
        col_index = (col_head * K + col_token)[None, :]
        mask = ((row_head < H) & (row_token < K))[:, None] & ((col_head < H) & (col_token < K))[None, :]
        base = grad_gram + tl.cast(i, tl.int64) * (H * K) * (H * K)
        tl.store(base + row_index * (H * K) + col_index, acc, mask=mask)
        if row_group != col_group:
            tl.store(base + col_index * (H * K) + row_index, acc, mask=mask)


class _Blocks(NamedTuple):
    """Block sizes and head groups (powers of two) for given H, K, d."""
    KP: int  # tokens, padded
    DP: int  # channels, padded
    DC: int  # channels contracted per dot in the logits
    HP: int  # heads, padded (the forward takes all heads at once)
    forward_texts: int
    text_heads: int  # heads per group of _text_grad_kernel
    text_channels: int  # channels per program of _text_grad_kernel
    text_texts: int
    image_heads: int  # heads per group of _image_grad_kernel
    image_channels: int
    gram_heads: int  # heads per group (on each side) of _gram_grad_kernel
    gram_texts: int


# fp32 values one program keeps live (accumulators and [heads, texts, K] temporaries): with 8 warps
# about 64 registers a thread, which leaves room for operands (checked without spills for B/16 and
# G/14 shapes on sm_80 and sm_90 with triton.compile).
_LIVE_ELEMENTS = 24576
# tl.dot needs every dimension to be at least 16.
_MIN_DOT = 16
_TEXTS = 16  # texts per tile in the backward kernels
_WARPS = 8


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _blocks(heads: int, tokens: int, head_dim: int, live_elements: int = None) -> _Blocks:
    """Largest tiles whose live fp32 values stay within ``live_elements`` (default ``_LIVE_ELEMENTS``)."""
    budget = live_elements or _LIVE_ELEMENTS
    kp = max(_MIN_DOT, triton.next_power_of_2(tokens))
    dp = max(_MIN_DOT, triton.next_power_of_2(head_dim))
    hp = triton.next_power_of_2(heads)

    def most(live, largest):  # largest power of two n <= largest with live(n) within the budget
        n = largest
        while n > 1 and live(n) > budget:
            n //= 2
        return n

    # dq, dp [heads, texts, channels]; attention, products, G a, their gradient [heads, texts, K]
    text_channels = most(lambda c: _TEXTS * (2 * c + 4 * kp), dp)
    text_heads = most(lambda g: g * _TEXTS * (2 * text_channels + 4 * kp), hp)
    # dkey, dvalue [heads, K, channels]; the same four [heads, texts, K]
    image_channels = most(lambda c: 2 * kp * c + 4 * _TEXTS * kp, dp)
    image_heads = most(lambda g: g * (2 * kp * image_channels + 4 * _TEXTS * kp), hp)
    return _Blocks(
        KP=kp, DP=dp, DC=min(dp, 32), HP=hp,
        forward_texts=max(_MIN_DOT, _pow2_at_most(budget // (3 * hp * kp))),  # attention, products, G a
        text_heads=text_heads, text_channels=text_channels, text_texts=_TEXTS,
        image_heads=image_heads, image_channels=image_channels,
        # dG block [heads·K, heads·K]; two attentions [heads, texts, K]
        gram_heads=most(lambda g: (g * kp) ** 2 + 2 * g * 2 * _TEXTS * kp, hp), gram_texts=2 * _TEXTS,
    )


def _launch_args(keys, values, gram, queries, targets):
    """Common dtype, row strides and checks; returns the tensors to hand to the kernels."""
    b, heads, tokens, head_dim = keys.shape
    if values.shape != keys.shape or queries.shape[1:] != (heads, head_dim) or targets.shape != queries.shape:
        raise ValueError(
            f'fused_sigmoid_loss expects keys and values [b, H, K, d] and queries and targets [B, H, d]; got keys '
            f'{tuple(keys.shape)}, values {tuple(values.shape)}, queries {tuple(queries.shape)}, targets '
            f'{tuple(targets.shape)}')
    if gram.shape != (b, heads * tokens, heads * tokens):
        raise ValueError(f'gram must be [b, H·K, H·K] = {(b, heads * tokens, heads * tokens)}; got {tuple(gram.shape)}')
    if not keys.is_cuda and not INTERPRETED:
        raise RuntimeError(
            'The fused Triton loss runs on CUDA tensors; on the CPU only under Triton\'s interpreter '
            '(TRITON_INTERPRET=1 set before open_clip_llip.fused_loss is imported). '
            'Use OPEN_CLIP_LLIP_LOSS_IMPL=torch for the PyTorch path.')
    # MMA operands in one dtype: autocast's where it is on (as for a matmul: under amp_bf16 the queries
    # come in fp32, the rest in bf16), else the inputs' common dtype.
    if torch.is_autocast_enabled(keys.device.type):
        dtype = torch.get_autocast_dtype(keys.device.type)
    else:
        dtype = keys.dtype
        for tensor in (values, gram, queries, targets):
            dtype = torch.promote_types(dtype, tensor.dtype)

    def rows(x):  # inner dimensions contiguous, any stride between rows (the packed [N, 2, ...] features)
        x = x.to(dtype)
        return x if x[0].is_contiguous() and x.stride(-1) == 1 else x.contiguous()

    return tuple(rows(x) for x in (keys, values, queries, targets)) + (gram.to(dtype).contiguous(),)


class _FusedSigmoidLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, keys, values, gram, queries, targets, logit_scale, logit_bias, first_text, negative_only):
        keys_, values_, queries_, targets_, gram_ = _launch_args(keys, values, gram, queries, targets)
        b, heads, tokens, head_dim = keys.shape
        num_texts = queries.shape[0]
        blocks = _blocks(heads, tokens, head_dim)
        scale = logit_scale.detach().float().reshape(1)
        bias = logit_bias.detach().float().reshape(1)
        cos = torch.empty(b, num_texts, device=keys.device, dtype=torch.float32)
        rnorm = torch.empty_like(cos)
        tiles = triton.cdiv(num_texts, blocks.forward_texts)
        partial = torch.empty(b, tiles, device=keys.device, dtype=torch.float32)
        with _on_device(keys):
            _forward_kernel[(tiles, b)](
                keys_, values_, gram_, queries_, targets_, scale, bias, cos, rnorm, partial,
                num_texts, keys_.stride(0), queries_.stride(0), first_text,
                H=heads, K=tokens, D_HEAD=head_dim, HAS_POSITIVES=not negative_only,
                HP=blocks.HP, BJ=blocks.forward_texts, KP=blocks.KP, DC=blocks.DC, num_warps=_WARPS)
        ctx.save_for_backward(keys_, values_, gram_, queries_, targets_, scale, bias, cos, rnorm)
        ctx.first_text, ctx.negative_only = first_text, negative_only
        ctx.dtypes = tuple(x.dtype for x in (keys, values, gram, queries, targets, logit_scale, logit_bias))
        ctx.scalar_shapes = (logit_scale.shape, logit_bias.shape)
        return partial.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        keys, values, gram, queries, targets, scale, bias, cos, rnorm = ctx.saved_tensors
        b, heads, tokens, head_dim = keys.shape
        num_texts = queries.shape[0]
        blocks = _blocks(heads, tokens, head_dim)
        grad = grad_loss.detach().float().reshape(1)
        common = dict(H=heads, K=tokens, D_HEAD=head_dim, HAS_POSITIVES=not ctx.negative_only, KP=blocks.KP,
                      DC=blocks.DC)
        strides = (keys.stride(0), queries.stride(0), ctx.first_text)
        grad_keys = torch.empty(b, heads, tokens, head_dim, device=keys.device, dtype=torch.float32)
        grad_values = torch.empty_like(grad_keys)
        grad_gram = torch.empty(gram.shape, device=keys.device, dtype=torch.float32)
        grad_queries = torch.empty(num_texts, heads, head_dim, device=keys.device, dtype=torch.float32)
        grad_targets = torch.empty_like(grad_queries)
        tiles = triton.cdiv(num_texts, blocks.text_texts)
        grad_scale = torch.empty(tiles, device=keys.device, dtype=torch.float32)
        grad_bias = torch.empty_like(grad_scale)
        pair_args = (scale, bias, cos, rnorm, grad)
        with _on_device(keys):
            _text_grad_kernel[(tiles, triton.cdiv(heads, blocks.text_heads), triton.cdiv(head_dim, blocks.text_channels))](
                keys, values, gram, queries, targets, *pair_args, grad_queries, grad_targets, grad_scale, grad_bias,
                b, num_texts, *strides, HG=blocks.text_heads, BJ=blocks.text_texts, DB=blocks.text_channels, **common,
                num_warps=_WARPS)
            _image_grad_kernel[(b, triton.cdiv(heads, blocks.image_heads), triton.cdiv(head_dim, blocks.image_channels))](
                keys, values, gram, queries, targets, *pair_args, grad_keys, grad_values,
                num_texts, *strides, HG=blocks.image_heads, BJ=blocks.text_texts, DB=blocks.image_channels, **common,
                num_warps=_WARPS)
            groups = triton.cdiv(heads, blocks.gram_heads)
            _gram_grad_kernel[(b, groups, groups)](
                keys, gram, queries, *pair_args, grad_gram, num_texts, *strides,
                HG=blocks.gram_heads, BJ=blocks.gram_texts, **common, num_warps=_WARPS)
        dtypes = ctx.dtypes
        scale_shape, bias_shape = ctx.scalar_shapes
        return (grad_keys.to(dtypes[0]), grad_values.to(dtypes[1]), grad_gram.to(dtypes[2]),
                grad_queries.to(dtypes[3]), grad_targets.to(dtypes[4]),
                grad_scale.sum().reshape(scale_shape).to(dtypes[5]), grad_bias.sum().reshape(bias_shape).to(dtypes[6]),
                None, None)


def _on_device(tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def fused_sigmoid_loss(keys, values, gram, queries, targets, logit_scale, logit_bias,
                       first_text: int = 0, negative_only: bool = False) -> torch.Tensor:
    """Σ_{i,j} −log σ(y[i,j]·s[i,j]) over b images and all B texts given -> 0-d fp32 tensor.

    ``s = logit_scale·cos(z[i|j], t[j]) + logit_bias``; ``y = +1`` where ``j + first_text == i``
    (unless ``negative_only``), else −1: the semantics of ``open_clip_llip.loss._block_loss``.

    Args:
        keys, values: [b, H, K, d] (rows may be strided, as the unbound ``[b, 2, H, K, d]`` features are).
        gram: [b, H·K, H·K].
        queries, targets: [B, H, d] (q / τ and p = W_O t̂).
        logit_scale, logit_bias: 0-d or [1] tensors (the scale already exponentiated).

    Differentiable in all seven tensors; inputs may be bf16 (computed with fp32 accumulation).
    """
    return _FusedSigmoidLoss.apply(keys, values, gram, queries, targets, logit_scale, logit_bias,
                                   int(first_text), bool(negative_only))

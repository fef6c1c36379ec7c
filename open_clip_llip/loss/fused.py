"""Llip's conditioned scores and sigmoid loss fused in Triton kernels, forward and backward (METHOD §4).

``fused_sigmoid_loss`` has the semantics of ``open_clip_llip.loss.sigmoid._block_loss`` over all the texts a rank sees:
``Σ_{i,j} −log σ(y[i,j]·s[i,j])``, ``s = logit_scale·cos + logit_bias``, ``cos = Σ_{h,k} a·<value, p> / |z|``,
``|z|² = aᵀ G a``, ``a = softmax_k(<q, key>/τ)`` per head. Shapes (b images, B texts, H heads, K tokens, d = D/H):

    keys, values [b, H, K, d]   gram [b, H·K, H·K]   queries (raw q), targets (p = W_O t̂) [B, H, d]

Design
======

Per (image, text) pair the useful work is 2·K·D + (H·K)² multiply-adds forward (logits <q, key>, numerator
<p, value>, ``A G``) and about twice that backward: 3·(2·K·D + (H·K)²) in all. Between forward and backward only
the inputs and two fp32 numbers per pair are kept (cos and |z|², [b, B] each); nothing of size [b, B, H·K].

Every product is a 2-D ``tl.dot`` of one MMA tile per warp group (heads are unrolled statically, each head's
tiles held in tuples): no warp computes another's tile. On sm_90 a wgmma is 64 rows tall per warp group, so
where a text tile has fewer rows (K = 64: 16 or 32 texts) the attention is token-major (``mix_t``): [K, texts]
tiles, the logits key·qᵀ, the softmax over tokens, ``A G`` as (G Aᵀ)ᵀ, ∂q as keyᵀ·∂logitsᵀ, every product K or
64 channels tall. ``scripts/kernel_report.py`` reads the compiled code and checks that the tensor-core work
issued equals this design's count (×1.00, but on sm_90 ×1.02–1.1 where d = 96, 160 pads to 128, 192 for ∂key,
∂value and, at K = 64, ∂q), and that on sm_90 the launches doing the work issue it on wgmma.

* Forward (``_forward_kernel``, image-stationary): a program takes one image and a run of text tiles. Per tile,
  head by head: logits (text tile × key tile, or token-major key tile × text tile), softmax with ``exp2`` and
  log2(e)/τ applied in its FFMA (applying it to bf16 queries would round them again), <p, value>; then ``aᵀ G a``
  over the symmetric half: column head c takes Σ_{r<c} 2·a_r G[r, c] + a_c G[c, c], H(H+1)/2 of the H² blocks.
  The bf16 ``a`` of earlier heads stay in registers (K ≤ 32) or, token-major at K = 64, are the B operands Aᵀ of
  (G Aᵀ)ᵀ, an MMA of K rows (in shared memory). Writes cos, |z|² and, per program, Σ loss, Σ g·cos, Σ g
  (g = ∂loss/∂s), so that ∂scale and ∂bias cost nothing more.
* Backward, in schemes that are all in the autotuning space (the GPU's timing chooses, ``_choose``):

  - two-pass, as FlashAttention-2 splits its backward so that every gradient has one owner and nothing is atomic:
    ``_text_grad_kernel`` (text-stationary: a program owns a text tile and a group of HG heads and loops over all
    b images) computes ∂q = Σ ∂logits·key, ∂p = Σ α·a·value (token-major their transposes, in tiles of 64
    channels); ``_image_grad_kernel`` (image-stationary: a program owns an image and HG heads and loops over all B
    texts) ∂key = Σ ∂logitsᵀ·q, ∂value = Σ (α·a)ᵀ·p and ∂G = Σ (β/2)·a aᵀ over a circulant half (column head c
    takes the row heads c … c+⌊H/2⌋ mod H: each pair of heads once), in products 64 rows tall (sm_90) or 2·KP
    columns wide (sm_80).
  - one-pass (``_one_pass``), as FlashAttention-2 computes dQ: the image kernel's program, having ∂logits and
    α·a of a text tile for ∂key and ∂value, also multiplies them by the image's keys and values (2·K·d per pair
    and head) and adds the products into fp32 sums of ∂q, ∂p [B, H, d] with atomics: the text kernel's pass,
    which recomputes every head's attention, is not run. Programs start at different text tiles (image i at
    tile i) so that concurrent atomics rarely meet at one address. On sm_90 (on sm_80, B/16's ∂key/∂value launch
    with them issued 4.0× its design count). At B/16 also in one launch (``_one_launch``): every gradient from one
    image kernel, each head group's attention computed once per pair for all five (at L/14 and K = 64 it spills).

  With α = g/|z| and β = −g·cos/|z|² per pair (from the stored cos, |z|²), ∂L/∂a = α·<value, p> + β·(G a). The
  heads' attention streams through the program (``_attention_pass``): each head's ``a`` is computed once and
  consumed at once: (β·a_r) G[r, c] into the group's ∂L/∂a (β scales the rows of the MMA's A operand), a_rᵀ (β/2
  a_c) into the group's ∂G. Each gradient can be computed in its own launch or fused with others (``_Part``).

Why the attention is recomputed more than once even so: an image's gradient state (2·K·D + (H·K)²/2 fp32: 64 K
values, 256 KiB, at B/16; 295 K at G/14) exceeds a program's registers and even an SM's 227 KiB of shared memory, so
the heads split into groups (HG per program), and ∂key (and ∂q) need every head's attention (through G a): each
group computes all H heads' logits (K·D per pair per group), and ∂G's launch its own heads' and ⌊H/2⌋ more.
Those recomputed logits are the design's main excess over the useful count. The one-pass scheme saves the text
kernel's pass (B/16: 147,456 multiply-adds per pair, 1.2e12 per step at b = 256, B = 32,768) for 2·D fp32
atomic adds per pair (8.6e9 per step, 34 GB of read-modify-writes in L2, on sm_90 as 4-wide vector atomics):
milliseconds either way, which is why all are in the space. The one-pass ∂q, ∂p are sums in no fixed order:
under ``torch.use_deterministic_algorithms(True)`` only the two-pass scheme runs. Per pair (sm_90 plans of
``_plan``; the one-pass total with ``_one_pass``'s tiles):

    shape  H  K    d | forward  ∂q,∂p      ∂key,∂value  ∂G        | two-pass   one-pass   useful     ratios
    B/32   8  64   64 | 212,992  655,360    655,360      327,680   | 1,851,392  1,261,568  983,040    1.9, 1.3
    B/16   8  32   64 | 69,632   180,224    245,760      131,072   | 626,688    479,232    294,912    2.1, 1.6
    L/14   8  32   96 | 86,016   335,872    335,872      172,032   | 929,792    643,072    344,064    2.7, 1.9
    H/14   8  64  128 | 278,528  1,048,576  1,048,576    491,520   | 2,867,200  1,949,696  1,179,648  2.4, 1.7
    G/14   8  64  160 | 311,296  1,245,184  1,245,184    573,440   | 3,375,104  2,293,760  1,277,952  2.6, 1.8

At B/16 the one-pass backward in one launch (``_one_launch``) does 397,312 per pair, 1.35× the useful count
(``scripts/kernel_report.py`` prints these per launch, with what the compiled code issues). Memory traffic per
pair, bf16, from L2 (the image- or text-stationary side stays in shared memory only where the compiler keeps
it): the forward reads a text tile (4·D bytes per text) and the image's keys, values and half of G per tile of
64 texts (B/16: 2 + 2.2 KB per pair); ∂q/∂p reads per image and group the keys of every head, the group's
values and G columns (B/16: 2.3 KB per pair over its 4 groups); the image kernels read per text tile and group
the queries of every head (B/16: 2 KB per pair per group, 8 groups for ∂key/∂value, 5 heads' worth for ∂G).

Call pattern: ``LlipLoss`` gathers the texts of a step (OpenCLIP's exchange helpers, for every
``--loss-dist-impl``) and calls once per step over all B texts a rank sees, its b positives first. At b = 256,
B = 32,768 (world size 128) the grids are ≥ 1,024 programs (forward: 4 programs per image; ∂q/∂p: 256 text tiles ×
4 groups; image kernels: 256 images × 8 groups); the gradients are written once, in the inputs' dtypes (the
one-pass ∂q, ∂p after their fp32 sums: 2·B·D·4 bytes more, 128 MiB at B/16 with B = 32,768).

Precision: operands in the inputs' dtype (autocast's under autocast), fp32 accumulation and softmax; bf16 ``a``
only as MMA operands. fp32 inputs multiply in IEEE fp32 (``input_precision='ieee'``: FMAs, not TF32). |z|² is
clamped at 1e-24 exactly as the PyTorch path (the comparison is on |z|², stored, not on an approximate 1/|z|),
and a clamped |z| has no gradient; −log σ uses log1p (Goldberg's form); every offset that grows with b·B is
int64.

Plans (``_plan``, keyed on (H, K, d, sm_arch)) are the largest tiles that compile without spills within shared
memory and without duplicated MMA tiles: on sm_90 a warp group per 64 text rows; K = 64 shapes take 32 texts
in the forward and 16 in ∂q and ∂key (which hold every head's attention), on one warp group, token-major;
sm_80 takes 16 texts, every product wider than tall, on 4 warps (8 at K = 64); fp32 (for checking) 16 texts on
4 warps.

Autotuning (``_space``, keyed on (H, K, d, sm_arch)): the plan and up to two variants of it, 1–3 candidates per
launch, then each of those members' one-pass form (sm_90); every candidate ``scripts/kernel_report.py
--check`` compiles and passes at the shipped shapes:

    launch                         candidates besides the plan's
    forward                        the other residency (the image's keys, values, G on chip, or streamed)
    ∂G; ∂value, ∂p in own launches the other residency (not ∂value, ∂G on sm_90 at d > 128: they spill)
    ∂key/∂value, ∂G (sm_90, K≤32)  128 texts on 8 warps (two warp groups) besides 64 on 4
    forward (sm_90, K = 64)        16 texts besides 32
    ∂q, ∂key (every head's a)      not the other residency: one way or the other spills at some shape

On a GPU the first call at a shape times each launch's candidates (``triton.testing.do_bench``, with the real
arguments: every kernel only stores, or adds into sums zeroed before each run, so reruns are harmless) and keeps
the fastest for the process, keyed on the launch, dtype, sm_arch and b, B rounded up to powers of two
(``_fastest``); then the backward's schemes (``_schemes``: members grouped by the launches they make), each with
its launches' fastest candidates, the same way (``_choose``). On the CPU (the interpreter) the plan's candidates
and the two-pass scheme run. ``triton.autotune`` is not used because the candidates of a launch differ in more
than constexprs (the grid and the forward's partial sums follow the text tile) and one kernel serves launches
whose spaces differ; ``_launches`` describes each candidate for the report as for the run. Nothing here has run
on a GPU yet: ``scripts/device_check.py`` is the first thing to run on one (it times every candidate and checks
each scheme).

On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first
imported), which is how the tests check them against float64; there ``_mm`` multiplies bf16 operands in fp32,
which is exact, because the interpreter cannot multiply bf16.
"""
import contextlib
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
import triton.testing

from ..modeling.scoring import _EPS

# Whether the kernels below were built for Triton's interpreter (the CPU) rather than a GPU.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# |z|² at or below _EPS² is clamped there, as in open_clip_llip.modeling.scoring (the comparison is on |z|² itself).
_EPS_SQUARED = tl.constexpr(_EPS * _EPS)
_UPCAST_DOTS = tl.constexpr(INTERPRETED)
_LOG2E = math.log2(math.e)
_LN2 = tl.constexpr(math.log(2.))  # query_scale·ln 2 = 1/τ


# ----------------------------------------------------------------------------------------------------------------
# Building blocks. Every product is a 2-D tl.dot (one MMA tile per warp group: no warp computes another's tile).
# Text tiles are [BJ texts, ·]; image tiles [KP tokens, ·] of one head; d is contracted in chunks of DC.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, acc):
    """acc + a @ b with fp32 accumulation. fp32 operands multiply in IEEE fp32, not TF32. The interpreter cannot
    multiply bf16, so there bf16 operands go to fp32 first: exact, like the GPU's MMA, which sums exact products."""
    if _UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision='ieee')
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision='ieee')
    return tl.dot(a, b, acc)


# Tiles are loaded as (scalar base pointer) + (offsets that depend only on the tile's shape and text rows), so that
# the offsets are computed once and shared by every head and image: per-head offset tensors, hoisted out of the
# loops, would otherwise fill the registers.

@triton.jit
def _text_tile(ptr, text_stride, row0, B, h, start: tl.constexpr, BJ: tl.constexpr, DC: tl.constexpr,
               D_HEAD: tl.constexpr, VOL: tl.constexpr):
    """Head h of the texts row0 … row0 + BJ − 1 of [B, H, d] (rows ``text_stride`` apart), channels
    start … start + DC − 1: [BJ, DC]; 0 outside."""
    base = ptr + tl.cast(row0, tl.int64) * text_stride + h * D_HEAD + start
    rows = tl.arange(0, BJ)
    cols = tl.arange(0, DC)
    offsets = rows[:, None] * text_stride + cols[None, :]
    if D_HEAD % DC == 0:
        mask = (row0 + rows < B)[:, None]
    else:
        mask = (row0 + rows < B)[:, None] & (start + cols < D_HEAD)[None, :]
    return tl.load(base + offsets, mask=mask, other=0., volatile=VOL)


@triton.jit
def _image_tile(ptr, h, start: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, KP: tl.constexpr,
                DC: tl.constexpr, TRANSPOSED: tl.constexpr, VOL: tl.constexpr):
    """Head h of one image's keys or values [H, K, d] (``ptr`` at the image), channels start … start + DC − 1:
    [KP, DC], or [DC, KP] if TRANSPOSED; 0 outside."""
    tokens = tl.arange(0, KP)
    cols = tl.arange(0, DC)
    base = ptr + h * (K * D_HEAD) + start
    if TRANSPOSED:
        offsets = tokens[None, :] * D_HEAD + cols[:, None]
        mask = (tokens[None, :] < K) & (start + cols[:, None] < D_HEAD)
    else:
        offsets = tokens[:, None] * D_HEAD + cols[None, :]
        mask = (tokens[:, None] < K) & (start + cols[None, :] < D_HEAD)
    if K == KP and D_HEAD % DC == 0:
        return tl.load(base + offsets, volatile=VOL)
    return tl.load(base + offsets, mask=mask, other=0., volatile=VOL)


@triton.jit
def _head_products(text_ptr, text_stride, row0, B, image_ptr, h,
                   K: tl.constexpr, D_HEAD: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr,
                   TOKEN_MAJOR: tl.constexpr, VOL: tl.constexpr):
    """<text[j, h], image[h, k]> for a text tile and one head -> [BJ, KP] fp32 (the logits <q, key>, or <p, value>),
    or TOKEN_MAJOR its transpose [KP, BJ], image [KP, DC] @ textᵀ [DC, BJ]: KP rows, which a warp group's wgmma
    needs (64) where the text tile has fewer."""
    acc = tl.zeros((KP, BJ) if TOKEN_MAJOR else (BJ, KP), dtype=tl.float32)
    for start in tl.static_range(0, D_HEAD, DC):
        text = _text_tile(text_ptr, text_stride, row0, B, h, start, BJ, DC, D_HEAD, VOL)
        if TOKEN_MAJOR:
            acc = _mm(_image_tile(image_ptr, h, start, K, D_HEAD, KP, DC, False, VOL), tl.trans(text), acc)
        else:
            acc = _mm(text, _image_tile(image_ptr, h, start, K, D_HEAD, KP, DC, True, VOL), acc)
    return acc


@triton.jit
def _softmax(logits, query_scale, K: tl.constexpr, KP: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """softmax_k(logits / τ) with ``query_scale`` = log2(e) / τ: one FFMA and one exp2 per logit. Tokens run along
    axis 1 of [BJ, KP], or TOKEN_MAJOR axis 0 of [KP, BJ]."""
    axis: tl.constexpr = 0 if TOKEN_MAJOR else 1
    if K < KP:
        tokens = tl.arange(0, KP)
        logits = tl.where((tokens[:, None] if TOKEN_MAJOR else tokens[None, :]) < K, logits, -float('inf'))
    top = tl.expand_dims(tl.max(logits, axis=axis), axis)
    weights = tl.exp2(logits * query_scale - top * query_scale)
    return weights * tl.expand_dims(1. / tl.sum(weights, axis=axis), axis)


@triton.jit
def _gram_block(gram_ptr, row_head, col_head, DOUBLE: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                KP: tl.constexpr, PH: tl.constexpr, VOL: tl.constexpr):
    """(2 if DOUBLE else 1) · G[rows of heads row_head … row_head + PH − 1, columns of col_head] -> [PH·KP, KP];
    0 outside. ``gram_ptr`` is at the image."""
    r = tl.arange(0, PH * KP)
    c = tl.arange(0, KP)
    offsets = ((r // KP) * K + r % KP)[:, None] * (H * K) + c[None, :]
    base = gram_ptr + row_head * K * (H * K) + col_head * K
    if K == KP:
        block = tl.load(base + offsets, volatile=VOL)
    else:
        block = tl.load(base + offsets, mask=((r % KP) < K)[:, None] & (c < K)[None, :], other=0., volatile=VOL)
    if DOUBLE:
        if _UPCAST_DOTS:  # the interpreter has no bf16 arithmetic
            block = block.to(tl.float32)
        block = block * 2  # exact in any float format
    return block


@triton.jit
def _split_panel(y, BJ: tl.constexpr, KP: tl.constexpr, PH: tl.constexpr):
    """[PH·KP, BJ] (heads one above the other) -> tuple of PH [KP, BJ]; PH is 1 or 2."""
    if PH == 1:
        out = (y,)
    else:
        first, second = tl.split(tl.permute(tl.reshape(y, (2, KP, BJ)), (1, 2, 0)))
        out = (first, second)
    return out


@triton.jit
def _mix(attention, gram_ptr, first_head, panel, row_stop, double_stop,
         H: tl.constexpr, K: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, PH: tl.constexpr,
         MIX_T: tl.constexpr, VOL: tl.constexpr):
    """(A G) for the PH column heads of ``panel`` -> tuple of PH [BJ, KP] fp32, or MIX_T of PH (A G)ᵀ [KP, BJ].

    ``attention`` holds one tile per head, A [BJ, KP] or MIX_T Aᵀ [KP, BJ], head ``(first_head + r) % H`` at
    position r (positions are static, heads may be rotated); the sum runs over positions r < ``row_stop``, doubled
    for r < ``double_stop`` (the forward's symmetric half). MIX_T: one [PH·KP, BJ] product whose A operand is a panel
    of G rows and whose B operand is Aᵀ (in shared memory, stored once however often it is used); else PH products
    [BJ, KP] whose A operand, A, is in registers.
    """
    if MIX_T:
        acc = tl.zeros((PH * KP, BJ), dtype=tl.float32)
        for r in tl.static_range(row_stop):
            # The panel's PH heads are consecutive (the plan makes PH divide the group, and groups divide H).
            block = _gram_block(gram_ptr, (first_head + panel * PH) % H, (first_head + r) % H, r < double_stop,
                                H, K, KP, PH, VOL)
            acc = _mm(block, attention[r], acc)
        return _split_panel(acc, BJ, KP, PH)
    else:
        out = ()
        for p in tl.static_range(PH):
            acc = tl.zeros((BJ, KP), dtype=tl.float32)
            for r in tl.static_range(row_stop):
                # G[head r rows, head c columns] = (G[c rows, r columns])ᵀ: G is symmetric.
                block = _gram_block(gram_ptr, (first_head + r) % H, (first_head + panel * PH + p) % H, r < double_stop,
                                    H, K, KP, 1, VOL)
                acc = _mm(attention[r], block, acc)
            out = out + (acc,)
        return out


@triton.jit
def _join_pair(x, y, ROWS: tl.constexpr, COLS: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """Two tiles [ROWS, COLS] side by side -> [ROWS, 2·COLS], or TOKEN_MAJOR one above the other -> [2·ROWS, COLS]."""
    if TOKEN_MAJOR:
        out = tl.reshape(tl.permute(tl.join(x, y), (2, 0, 1)), (2 * ROWS, COLS))
    else:
        out = tl.reshape(tl.permute(tl.join(x, y), (0, 2, 1)), (ROWS, 2 * COLS))
    return out


@triton.jit
def _join_heads(tiles, RP: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """RP tiles [BJ, KP] side by side -> [BJ, RP·KP], or TOKEN_MAJOR RP tiles [KP, BJ] one above the other
    -> [RP·KP, BJ]; RP is 1, 2 or 4."""
    ROWS: tl.constexpr = KP if TOKEN_MAJOR else BJ
    COLS: tl.constexpr = BJ if TOKEN_MAJOR else KP
    if RP == 1:
        out = tiles[0]
    elif RP == 2:
        out = _join_pair(tiles[0], tiles[1], ROWS, COLS, TOKEN_MAJOR)
    else:
        first = _join_pair(tiles[0], tiles[1], ROWS, COLS, TOKEN_MAJOR)
        second = _join_pair(tiles[2], tiles[3], ROWS, COLS, TOKEN_MAJOR)
        out = _join_pair(first, second, 2 * ROWS if TOKEN_MAJOR else ROWS, COLS if TOKEN_MAJOR else 2 * COLS,
                         TOKEN_MAJOR)
    return out


@triton.jit
def _per_text(x, TOKEN_MAJOR: tl.constexpr):
    """[BJ] per text -> broadcastable against a [BJ, KP] tile, or TOKEN_MAJOR a [KP, BJ] one."""
    return x[None, :] if TOKEN_MAJOR else x[:, None]


@triton.constexpr_function
def _gram_block_used(c, q, RP, ROWS, COUNT, H):
    """Whether the ∂G column of the group's c-th head takes a row of block q (positions q·RP … q·RP + RP − 1): a
    position p < COUNT at circulant offset (p − c) mod H < ROWS. Evaluated when compiling."""
    c, q, RP, ROWS, COUNT, H = (getattr(x, 'value', x) for x in (c, q, RP, ROWS, COUNT, H))
    return any(q * RP + t < COUNT and (q * RP + t - c) % H < ROWS for t in range(RP))


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], accurate where 1 + x rounds (Goldberg's trick)."""
    u = 1. + x
    return tl.where(u == 1., x, tl.log(u) * (x / tl.where(u == 1., 1., u - 1.)))


@triton.jit
def _pair_coefficients(cos_ptr, sq_norm_ptr, pair_offset, rows, B, i, first_text, scale, bias, grad,
                       HAS_POSITIVES: tl.constexpr):
    """Per pair (image i, texts ``rows``): α = ∂L/∂numerator and β = 2·∂L/∂|z|², [BJ] each, 0 for padded texts.

    With g = ∂L/∂cos: α = g/|z|, β = −g·cos/|z|², and β = 0 where |z|² was clamped (as clamp_min in PyTorch).
    """
    valid = rows < B
    cos = tl.load(cos_ptr + pair_offset + rows, mask=valid, other=0.)
    sq_norm = tl.load(sq_norm_ptr + pair_offset + rows, mask=valid, other=1.)
    positive = (rows + first_text == i) & HAS_POSITIVES
    grad_logits = grad * (tl.sigmoid(scale * cos + bias) - tl.where(positive, 1., 0.))
    grad_cos = tl.where(valid, grad_logits * scale, 0.)
    rnorm = tl.div_rn(1., tl.sqrt_rn(tl.maximum(sq_norm, _EPS_SQUARED)))
    alpha = grad_cos * rnorm
    beta = tl.where(sq_norm > _EPS_SQUARED, -grad_cos * cos * rnorm * rnorm, 0.)
    return alpha, beta


@triton.jit
def _attention_pass(queries, targets, text_stride, row0, B, keys, values, gram, first_head, query_scale, alpha, beta,
                    grad_g, COUNT: tl.constexpr, HG: tl.constexpr, LOGITS: tl.constexpr, GRAM: tl.constexpr,
                    ROWS: tl.constexpr, RP: tl.constexpr, H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr,
                    BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr, MIX_T: tl.constexpr, VOL: tl.constexpr,
                    GRAM_T: tl.constexpr = False):
    """Streams the attention of COUNT heads, each consumed as soon as it is computed, so that only one head's a is
    live besides the group's (heads first_head … first_head + HG − 1). Tiles are [BJ, KP], or with MIX_T
    token-major [KP, BJ] (for text tiles of fewer than 64 rows: every product KP rows tall, one warp group's wgmma;
    on two warp groups each would compute the whole product): the logits key·qᵀ, the softmax over tokens.

    * LOGITS: ∂L/∂logits of the group's heads. ∂L/∂a = α·<value, p> + β·(G a) (G symmetric), with
      β·(G a)[c] = Σ_r (β·a_r) G[r, c] (scaling a's rows by β scales the product's rows): text-major with A from
      registers, or with MIX_T Σ_r G[c, r] (β·a_r)ᵀ, an MMA of KP rows whose B operand is in shared memory; then
      the softmax backward, a ∘ (∂L/∂a − <a, ∂L/∂a>).
    * GRAM: the group's circulant ∂G columns, ``grad_g[c·NB + q] += A_qᵀ (β/2·a_c)`` with A_q the RP heads of
      positions q·RP … q·RP + RP − 1 side by side (zeros past COUNT; with MIX_T A_qᵀ is the RP tiles one above
      the other), so that the product is 64 rows tall (RP·KP; a [32, 32] MMA tile on 4 warps would be laid out
      with two warps duplicating the other two); with GRAM_T its transpose ``(β/2·a_c)ᵀ A_q``, [KP, RP·KP], wider
      than tall as sm_80's warp layout needs (``_plan``). The blocks q that hold none of the column's rows
      c … c + ROWS − 1 (mod H) are skipped.

    When all H heads stream and GRAM is off, they stream in their natural order (static offsets, no registers for
    addresses) and the group's a are picked out as they pass; otherwise the order is rotated, head
    ``(first_head + r) % H`` at position r, so that the group comes first (GRAM needs its a from the start).

    Returns (the group's a, in the operands' dtype; the group's ∂L/∂logits, fp32; grad_g), a and ∂L/∂logits in
    the tiles' orientation.
    """
    ROTATE: tl.constexpr = GRAM or COUNT < H
    NB: tl.constexpr = (COUNT + RP - 1) // RP  # ∂G row blocks
    TILE: tl.constexpr = (KP, BJ) if MIX_T else (BJ, KP)
    TOKENS: tl.constexpr = 0 if MIX_T else 1  # the tiles' token axis
    dtype = keys.dtype.element_ty
    pending = ()
    own = ()
    half_beta = ()
    grad_a = ()
    for c in tl.static_range(HG):
        if ROTATE:
            a = _softmax(_head_products(queries, text_stride, row0, B, keys, (first_head + c) % H,
                                        K, D_HEAD, BJ, KP, DC, MIX_T, VOL), query_scale, K, KP, MIX_T)
            own = own + (a.to(dtype),)
            if GRAM:
                half_beta = half_beta + ((_per_text(0.5 * beta, MIX_T) * a).to(dtype),)
        else:
            own = own + (tl.zeros(TILE, dtype=dtype),)
        if LOGITS:
            grad_a = grad_a + (tl.zeros(TILE, dtype=tl.float32),)
    for r in tl.static_range(COUNT):
        if ROTATE:
            head = (first_head + r) % H
            if r < HG:
                a = own[r].to(tl.float32)
            else:
                a = _softmax(_head_products(queries, text_stride, row0, B, keys, head, K, D_HEAD, BJ, KP, DC, MIX_T,
                                            VOL), query_scale, K, KP, MIX_T)
        else:
            head = r
            a = _softmax(_head_products(queries, text_stride, row0, B, keys, r, K, D_HEAD, BJ, KP, DC, MIX_T, VOL),
                         query_scale, K, KP, MIX_T)
            picked = ()
            for c in tl.static_range(HG):
                picked = picked + (tl.where(first_head + c == r, a.to(dtype), own[c]),)
            own = picked
        if LOGITS:
            weighted = (_per_text(beta, MIX_T) * a).to(dtype)
            updated = ()
            for c in tl.static_range(HG):
                if MIX_T:
                    block = _gram_block(gram, (first_head + c) % H, head, False, H, K, KP, 1, VOL)  # G[c, r]
                    updated = updated + (_mm(block, weighted, grad_a[c]),)
                else:
                    block = _gram_block(gram, head, (first_head + c) % H, False, H, K, KP, 1, VOL)  # G[r, c]
                    updated = updated + (_mm(weighted, block, grad_a[c]),)
            grad_a = updated
        if GRAM:
            pending = pending + (a.to(dtype),)
            if r % RP == RP - 1 or r == COUNT - 1:
                for _ in tl.static_range(RP - 1 - r % RP):  # pad the last block
                    pending = pending + (tl.zeros(TILE, dtype=dtype),)
                joined = _join_heads(pending, RP, BJ, KP, MIX_T)  # A_q [BJ, RP·KP], or MIX_T A_qᵀ [RP·KP, BJ]
                operand = joined if GRAM_T != MIX_T else tl.trans(joined)
                pending = ()
                updated = ()
                for n in tl.static_range(HG * NB):
                    if n % NB == r // RP and _gram_block_used(n // NB, n % NB, RP, ROWS, COUNT, H):
                        scaled = half_beta[n // NB]
                        if GRAM_T:  # (β/2·a_c)ᵀ A_q: [KP, RP·KP]
                            updated = updated + (_mm(scaled if MIX_T else tl.trans(scaled), operand, grad_g[n]),)
                        else:
                            updated = updated + (_mm(operand, tl.trans(scaled) if MIX_T else scaled, grad_g[n]),)
                    else:
                        updated = updated + (grad_g[n],)
                grad_g = updated
    grad_logits = ()
    if LOGITS:
        for c in tl.static_range(HG):
            a = own[c].to(tl.float32)
            products = _head_products(targets, text_stride, row0, B, values, (first_head + c) % H,
                                      K, D_HEAD, BJ, KP, DC, MIX_T, VOL)
            grad = _per_text(alpha, MIX_T) * products + grad_a[c]
            grad_logits = grad_logits + (a * (grad - tl.expand_dims(tl.sum(a * grad, axis=TOKENS), TOKENS)),)
    return own, grad_logits, grad_g


@triton.jit
def _zeros(COUNT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A tuple of COUNT fp32 accumulators [ROWS, COLS]."""
    out = ()
    for _ in tl.static_range(COUNT):
        out = out + (tl.zeros((ROWS, COLS), dtype=tl.float32),)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, cos_ptr, sq_norm_ptr, partial_ptr,
                    B, image_stride, text_stride, first_text, query_scale, tiles_per_split,
                    H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HAS_POSITIVES: tl.constexpr,
                    BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr, PH: tl.constexpr, MIX_T: tl.constexpr,
                    VOL: tl.constexpr):
    """One image against ``tiles_per_split`` text tiles: cos and |z|² per pair; Σ loss, Σ g·cos, Σ g per program,
    g = ∂(−log σ(y·s))/∂s."""
    TOKENS: tl.constexpr = 0 if MIX_T else 1  # the attention tiles' token axis
    split = tl.program_id(0)
    i = tl.program_id(1)
    keys += tl.cast(i, tl.int64) * image_stride
    values += tl.cast(i, tl.int64) * image_stride
    gram += tl.cast(i, tl.int64) * (H * K) * (H * K)
    pair_offset = tl.cast(i, tl.int64) * B
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    loss_sum = tl.zeros((BJ,), dtype=tl.float32)
    grad_cos_sum = tl.zeros((BJ,), dtype=tl.float32)
    grad_sum = tl.zeros((BJ,), dtype=tl.float32)
    for t in range(tiles_per_split):
        row0 = (split * tiles_per_split + t) * BJ
        rows = row0 + tl.arange(0, BJ)
        numerator = tl.zeros((BJ,), dtype=tl.float32)
        sq_norm = tl.zeros((BJ,), dtype=tl.float32)
        attention = ()
        for panel in tl.static_range(H // PH):
            rounded = ()  # the panel's a as the products see it (rounded to the input dtype)
            for p in tl.static_range(PH):
                head = panel * PH + p
                a = _softmax(_head_products(queries, text_stride, row0, B, keys, head, K, D_HEAD, BJ, KP, DC, MIX_T,
                                            VOL), query_scale, K, KP, MIX_T)
                products = _head_products(targets, text_stride, row0, B, values, head, K, D_HEAD, BJ, KP, DC, MIX_T,
                                          VOL)
                numerator += tl.sum(a * products, axis=TOKENS)
                operand = a.to(keys.dtype.element_ty)
                attention = attention + (operand,)
                rounded = rounded + (operand.to(tl.float32),)
            # aᵀ G a over the symmetric half: earlier panels' rows doubled, the panel's own diagonal block once.
            mixed = _mix(attention, gram, 0, panel, (panel + 1) * PH, panel * PH, H, K, BJ, KP, PH, MIX_T, VOL)
            for p in tl.static_range(PH):
                sq_norm += tl.sum(rounded[p] * mixed[p], axis=TOKENS)
        rnorm = tl.div_rn(1., tl.sqrt_rn(tl.maximum(sq_norm, _EPS_SQUARED)))
        cos = numerator * rnorm
        logits = scale * cos + bias
        valid = rows < B
        positive = (rows + first_text == i) & HAS_POSITIVES
        signed = tl.where(positive, logits, -logits)
        loss = tl.maximum(-signed, 0.) + _log1p(tl.exp(-tl.abs(signed)))  # −log σ(y·s), stable
        grad = tl.where(valid, tl.sigmoid(logits) - tl.where(positive, 1., 0.), 0.)
        tl.store(cos_ptr + pair_offset + rows, cos, mask=valid)
        tl.store(sq_norm_ptr + pair_offset + rows, sq_norm, mask=valid)
        loss_sum += tl.where(valid, loss, 0.)
        grad_cos_sum += grad * cos
        grad_sum += grad
    out = partial_ptr + (i * tl.num_programs(0) + split) * 3
    tl.store(out, tl.sum(loss_sum))
    tl.store(out + 1, tl.sum(grad_cos_sum))
    tl.store(out + 2, tl.sum(grad_sum))


@triton.jit
def _text_products(grad_logits, c: tl.constexpr, weighted, keys, values, head, start: tl.constexpr, grad_q, grad_p,
                   n: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, KP: tl.constexpr, DT: tl.constexpr,
                   QUERY: tl.constexpr, TARGET: tl.constexpr, MIX_T: tl.constexpr, VOL: tl.constexpr):
    """grad_q[n] + ∂logits·key (QUERY; ∂logits = grad_logits[c]) and grad_p[n] + (α·a)·value (TARGET; α·a =
    ``weighted``) for one image, one head and channels start … start + DT − 1 of a text tile: [BJ, DT], or MIX_T
    (token-major ∂logits, α·a [KP, BJ]) their transposes [DT, BJ] (keyᵀ ∂logitsᵀ: DT rows, 64 for a warp group's
    wgmma, where the text tile has fewer); tuples of one tile each, empty where not computed."""
    new_q = ()
    new_p = ()
    if QUERY:
        key = _image_tile(keys, head, start, K, D_HEAD, KP, DT, MIX_T, VOL)
        grad = grad_logits[c].to(key.dtype)
        new_q = ((_mm(key, grad, grad_q[n]) if MIX_T else _mm(grad, key, grad_q[n])),)
    if TARGET:
        value = _image_tile(values, head, start, K, D_HEAD, KP, DT, MIX_T, VOL)
        new_p = ((_mm(value, weighted, grad_p[n]) if MIX_T else _mm(weighted, value, grad_p[n])),)
    return new_q, new_p


@triton.jit
def _text_offsets(rows, head, start: tl.constexpr, B, H: tl.constexpr, D_HEAD: tl.constexpr, DT: tl.constexpr,
                  MIX_T: tl.constexpr):
    """Offsets and mask of head ``head``, channels start … start + DT − 1 of the texts ``rows`` in a contiguous
    [B, H, d] gradient: [BJ, DT] each, or MIX_T [DT, BJ]. ``head`` may be past H (the last group of heads), which
    masks it all."""
    cols = start + tl.arange(0, DT)
    if MIX_T:
        offsets = (rows[None, :].to(tl.int64) * H + head) * D_HEAD + cols[:, None]
        mask = (rows[None, :] < B) & (cols[:, None] < D_HEAD) & (head < H)
    else:
        offsets = (rows[:, None].to(tl.int64) * H + head) * D_HEAD + cols[None, :]
        mask = (rows[:, None] < B) & (cols[None, :] < D_HEAD) & (head < H)
    return offsets, mask


@triton.jit
def _text_grad_step(grad_q, grad_p, keys, values, gram, queries, targets, text_stride, row0, B, first_head, query_scale,
                    alpha, beta, H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HG: tl.constexpr,
                    BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr, QUERY: tl.constexpr, TARGET: tl.constexpr,
                    MIX_T: tl.constexpr, VOL: tl.constexpr, DK: tl.constexpr):
    """One image's contribution to the text tile's ∂q = Σ ∂(logits)·key (QUERY) and ∂p = Σ α·a·value (TARGET)
    for the group's heads, in tiles [BJ, DK channels], or MIX_T their transposes [DK, BJ] (keyᵀ ∂logitsᵀ: DK rows,
    64 for a warp group's wgmma, where the text tile has fewer). ∂q needs every head's attention (through G a); ∂p
    only the group's."""
    CHUNKS: tl.constexpr = (D_HEAD + DK - 1) // DK
    own, grad_logits, _ = _attention_pass(queries, targets, text_stride, row0, B, keys, values, gram, first_head,
                                          query_scale, alpha, beta, (), H if QUERY else HG, HG, QUERY, False, 1, 1, H,
                                          K, D_HEAD, BJ, KP, DC, MIX_T, VOL)
    new_q = ()
    new_p = ()
    for c in tl.static_range(HG):
        weighted = (_per_text(alpha, MIX_T) * own[c].to(tl.float32)).to(own[c].dtype)
        for start in tl.static_range(0, D_HEAD, DK):
            q, p = _text_products(grad_logits, c, weighted, keys, values, (first_head + c) % H, start, grad_q, grad_p,
                                  c * CHUNKS + start // DK, K, D_HEAD, KP, DK, QUERY, TARGET, MIX_T, VOL)
            new_q = new_q + q
            new_p = new_p + p
    return new_q, new_p


@triton.jit
def _text_grad_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, grad_ptr, cos_ptr, sq_norm_ptr,
                      grad_queries, grad_targets, b, B, image_stride, text_stride, first_text, query_scale,
                      H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr, HAS_POSITIVES: tl.constexpr,
                      HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr, QUERY: tl.constexpr,
                      TARGET: tl.constexpr, MIX_T: tl.constexpr, VOL: tl.constexpr, DK: tl.constexpr):
    """∂L/∂q (QUERY), ∂L/∂p (TARGET) [B, H, d] of one text tile and HG heads (a group), summed over all b images,
    in tiles of DK channels (``_text_grad_step``).

    ∂L/∂q is with respect to the raw queries (logits <q, key>/τ).
    """
    CHUNKS: tl.constexpr = (D_HEAD + DK - 1) // DK
    tile = tl.program_id(0)
    first_head = tl.program_id(1) * HG
    row0 = tile * BJ
    rows = row0 + tl.arange(0, BJ)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    grad = tl.load(grad_ptr)
    grad_q = _zeros(HG * CHUNKS if QUERY else 0, DK if MIX_T else BJ, BJ if MIX_T else DK)
    grad_p = _zeros(HG * CHUNKS if TARGET else 0, DK if MIX_T else BJ, BJ if MIX_T else DK)
    for i in range(b):
        alpha, beta = _pair_coefficients(cos_ptr, sq_norm_ptr, tl.cast(i, tl.int64) * B, rows, B, i, first_text,
                                         scale, bias, grad, HAS_POSITIVES)
        grad_q, grad_p = _text_grad_step(
            grad_q, grad_p, keys + tl.cast(i, tl.int64) * image_stride, values + tl.cast(i, tl.int64) * image_stride,
            gram + tl.cast(i, tl.int64) * (H * K) * (H * K), queries, targets, text_stride, row0, B, first_head,
            query_scale, alpha, beta, H, K, D_HEAD, HG, BJ, KP, DC, QUERY, TARGET, MIX_T, VOL, DK)
    for c in tl.static_range(HG):
        for start in tl.static_range(0, D_HEAD, DK):
            offsets, mask = _text_offsets(rows, first_head + c, start, B, H, D_HEAD, DK, MIX_T)
            if QUERY:
                tl.store(grad_queries + offsets, grad_q[c * CHUNKS + start // DK] * (query_scale * _LN2), mask=mask)
            if TARGET:
                tl.store(grad_targets + offsets, grad_p[c * CHUNKS + start // DK], mask=mask)


@triton.jit
def _image_grad_step(grad_k, grad_v, grad_g, keys, values, gram, queries, targets, grad_queries_sum, grad_targets_sum,
                     text_stride, row0, B, first_head, query_scale, alpha, beta, H: tl.constexpr, K: tl.constexpr,
                     D_HEAD: tl.constexpr, HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr, DC: tl.constexpr,
                     KEY: tl.constexpr, VALUE: tl.constexpr, GRAM: tl.constexpr, QUERY: tl.constexpr,
                     TARGET: tl.constexpr, ROWS: tl.constexpr, RP: tl.constexpr, NEEDED: tl.constexpr,
                     DK: tl.constexpr, MIX_T: tl.constexpr, VOL: tl.constexpr, GRAM_T: tl.constexpr):
    """One text tile's contribution to the image's ∂key (KEY), ∂value (VALUE) and ∂G columns (GRAM) of the group's
    heads, ∂key, ∂value in tiles [DK channels, KP]; and the tile's ∂q (QUERY), ∂p (TARGET) from this image, added
    to the fp32 sums ``grad_queries_sum``, ``grad_targets_sum`` [B, H, d] with atomics, in tiles of DT channels
    (as the text kernel's: DK token-major, else DC)."""
    CHUNKS: tl.constexpr = (D_HEAD + DK - 1) // DK
    DT: tl.constexpr = DK if MIX_T else DC
    own, grad_logits, grad_g = _attention_pass(queries, targets, text_stride, row0, B, keys, values, gram, first_head,
                                               query_scale, alpha, beta, grad_g, NEEDED, HG, KEY or QUERY, GRAM, ROWS,
                                               RP, H, K, D_HEAD, BJ, KP, DC, MIX_T, VOL, GRAM_T)
    new_k = ()
    new_v = ()
    rows = row0 + tl.arange(0, BJ)
    for c in tl.static_range(HG):
        head = (first_head + c) % H
        weighted = (_per_text(alpha, MIX_T) * own[c].to(tl.float32)).to(own[c].dtype)
        if QUERY or TARGET:
            for start in tl.static_range(0, D_HEAD, DT):
                zeros = (tl.zeros((DT, BJ) if MIX_T else (BJ, DT), dtype=tl.float32),)
                q, p = _text_products(grad_logits, c, weighted, keys, values, head, start, zeros, zeros, 0, K,
                                      D_HEAD, KP, DT, QUERY, TARGET, MIX_T, VOL)
                offsets, mask = _text_offsets(rows, first_head + c, start, B, H, D_HEAD, DT, MIX_T)
                if QUERY:
                    tl.atomic_add(grad_queries_sum + offsets, q[0] * (query_scale * _LN2), mask=mask, sem='relaxed')
                if TARGET:
                    tl.atomic_add(grad_targets_sum + offsets, p[0], mask=mask, sem='relaxed')
        if KEY:
            grad = grad_logits[c].to(own[c].dtype)
        if MIX_T:  # B operands [BJ, KP], in shared memory: the transposes are in how they are stored there
            weighted = tl.trans(weighted)
            if KEY:
                grad = tl.trans(grad)
        for start in tl.static_range(0, D_HEAD, DK):
            if KEY:
                query = tl.trans(_text_tile(queries, text_stride, row0, B, head, start, BJ, DK, D_HEAD, VOL))
                new_k = new_k + (_mm(query, grad, grad_k[c * CHUNKS + start // DK]),)
            if VALUE:
                target = tl.trans(_text_tile(targets, text_stride, row0, B, head, start, BJ, DK, D_HEAD, VOL))
                new_v = new_v + (_mm(target, weighted, grad_v[c * CHUNKS + start // DK]),)
    return new_k, new_v, grad_g


@triton.jit
def _image_grad_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, grad_ptr, cos_ptr, sq_norm_ptr,
                       grad_keys, grad_values, grad_gram, grad_queries_sum, grad_targets_sum, B, image_stride,
                       text_stride, first_text, query_scale, H: tl.constexpr, K: tl.constexpr, D_HEAD: tl.constexpr,
                       HAS_POSITIVES: tl.constexpr, HG: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr,
                       DC: tl.constexpr, KEY: tl.constexpr, VALUE: tl.constexpr, GRAM: tl.constexpr,
                       QUERY: tl.constexpr, TARGET: tl.constexpr, MIX_T: tl.constexpr, VOL: tl.constexpr,
                       DK: tl.constexpr, GRAM_T: tl.constexpr, RP: tl.constexpr):
    """One image and HG heads (a group), summed over all B texts: ∂L/∂key (KEY), ∂L/∂value (VALUE) [b, H, K, d] and
    the group's columns of ∂L/∂G = Σ_j (β/2)·a aᵀ over a circulant half (GRAM): column head c takes the row heads
    c, c+1, …, c+⌊H/2⌋ (mod H), so that every pair of heads is computed once (twice only for the H/2-apart pairs
    when H is even; the larger c does not store them); each block is stored with its mirror. With QUERY, TARGET
    (the one-pass backward) also this image's share of its texts' ∂q, ∂p, added to the zeroed fp32 sums
    ``grad_queries_sum``, ``grad_targets_sum`` [B, H, d] with atomics; programs start at different text tiles
    (image i at tile i) so that the images' atomics rarely meet at one address.

    ∂key, ∂value accumulate as [DK channels, KP] tiles; ∂G in blocks [RP·KP, KP] (A_qᵀ · β/2 a_c) of RP row heads,
    or with GRAM_T [KP, RP·KP] ((β/2 a_c)ᵀ A_q). The plan picks DK, RP and GRAM_T for the MMA's layout (``_plan``).
    """
    CHUNKS: tl.constexpr = (D_HEAD + DK - 1) // DK
    ROWS: tl.constexpr = H // 2 + 1 if H // 2 + 1 < H else H  # row heads per ∂G column
    # Heads whose attention the program needs: all for ∂L/∂key and ∂L/∂q (through G a); the group and ⌊H/2⌋ more
    # for ∂G; the group for ∂L/∂value and ∂L/∂p.
    NEEDED: tl.constexpr = H if KEY or QUERY else ((HG + ROWS - 1 if HG + ROWS - 1 < H else H) if GRAM else HG)
    NB: tl.constexpr = (NEEDED + RP - 1) // RP
    i = tl.program_id(0)
    first_head = tl.program_id(1) * HG
    keys += tl.cast(i, tl.int64) * image_stride
    values += tl.cast(i, tl.int64) * image_stride
    gram += tl.cast(i, tl.int64) * (H * K) * (H * K)
    pair_offset = tl.cast(i, tl.int64) * B
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    grad = tl.load(grad_ptr)
    # Accumulators: tuples of tiles, empty when not computed.
    grad_k = _zeros(HG * CHUNKS if KEY else 0, DK, KP)
    grad_v = _zeros(HG * CHUNKS if VALUE else 0, DK, KP)
    grad_g = _zeros(HG * NB if GRAM else 0, KP if GRAM_T else RP * KP, RP * KP if GRAM_T else KP)
    span = tl.cdiv(B, BJ) * BJ
    shift = (i * BJ) % span
    for row0 in range(0, B, BJ):
        start = row0
        if QUERY or TARGET:
            start = (row0 + shift) % span
        rows = start + tl.arange(0, BJ)
        alpha, beta = _pair_coefficients(cos_ptr, sq_norm_ptr, pair_offset, rows, B, i, first_text,
                                         scale, bias, grad, HAS_POSITIVES)
        grad_k, grad_v, grad_g = _image_grad_step(
            grad_k, grad_v, grad_g, keys, values, gram, queries, targets, grad_queries_sum, grad_targets_sum,
            text_stride, start, B, first_head, query_scale, alpha, beta, H, K, D_HEAD, HG, BJ, KP, DC, KEY, VALUE,
            GRAM, QUERY, TARGET, ROWS, RP, NEEDED, DK, MIX_T, VOL, GRAM_T)
    tokens = tl.arange(0, KP)
    for c in tl.static_range(HG):
        head = first_head + c
        for start_c in tl.static_range(0, D_HEAD, DK):
            cols = start_c + tl.arange(0, DK)
            offsets = (tl.cast(i, tl.int64) * H + head) * (K * D_HEAD) + tokens[None, :] * D_HEAD + cols[:, None]
            mask = (tokens[None, :] < K) & (cols[:, None] < D_HEAD) & (head < H)
            if KEY:
                tl.store(grad_keys + offsets, grad_k[c * CHUNKS + start_c // DK] * (query_scale * _LN2), mask=mask)
            if VALUE:
                tl.store(grad_values + offsets, grad_v[c * CHUNKS + start_c // DK], mask=mask)
        if GRAM:
            base = grad_gram + tl.cast(i, tl.int64) * (H * K) * (H * K)
            t = tl.arange(0, RP * KP)
            token = t % KP
            for q in tl.static_range(NB):
                if _gram_block_used(c, q, RP, ROWS, NEEDED, H):
                    position = q * RP + t // KP
                    offset = (position - c + H) % H  # circulant offset of the row head from the column head
                    row_head = (head + offset) % H
                    # Rows of the column's half; the H/2-apart pair is computed by both heads, the smaller stores it.
                    keep = (position < NEEDED) & (offset < ROWS) & ((2 * offset != H) | (head < row_head))
                    keep = (keep & (token < K))[:, None] & (tokens < K)[None, :] & (head < H)
                    rows_at = (row_head * K + token)[:, None] * (H * K) + head * K + tokens[None, :]
                    mirror = (head * K + tokens[None, :]) * (H * K) + (row_head * K + token)[:, None]
                    block = tl.trans(grad_g[c * NB + q]) if GRAM_T else grad_g[c * NB + q]
                    tl.store(base + rows_at, block, mask=keep)
                    tl.store(base + mirror, block, mask=keep & (offset > 0)[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Plans and launches
# ----------------------------------------------------------------------------------------------------------------

class _Blocks(NamedTuple):
    """One kernel's tile sizes and launch options."""
    texts: int  # BJ: texts per tile, the M of the text-major products (64 per warp group for wgmma)
    heads: int  # HG: heads per program (the forward: all H)
    warps: int
    stages: int
    panel: int = 1  # forward: heads per row panel of G when mixing token-major (2 when K pads to 32)
    # The attention token-major, [KP, texts] tiles (text tiles of fewer than 64 rows on sm_90: every product KP or
    # 64 channels tall, one warp group's wgmma): the logits key·qᵀ, the softmax over tokens, A G as (G Aᵀ)ᵀ with
    # Aᵀ in shared memory (an MMA of KP·panel rows), ∂q and ∂p as their transposes in tiles of ``dk`` channels.
    mix_t: bool = False
    # Whether the side that stays the same through the kernel's loop (the image's keys, values and G in the
    # forward and ∂key/∂value/∂G kernels, the text tile in the ∂q/∂p kernel) may stay on chip for the whole loop,
    # as the compiler hoists it; else its loads are volatile, which keeps them in the loop (streamed from L2).
    resident: bool = True
    # The image kernel: channels per ∂key, ∂value tile (channels; 0: 64, or DC where d ≤ 32; also per ∂qᵀ, ∂pᵀ tile
    # in a token-major text kernel), row heads per ∂G block (gram_heads; 0: 64 // KP, at least 1), and ∂G blocks as
    # [KP, RP·KP] = (β/2 a_c)ᵀ A_q rather than its transpose (gram_t).
    channels: int = 0
    gram_heads: int = 0
    gram_t: bool = False
    chunk: int = 0  # channels per chunk of d in the logits and <p, value> (DC; 0: the plan's)

    def rp(self, kp: int) -> int:
        """Row heads per ∂G block (RP)."""
        return self.gram_heads or max(1, 64 // kp)

    def dk(self, head_dim: int, dc: int) -> int:
        """Channels per ∂key, ∂value tile, and per ∂qᵀ, ∂pᵀ tile where token-major (DK)."""
        return self.channels or (64 if head_dim > 32 else dc)


class _Part(NamedTuple):
    """One backward launch: a kernel ('text' or 'image'), the gradients it computes and its blocks."""
    kernel: str
    grads: tuple  # of 'query', 'target' (text) or 'key', 'value', 'gram' (image)
    blocks: _Blocks


class _Plan(NamedTuple):
    KP: int  # tokens per head, padded to a power of two ≥ 16
    DC: int  # channels per chunk of d
    forward: _Blocks
    backward: tuple  # of _Part: every gradient in one part


def _chunk(head_dim: int) -> int:
    """Channels per chunk: the largest of 64, 32 dividing d (no padding at the shipped d = 64, 96, 128, 160)."""
    for size in (64, 32):
        if head_dim % size == 0:
            return size
    return min(64, max(16, triton.next_power_of_2(head_dim)))


def _plan(heads: int, tokens: int, head_dim: int, arch: int = 90, fp32: bool = False) -> _Plan:
    """Tiles for (H, K, d) on sm_``arch``: the largest that compile without spills within shared memory and without
    a warp duplicating another's MMA tile (checked by tests/test_fused_loss.py at the shipped shapes with
    scripts/kernel_report.py, which prints what they issue). On sm_90 a warp group takes 64 rows: 4 warps for a
    64-row tile, 8 only for 128 rows (8 warps on 64 rows have Triton duplicate some products).

    A plan is one of four, chosen by architecture, dtype and K (fp32; sm_80; sm_90 with K ≤ 32; sm_90 with
    K = 64), with the heads per program and warps following from d and K as below; it is the first member of the
    autotuning space (``_space``), which varies single launches around it.

    sm_90, K ≤ 32 (B/16, L/14): text tiles of 64 rows; the ∂q/∂p program keeps its 128 texts on chip and takes two
    heads where d = 64. sm_90, K = 64 (B/32, H/14, G/14): [64, 64] fp32 tiles leave too few registers for 64 texts
    wherever every head's attention is needed (the forward spilled 1.1–1.3 KB), so the forward takes 32 texts and
    ∂q and ∂key 16 (on 32 texts they spill 8–72 bytes), on one warp group (4 warps), token-major (``mix_t``): a
    text-major product of 16 or 32 rows is mma.sync, and on two warp groups each computes the whole [K, 32]
    product (1.9× the design count). ∂q and ∂key take d in tiles of 64 channels (G/14's d = 160, in chunks of 32
    for the logits, pads to 192 there: in tiles of 32, ∂qᵀ [32, 16] was mma.sync, issued twice). What stays the
    same through a loop streams from L2 (∂q and ∂key spill at H/14 and G/14 with it on chip).

    sm_80 (mma.sync, 16×8 tiles per warp): Triton gives every dot of a chain one warp arrangement, warps stacked
    along the longer side of the first dot it lays out; a product narrower than that arrangement is computed by
    several warps alike. So every product is kept wider than tall and the warps lie side by side along N, 8
    columns each: 16 texts × KP for the logits, A G and the softmax backward; ∂key, ∂value as [DK, KP] tiles with
    DK = KP/2 channels (16 at K ≤ 32: d = 96 and 160 need no padding); ∂G as (β/2·a_c)ᵀ A_q, [KP, 2·KP] (its
    transpose, 2·KP tall, would stack the warps along M and replicate every [16, KP] product 4×). 4 warps where
    a product is 32 columns wide (K ≤ 32, or ∂q/∂p in chunks of 32 channels), 8 where all are 64 wide (K = 64),
    which halves each thread's share of the K = 64 tiles: no spills. At K = 64 ∂value has its own launch (it
    needs only the group's attention; beside ∂key's it spills); ∂key/∂value takes d in chunks of 16 at K ≤ 32,
    of 32 at K = 64 (in chunks of 64, B/32's ∂key, held at 128 registers, spilled 16 bytes; the same MMAs).

    fp32 (products in fp32 FMAs, for checking; twice the bytes per operand): 16 texts on 4 warps.
    """
    kp = max(16, triton.next_power_of_2(tokens))
    two = min(2, heads)
    if fp32:
        tile = _Blocks(texts=16, heads=1, warps=4, stages=1, resident=False)
        forward = tile._replace(heads=heads)
        backward = (_Part('text', ('query', 'target'), tile), _Part('image', ('key', 'value'), tile),
                    _Part('image', ('gram',), tile._replace(texts=64) if kp <= 32 else tile))
    elif arch < 90:
        tile = _Blocks(texts=16, heads=1, warps=4, stages=1, resident=False)
        wide = 8 if kp >= 64 else 4  # warps where every product is at least 64 columns wide
        forward = tile._replace(heads=heads, warps=wide)
        text = _Part('text', ('query', 'target'), tile._replace(warps=wide if _chunk(head_dim) >= 64 else 4))
        # At K ≤ 32 ∂key/∂value contracts d in chunks of 16: with L/14's chunks of 32 ptxas, held at 128 registers,
        # spills three addresses across the text loop (the same MMAs either way); at K = 64 in chunks of 32 (B/32's
        # ∂key in chunks of 64 spilled 16 bytes, also at 128 registers).
        image = tile._replace(channels=max(16, kp // 2), chunk=16 if kp <= 32 else 32)
        gram = _Part('image', ('gram',), tile._replace(warps=wide, gram_t=True, gram_heads=2))
        if kp <= 32:
            backward = (text, _Part('image', ('key', 'value'), image), gram)
        else:  # ∂value needs only the group's attention; beside ∂key's (every head's) it would spill
            backward = (text, _Part('image', ('key',), image._replace(warps=wide)), _Part('image', ('value',), image),
                        gram)
    elif kp <= 32:
        forward = _Blocks(texts=64, heads=heads, warps=4, stages=1)
        text = _Blocks(texts=128, heads=two if head_dim <= 64 else 1, warps=8, stages=1)
        backward = (_Part('text', ('query', 'target'), text),
                    _Part('image', ('key', 'value'), _Blocks(texts=64, heads=1, warps=4, stages=1, resident=False)),
                    _Part('image', ('gram',), _Blocks(texts=64, heads=1, warps=4, stages=1)))
    else:
        forward = _Blocks(texts=32, heads=heads, warps=4, stages=1, mix_t=True, resident=False)
        backward = (
            _Part('text', ('query',), _Blocks(texts=16, heads=1, warps=4, stages=1, mix_t=True, resident=False)),
            _Part('text', ('target',), _Blocks(texts=64, heads=1, warps=4, stages=1, resident=False)),
            _Part('image', ('key',), _Blocks(texts=16, heads=1, warps=4, stages=1, mix_t=True, resident=False)),
            _Part('image', ('value',), _Blocks(texts=128, heads=two, warps=8, stages=1, resident=False)),
            _Part('image', ('gram',), _Blocks(texts=128, heads=1, warps=8, stages=1, resident=False)))
    return _Plan(KP=kp, DC=_chunk(head_dim), forward=forward, backward=backward)


def _space(heads: int, tokens: int, head_dim: int, arch: int = 90, fp32: bool = False) -> tuple:
    """The autotuning space of (H, K, d) on sm_``arch``: ``_plan``'s plan first (what runs where nothing is timed),
    then variants of it, then the one-pass form of each (``_one_pass``); on a GPU ``_fastest`` times each launch's
    distinct candidates (``_schemes``) the first time it meets a shape and keeps the fastest, launch by launch,
    and ``_choose`` the backward schemes. The variants are those that pass
    scripts/kernel_report.py --check at every shipped shape (it compiles every member): no spills, no replication,
    shared memory within the limit.

    * The other residency (``_Blocks.resident``: what stays the same through the loop kept on chip, or streamed
      from L2, registers and shared memory against L2 traffic) for the forward and the launches that need only
      their group's attention: ∂G, and at K = 64 ∂value and ∂p in their own launches. Not for ∂q and ∂key, which
      hold every head's attention (one way or the other spills at some shipped shape), nor for ∂value and ∂G on
      sm_90 at d > 128 (G/14: on chip they spill).
    * sm_90, K ≤ 32: ∂key/∂value and ∂G on 128 texts and 8 warps (two warp groups) besides 64 texts on 4.
    * sm_90, K = 64: the forward on 16 texts besides 32 (fewer registers: 174–208 against 245–252).
    * sm_90: every member's one-pass form (on sm_80 its extra products replicate 4×); at K ≤ 32, d ≤ 64 (B/16)
      also the one-pass backward in one launch (``_one_launch``).

    fp32 (for checking) has one member.
    """
    plan = _plan(heads, tokens, head_dim, arch, fp32)
    if fp32:
        return (plan,)

    def other_residency(part):
        group_only = part.grads in (('gram',), ('value',), ('target',))
        if not group_only or (part.kernel == 'image' and arch >= 90 and head_dim > 128):
            return part
        return part._replace(blocks=part.blocks._replace(resident=not part.blocks.resident))

    space = (plan, plan._replace(forward=plan.forward._replace(resident=not plan.forward.resident),
                                 backward=tuple(other_residency(part) for part in plan.backward)))
    if arch >= 90 and plan.KP <= 32:
        wide = tuple(part._replace(blocks=part.blocks._replace(texts=128, warps=8)) if part.kernel == 'image' else part
                     for part in plan.backward)
        space += (plan._replace(backward=wide),)
    elif arch >= 90:  # K = 64: the forward on 16 texts besides 32
        space += (plan._replace(forward=plan.forward._replace(texts=16)),)
    if arch >= 90:
        space += tuple(dict.fromkeys(_one_pass(member) for member in space))
        if plan.KP <= 32 and head_dim <= 64:
            space += (_one_launch(plan),)
    return space


def _one_pass(plan: _Plan) -> _Plan:
    """The plan's one-pass backward: no text kernel; ∂q computed beside ∂key (from the same ∂L/∂logits) and ∂p
    beside ∂value (from the same α·a), in the image kernel's programs, and added into fp32 sums with atomics.

    The image kernel's tiles are the plan's, but for one head per program where ∂value/∂p has a launch of its own
    (K = 64: two heads, as the plan's ∂value, spill 20–32 bytes at H/14 with ∂p beside them)."""
    parts = []
    for part in plan.backward:
        if part.kernel == 'text':
            continue
        grads, blocks = part.grads, part.blocks
        if 'key' in grads:
            grads += ('query',)
        if 'value' in grads:
            grads += ('target',)
            blocks = blocks._replace(heads=1)
        parts.append(part._replace(grads=grads, blocks=blocks))
    return plan._replace(backward=tuple(parts))


def _one_launch(plan: _Plan) -> _Plan:
    """The one-pass backward in a single launch: one image kernel computes all five gradients, each head group's
    attention recomputed once per pair. On sm_90 at K ≤ 32, d ≤ 64 (B/16), on 128 texts and two warp groups, it
    compiles without spills (255 registers); at L/14 it spills 40 bytes, at K = 64 over 1 KB."""
    return plan._replace(backward=(_Part('image', GRADIENTS, _Blocks(texts=128, heads=1, warps=8, stages=1,
                                                                         resident=False)),))


# Programs the forward aims for: an image's text tiles are split among programs until about this many.
_FORWARD_PROGRAMS = 1024


class _Launch(NamedTuple):
    """One kernel launch, as the autograd function makes it and scripts/kernel_report.py compiles it."""
    name: str
    kernel: object
    grid: tuple
    constexprs: dict
    options: dict  # num_warps, num_stages
    ints: dict  # the kernel's integer arguments
    trips: int  # iterations of the kernel's one dynamic loop, summed over its programs
    macs: int  # multiply-adds the design does in this launch


def _gram_blocks(heads: int, own: int, count: int, rp: int) -> int:
    """∂G blocks (of rp row heads) a program computes: _gram_block_used over the group's columns."""
    rows = min(heads, heads // 2 + 1)
    return sum(_gram_block_used.fn(c, q, rp, rows, count, heads) for c in range(own) for q in range(triton.cdiv(count, rp)))


GRADIENTS = ('key', 'value', 'gram', 'query', 'target')


def _launches(stage: str, plan: _Plan, b: int, B: int, heads: int, tokens: int, head_dim: int, image_stride: int,
              text_stride: int, first_text: int, negative_only: bool, grads=GRADIENTS):
    """The launches of ``stage`` ('forward', or 'backward' for the gradients named in ``grads``), with the
    multiply-adds each does by design (K and d unpadded, text tiles past B included)."""
    k, d, h = tokens, head_dim, heads
    common = dict(H=heads, K=tokens, D_HEAD=head_dim, HAS_POSITIVES=not negative_only, KP=plan.KP, DC=plan.DC)
    strides = dict(image_stride=image_stride, text_stride=text_stride, first_text=first_text)

    def options(blocks):
        return dict(num_warps=blocks.warps, num_stages=blocks.stages)

    if stage == 'forward':
        blocks = plan.forward
        tiles = triton.cdiv(B, blocks.texts)
        splits = min(tiles, triton.cdiv(_FORWARD_PROGRAMS, b))
        per_split = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, per_split)
        texts = b * splits * per_split * blocks.texts
        panels = heads // blocks.panel
        # logits and <p, value> of every head; aᵀ G a over the symmetric half, at panel granularity
        macs = texts * (2 * h * k * d + (blocks.panel * k) ** 2 * panels * (panels + 1) // 2)
        return [_Launch('forward', _forward_kernel, (splits, b),
                        dict(common, BJ=blocks.texts, PH=blocks.panel, MIX_T=blocks.mix_t, VOL=not blocks.resident),
                        options(blocks), dict(B=B, tiles_per_split=per_split, **strides), b * splits * per_split,
                        macs)]
    launches = []
    rows = min(heads, heads // 2 + 1)  # row heads per ∂G column (_image_grad_kernel's ROWS)
    for part in plan.backward:
        wanted = [g for g in part.grads if g in grads]
        if not wanted:
            continue
        blocks = part.blocks
        own, groups = blocks.heads, triton.cdiv(heads, blocks.heads)
        constexprs = dict(common, BJ=blocks.texts, HG=own, MIX_T=blocks.mix_t, VOL=not blocks.resident,
                          **{g.upper(): g in wanted for g in (('query', 'target') if part.kernel == 'text'
                                                              else GRADIENTS)})
        mixing = k * d + h * k * k  # <p, value> and G a for one head: the softmax backward's inputs
        if blocks.chunk:
            constexprs['DC'] = blocks.chunk
        if part.kernel == 'text':  # token-major, ∂qᵀ and ∂pᵀ are DK rows tall: 64 where d > 32, as for ∂key
            constexprs['DK'] = blocks.dk(head_dim, constexprs['DC']) if blocks.mix_t else constexprs['DC']
        if part.kernel == 'image':
            rp = blocks.rp(plan.KP)
            constexprs.update(DK=blocks.dk(head_dim, constexprs['DC']), GRAM_T=blocks.gram_t, RP=rp)
        if part.kernel == 'text':
            tiles = triton.cdiv(B, blocks.texts)
            streamed = h if constexprs['QUERY'] else own
            per_pair = streamed * k * d + own * (constexprs['QUERY'] * (mixing + k * d) + constexprs['TARGET'] * k * d)
            launches.append(_Launch('text', _text_grad_kernel, (tiles, groups), constexprs, options(blocks),
                                    dict(b=b, B=B, **strides), tiles * groups * b,
                                    b * tiles * blocks.texts * groups * per_pair))
        else:
            tiles = triton.cdiv(B, blocks.texts)
            logits = constexprs['KEY'] or constexprs['QUERY']  # ∂L/∂logits of the group: every head's attention
            streamed = h if logits else min(h, own + rows - 1) if constexprs['GRAM'] else own
            products = sum(constexprs[g] for g in ('KEY', 'VALUE', 'QUERY', 'TARGET'))  # K·d each per head
            per_pair = (streamed * k * d + own * (logits * mixing + products * k * d)
                        + constexprs['GRAM'] * _gram_blocks(heads, own, streamed, rp) * rp * k * k)
            launches.append(_Launch('image', _image_grad_kernel, (b, groups), constexprs, options(blocks),
                                    dict(B=B, **strides), b * groups * tiles, b * tiles * blocks.texts * groups * per_pair))
    return launches


def _gradients(launch: _Launch) -> tuple:
    """The gradients a launch computes (GRADIENTS' names)."""
    return tuple(g for g in GRADIENTS if launch.constexprs.get(g.upper()))


def _adds_atomically(launch: _Launch) -> bool:
    """Whether a launch adds its texts' gradients into fp32 sums with atomics (the one-pass backward)."""
    return launch.name == 'image' and bool(launch.constexprs['QUERY'] or launch.constexprs['TARGET'])


def _label(launch: _Launch) -> str:
    """A launch as reports name it: its kernel and the initials of its gradients, e.g. 'image[QTKV]'."""
    initials = ''.join(g[0] for g in ('QUERY', 'TARGET', 'KEY', 'VALUE', 'GRAM') if launch.constexprs.get(g))
    return launch.name + (f'[{initials}]' if initials else '')


def _scheme_name(kernels) -> str:
    """A backward scheme's name from the kernels of its launches (or of a plan's parts), 'text' or 'image':
    'two-pass' where the text kernel computes ∂q, ∂p; else 'one-pass', where the image kernel adds them with
    atomics, or 'one launch' where that kernel computes every gradient in one launch."""
    kernels = list(kernels)
    if 'text' in kernels:
        return 'two-pass'
    return 'one launch' if len(kernels) == 1 else 'one-pass'


def _schemes(stage: str, space: tuple, *shape, grads=GRADIENTS) -> list:
    """The launches of ``stage`` over the members of ``space`` (``_space``), grouped into schemes, members that
    make the same launches (the same kernels computing the same gradients: the forward has one scheme, the
    backward two or three, named by ``_scheme_name``), in the space's order; per scheme, per launch, its distinct
    forms across the scheme's members, the first member's first: what ``_fastest`` chooses among."""
    schemes = {}
    for plan in space:
        launches = _launches(stage, plan, *shape, grads=grads)
        structure = tuple((launch.name, _gradients(launch)) for launch in launches)
        forms = schemes.setdefault(structure, [[] for _ in launches])
        for distinct, launch in zip(forms, launches):
            if launch not in distinct:
                distinct.append(launch)
    return list(schemes.values())


def _run(launch: _Launch, args: dict):
    """Launch with ``args`` (tensors and floats by name) and the launch's integers."""
    values = [args[name] if name in args else launch.ints[name]
              for name in launch.kernel.arg_names if name not in launch.constexprs]
    launch.kernel[launch.grid](*values, **launch.constexprs, **launch.options)


# What runs, timed once per process: a launch's candidate, keyed on (launch name and constexprs, dtype, sm_arch, b
# and B rounded up to powers of two), and the backward's scheme (the same, with H, K, d and the gradients wanted).
_CHOSEN = {}


def _choose(options: list, run, key: tuple):
    """The option to run: the first where there is nothing to choose or nothing to time (the interpreter), else the
    one that ``run`` ran fastest the first time ``key`` was seen. Timing reruns kernels, which is harmless: each
    only stores, or adds into sums that ``run`` zeroes first, and reads nothing it writes."""
    if len(options) == 1 or INTERPRETED:
        return options[0]
    if key not in _CHOSEN:
        times = [triton.testing.do_bench(lambda option=option: run(option), warmup=5, rep=25) for option in options]
        _CHOSEN[key] = times.index(min(times))
    return options[_CHOSEN[key]]


def _fastest(candidates: list, run, tuning: tuple) -> _Launch:
    """The candidate of one launch to run (``_choose``), keyed on the launch and ``tuning``."""
    first = candidates[0]
    return _choose(candidates, run, (first.name, tuple(sorted(first.constexprs.items())), *tuning))


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
            '(TRITON_INTERPRET=1 set before open_clip_llip.loss.fused is imported). '
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


def _arch(tensor) -> int:
    """The tensor's GPU as 10·major + minor (90 for an H100/H200); 90 under the interpreter."""
    if not tensor.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


def _on_device(tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class _FusedSigmoidLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, keys, values, gram, queries, targets, logit_scale, logit_bias, temperature, first_text,
                negative_only):
        keys_, values_, queries_, targets_, gram_ = _launch_args(keys, values, gram, queries, targets)
        b, heads, tokens, head_dim = keys.shape
        num_texts = queries.shape[0]
        arch = _arch(keys)
        space = _space(heads, tokens, head_dim, arch, keys_.dtype == torch.float32)
        shape = (space, b, num_texts, heads, tokens, head_dim, keys_.stride(0), queries_.stride(0), first_text,
                 negative_only)
        query_scale = _LOG2E / temperature
        scale = logit_scale.detach().float().reshape(1)
        bias = logit_bias.detach().float().reshape(1)
        cos = torch.empty(b, num_texts, device=keys.device, dtype=torch.float32)
        sq_norm = torch.empty_like(cos)

        def run(launch):  # the partial sums are per program: their size follows the candidate's grid
            partial = torch.empty(b, launch.grid[0], 3, device=keys.device, dtype=torch.float32)
            _run(launch, dict(keys=keys_, values=values_, gram=gram_, queries=queries_, targets=targets_,
                              scale_ptr=scale, bias_ptr=bias, cos_ptr=cos, sq_norm_ptr=sq_norm, partial_ptr=partial,
                              query_scale=query_scale))
            return partial

        tuning = (keys_.dtype, arch, triton.next_power_of_2(b), triton.next_power_of_2(num_texts))
        ((candidates,),) = _schemes('forward', *shape)
        with _on_device(keys):
            partial = run(_fastest(candidates, run, tuning))
        ctx.save_for_backward(keys_, values_, gram_, queries_, targets_, scale, bias, cos, sq_norm, partial)
        ctx.shape, ctx.query_scale, ctx.tuning = shape, query_scale, tuning
        ctx.dtypes = tuple(x.dtype for x in (keys, values, gram, queries, targets, logit_scale, logit_bias))
        ctx.scalar_shapes = (logit_scale.shape, logit_bias.shape)
        return partial[..., 0].sum()

    @staticmethod
    def backward(ctx, grad_loss):
        keys, values, gram, queries, targets, scale, bias, cos, sq_norm, partial = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dtypes = ctx.dtypes
        grad = grad_loss.detach().float().reshape(1)

        def empty(shape, dtype):
            return torch.empty(shape, device=keys.device, dtype=dtype)

        args = dict(keys=keys, values=values, gram=gram, queries=queries, targets=targets, scale_ptr=scale,
                    bias_ptr=bias, grad_ptr=grad, cos_ptr=cos, sq_norm_ptr=sq_norm, query_scale=ctx.query_scale,
                    grad_queries=empty(queries.shape, dtypes[3]), grad_targets=empty(targets.shape, dtypes[4]),
                    grad_keys=empty(keys.shape, dtypes[0]), grad_values=empty(values.shape, dtypes[1]),
                    grad_gram=empty(gram.shape, dtypes[2]))
        # The one-pass backward's fp32 sums of the texts' gradients: the gradients themselves where they are fp32;
        # made when a one-pass scheme first runs (the two-pass kernels never touch them).
        no_sums = empty((0,), torch.float32)
        args.update(grad_queries_sum=no_sums, grad_targets_sum=no_sums)

        def run(launch):
            _run(launch, args)

        def atomic(scheme):  # whether the scheme adds the texts' gradients into the fp32 sums
            return any(_adds_atomically(candidates[0]) for candidates in scheme)

        def run_scheme(scheme):
            if atomic(scheme):
                for name in summed:
                    if args[name + '_sum'] is no_sums:
                        out = args[name]
                        args[name + '_sum'] = out if out.dtype == torch.float32 else empty(out.shape, torch.float32)
                    args[name + '_sum'].zero_()
            for candidates in scheme:
                run(_fastest(candidates, run, ctx.tuning))
            if atomic(scheme):
                for name in summed:
                    if args[name] is not args[name + '_sum']:
                        args[name].copy_(args[name + '_sum'])

        wanted = [g for g, need in zip(GRADIENTS, needs) if need]
        summed = [name for name, g in (('grad_queries', 'query'), ('grad_targets', 'target')) if g in wanted]
        schemes = _schemes('backward', *ctx.shape, grads=wanted)
        if torch.are_deterministic_algorithms_enabled():  # fp32 atomics add in no fixed order
            schemes = [scheme for scheme in schemes if not atomic(scheme)]
        with _on_device(keys):
            run_scheme(_choose(schemes, run_scheme, ('backward', *ctx.shape[3:6], tuple(wanted), *ctx.tuning)))
        sums = partial[..., 1:].sum(dim=(0, 1)) * grad  # Σ ∂L/∂s·cos, Σ ∂L/∂s
        scale_shape, bias_shape = ctx.scalar_shapes
        grads = (args['grad_keys'], args['grad_values'], args['grad_gram'], args['grad_queries'], args['grad_targets'],
                 sums[0].reshape(scale_shape).to(dtypes[5]), sums[1].reshape(bias_shape).to(dtypes[6]))
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None)


def fused_sigmoid_loss(keys, values, gram, queries, targets, logit_scale, logit_bias, temperature: float = 1.0,
                       first_text: int = 0, negative_only: bool = False) -> torch.Tensor:
    """Σ_{i,j} −log σ(y[i,j]·s[i,j]) over b images and all B texts given -> 0-d fp32 tensor.

    ``s = logit_scale·cos(z[i|j], t[j]) + logit_bias`` with the attention ``a = softmax_k(<q, key>/τ)``;
    ``y = +1`` where ``j + first_text == i`` (unless ``negative_only``), else −1: the semantics of
    ``open_clip_llip.loss.sigmoid._block_loss``.

    Args:
        keys, values: [b, H, K, d] (rows may be strided, as the unbound ``[b, 2, H, K, d]`` features are).
        gram: [b, H·K, H·K], symmetric (G = Ṽ Ṽᵀ).
        queries, targets: [B, H, d]: the raw queries q (divided by ``temperature`` here) and p = W_O t̂.
        logit_scale, logit_bias: 0-d or [1] tensors (the scale already exponentiated).
        temperature: τ (1 for queries already divided by τ).

    Differentiable in all seven tensors; inputs may be bf16 (computed with fp32 accumulation).
    """
    if not temperature > 0:
        raise ValueError(f'temperature must be positive, got {temperature}')
    return _FusedSigmoidLoss.apply(keys, values, gram, queries, targets, logit_scale, logit_bias,
                                   float(temperature), int(first_text), bool(negative_only))

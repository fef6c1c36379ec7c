"""The Triton kernels of Llip's fused sigmoid loss: the forward and the two backward kernels, and their building blocks.

Shapes (b images, B texts, H heads, K tokens, d = D/H): keys, values [b, H, K, d] (rows may be strided), gram
[b, H·K, H·K], queries (raw q) and targets (p = W_O t̂) [B, H, d]; the forward writes cos and |z|² [b, B] and
per-program partial sums. Every product is a 2-D ``tl.dot`` of one MMA tile per warp group, heads unrolled
statically (each head's tiles held in tuples), so that no warp computes another's tile. Only the @triton.jit
code lives here; what tiles a launch uses is ``plans``', how it is launched ``launch``'s. The design is in
docs/kernels.md.

On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first
imported); there ``_mm`` multiplies bf16 operands in fp32, which is exact, because the interpreter cannot multiply
bf16.
"""
import math

import triton
import triton.language as tl

from ...modeling.scoring import _EPS

# Whether the kernels below were built for Triton's interpreter (the CPU) rather than a GPU.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# |z|² at or below _EPS² is clamped there, as in open_clip_llip.modeling.scoring (the comparison is on |z|² itself).
_EPS_SQUARED = tl.constexpr(_EPS * _EPS)
_UPCAST_DOTS = tl.constexpr(INTERPRETED)
LOG2E = math.log2(math.e)
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
def gram_block_used(c, q, RP, ROWS, COUNT, H):
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
      than tall as sm_80's warp layout needs (``plan_for``). The blocks q that hold none of the column's rows
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
                    if n % NB == r // RP and gram_block_used(n // NB, n % NB, RP, ROWS, COUNT, H):
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
def forward_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, cos_ptr, sq_norm_ptr, partial_ptr,
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
def text_grad_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, grad_ptr, cos_ptr, sq_norm_ptr,
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
def image_grad_kernel(keys, values, gram, queries, targets, scale_ptr, bias_ptr, grad_ptr, cos_ptr, sq_norm_ptr,
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
    or with GRAM_T [KP, RP·KP] ((β/2 a_c)ᵀ A_q). The plan picks DK, RP and GRAM_T for the MMA's layout (``plan_for``).
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
                if gram_block_used(c, q, RP, ROWS, NEEDED, H):
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



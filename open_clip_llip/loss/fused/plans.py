"""Tile plans of the fused loss's kernels for a shape (H, K, d) and architecture, and the autotuning space.

A plan (``Plan``) gives, per launch, the text tile (texts per program), heads per program, warps, stages and where
the attention is laid out token-major; ``plan_for`` picks the one that compiles without spills or duplicated MMA
tiles (as ``scripts/kernel_report.py --check`` verifies at the shipped shapes), ``tuning_space`` the plan and its
variants, which the GPU's timing chooses among (``tuning.TuningCache``). Pure functions of the shape: no kernel
is compiled here. Why these tiles: docs/kernels.md.
"""
from typing import NamedTuple

import triton

# The gradients by name, in the order of the autograd function's tensor inputs (keys, values, gram, queries, targets).
GRADIENTS = ('key', 'value', 'gram', 'query', 'target')


class Blocks(NamedTuple):
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


class Part(NamedTuple):
    """One backward launch: a kernel ('text' or 'image'), the gradients it computes and its blocks."""
    kernel: str
    grads: tuple  # of 'query', 'target' (text) or 'key', 'value', 'gram' (image)
    blocks: Blocks


class Plan(NamedTuple):
    KP: int  # tokens per head, padded to a power of two ≥ 16
    DC: int  # channels per chunk of d
    forward: Blocks
    backward: tuple  # of Part: every gradient in one part


def _chunk(head_dim: int) -> int:
    """Channels per chunk: the largest of 64, 32 dividing d (no padding at the shipped d = 64, 96, 128, 160)."""
    for size in (64, 32):
        if head_dim % size == 0:
            return size
    return min(64, max(16, triton.next_power_of_2(head_dim)))


def plan_for(heads: int, tokens: int, head_dim: int, arch: int = 90, fp32: bool = False) -> Plan:
    """Tiles for (H, K, d) on sm_``arch``: the largest that compile without spills within shared memory and without
    a warp duplicating another's MMA tile (checked by tests/test_fused_loss.py at the shipped shapes with
    scripts/kernel_report.py, which prints what they issue). On sm_90 a warp group takes 64 rows: 4 warps for a
    64-row tile, 8 only for 128 rows (8 warps on 64 rows have Triton duplicate some products).

    A plan is one of four, chosen by architecture, dtype and K (fp32; sm_80; sm_90 with K ≤ 32; sm_90 with
    K = 64), with the heads per program and warps following from d and K as below; it is the first member of the
    autotuning space (``tuning_space``), which varies single launches around it.

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
        tile = Blocks(texts=16, heads=1, warps=4, stages=1, resident=False)
        forward = tile._replace(heads=heads)
        backward = (Part('text', ('query', 'target'), tile), Part('image', ('key', 'value'), tile),
                    Part('image', ('gram',), tile._replace(texts=64) if kp <= 32 else tile))
    elif arch < 90:
        tile = Blocks(texts=16, heads=1, warps=4, stages=1, resident=False)
        wide = 8 if kp >= 64 else 4  # warps where every product is at least 64 columns wide
        forward = tile._replace(heads=heads, warps=wide)
        text = Part('text', ('query', 'target'), tile._replace(warps=wide if _chunk(head_dim) >= 64 else 4))
        # At K ≤ 32 ∂key/∂value contracts d in chunks of 16: with L/14's chunks of 32 ptxas, held at 128 registers,
        # spills three addresses across the text loop (the same MMAs either way); at K = 64 in chunks of 32 (B/32's
        # ∂key in chunks of 64 spilled 16 bytes, also at 128 registers).
        image = tile._replace(channels=max(16, kp // 2), chunk=16 if kp <= 32 else 32)
        gram = Part('image', ('gram',), tile._replace(warps=wide, gram_t=True, gram_heads=2))
        if kp <= 32:
            backward = (text, Part('image', ('key', 'value'), image), gram)
        else:  # ∂value needs only the group's attention; beside ∂key's (every head's) it would spill
            backward = (text, Part('image', ('key',), image._replace(warps=wide)), Part('image', ('value',), image),
                        gram)
    elif kp <= 32:
        forward = Blocks(texts=64, heads=heads, warps=4, stages=1)
        text = Blocks(texts=128, heads=two if head_dim <= 64 else 1, warps=8, stages=1)
        backward = (Part('text', ('query', 'target'), text),
                    Part('image', ('key', 'value'), Blocks(texts=64, heads=1, warps=4, stages=1, resident=False)),
                    Part('image', ('gram',), Blocks(texts=64, heads=1, warps=4, stages=1)))
    else:
        forward = Blocks(texts=32, heads=heads, warps=4, stages=1, mix_t=True, resident=False)
        backward = (
            Part('text', ('query',), Blocks(texts=16, heads=1, warps=4, stages=1, mix_t=True, resident=False)),
            Part('text', ('target',), Blocks(texts=64, heads=1, warps=4, stages=1, resident=False)),
            Part('image', ('key',), Blocks(texts=16, heads=1, warps=4, stages=1, mix_t=True, resident=False)),
            Part('image', ('value',), Blocks(texts=128, heads=two, warps=8, stages=1, resident=False)),
            Part('image', ('gram',), Blocks(texts=128, heads=1, warps=8, stages=1, resident=False)))
    return Plan(KP=kp, DC=_chunk(head_dim), forward=forward, backward=backward)


def tuning_space(heads: int, tokens: int, head_dim: int, arch: int = 90, fp32: bool = False) -> tuple:
    """The autotuning space of (H, K, d) on sm_``arch``: ``plan_for``'s plan first (what runs where nothing is timed),
    then variants of it, then the one-pass form of each (``one_pass``); on a GPU ``TuningCache.fastest`` times each launch's
    distinct candidates (``schemes``) the first time it meets a shape and keeps the fastest, launch by launch,
    and ``TuningCache.choose`` the backward schemes. The variants are those that pass
    scripts/kernel_report.py --check at every shipped shape (it compiles every member): no spills, no replication,
    shared memory within the limit.

    * The other residency (``Blocks.resident``: what stays the same through the loop kept on chip, or streamed
      from L2, registers and shared memory against L2 traffic) for the forward and the launches that need only
      their group's attention: ∂G, and at K = 64 ∂value and ∂p in their own launches. Not for ∂q and ∂key, which
      hold every head's attention (one way or the other spills at some shipped shape), nor for ∂value and ∂G on
      sm_90 at d > 128 (G/14: on chip they spill).
    * sm_90, K ≤ 32: ∂key/∂value and ∂G on 128 texts and 8 warps (two warp groups) besides 64 texts on 4.
    * sm_90, K = 64: the forward on 16 texts besides 32 (fewer registers: 174–208 against 245–252).
    * sm_90: every member's one-pass form (on sm_80 its extra products replicate 4×); at K ≤ 32, d ≤ 64 (B/16)
      also the one-pass backward in one launch (``one_launch``).

    fp32 (for checking) has one member.
    """
    plan = plan_for(heads, tokens, head_dim, arch, fp32)
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
        space += tuple(dict.fromkeys(one_pass(member) for member in space))
        if plan.KP <= 32 and head_dim <= 64:
            space += (one_launch(plan),)
    return space


def one_pass(plan: Plan) -> Plan:
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


def one_launch(plan: Plan) -> Plan:
    """The one-pass backward in a single launch: one image kernel computes all five gradients, each head group's
    attention recomputed once per pair. On sm_90 at K ≤ 32, d ≤ 64 (B/16), on 128 texts and two warp groups, it
    compiles without spills (255 registers); at L/14 it spills 40 bytes, at K = 64 over 1 KB."""
    return plan._replace(backward=(Part('image', GRADIENTS, Blocks(texts=128, heads=1, warps=8, stages=1,
                                                                         resident=False)),))



def scheme_name(kernels) -> str:
    """A backward scheme's name from the kernels of its launches (or of a plan's parts), 'text' or 'image':
    'two-pass' where the text kernel computes ∂q, ∂p; else 'one-pass', where the image kernel adds them with
    atomics, or 'one launch' where that kernel computes every gradient in one launch."""
    kernels = list(kernels)
    if 'text' in kernels:
        return 'two-pass'
    return 'one launch' if len(kernels) == 1 else 'one-pass'


def plan_scheme(plan: Plan) -> str:
    """The backward scheme of a member of the autotuning space: 'two-pass', 'one-pass' or 'one launch'."""
    return scheme_name(part.kernel for part in plan.backward)

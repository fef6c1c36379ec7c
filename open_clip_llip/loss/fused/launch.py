"""Launchers of the fused loss's kernels: for a plan and a shape, each launch's grid, constexprs, integer arguments
and design multiply-adds (``stage_launches``), grouped into the backward's schemes (``schemes``), and running them.

A launch is described once (``Launch``), for the autograd function as for ``scripts/kernel_report.py``, which
compiles the same launches offline. Arguments are the kernels' tensors by name: keys, values [b, H, K, d], gram
[b, H·K, H·K], queries, targets [B, H, d], cos, sq_norm [b, B] fp32, the gradients in the inputs' shapes.
"""
import contextlib
from typing import NamedTuple

import torch
import triton

from .kernels import INTERPRETED, forward_kernel, gram_block_used, image_grad_kernel, text_grad_kernel
from .plans import GRADIENTS, Plan

# Programs the forward aims for: an image's text tiles are split among programs until about this many.
_FORWARD_PROGRAMS = 1024


class Launch(NamedTuple):
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
    """∂G blocks (of rp row heads) a program computes: gram_block_used over the group's columns."""
    rows = min(heads, heads // 2 + 1)
    return sum(gram_block_used.fn(c, q, rp, rows, count, heads) for c in range(own) for q in range(triton.cdiv(count, rp)))



def stage_launches(stage: str, plan: Plan, b: int, B: int, heads: int, tokens: int, head_dim: int, image_stride: int,
              text_stride: int, first_text: int, negative_only: bool, grads=GRADIENTS):
    """The launches of ``stage`` ('forward', or 'backward' for the gradients named in ``grads``), with the
    multiply-adds each does by design (K and d unpadded, text tiles past B included).

    For b images [b, H, K, d] (keys' row stride ``image_stride``) against B texts [B, H, d] (queries' row stride
    ``text_stride``); text j is image (j + first_text)'s positive unless ``negative_only``."""
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
        return [Launch('forward', forward_kernel, (splits, b),
                        dict(common, BJ=blocks.texts, PH=blocks.panel, MIX_T=blocks.mix_t, VOL=not blocks.resident),
                        options(blocks), dict(B=B, tiles_per_split=per_split, **strides), b * splits * per_split,
                        macs)]
    launches = []
    rows = min(heads, heads // 2 + 1)  # row heads per ∂G column (image_grad_kernel's ROWS)
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
            launches.append(Launch('text', text_grad_kernel, (tiles, groups), constexprs, options(blocks),
                                    dict(b=b, B=B, **strides), tiles * groups * b,
                                    b * tiles * blocks.texts * groups * per_pair))
        else:
            tiles = triton.cdiv(B, blocks.texts)
            logits = constexprs['KEY'] or constexprs['QUERY']  # ∂L/∂logits of the group: every head's attention
            streamed = h if logits else min(h, own + rows - 1) if constexprs['GRAM'] else own
            products = sum(constexprs[g] for g in ('KEY', 'VALUE', 'QUERY', 'TARGET'))  # K·d each per head
            per_pair = (streamed * k * d + own * (logits * mixing + products * k * d)
                        + constexprs['GRAM'] * _gram_blocks(heads, own, streamed, rp) * rp * k * k)
            launches.append(Launch('image', image_grad_kernel, (b, groups), constexprs, options(blocks),
                                    dict(B=B, **strides), b * groups * tiles, b * tiles * blocks.texts * groups * per_pair))
    return launches


def launch_gradients(launch: Launch) -> tuple:
    """The gradients a launch computes (GRADIENTS' names)."""
    return tuple(g for g in GRADIENTS if launch.constexprs.get(g.upper()))


def adds_atomically(launch: Launch) -> bool:
    """Whether a launch adds its texts' gradients into fp32 sums with atomics (the one-pass backward)."""
    return launch.name == 'image' and bool(launch.constexprs['QUERY'] or launch.constexprs['TARGET'])


def launch_label(launch: Launch) -> str:
    """A launch as reports name it: its kernel and the initials of its gradients, e.g. 'image[QTKV]'."""
    initials = ''.join(g[0] for g in ('QUERY', 'TARGET', 'KEY', 'VALUE', 'GRAM') if launch.constexprs.get(g))
    return launch.name + (f'[{initials}]' if initials else '')


def schemes(stage: str, space: tuple, *shape, grads=GRADIENTS) -> list:
    """The launches of ``stage`` over the members of ``space`` (``tuning_space``), grouped into schemes, members that
    make the same launches (the same kernels computing the same gradients: the forward has one scheme, the
    backward two or three, named by ``scheme_name``), in the space's order; per scheme, per launch, its distinct
    forms across the scheme's members, the first member's first: what ``TuningCache.fastest`` chooses among."""
    schemes = {}
    for plan in space:
        launches = stage_launches(stage, plan, *shape, grads=grads)
        structure = tuple((launch.name, launch_gradients(launch)) for launch in launches)
        forms = schemes.setdefault(structure, [[] for _ in launches])
        for distinct, launch in zip(forms, launches):
            if launch not in distinct:
                distinct.append(launch)
    return list(schemes.values())


def run_launch(launch: Launch, args: dict):
    """Launch with ``args`` (tensors and floats by name) and the launch's integers.

    ``args``: keys, values [b, H, K, d]; gram [b, H·K, H·K]; queries, targets [B, H, d] (as ``launch_inputs``
    returns them); scale_ptr, bias_ptr [1] fp32; query_scale = log2(e)/τ; the forward's cos_ptr, sq_norm_ptr [b, B]
    fp32 and partial_ptr [b, programs, 3] fp32; the backward's grad_ptr [1] and the gradients (``run_scheme``).
    """
    values = [args[name] if name in args else launch.ints[name]
              for name in launch.kernel.arg_names if name not in launch.constexprs]
    launch.kernel[launch.grid](*values, **launch.constexprs, **launch.options)



def launch_inputs(keys, values, gram, queries, targets):
    """Common dtype, row strides and checks -> (keys, values, queries, targets, gram) to hand to the kernels.

    keys, values [b, H, K, d] and queries, targets [B, H, d] keep their row strides (inner dimensions made
    contiguous); gram [b, H·K, H·K] is made contiguous; all in autocast's dtype under autocast, else the inputs'
    common dtype.
    """
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


def device_arch(tensor) -> int:
    """The tensor's GPU as 10·major + minor (90 for an H100/H200); 90 under the interpreter."""
    if not tensor.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


def on_device(tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def is_atomic(scheme) -> bool:
    """Whether a backward scheme (``schemes``) adds the texts' gradients into fp32 sums with atomics: their order
    of addition is not fixed, so under ``torch.use_deterministic_algorithms(True)`` such schemes do not run."""
    return any(adds_atomically(candidates[0]) for candidates in scheme)


def run_scheme(scheme, args: dict, pick=lambda candidates: candidates[0]):
    """Runs one backward scheme (``schemes``), each launch's candidate chosen by ``pick`` (the plan's by default).

    ``args`` as for ``run_launch``, with the gradients to write: grad_keys, grad_values [b, H, K, d], grad_gram
    [b, H·K, H·K], grad_queries, grad_targets [B, H, d] (those not wanted may be any tensor). A one-pass scheme
    adds ∂q, ∂p into fp32 sums ``grad_queries_sum``, ``grad_targets_sum`` [B, H, d]: made here where ``args``
    has none of the gradient's size (the gradient itself where it is fp32), zeroed before and copied into the
    gradients after, so that a scheme may be run again (as timing does).
    """
    atomic = [launch for launch in (candidates[0] for candidates in scheme) if adds_atomically(launch)]
    summed = [name for name, g in (('grad_queries', 'query'), ('grad_targets', 'target'))
              if any(g in launch_gradients(launch) for launch in atomic)]
    for name in summed:
        out, sums = args[name], args.get(name + '_sum')
        if sums is None or sums.shape != out.shape:
            args[name + '_sum'] = out if out.dtype == torch.float32 else torch.empty(
                out.shape, device=out.device, dtype=torch.float32)
        args[name + '_sum'].zero_()
    for candidates in scheme:
        run_launch(pick(candidates), args)
    for name in summed:
        if args[name] is not args[name + '_sum']:
            args[name].copy_(args[name + '_sum'])

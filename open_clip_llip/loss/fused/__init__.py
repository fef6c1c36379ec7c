"""Llip's conditioned scores and sigmoid loss fused in Triton kernels, forward and backward (docs/method.md, the loss
and the cost).

``fused_sigmoid_loss`` has the semantics of ``open_clip_llip.loss.sigmoid.block_loss`` over all the texts a rank
sees: ``Σ_{i,j} −log σ(y[i,j]·s[i,j])``, ``s = logit_scale·cos + logit_bias``, ``cos = Σ_{h,k} a·<value, p> / |z|``,
``|z|² = aᵀ G a``, ``a = softmax_k(<q, key>/τ)`` per head. Shapes (b images, B texts, H heads, K tokens, d = D/H):

    keys, values [b, H, K, d]   gram [b, H·K, H·K]   queries (raw q), targets (p = W_O t̂) [B, H, d]

Laid out like FlashAttention's ``ops/triton``: ``kernels`` (the @triton.jit code), ``plans`` (tiles per shape and
architecture, the autotuning space), ``tuning`` (the timed choices, a ``TuningCache``), ``launch`` (grids,
arguments, the backward's schemes) and ``autograd`` (the thin ``torch.autograd.Function``). The design, its
arithmetic and memory traffic, and what is checked offline: docs/kernels.md. No GPU has timed these kernels yet;
``scripts/device_check.py`` is the script to run on one.

The public API, for users and for ``scripts/`` (kernel_report, device_check):

* ``fused_sigmoid_loss``: the loss, optionally with one backward scheme (``scheme=``);
* ``plan_for``, ``tuning_space``: the plan, and the autotuning space, of a shape (H, K, d) and sm_arch;
* ``backward_schemes``: the backward schemes a shape's space has, by name; ``plan_scheme``, ``scheme_name``;
* ``schemes``, ``stage_launches``, ``Launch``: the launches a shape runs, with their design multiply-adds;
  ``launch_label``, ``launch_gradients``, ``adds_atomically``: what a launch is and computes;
  ``run_launch``: run one; ``device_arch``: a tensor's sm_arch;
* ``TuningCache``, ``TUNING_CACHE``: the timed choices; ``INTERPRETED``: whether Triton's interpreter runs them.
"""
from .autograd import FusedSigmoidLoss, fused_sigmoid_loss
from .kernels import INTERPRETED
from .launch import Launch, adds_atomically, device_arch, launch_gradients, launch_label, run_launch, schemes, stage_launches
from .plans import GRADIENTS, Blocks, Part, Plan, one_launch, one_pass, plan_for, plan_scheme, scheme_name, tuning_space
from .tuning import TUNING_CACHE, TuningCache

__all__ = ['GRADIENTS', 'INTERPRETED', 'TUNING_CACHE', 'Blocks', 'FusedSigmoidLoss', 'Launch', 'Part', 'Plan',
           'TuningCache', 'adds_atomically', 'backward_schemes', 'device_arch', 'fused_sigmoid_loss', 'launch_gradients',
           'launch_label', 'one_launch', 'one_pass', 'plan_for', 'plan_scheme', 'run_launch', 'scheme_name', 'schemes',
           'stage_launches', 'tuning_space']


def backward_schemes(heads: int, tokens: int, head_dim: int, arch: int = 90, fp32: bool = False) -> list:
    """The backward schemes of (H, K, d) on sm_``arch`` ('two-pass', 'one-pass', 'one launch'), in the autotuning
    space's order: the first is the plan's, the one that runs where nothing is timed. Each can be run alone with
    ``fused_sigmoid_loss(..., scheme=name)``."""
    return list(dict.fromkeys(plan_scheme(plan) for plan in tuning_space(heads, tokens, head_dim, arch, fp32)))

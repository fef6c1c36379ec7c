"""The fused loss as a ``torch.autograd.Function``: the forward launch, then one backward scheme.

Between forward and backward only the inputs and two fp32 numbers per pair are kept (cos and |z|², [b, B] each),
with the forward's per-program sums (loss, Σ g·cos, Σ g) from which ∂scale and ∂bias follow at no cost. Which
candidate of each launch and which backward scheme run is the tuning cache's choice (``tuning.TUNING_CACHE``).
"""
import torch
import triton

from ...modeling.scoring import Temperature, single_temperature
from . import plans
from .kernels import LOG2E
from .launch import device_arch, is_atomic, launch_inputs, on_device, run_launch, run_scheme, schemes
from .plans import GRADIENTS, plan_scheme
from .tuning import TUNING_CACHE


class FusedSigmoidLoss(torch.autograd.Function):
    """Σ −log σ(y·s) over b images × B texts; see ``fused_sigmoid_loss`` for the arguments."""

    @staticmethod
    def forward(ctx, keys, values, gram, queries, targets, logit_scale, logit_bias, temperature, first_text,
                negative_only, scheme):
        keys_, values_, queries_, targets_, gram_ = launch_inputs(keys, values, gram, queries, targets)
        b, heads, tokens, head_dim = keys.shape
        num_texts = queries.shape[0]
        arch = device_arch(keys)
        space = plans.tuning_space(heads, tokens, head_dim, arch, keys_.dtype == torch.float32)
        if scheme is not None:
            found = tuple(member for member in space if plan_scheme(member) == scheme)
            if not found:
                raise ValueError(f'No {scheme!r} backward at H, K, d = {heads, tokens, head_dim} on sm_{arch}; the '
                                 f'space has {sorted({plan_scheme(member) for member in space})}')
            space = found
        shape = (space, b, num_texts, heads, tokens, head_dim, keys_.stride(0), queries_.stride(0), first_text,
                 negative_only)
        query_scale = LOG2E / temperature
        scale = logit_scale.detach().float().reshape(1)
        bias = logit_bias.detach().float().reshape(1)
        cos = torch.empty(b, num_texts, device=keys.device, dtype=torch.float32)
        sq_norm = torch.empty_like(cos)

        def run(launch):  # the partial sums are per program: their size follows the candidate's grid
            partial = torch.empty(b, launch.grid[0], 3, device=keys.device, dtype=torch.float32)
            run_launch(launch, dict(keys=keys_, values=values_, gram=gram_, queries=queries_, targets=targets_,
                                    scale_ptr=scale, bias_ptr=bias, cos_ptr=cos, sq_norm_ptr=sq_norm,
                                    partial_ptr=partial, query_scale=query_scale))
            return partial

        # A restricted space has other candidates per launch: its choices are kept apart (the scheme in the key).
        tuning = (keys_.dtype, arch, triton.next_power_of_2(b), triton.next_power_of_2(num_texts), scheme)
        ((candidates,),) = schemes('forward', *shape)
        with on_device(keys):
            partial = run(TUNING_CACHE.fastest(candidates, run, tuning))
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
        # The one-pass backward's fp32 sums of the texts' gradients, made by run_scheme when a one-pass scheme first
        # runs; until then empty (the two-pass kernels never touch them).
        no_sums = empty((0,), torch.float32)
        args.update(grad_queries_sum=no_sums, grad_targets_sum=no_sums)

        def run(scheme):
            run_scheme(scheme, args, lambda candidates: TUNING_CACHE.fastest(
                candidates, lambda launch: run_launch(launch, args), ctx.tuning))

        wanted = [g for g, need in zip(GRADIENTS, needs) if need]
        backward = schemes('backward', *ctx.shape, grads=wanted)
        if torch.are_deterministic_algorithms_enabled():  # fp32 atomics add in no fixed order
            backward = [scheme for scheme in backward if not is_atomic(scheme)]
        with on_device(keys):
            run(TUNING_CACHE.choose(backward, run, ('backward', *ctx.shape[3:6], tuple(wanted), *ctx.tuning)))
        sums = partial[..., 1:].sum(dim=(0, 1)) * grad  # Σ ∂L/∂s·cos, Σ ∂L/∂s
        scale_shape, bias_shape = ctx.scalar_shapes
        grads = (args['grad_keys'], args['grad_values'], args['grad_gram'], args['grad_queries'], args['grad_targets'],
                 sums[0].reshape(scale_shape).to(dtypes[5]), sums[1].reshape(bias_shape).to(dtypes[6]))
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None, None)


def fused_sigmoid_loss(keys, values, gram, queries, targets, logit_scale, logit_bias, temperature: Temperature = 1.0,
                       first_text: int = 0, negative_only: bool = False, scheme: str | None = None) -> torch.Tensor:
    """Σ_{i,j} −log σ(y[i,j]·s[i,j]) over b images and all B texts given -> 0-d fp32 tensor.

    ``s = logit_scale·cos(z[i|j], t[j]) + logit_bias`` with the attention ``a = softmax_k(<q, key>/τ)``;
    ``y = +1`` where ``j + first_text == i`` (unless ``negative_only``), else −1: the semantics of
    ``open_clip_llip.loss.sigmoid.block_loss``.

    Args:
        keys, values: [b, H, K, d] (rows may be strided, as the unbound ``[b, 2, H, K, d]`` features are).
        gram: [b, H·K, H·K], symmetric (G = Ṽ Ṽᵀ).
        queries, targets: [B, H, d]: the raw queries q (divided by ``temperature`` here) and p = W_O t̂.
        logit_scale, logit_bias: 0-d or [1] tensors (the scale already exponentiated).
        temperature: τ (1 for queries already divided by τ).
        first_text: text j is image (j + first_text)'s positive (the images' positives among the texts).
        negative_only: every pair is a negative (y = −1).
        scheme: None (the tuning's choice), or one backward scheme to run ('two-pass', 'one-pass', 'one launch':
            ``backward_schemes`` lists those the shape has), the autotuning space restricted to its members; for
            checking each scheme (``scripts/device_check.py``).

    Differentiable in all seven tensors; inputs may be bf16 (computed with fp32 accumulation).
    """
    return FusedSigmoidLoss.apply(keys, values, gram, queries, targets, logit_scale, logit_bias,
                                  single_temperature(temperature), int(first_text), bool(negative_only), scheme)

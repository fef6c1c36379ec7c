"""Cases for the fused Triton loss, run by Triton's interpreter on the CPU against a plain PyTorch reference.

Triton decides whether a jitted function (its own ``tl.zeros`` included) is interpreted when it is
defined, and importing ``open_clip`` imports Triton; so ``TRITON_INTERPRET=1`` has to be set before the
interpreter starts. ``test_fused_loss.py`` runs this file in a subprocess that way; it is not collected
by itself (run it as ``TRITON_INTERPRET=1 python -m pytest tests/fused_loss_cases.py``).
"""
import pytest
import torch
import torch.nn.functional as F

from open_clip_llip import LlipLoss
from open_clip_llip.loss import fused as fused_loss
from open_clip_llip.loss.fused import launch as launching
from open_clip_llip.loss.fused import plans
from open_clip_llip.loss.sigmoid import block_loss

if not fused_loss.INTERPRETED:
    pytest.skip('needs TRITON_INTERPRET=1 from the start (see test_fused_loss.py)', allow_module_level=True)


def reference_loss(keys, values, gram, queries, targets, logit_scale, logit_bias, first_text, negative_only):
    """Σ −log σ(y·s) written out in float64: a = softmax(<q, key>), cos = Σ a<value, p> / sqrt(aᵀ G a)."""
    keys, values, gram, queries, targets = (x.double() for x in (keys, values, gram, queries, targets))
    attention = torch.einsum('ihkd,jhd->ijhk', keys, queries).softmax(dim=-1)
    numerator = torch.einsum('ijhk,ihkd,jhd->ij', attention, values, targets)
    flat = attention.flatten(2)  # [b, B, H·K]
    norm = torch.einsum('ijr,irc,ijc->ij', flat, gram, flat).sqrt()
    logits = logit_scale.double() * numerator / norm + logit_bias.double()
    rows, cols = torch.meshgrid(torch.arange(logits.shape[0]), torch.arange(logits.shape[1]), indexing='ij')
    labels = torch.where((cols + first_text == rows) & (not negative_only), 1., -1.).double()
    return -F.logsigmoid(labels * logits).sum()


def make_inputs(b, B, H, K, d, dtype, seed=0):
    """Random keys, values [b, H, K, d], a PSD Gram [b, H·K, H·K], queries, targets [B, H, d], scale, bias."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, b, H, K, d, generator=generator)
    mixed = torch.randn(b, H * K, 2 * d, generator=generator) / d ** 0.5
    queries, targets = torch.randn(2, B, H, d, generator=generator)
    tensors = [keys, values, mixed @ mixed.transpose(1, 2), queries, targets]
    tensors = [x.to(dtype).requires_grad_() for x in tensors]
    return tensors + [torch.tensor(3.5, requires_grad=True), torch.tensor([-2.], requires_grad=True)]


def assert_close(ours, ref, rtol, name):
    error = (ours.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert error <= rtol * scale, f'{name}: max error {error:.3g} against a reference of scale {scale:.3g}'


NAMES = ('keys', 'values', 'gram', 'queries', 'targets', 'logit_scale', 'logit_bias')


def check_against_reference(inputs, first_text, negative_only, rtol):
    loss = fused_loss.fused_sigmoid_loss(*inputs, first_text=first_text, negative_only=negative_only)
    grads = torch.autograd.grad(loss, inputs)
    ref = reference_loss(*inputs, first_text, negative_only)
    ref_grads = torch.autograd.grad(ref, inputs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref, rtol, 'loss')
    for name, x, grad, ref_grad in zip(NAMES, inputs, grads, ref_grads):
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        assert_close(grad, ref_grad, rtol, name)


@pytest.mark.parametrize('b, B, H, K, d, first_text, negative_only', [
    (3, 5, 3, 5, 6, 1, False),  # b ≠ B, nothing a power of two, positives off the diagonal
    (4, 4, 2, 3, 40, 0, False),  # d contracted in two chunks
    (3, 4, 3, 5, 6, 0, True),  # negatives only
])
def test_fp32_loss_and_every_gradient_match_reference(b, B, H, K, d, first_text, negative_only):
    check_against_reference(make_inputs(b, B, H, K, d, torch.float32), first_text, negative_only, rtol=2e-5)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 inputs against the float64 loss of the same (rounded) values: only operand rounding remains."""
    check_against_reference(make_inputs(3, 6, 2, 5, 6, torch.bfloat16), 2, False, rtol=2e-2)


def test_autocast_sets_the_operand_dtype():
    """Under autocast (amp_bf16 gives fp32 queries beside bf16 keys) the MMA operands take its dtype."""
    inputs = make_inputs(3, 5, 2, 5, 6, torch.float32)
    fp32_loss = fused_loss.fused_sigmoid_loss(*inputs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = fused_loss.fused_sigmoid_loss(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    assert loss.item() != fp32_loss.item()  # rounded operands
    assert_close(loss, reference_loss(*inputs, 0, False), 2e-2, 'loss')
    assert all(grad.dtype == torch.float32 for grad in grads)


def test_every_split_matches_reference(monkeypatch):
    """Small tiles force every split the kernels have: several text tiles (the last partial) and forward programs
    per image, head groups (the last partial, H not a multiple), channel chunks (d = 40 in chunks of 16, the last
    partial), token-major mixing in panels of two heads, and each gradient in its own launch or fused with others."""
    blocks = fused_loss.Blocks
    part = fused_loss.Part
    plan = fused_loss.Plan(
        KP=16, DC=16, forward=blocks(texts=16, heads=3, warps=4, stages=1),
        backward=(part('text', ('query',), blocks(16, 2, 4, 1)), part('text', ('target',), blocks(16, 1, 4, 1)),
                  part('image', ('key', 'value'), blocks(16, 2, 4, 1, resident=False)),
                  part('image', ('gram',), blocks(16, 2, 4, 1))))
    monkeypatch.setattr(plans, 'plan_for', lambda *shape: plan)
    monkeypatch.setattr(launching, '_FORWARD_PROGRAMS', 4)  # 2 images: 2 programs each, 2 of the 3 tiles each
    check_against_reference(make_inputs(2, 40, 3, 5, 40, torch.float32), 1, False, rtol=2e-5)


def test_panels_of_two_heads_and_one_launch_for_all_image_gradients(monkeypatch):
    """Token-major attention ([KP, BJ] tiles: the logits as key·qᵀ, the softmax over tokens, A G as (G Aᵀ)ᵀ): the
    forward's in panels of two heads of K = 20 padded to 32, ∂q/∂p as their transposes, ∂key, ∂value and ∂G (from
    token-major a) in one launch."""
    blocks = fused_loss.Blocks
    part = fused_loss.Part
    plan = fused_loss.Plan(
        KP=32, DC=16, forward=blocks(texts=16, heads=4, warps=4, stages=1, panel=2, mix_t=True),
        backward=(part('text', ('query', 'target'), blocks(16, 4, 4, 1, mix_t=True)),
                  part('image', ('key', 'value', 'gram'), blocks(16, 1, 4, 1, mix_t=True))))
    monkeypatch.setattr(plans, 'plan_for', lambda *shape: plan)
    check_against_reference(make_inputs(2, 20, 4, 20, 16, torch.float32), 0, False, rtol=2e-5)


@pytest.mark.parametrize('dtype, rtol', [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('b, B, H, K, d', [
    (2, 20, 4, 20, 24),  # K pads to 32; d to a chunk of 32, ∂key/∂value tiles of 16 channels (sm_80), the last partial
    (2, 18, 3, 36, 40),  # K pads to 64: the K = 64 plans (sm_90: token-major, partial text tiles); H odd
    (2, 18, 2, 64, 64),  # B/32's K and d: nothing padded (the loads without masks)
    (2, 17, 2, 50, 96),  # K = 64 with d in chunks of 32 and ∂q, ∂key in tiles of 64 channels (G/14's d = 160)
])
def test_the_gpus_plans_match_reference(monkeypatch, b, B, H, K, d, arch, dtype, rtol):
    """The plan a GPU gets (sm_80: ∂G blocks transposed, ∂key/∂value tiles narrower than K; sm_90), whatever the
    inputs' dtype: the interpreter takes the fp32 plan for fp32 inputs and sm_90's otherwise."""
    plan = fused_loss.plan_for
    monkeypatch.setattr(plans, 'plan_for', lambda heads, tokens, head_dim, *_: plan(heads, tokens, head_dim, arch))
    check_against_reference(make_inputs(b, B, H, K, d, dtype), 1, False, rtol=rtol)


def arithmetic(plan):
    """What of a plan changes the arithmetic's layout: its tiles and chunks, not its warps, stages or residency."""
    def tiles(blocks):
        return blocks._replace(warps=0, stages=0, resident=True)
    return plan.KP, plan.DC, tiles(plan.forward), tuple(part._replace(blocks=tiles(part.blocks)) for part in plan.backward)


@pytest.mark.parametrize('b, B, H, K, d', [
    (2, 20, 4, 20, 24),  # K ≤ 32: sm_90's ∂key/∂value and ∂G on 128 texts
    (2, 18, 2, 64, 64),  # B/32's K and d (K = 64: sm_90's ∂key on 16 texts, token-major): nothing padded
])
def test_every_tile_variant_of_the_autotuning_space_matches_reference(monkeypatch, b, B, H, K, d):
    """Each member of sm_90's and sm_80's spaces whose tiles differ from the plan's (the interpreter runs only the
    plan's otherwise), on its own; in fp32, for the tight tolerance (the layout is the bf16 one)."""
    variants = []
    for arch in (90, 80):
        space = fused_loss.tuning_space(H, K, d, arch)
        seen = {arithmetic(space[0])}
        for plan in space[1:]:
            if arithmetic(plan) not in seen:
                seen.add(arithmetic(plan))
                variants.append(plan)
    assert variants
    for plan in variants:
        monkeypatch.setattr(plans, 'tuning_space', lambda *shape, plan=plan: (plan,))
        check_against_reference(make_inputs(b, B, H, K, d, torch.float32), 1, False, rtol=2e-5)


def members(scheme, H, K, d):
    """sm_90's members of a backward scheme: 'one-pass' (no text kernel: the image kernel adds ∂q, ∂p with
    atomics), 'one launch' (all five gradients from one image kernel)."""
    found = [plan for plan in fused_loss.tuning_space(H, K, d, 90)
             if fused_loss.plan_scheme(plan) == scheme]
    assert found
    return found


@pytest.mark.parametrize('dtype, rtol', [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('scheme, b, B, H, K, d', [
    # K ≤ 32: 64-text tiles, 3 of them (the last partial); images start at tiles 0, 1, 2
    ('one-pass', 3, 150, 4, 20, 24),
    ('one launch', 3, 300, 4, 20, 24),  # 128-text tiles, the same way
    ('one-pass', 3, 40, 3, 36, 40),  # K = 64 (padded): ∂key/∂q on 16 texts token-major, ∂value/∂p on 128; H odd
])
def test_the_one_pass_backward_matches_reference(monkeypatch, scheme, b, B, H, K, d, dtype, rtol):
    """The scheme's first member on its own, in both dtypes: the texts' gradients summed over images by atomics
    from programs that start at different tiles and wrap around."""
    plan = members(scheme, H, K, d)[0]
    monkeypatch.setattr(plans, 'tuning_space', lambda *shape: (plan,))
    check_against_reference(make_inputs(b, B, H, K, d, dtype), 1, False, rtol=rtol)


@pytest.mark.parametrize('scheme', ['two-pass', 'one-pass', 'one launch'])
def test_every_scheme_under_autocast(monkeypatch, scheme):
    """amp_bf16's mix (fp32 inputs, bf16 operands): the loss and every gradient within bf16 of the float64
    reference, the gradients in the inputs' fp32 (the one-pass schemes add ∂q, ∂p straight into them)."""
    plan = members(scheme, 2, 5, 6)[0] if scheme != 'two-pass' else fused_loss.tuning_space(2, 5, 6, 90)[0]
    monkeypatch.setattr(plans, 'tuning_space', lambda *shape: (plan,))
    inputs = make_inputs(3, 70, 2, 5, 6, torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = fused_loss.fused_sigmoid_loss(*inputs, first_text=1)
    grads = torch.autograd.grad(loss, inputs)
    ref = reference_loss(*inputs, 1, False)
    assert_close(loss, ref, 2e-2, 'loss')
    for name, grad, ref_grad in zip(NAMES, grads, torch.autograd.grad(ref, inputs)):
        assert grad.dtype == torch.float32, name
        assert_close(grad, ref_grad, 3e-2, name)


def test_deterministic_algorithms_run_the_two_pass_backward(monkeypatch):
    """Atomics add in no fixed order: under torch.use_deterministic_algorithms(True) the one-pass scheme is left
    out even where it comes first (the interpreter runs the first scheme otherwise)."""
    space = fused_loss.tuning_space(2, 5, 6, 90)
    one_pass = members('one-pass', 2, 5, 6)[0]
    monkeypatch.setattr(plans, 'tuning_space', lambda *shape: (one_pass, space[0]))
    ran = []
    run = launching.run_launch
    monkeypatch.setattr(launching, 'run_launch', lambda launch, args: ran.append(launch.name) or run(launch, args))
    inputs = make_inputs(2, 5, 2, 5, 6, torch.float32)
    torch.autograd.grad(fused_loss.fused_sigmoid_loss(*inputs), inputs)
    assert 'text' not in ran
    ran.clear()
    monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: True)
    check_against_reference(inputs, 0, False, rtol=2e-5)
    assert 'text' in ran


def test_one_backward_scheme_runs_when_asked(monkeypatch):
    """``scheme=`` restricts the autotuning space to one backward scheme's members (how scripts/device_check.py
    checks each); a scheme the shape's space lacks is refused, naming those it has."""
    ran = []
    run = launching.run_launch
    monkeypatch.setattr(launching, 'run_launch', lambda launch, args: ran.append(launch.name) or run(launch, args))
    inputs = make_inputs(2, 5, 2, 5, 6, torch.bfloat16)
    grads = torch.autograd.grad(fused_loss.fused_sigmoid_loss(*inputs, scheme='one-pass'), inputs)
    assert ran and 'text' not in ran and all(torch.isfinite(grad).all() for grad in grads)
    with pytest.raises(ValueError, match='two-pass'):
        fused_loss.fused_sigmoid_loss(*make_inputs(2, 5, 2, 5, 6, torch.float32), scheme='one-pass')


def test_raw_queries_with_a_temperature():
    """``temperature`` divides the raw queries' logits: the same loss as queries divided beforehand, and the
    gradient with respect to the raw queries."""
    inputs = make_inputs(3, 5, 2, 5, 6, torch.float32)
    loss = fused_loss.fused_sigmoid_loss(*inputs, temperature=5., first_text=1)
    grads = torch.autograd.grad(loss, inputs)
    keys, values, gram, queries, targets, scale, bias = inputs
    ref = reference_loss(keys, values, gram, queries / 5., targets, scale, bias, 1, False)
    ref_grads = torch.autograd.grad(ref, inputs)
    assert_close(loss, ref, 2e-5, 'loss')
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        assert_close(grad, ref_grad, 2e-5, name)


def test_tiny_losses_keep_their_precision():
    """Every pair far on the right side (s ≈ −25 for negatives): −log σ(−s) ≈ e^s ≈ 1e-11 per pair, which
    log(1 + e^s) would round to 0 in fp32."""
    keys, values, gram, queries, targets, scale, _ = make_inputs(3, 4, 2, 5, 6, torch.float32)
    bias = torch.tensor(-25., requires_grad=True)
    inputs = [keys, values, gram, queries, targets, scale, bias]
    loss = fused_loss.fused_sigmoid_loss(*inputs, negative_only=True)
    ref = reference_loss(*inputs, 0, True)
    assert 0 < ref.item() < 1e-8
    assert_close(loss, ref, 1e-5, 'loss')


def test_strided_packed_features_and_tiny_norms():
    """Keys and values unbound from the model's packed [b, 2, H, K, d] features; a zero image (|z| = 0)."""
    keys, values, gram, queries, targets, scale, bias = make_inputs(3, 4, 2, 5, 6, torch.float32)
    with torch.no_grad():
        values[1] = 0.
        gram[1] = 0.
    features = torch.stack([keys, values], dim=1).detach().requires_grad_()
    keys, values = features.unbind(dim=1)
    assert not keys.is_contiguous()
    loss = fused_loss.fused_sigmoid_loss(keys, values, gram, queries, targets, scale, bias)
    grads = torch.autograd.grad(loss, [features, gram, queries, targets, scale, bias])
    # The PyTorch path clamps |z| at 1e-12 as the kernel does; the float64 reference would divide by zero.
    ref = block_loss(keys, values, gram, queries, targets, scale, bias, 0, False)
    ref_grads = torch.autograd.grad(ref, [features, gram, queries, targets, scale, bias])
    assert torch.isfinite(loss)
    assert_close(loss, ref.double(), 1e-5, 'loss')
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad.double(), 1e-5, 'gradient')


def test_llip_loss_uses_the_kernels_when_forced(monkeypatch):
    """LlipLoss with OPEN_CLIP_LLIP_LOSS_IMPL=triton equals the PyTorch path, value and gradients."""
    keys, values, gram, queries, targets, scale, bias = make_inputs(4, 4, 2, 3, 8, torch.float32)
    features = torch.stack([keys, values], dim=1).detach().requires_grad_()
    texts = torch.stack([queries, targets], dim=1).detach().requires_grad_()
    inputs = dict(image_features=features, text_features=texts, logit_scale=scale, logit_bias=bias, image_gram=gram)
    leaves = [features, texts, gram, scale, bias]
    results = {}
    for impl in ('torch', 'triton'):
        monkeypatch.setenv('OPEN_CLIP_LLIP_LOSS_IMPL', impl)
        loss = LlipLoss(1.)(**inputs)
        results[impl] = [loss] + list(torch.autograd.grad(loss, leaves))
    called = []
    monkeypatch.setattr(fused_loss, 'fused_sigmoid_loss', lambda *a, **k: called.append(1) or torch.tensor(0.))
    LlipLoss(1.)(**inputs)  # the environment is read when the loss is built
    assert called, 'OPEN_CLIP_LLIP_LOSS_IMPL=triton did not reach the fused kernels'
    for ours, ref in zip(results['triton'], results['torch']):
        assert_close(ours, ref.double(), 1e-5, 'LlipLoss')

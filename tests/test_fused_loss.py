"""The fused Triton loss: its cases under Triton's interpreter (in a subprocess), and how it is chosen."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('triton')

from open_clip_llip import LlipLoss  # noqa: E402
from open_clip_llip.loss import fused as fused_loss  # noqa: E402  (imported for a GPU here: only what runs no kernel)

CASES = Path(__file__).with_name('fused_loss_cases.py')
REPORT = Path(__file__).resolve().parents[1] / 'scripts' / 'kernel_report.py'


def test_kernels_match_pytorch_under_the_triton_interpreter():
    """fused_loss_cases.py in a fresh interpreter with TRITON_INTERPRET=1: Triton reads it at its own import."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    env.pop('OPEN_CLIP_LLIP_LOSS_IMPL', None)
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(CASES)],
        cwd=CASES.parents[1], env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ''
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert ' passed' in summary and 'skipped' not in summary, summary


def load_report():
    spec = importlib.util.spec_from_file_location('kernel_report', REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('arch', [90, 80])
@pytest.mark.parametrize('shape', ['b32', 'b16', 'l14', 'h14', 'g14'])
def test_every_kernel_compiles_without_spills_within_shared_memory(shape, arch):
    """What the interpreter does not check, for every candidate of every launch (the autotuning space) at a shipped
    shape (b = 256, B = 32,768, bf16), compiled offline (no GPU) with the JIT's specialisation: it compiles without
    spills, within the architecture's shared memory, with no more tensor-core work than the design's (× 1.3:
    replication shows as 2×), and on sm_90 with at least 75% of the multiply-adds on wgmma in every launch doing
    10% or more of the work (kernel_report.problems)."""
    report = load_report()
    result = report.report_shape(shape, arch, 256, 32768, 'bf16')
    assert not report.problems(result), report.table([result])


def test_fp32_products_are_ieee_not_tf32():
    """fp32 inputs multiply in fp32 (FMA), not TF32 tensor-core instructions that round operands to 10 bits."""
    report = load_report()
    plan = fused_loss.plan_for(2, 5, 6, 90, fp32=True)
    shape = (plan, 4, 80, 2, 5, 6, 2 * 2 * 5 * 6, 2 * 2 * 6, 0, False)
    for stage in ('forward', 'backward'):
        for launch in fused_loss.stage_launches(stage, *shape):
            ptx = report.compile_launch(launch, 90, 'fp32').asm['ptx']
            assert 'tf32' not in ptx and 'mma' not in ptx, launch.name
            assert 'fma.rn.f32' in ptx, launch.name


def test_the_fastest_candidate_is_timed_once_per_key(monkeypatch):
    """On a GPU each launch's candidates are timed the first time a key is met; later calls reuse the choice."""
    import triton.testing
    candidates = [fused_loss.Launch('image', None, (4, 8), dict(BJ=texts), {}, {}, 4, 1) for texts in (64, 128)]
    timed = []

    def run(launch):  # do_bench below returns what run returns: 128 texts are faster
        timed.append(launch)
        return 1. if launch.constexprs['BJ'] == 128 else 2.

    monkeypatch.setattr(triton.testing, 'do_bench', lambda fn, **_: fn())
    cache = fused_loss.TuningCache()
    key = (torch.bfloat16, 90, 256, 32768)
    assert cache.fastest(candidates, run, key) is candidates[1] and len(timed) == 2
    assert cache.fastest(candidates, run, key) is candidates[1] and len(timed) == 2
    assert cache.fastest(candidates, run, (torch.bfloat16, 90, 512, 32768)) is candidates[1] and len(timed) == 4
    assert cache.fastest(candidates[:1], run, key) is candidates[0] and len(timed) == 4


@pytest.mark.parametrize('shape, arch, names', [
    ((8, 32, 64), 90, ['two-pass', 'one-pass', 'one launch']),  # B/16 on sm_90
    ((8, 64, 160), 90, ['two-pass', 'one-pass']),  # G/14: in one launch it would spill
    ((8, 32, 64), 80, ['two-pass']),  # sm_80 replicates the one-pass products 4×
])
def test_the_backward_schemes_where_they_compile_clean(shape, arch, names):
    """The two-pass scheme first (what the interpreter runs); the others add ∂q, ∂p with atomics in the image
    kernel beside ∂key, ∂value, and no text kernel runs."""
    space = fused_loss.tuning_space(*shape, arch)
    schemes = fused_loss.schemes('backward', space, 256, 32768, *shape, 0, 0, 0, False)
    assert [fused_loss.scheme_name(c[0].name for c in launches) for launches in schemes] == names
    assert not any(fused_loss.adds_atomically(candidates[0]) for candidates in schemes[0])
    for scheme in schemes[1:]:
        launches = [candidates[0] for candidates in scheme]
        assert all(launch.name == 'image' for launch in launches)
        assert {g for launch in launches for g in fused_loss.launch_gradients(launch)} == set(fused_loss.GRADIENTS)
        assert {fused_loss.launch_gradients(launch) for launch in launches if fused_loss.adds_atomically(launch)} <= {
            ('key', 'value', 'query', 'target'), ('key', 'query'), ('value', 'target'), fused_loss.GRADIENTS}
    assert len(fused_loss.tuning_space(*shape, arch, fp32=True)) == 1


def test_implementation_is_chosen_when_the_loss_is_built(monkeypatch):
    monkeypatch.delenv('OPEN_CLIP_LLIP_LOSS_IMPL', raising=False)
    loss = LlipLoss(5.)
    assert loss.impl == 'auto' and not loss.uses_kernels(torch.zeros(1))  # the CPU defaults to PyTorch
    monkeypatch.setenv('OPEN_CLIP_LLIP_LOSS_IMPL', 'triton')
    assert not loss.uses_kernels(torch.zeros(1))  # read once, when the loss was built
    assert LlipLoss(5.).uses_kernels(torch.zeros(1))
    monkeypatch.setenv('OPEN_CLIP_LLIP_LOSS_IMPL', 'torch')
    assert not LlipLoss(5.).uses_kernels(torch.zeros(1))
    assert LlipLoss(5., impl='triton').uses_kernels(torch.zeros(1))  # an explicit choice wins
    monkeypatch.setenv('OPEN_CLIP_LLIP_LOSS_IMPL', 'cuda')
    with pytest.raises(ValueError, match='"triton" or "torch"'):
        LlipLoss(5.)


def _inputs(b=2, B=3, H=2, K=3, d=4):
    keys, values = torch.randn(2, b, H, K, d)
    queries, targets = torch.randn(2, B, H, d)
    return [keys, values, torch.eye(H * K).expand(b, -1, -1), queries, targets, torch.tensor(1.), torch.tensor(0.)]


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    assert not fused_loss.INTERPRETED
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1.*OPEN_CLIP_LLIP_LOSS_IMPL=torch'):
        fused_loss.fused_sigmoid_loss(*_inputs())


def test_bad_shapes_get_a_clear_error():
    inputs = _inputs()
    inputs[2] = inputs[2][:, 1:]
    with pytest.raises(ValueError, match=r'gram must be \[b, H·K, H·K\]'):
        fused_loss.fused_sigmoid_loss(*inputs)
    inputs = _inputs()
    inputs[3] = inputs[3][:, :, 1:]
    with pytest.raises(ValueError, match='queries and targets'):
        fused_loss.fused_sigmoid_loss(*inputs)

"""The fused Triton loss: its cases under Triton's interpreter (in a subprocess), and how it is chosen."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('triton')

from open_clip_llip import fused_loss  # noqa: E402  (imported for a GPU here: only what runs no kernel)
from open_clip_llip import LlipLoss  # noqa: E402

CASES = Path(__file__).with_name('fused_loss_cases.py')


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


# Shared memory a block may use (KiB): Hopper, Ampere (A100).
SHARED_LIMIT = {90: 227, 80: 163}


@pytest.mark.parametrize('heads, tokens, head_dim, dtype, arch, negative_only', [
    (8, 32, 64, 'bf16', 90, False),  # B/16 on an H100
    (8, 64, 160, 'bf16', 80, True),  # G/14 on an A100
    (3, 5, 6, 'fp32', 90, False),  # the interpreter cases' odd shapes
])
def test_kernels_compile_for_the_gpu(heads, tokens, head_dim, dtype, arch, negative_only):
    """What the interpreter does not check: every kernel compiles to a GPU binary (no GPU needed) that fits
    the architecture's shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    blocks = fused_loss._blocks(heads, tokens, head_dim)
    common = dict(H=heads, K=tokens, D_HEAD=head_dim, HAS_POSITIVES=not negative_only, KP=blocks.KP, DC=blocks.DC)
    kernels = [
        (fused_loss._forward_kernel, dict(HP=blocks.HP, BJ=blocks.forward_texts)),
        (fused_loss._text_grad_kernel, dict(HG=blocks.text_heads, BJ=blocks.text_texts, DB=blocks.text_channels)),
        (fused_loss._image_grad_kernel, dict(HG=blocks.image_heads, BJ=blocks.text_texts, DB=blocks.image_channels)),
        (fused_loss._gram_grad_kernel, dict(HG=blocks.gram_heads, BJ=blocks.gram_texts)),
    ]
    integers = {'b', 'B', 'image_stride', 'text_stride', 'first_text'}
    inputs = {'keys', 'values', 'gram', 'queries', 'targets'}
    for kernel, constants in kernels:
        constants = dict(common, **constants)
        signature = {name: 'constexpr' if name in constants else 'i32' if name in integers
                     else f'*{dtype}' if name in inputs else '*fp32' for name in kernel.arg_names}
        compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget('cuda', arch, 32), options=dict(num_warps=fused_loss._WARPS))
        assert compiled.asm['cubin'], kernel.__name__
        assert compiled.metadata.shared <= SHARED_LIMIT[arch] * 1024, kernel.__name__


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

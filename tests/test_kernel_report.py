"""scripts/kernel_report.py: its counting method on a known PTX, its checks, and the report at one shape (B/16 on
sm_90) as CI runs it: offline, no GPU."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip('triton')

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'kernel_report.py'

# The shape of Triton's PTX around a loop whose latch block LLVM placed before the header.
PTX = '''
.target sm_90a
	wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 1, 1;
	bra.uni 	$L__BB0_3;
$L__BB0_7:                              // %latch
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
$L__BB0_3:                              // %body
                                        // =>This Inner Loop Header: Depth=1
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 1, 1;
	@%p1 bra 	$L__BB0_7;
$L__BB0_8:
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
'''


def load_report():
    spec = importlib.util.spec_from_file_location('kernel_report', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensor_core_work_splits_static_instructions_by_the_loop():
    """8 warps: an mma.sync counts 8 times (every warp), a wgmma twice (every warp group); the latch block before
    the header belongs to the loop."""
    instructions, outside, inside = load_report().tensor_core_work(PTX, warps=8)
    assert instructions == {'wgmma.m64n32k16': 1, 'mma.m16n8k16': 2, 'wgmma.m64n64k16': 1}
    assert outside == dict(mma=8 * 16 * 8 * 16, wgmma=2 * 64 * 32 * 16)
    assert inside == dict(mma=8 * 16 * 8 * 16, wgmma=2 * 64 * 64 * 16)


def test_atomic_adds_count_vector_values_per_thread_by_the_loop():
    """A 4-wide atomic in the loop adds 4 values per thread per iteration; a scalar one outside, 1 per thread."""
    ptx = PTX.replace('@%p1 bra', '@%p2 atom.global.gpu.relaxed.add.v4.f32 {%f1, %f2, %f3, %f4}, [%rd1], '
                      '{%f5, %f6, %f7, %f8};\n\t@%p1 bra') + '\tred.global.add.f32 [%rd2], %f1;\n'
    assert load_report().atomic_adds(ptx, warps=4) == (128, 4 * 128)


def test_problems_flag_spills_shared_memory_replication_and_mma_sync_on_sm90():
    report = load_report()
    row = dict(kernel='text[QT]', arch=90, launch=0, candidate=0, spill_bytes=8, shared_bytes=300 * 1024,
               issued_per_pair=2., design_per_pair=1., wgmma_share=0.)
    found = report.problems(dict(shape='b16', arch=90, design_per_pair=1., kernels=[row]))
    assert len(found) == 4 and all(problem.startswith('b16 sm_90 text[QT] candidate 0') for problem in found)
    clean = dict(row, spill_bytes=0, shared_bytes=0, issued_per_pair=1., wgmma_share=1.)
    assert not report.problems(dict(shape='b16', arch=90, design_per_pair=1., kernels=[clean]))
    # Every candidate of a launch doing at least 10% of the design work issues at least 75% of it on wgmma; a
    # launch doing less may use mma.sync; sm_80 has no wgmma.
    mostly_mma = dict(clean, candidate=1, wgmma_share=0.7)
    small = dict(clean, kernel='image[V]', launch=1, design_per_pair=0.09, issued_per_pair=0.09, wgmma_share=0.)
    shape = dict(shape='b16', arch=90, design_per_pair=1.09, kernels=[clean, mostly_mma, small])
    assert report.problems(shape) == [
        'b16 sm_90 text[QT] candidate 1: 70% of its multiply-adds on wgmma, doing 92% of the design work']
    assert not report.problems(dict(shape, kernels=[clean, dict(mostly_mma, wgmma_share=0.75), small]))
    larger = dict(small, design_per_pair=0.12, issued_per_pair=0.12)
    assert report.problems(dict(shape, design_per_pair=1.12, kernels=[clean, larger])) == [
        'b16 sm_90 image[V] candidate 0: 0% of its multiply-adds on wgmma, doing 11% of the design work']
    spilled = dict(mostly_mma, arch=80, spill_bytes=24, wgmma_share=0.)
    assert report.problems(dict(shape='l14', arch=80, design_per_pair=1., kernels=[spilled])) == [
        'l14 sm_80 text[QT] candidate 1: spills 24 bytes']


def test_report_at_b16_finds_no_replication_or_spills(tmp_path, capsys):
    """The CI check: every candidate of every launch at B/16 on sm_90 issues its design count of tensor-core work,
    without spills."""
    out = tmp_path / 'report.json'
    load_report().main(['--shapes', 'b16', '--arch', '90', '--check', '--json', str(out)])
    (result,) = json.loads(out.read_text())
    assert [row['kernel'].split('[')[0] for row in result['kernels']][0] == 'forward'
    assert result['members'] == 7 and max(row['candidate'] for row in result['kernels']) == 2
    for row in result['kernels']:
        assert row['spill_bytes'] == 0, row
        assert row['issued_per_pair'] == pytest.approx(row['design_per_pair'], rel=0.01), row
        assert row['wgmma_share'] == 1 and all(name.startswith('wgmma') for name in row['instructions']), row
        # 2·D = 1,024 fp32 atomic adds per pair where the one-pass image kernel adds ∂q, ∂p; none elsewhere
        assert row['atomics_per_pair'] == (1024 if 'Q' in row['kernel'] and row['kernel'].startswith('image') else 0)
    assert result['useful_per_pair'] == 3 * (2 * 32 * 512 + (8 * 32) ** 2)
    assert [scheme['name'] for scheme in result['schemes']] == ['two-pass', 'one-pass', 'one launch']
    two_pass, one_pass, one_launch = result['schemes']
    assert result['design_per_pair'] == two_pass['design_per_pair'] == 626_688
    assert one_pass['design_per_pair'] == 479_232 and one_pass['atomics_per_pair'] == 1024
    assert one_launch['design_per_pair'] == 397_312 and one_launch['atomics_per_pair'] == 1024
    printed = capsys.readouterr().out
    assert 'useful' in printed and 'FAIL' not in printed

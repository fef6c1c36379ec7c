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
    assert outside == 2 * 64 * 32 * 16 + 8 * 16 * 8 * 16
    assert inside == 8 * 16 * 8 * 16 + 2 * 64 * 64 * 16


def test_problems_flag_spills_shared_memory_replication_and_no_wgmma():
    report = load_report()
    row = dict(kernel='text[QT]', arch=90, launch=0, candidate=0, spill_bytes=8, shared_bytes=300 * 1024,
               issued_per_pair=2., design_per_pair=1., instructions={'mma.m16n8k16': 4})
    found = report.problems(dict(shape='b16', arch=90, kernels=[row]))
    assert len(found) == 4 and all(problem.startswith('b16 sm_90 text[QT] candidate 0') for problem in found)
    clean = dict(row, spill_bytes=0, shared_bytes=0, issued_per_pair=1., instructions={'wgmma.m64n32k16': 1})
    assert not report.problems(dict(shape='b16', arch=90, kernels=[clean]))
    # Every candidate of the largest launch needs wgmma; sm_80 fails on spills too (it has no wgmma).
    mma = dict(clean, candidate=1, instructions={'mma.m16n8k16': 4})
    assert report.problems(dict(shape='b16', arch=90, kernels=[clean, mma])) == [
        'b16 sm_90 text[QT] candidate 1: the largest product issues no wgmma']
    spilled = dict(mma, arch=80, spill_bytes=24)
    assert report.problems(dict(shape='l14', arch=80, kernels=[spilled])) == [
        'l14 sm_80 text[QT] candidate 1: spills 24 bytes']


def test_report_at_b16_finds_no_replication_or_spills(tmp_path, capsys):
    """The CI check: every candidate of every launch at B/16 on sm_90 issues its design count of tensor-core work,
    without spills."""
    out = tmp_path / 'report.json'
    load_report().main(['--shapes', 'b16', '--arch', '90', '--check', '--json', str(out)])
    (result,) = json.loads(out.read_text())
    assert [row['kernel'].split('[')[0] for row in result['kernels']][0] == 'forward'
    assert result['members'] == 3 and max(row['candidate'] for row in result['kernels']) == 2
    for row in result['kernels']:
        assert row['spill_bytes'] == 0, row
        assert row['issued_per_pair'] == pytest.approx(row['design_per_pair'], rel=0.01), row
        assert any(name.startswith('wgmma') for name in row['instructions']), row
    assert result['useful_per_pair'] == 3 * (2 * 32 * 512 + (8 * 32) ** 2)
    printed = capsys.readouterr().out
    assert 'useful' in printed and 'FAIL' not in printed

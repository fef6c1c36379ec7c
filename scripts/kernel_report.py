"""What the fused loss's kernels issue on the GPU, read offline from their compiled code (no GPU needed).

For each shape (H, K, d of a shipped config) and architecture (sm_90: H100/H200; sm_80: A100), every launch that
``open_clip_llip.loss.fused`` makes for b images against B texts (default b = 256, B = 32,768, one rank's step at
world size 128; bf16), in every form its autotuning space (``fused.tuning_space``) gives it (column ``c``: candidate 0
is the plan's; column ``s``: the backward's scheme, 0 two-pass, then one-pass and, at B/16, one launch; the totals
are per scheme, of each launch's candidate 0), is compiled with ``triton.compile`` exactly as the JIT would compile
it: the same constexprs, ``num_warps`` and ``num_stages`` (``fused.stage_launches`` describes each launch for both
the autograd function and this script), and the JIT's specialisation of the arguments (16-byte-aligned pointers and
integers divisible by 16 get ``tt.divisibility = 16``; an integer equal to 1 becomes a constexpr). It prints, per
kernel: registers and spilled bytes (``ptxas -v`` on the PTX, with Triton's own ptxas flags), shared memory, the
tensor-core instructions, the multiply-adds per (image, text) pair that they amount to, beside the design's own count
and, per shape, the useful count 3·(2·K·D + (H·K)²) (docs/method.md, the cost: forward, backward ≈ 2×), and on
sm_90 the share of the issued multiply-adds that are wgmma.

How issued work is counted:

* Tensor-core instructions are read from the PTX: ``mma.sync.aligned.mMnNkK`` (issued by every warp of a
  program) and ``wgmma.mma_async.sync.aligned.mMnNkK`` (issued once per warp group of 4 warps), M·N·K
  multiply-adds each. The SASS (``nvdisasm`` on the cubin: HMMA, HGMMA) is counted as a cross-check.
* Static counts are made dynamic from the loop structure. By construction every kernel has exactly one dynamic
  loop (over images or text tiles; the loops over heads and channel chunks are static and unrolled). The PTX
  marks its header (``// =>This Inner Loop Header: Depth=1``) and its backward branch: an instruction between the
  two runs once per iteration, any other once per program. The launch description gives the programs and the
  iterations summed over all programs, so issued = (Σ inside × iterations + Σ outside × programs) × warps (or
  warp groups) per program, exactly. A kernel with another loop structure is reported as an error.
* fp32 atomic adds (the one-pass backward's ∂q, ∂p: ``atom``/``red`` ``.add.f32``, a ``.v4`` vector counting 4
  values) are counted the same way, per thread (32 per warp), as values added per pair: 2·D by design.
* Per pair: issued / (b·B). The design count is the multiply-adds ``fused.stage_launches`` says the design does
  (K and d unpadded). issued/design above 1 is padding or replicated work: a product computed by more warps than
  hold distinct tiles shows up as a ratio of 2 or more.

``--check`` exits with status 1 if any candidate of any kernel spills, exceeds the architecture's shared memory or
issues more than 1.3× its design count, or, on sm_90, if a candidate of a launch doing at least 10% of its shape's
design work (its plan's form) issues less than 75% of its multiply-adds on wgmma (``mma.sync`` on sm_90 is the
Ampere path: a product under 64 rows per warp group).

Example: python scripts/kernel_report.py --shapes b32 b16 l14 h14 g14 --arch 90 80 --json report.json
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from open_clip_llip.loss import fused  # noqa: E402
from open_clip_llip.written_files import add_json_output, check_json_output, write_json  # noqa: E402

# H, K, d of the shipped configs (model_configs/Llip-*.json: llip_cfg.heads, mixture_tokens, embed_dim / heads).
SHAPES = {
    'b32': (8, 64, 64),
    'b16': (8, 32, 64),
    'l14': (8, 32, 96),
    'h14': (8, 64, 128),
    'g14': (8, 64, 160),
    'tiny': (4, 8, 16),
}
# Shared memory a program may use: Hopper (H100/H200), Ampere (A100).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Arguments the kernels take in the inputs' dtype (the rest are fp32 pointers, integers and query_scale).
INPUTS = {'keys', 'values', 'gram', 'queries', 'targets',
          'grad_keys', 'grad_values', 'grad_gram', 'grad_queries', 'grad_targets'}
FLOATS = {'query_scale'}
MAX_RATIO = 1.3
# sm_90: a launch doing at least LARGE_LAUNCH of its shape's design work issues at least MIN_WGMMA of it on wgmma.
LARGE_LAUNCH = 0.10
MIN_WGMMA = 0.75
TOOLS = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'
_ATOMIC = re.compile(r'\b(?:atom|red)\.global\.[\w.]*?add\.(?:v(\d)\.)?f32\b')
_MMA = re.compile(r'\b(mma\.sync\.aligned|wgmma\.mma_async\.sync\.aligned)\.m(\d+)n(\d+)k(\d+)')


def signature(launch, dtype: str):
    """(signature, constexprs, attrs) as the JIT builds them for this launch's arguments."""
    sig, constexprs, attrs = {}, dict(launch.constexprs), {}
    for index, name in enumerate(launch.kernel.arg_names):
        if name in constexprs:
            sig[name] = 'constexpr'
        elif name in FLOATS:
            sig[name] = 'fp32'
        elif name in launch.ints:
            value = launch.ints[name]
            if value == 1:  # the JIT makes an integer equal to 1 a constexpr
                sig[name], constexprs[name] = 'constexpr', 1
            else:
                sig[name] = 'i32'
                if value % 16 == 0:
                    attrs[(index,)] = [['tt.divisibility', 16]]
        else:  # a tensor: allocations are 16-byte aligned
            sig[name] = f'*{dtype}' if name in INPUTS else '*fp32'
            attrs[(index,)] = [['tt.divisibility', 16]]
    return sig, constexprs, attrs


def compile_launch(launch, arch: int, dtype: str = 'bf16'):
    sig, constexprs, attrs = signature(launch, dtype)
    source = triton.compiler.ASTSource(fn=launch.kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget('cuda', arch, 32), options=launch.options)


def ptxas_resources(ptx: str):
    """(registers, spill-store bytes) from ptxas -v with Triton's flags."""
    arch = re.search(r'\.target\s+(\S+)', ptx).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / 'kernel.ptx'
        source.write_text(ptx)
        log = subprocess.run([str(TOOLS / 'ptxas'), '-v', '--regAllocOptLevel=2', f'--gpu-name={arch}', str(source),
                              '-o', str(Path(folder) / 'kernel.cubin')], capture_output=True, text=True, check=True)
    registers = int(re.search(r'Used (\d+) registers', log.stderr).group(1))
    spills = int(re.search(r'(\d+) bytes spill stores', log.stderr).group(1))
    return registers, spills


def sass_counts(cubin: bytes):
    """Static (HMMA, HGMMA) counts in the SASS, or None where nvdisasm is not available."""
    if not (TOOLS / 'nvdisasm').exists():
        return None
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(TOOLS / 'nvdisasm'), '-c', f.name], capture_output=True, text=True).stdout
    return len(re.findall(r'\bHMMA\.', sass)), len(re.findall(r'\bHGMMA\.', sass))


def lines_by_loop(ptx: str):
    """(line, whether it is inside the kernel's one dynamic loop) for each line of its PTX."""
    lines = ptx.splitlines()
    depths = [int(re.search(r'Depth=(\d+)', line).group(1)) for line in lines if 'Loop Header' in line]
    if depths != [1]:
        raise ValueError(f'expected one dynamic loop, found loop headers of depths {depths}')
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r'\s*(\$L__BB\d+_\d+):', line))}
    # The loop is the span of its backward branches (LLVM may place the latch block before the header).
    backward = [(labels[m.group(1)], i) for i, line in enumerate(lines)
                if (m := re.search(r'\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);', line)) and labels[m.group(1)] < i]
    if not backward:
        raise ValueError('no backward branch found for the loop')
    start, stop = min(t for t, _ in backward), max(j for _, j in backward)
    return [(line, start <= i <= stop) for i, line in enumerate(lines)]


def tensor_core_work(ptx: str, warps: int):
    """Static tensor-core instructions, split by the kernel's one dynamic loop.

    Returns (instructions, MACs per program outside the loop, MACs per program per iteration), the MACs as
    {'mma': …, 'wgmma': …}; an instruction's MACs count every warp (mma.sync) or warp group (wgmma) that issues it.
    """
    instructions, outside, inside = {}, dict(mma=0, wgmma=0), dict(mma=0, wgmma=0)
    for line, in_loop in lines_by_loop(ptx):
        match = _MMA.search(line)
        if not match:
            continue
        kind = 'wgmma' if match.group(1).startswith('wgmma') else 'mma'
        m, n, k = map(int, match.group(2, 3, 4))
        name = f'{kind}.m{m}n{n}k{k}'
        instructions[name] = instructions.get(name, 0) + 1
        macs = m * n * k * (warps // 4 if kind == 'wgmma' else warps)
        (inside if in_loop else outside)[kind] += macs
    return instructions, outside, inside


def atomic_adds(ptx: str, warps: int):
    """fp32 values added with atomics (``atom``/``red`` ``.add``, ``.v2``/``.v4`` vectors counted per value) by
    every thread of a program: (outside the loop, per iteration)."""
    values = {False: 0, True: 0}
    for line, in_loop in lines_by_loop(ptx):
        if match := _ATOMIC.search(line):
            values[in_loop] += int(match.group(1) or 1) * 32 * warps
    return values[False], values[True]


def report_launch(launch, arch: int, b: int, B: int, dtype: str):
    started = time.perf_counter()
    compiled = compile_launch(launch, arch, dtype)
    seconds = time.perf_counter() - started
    ptx = compiled.asm['ptx']
    registers, spills = ptxas_resources(ptx)
    instructions, outside, inside = tensor_core_work(ptx, launch.options['num_warps'])
    atomics_outside, atomics_inside = atomic_adds(ptx, launch.options['num_warps'])
    programs = 1
    for size in launch.grid:
        programs *= size
    issued = {kind: outside[kind] * programs + inside[kind] * launch.trips for kind in outside}
    total = sum(issued.values())
    atomics = atomics_outside * programs + atomics_inside * launch.trips
    c = launch.constexprs
    return dict(
        kernel=fused.launch_label(launch), arch=arch, texts=c['BJ'], heads=c.get('HG', c['H']),
        warps=launch.options['num_warps'], stages=launch.options['num_stages'], streamed=bool(c['VOL']),
        registers=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
        instructions=instructions, sass=sass_counts(compiled.asm['cubin']),
        issued_per_pair=total / (b * B), design_per_pair=launch.macs / (b * B),
        wgmma_share=issued['wgmma'] / total if total else 0., atomics_per_pair=atomics / (b * B), compile_s=seconds)


def report_shape(name: str, arch: int, b: int, B: int, dtype: str):
    """Every launch of every member of the shape's autotuning space (``fused.tuning_space``): a row per distinct
    candidate, numbered per launch (``launch``) and within it (``candidate``, 0 for the first member's, which runs
    where nothing is timed), with the backward's scheme (``scheme``: its index in ``fused.schemes``; the
    totals name it).
    The totals are per scheme, of the forward and the scheme's backward, with the first candidate of each launch;
    the shape's own are scheme 0's."""
    heads, tokens, head_dim = SHAPES[name]
    space = fused.tuning_space(heads, tokens, head_dim, arch)
    shape = (space, b, B, heads, tokens, head_dim, 2 * heads * tokens * head_dim, 2 * heads * head_dim, 0, False)
    ((forward,),) = fused.schemes('forward', *shape)
    backward = fused.schemes('backward', *shape)
    launches = [(None, forward)] + [(scheme, candidates)
                                    for scheme, launches in enumerate(backward) for candidates in launches]
    rows = [dict(report_launch(launch, arch, b, B, dtype), launch=position, candidate=index, scheme=scheme)
            for position, (scheme, candidates) in enumerate(launches) for index, launch in enumerate(candidates)]
    totals = []
    for scheme, launches in enumerate(backward):
        first = [row for row in rows if row['candidate'] == 0 and row['scheme'] in (None, scheme)]
        totals.append(dict(name=fused.scheme_name(c[0].name for c in launches),
                           **{key: sum(row[key] for row in first)
                              for key in ('issued_per_pair', 'design_per_pair', 'atomics_per_pair')}))
    useful = 3 * (2 * tokens * heads * head_dim + (heads * tokens) ** 2)
    return dict(shape=name, H=heads, K=tokens, d=head_dim, arch=arch, b=b, B=B, members=len(space), kernels=rows,
                useful_per_pair=useful, schemes=totals, **totals[0])


def problems(result) -> list:
    """What fails the targets, for every candidate: shared memory over the limit, issued > 1.3 × design (replicated
    work) and spills; on sm_90 also, in every candidate of a launch whose plan's form does at least LARGE_LAUNCH of
    the shape's design work, less than MIN_WGMMA of the issued multiply-adds on wgmma."""
    found = []
    for row in result['kernels']:
        where = f'{result["shape"]} sm_{row["arch"]} {row["kernel"]} candidate {row["candidate"]}'
        if row['shared_bytes'] > SHARED_LIMIT[row['arch']]:
            found.append(f'{where}: {row["shared_bytes"]} bytes of shared memory')
        if row['issued_per_pair'] > MAX_RATIO * row['design_per_pair']:
            found.append(f'{where}: issues {row["issued_per_pair"] / row["design_per_pair"]:.2f}× its design count')
        if row['spill_bytes']:
            found.append(f'{where}: spills {row["spill_bytes"]} bytes')
    if result['arch'] == 90:
        large = {row['launch']: row['design_per_pair'] / result['design_per_pair'] for row in result['kernels']
                 if row['candidate'] == 0 and row['design_per_pair'] >= LARGE_LAUNCH * result['design_per_pair']}
        for row in result['kernels']:
            if row['launch'] in large and row['wgmma_share'] < MIN_WGMMA:
                found.append(f'{result["shape"]} sm_90 {row["kernel"]} candidate {row["candidate"]}: '
                             f'{row["wgmma_share"]:.0%} of its multiply-adds on wgmma, doing '
                             f'{large[row["launch"]]:.0%} of the design work')
    return found


def table(results) -> str:
    header = (f'{"shape":5s} {"arch":5s} {"kernel":12s} {"s":>1s} {"c":>1s} {"BJ":>4s} {"HG":>3s} {"w":>2s} {"st":>2s} '
              f'{"L2":>2s} {"regs":>4s} {"spill":>5s} {"smem KB":>7s} {"MAC/pair issued":>15s} {"design":>10s} '
              f'{"ratio":>5s} {"wgmma":>5s} {"atomics":>7s}  tensor-core instructions (static)')
    lines = [header, '-' * len(header)]
    for result in results:
        for r in result['kernels']:
            instructions = ', '.join(f'{name}×{count}' for name, count in sorted(r['instructions'].items()))
            lines.append(
                f'{result["shape"]:5s} sm_{r["arch"]:<2d} {r["kernel"]:12s} {"" if r["scheme"] is None else r["scheme"]:>1} '
                f'{r["candidate"]:1d} {r["texts"]:4d} {r["heads"]:3d} {r["warps"]:2d} {r["stages"]:2d} '
                f'{"y" if r["streamed"] else "n":>2s} {r["registers"]:4d} {r["spill_bytes"]:5d} '
                f'{r["shared_bytes"] / 1024:7.0f} {r["issued_per_pair"]:15,.0f} {r["design_per_pair"]:10,.0f} '
                f'{r["issued_per_pair"] / r["design_per_pair"]:5.2f} '
                f'{format(r["wgmma_share"], "5.0%") if r["arch"] >= 90 else "-":>5s} {r["atomics_per_pair"]:7,.0f}  '
                f'{instructions}')
        for scheme, total in enumerate(result['schemes']):
            lines.append(
                f'{result["shape"]:5s} sm_{result["arch"]:<2d} {"total":12s} {scheme:1d} {total["name"]:34s} '
                f'{total["issued_per_pair"]:15,.0f} {total["design_per_pair"]:10,.0f} '
                f'{total["issued_per_pair"] / total["design_per_pair"]:5.2f} {"":5s} {total["atomics_per_pair"]:7,.0f}  '
                f'useful {result["useful_per_pair"]:,} '
                f'(issued/useful {total["issued_per_pair"] / result["useful_per_pair"]:.2f})')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=['b32', 'b16', 'l14', 'h14', 'g14'])
    parser.add_argument('--arch', nargs='+', type=int, choices=sorted(SHARED_LIMIT), default=[90, 80])
    parser.add_argument('--b', type=int, default=256, help='images (one rank)')
    parser.add_argument('--B', type=int, default=32768, help='texts (all a rank sees)')
    parser.add_argument('--dtype', choices=['bf16', 'fp16'], default='bf16')
    add_json_output(parser, 'the results')
    # argparse %-formats help strings: a literal % is written %%.
    parser.add_argument('--check', action='store_true', help='exit 1 on spills, shared memory over the limit, '
                        f'issued > {MAX_RATIO}× design, or on sm_90 under {MIN_WGMMA:.0%}% of a launch\'s multiply-adds '
                        f'on wgmma where it does {LARGE_LAUNCH:.0%}% or more of the design work')
    args = parser.parse_args(argv)
    check_json_output(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.pop('TRITON_INTERPRET', None)
    results = [report_shape(name, arch, args.b, args.B, args.dtype) for name in args.shapes for arch in args.arch]
    print(table(results))
    found = [problem for result in results for problem in problems(result)]
    for problem in found:
        print('FAIL:', problem)
    if args.json:
        write_json(args.json, results, args.overwrite)
    if args.check and found:
        raise SystemExit(1)
    return results


if __name__ == '__main__':
    main()

"""The first thing a session with a GPU runs: the fused loss checked and timed on the device, in one call.

1. Correctness, at every shipped config's (H, K, d), bf16 and fp32, for each backward scheme the autotuning space has
   there (two-pass; one-pass, whose texts' gradients are fp32 atomic sums: ``fused.one_pass``; at B/16 one
   launch: ``fused.one_launch``), the space restricted to it: the loss and all seven gradients of
   ``fused_sigmoid_loss`` against float64 (``reference``: the formula written out) and against the PyTorch path
   (``open_clip_llip.loss.sigmoid.block_loss``), with partial text tiles (B not a multiple of any tile), positives off the
   diagonal, raw queries with τ = 5, and one image whose values and Gram matrix are zero (|z| = 0: checked against
   the PyTorch path, which clamps as the kernels do; the float64 formula would divide by zero).
2. Per-kernel times: every candidate (``fused.tuning_space``; 0 is the plan's) of every launch of the forward and
   of each backward scheme at b = 256, B = 32,768 (one rank's step at world size 128), bf16, median of
   ``triton.testing.do_bench``, with the design's TFLOP/s; then per scheme forward + backward with each launch's
   fastest candidate: what the run-time choice (``fused.TuningCache``) chooses among.
3. ``scripts/bench_loss.py`` at b = 256, B = 32,768 for B/16 and G/14: the direct formulation, ours (Triton; the
   PyTorch path too at B/16) and SigLIP, forward+backward time and peak memory.
4. ``tests/test_precision.py`` on the GPU (``OPEN_CLIP_LLIP_TEST_DEVICE=cuda``): the stock loop with validation,
   get_logits, similarity, zero-shot and the eval command in fp32, amp_bf16, amp and pure_bf16, against fp32.
5. A few ``open_clip_train`` steps of Llip-ViT-B-16 and of its SigLIP twin (ViT-B-16-quickgelu with ``--siglip``:
   the same towers) at 256 per GPU, amp_bf16, synthetic data: samples/s of each, from the loop's tensorboard.

Prints every figure, with the seconds elapsed after each, and writes them all to ``--json``. Budget: 8 minutes for
sections 1–3, not yet measured (no GPU has run it). Most of it is Triton compiling, each kernel once: the timed
choice in section 1 compiles every candidate at each shape (about 60 distinct bf16 kernels at the five shipped
shapes on sm_90, of the 70 rows ``scripts/kernel_report.py`` prints there, which section 2 reuses; about 30 more
for fp32 and the tiny shape); kernel_report compiles 106 kernels for both architectures, with ptxas -v and
nvdisasm, in 2.5–6 minutes on 2 CPU cores. Timing takes ~0.15 s per candidate (``do_bench``'s 25 + 100 ms).
Sections 4 and 5 add about 3 minutes. If the first run is over budget, ``--skip`` leaves sections out and
``--shapes`` narrows section 1 for the rerun.
``--dry-run`` runs section 1 at the tiny shapes only, on the CPU under TRITON_INTERPRET=1 (how CI tests it).

Example: python scripts/device_check.py --json $OUT/device_check.json
"""
import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from open_clip_llip.loss import fused  # noqa: E402
from open_clip_llip.loss.sigmoid import block_loss  # noqa: E402
from open_clip_llip.written_files import add_json_output, check_json_output, write_json  # noqa: E402

# H, K, d of the shipped configs (as scripts/kernel_report.py)
SHAPES = {'tiny': (4, 8, 16), 'b32': (8, 64, 64), 'b16': (8, 32, 64), 'l14': (8, 32, 96), 'h14': (8, 64, 128),
          'g14': (8, 64, 160)}
TIMED = ('b32', 'b16', 'l14', 'h14', 'g14')
# Largest error allowed, relative to the largest magnitude of the reference (fp32: fp32 arithmetic with exact
# products; bf16: operands rounded to 8 bits).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
NAMES = ('loss', 'keys', 'values', 'gram', 'queries', 'targets', 'logit_scale', 'logit_bias')


def reference(keys, values, gram, queries, targets, logit_scale, logit_bias, temperature, first_text):
    """Σ −log σ(y·s) written out in float64: a = softmax(<q, key>/τ), cos = Σ a<value, p> / sqrt(aᵀ G a)."""
    keys, values, gram, queries, targets = (x.double() for x in (keys, values, gram, queries, targets))
    attention = (torch.einsum('ihkd,jhd->ijhk', keys, queries) / temperature).softmax(dim=-1)
    numerator = torch.einsum('ijhk,ihkd,jhd->ij', attention, values, targets)
    flat = attention.flatten(2)
    norm = torch.einsum('ijr,irc,ijc->ij', flat, gram, flat).sqrt()
    logits = logit_scale.double() * numerator / norm + logit_bias.double()
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    cols = torch.arange(logits.shape[1], device=logits.device)[None, :]
    labels = torch.where(cols + first_text == rows, 1., -1.).double()
    return -F.logsigmoid(labels * logits).sum()


def make_inputs(b, B, heads, tokens, head_dim, dtype, device, zero_image=None, seed=0):
    """Keys and values unbound from packed [b, 2, H, K, d] features, a PSD Gram matrix, texts unbound from
    [B, 2, H, d] (as LlipModel gives them), scale, bias; all requiring gradients."""
    generator = torch.Generator(device=device).manual_seed(seed)
    features = torch.randn(b, 2, heads, tokens, head_dim, generator=generator, device=device)
    mixed = torch.randn(b, heads * tokens, 2 * head_dim, generator=generator, device=device) / head_dim ** 0.5
    gram = mixed @ mixed.transpose(1, 2)
    texts = torch.randn(B, 2, heads, head_dim, generator=generator, device=device)
    texts[:, 0] *= 3.  # raw queries: the kernels divide the logits by τ = 5
    if zero_image is not None:
        features[zero_image, 1] = 0.
        gram[zero_image] = 0.
    leaves = [x.to(dtype).requires_grad_() for x in (features, gram, texts)]
    scale = torch.tensor(10., device=device, requires_grad=True)
    bias = torch.tensor([-5.], device=device, requires_grad=True)
    return leaves + [scale, bias]


def relative_errors(ours, refs):
    return [((a.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()
            for a, r in zip(ours, refs)]


def schemes_at(name, dtype, device) -> list:
    """The backward schemes whose members the autotuning space has at a shape, for the device and dtype, in the
    space's order."""
    heads, tokens, head_dim = SHAPES[name]
    return fused.backward_schemes(heads, tokens, head_dim, fused.device_arch(torch.empty(0, device=device)),
                                  dtype == torch.float32)


def check_shape(name, dtype, device, scheme, b=16, B=208, temperature=5., first_text=1):
    """Loss and gradients, with the backward ``scheme`` (``fused_sigmoid_loss(..., scheme=scheme)``), against float64 and the
    PyTorch path; one more run with a zero image against the PyTorch path. Returns a record with the errors and
    whether all are within TOLERANCE[dtype]."""
    heads, tokens, head_dim = SHAPES[name]
    record = dict(section='correctness', shape=name, dtype=str(dtype).replace('torch.', ''), scheme=scheme, b=b, B=B)
    for case, zero_image in (('float64', None), ('pytorch_path_zero_image', 1)):
        features, gram, texts, scale, bias = make_inputs(b, B, heads, tokens, head_dim, dtype, device, zero_image)
        keys, values = features.unbind(dim=1)
        queries, targets = texts.unbind(dim=1)
        inputs = (keys, values, gram, queries, targets, scale, bias)
        leaves = (features, gram, texts, scale, bias)
        loss = fused.fused_sigmoid_loss(*inputs, temperature=temperature, first_text=first_text, scheme=scheme)
        ours = [loss] + list(torch.autograd.grad(loss, leaves))
        if case == 'float64':
            ref = reference(*inputs, temperature, first_text)
        else:  # the PyTorch path in float64 (it clamps |z| at 1e-12 as the kernels do)
            double = [x.detach().double().requires_grad_() for x in leaves]
            k, v = double[0].unbind(dim=1)
            q, p = double[2].unbind(dim=1)
            ref = block_loss(k, v, double[1], q / temperature, p, double[3], double[4], first_text, False)
            leaves = double
        refs = [ref] + list(torch.autograd.grad(ref, leaves))
        errors = relative_errors(ours, refs)
        record[case] = dict(zip(('loss', 'features', 'gram', 'texts', 'logit_scale', 'logit_bias'), errors))
        record[case + '_finite'] = all(bool(torch.isfinite(x).all()) for x in ours)
    worst = max(max(record[c].values()) for c in ('float64', 'pytorch_path_zero_image'))
    record['max_error'] = worst
    record['ok'] = worst <= TOLERANCE[dtype] and record['float64_finite'] and record['pytorch_path_zero_image_finite']
    return record


def kernel_times(name, device, b=256, B=32768):
    """Median time of every candidate of every launch (``fused.tuning_space``) at b images × B texts (bf16), forward
    then the backward of each scheme (two-pass, one-pass: ``fused.schemes``), with design TFLOP/s;
    candidate 0 is the plan's, the one that runs where nothing is timed. Then per scheme the forward and backward
    with each launch's fastest candidate: what the run-time choice (``fused.TuningCache``) compares."""
    import triton.testing
    heads, tokens, head_dim = SHAPES[name]
    features, gram, texts, scale, bias = make_inputs(b, B, heads, tokens, head_dim, torch.bfloat16, device)
    keys, values = features.detach().unbind(dim=1)
    queries, targets = texts.detach().unbind(dim=1)
    space = fused.tuning_space(heads, tokens, head_dim, fused.device_arch(keys))
    shape = (space, b, B, heads, tokens, head_dim, keys.stride(0), queries.stride(0), 0, False)
    fp32 = dict(device=device, dtype=torch.float32)
    args = dict(keys=keys, values=values, gram=gram.detach(), queries=queries, targets=targets,
                scale_ptr=scale.detach().reshape(1).float(), bias_ptr=bias.detach().float(),
                grad_ptr=torch.ones(1, **fp32), cos_ptr=torch.empty(b, B, **fp32),
                sq_norm_ptr=torch.empty(b, B, **fp32), query_scale=math.log2(math.e) / 5.,
                grad_queries=torch.empty_like(queries), grad_targets=torch.empty_like(targets),
                grad_keys=torch.empty_like(keys), grad_values=torch.empty_like(values),
                grad_gram=torch.empty_like(gram),  # the one-pass backward's sums (timing only adds more)
                grad_queries_sum=torch.zeros(queries.shape, **fp32), grad_targets_sum=torch.zeros(targets.shape, **fp32))
    records = []
    stages = [('forward', None, launches) for launches in fused.schemes('forward', *shape)]
    stages += [('backward', fused.scheme_name(c[0].name for c in launches),
                launches) for launches in fused.schemes('backward', *shape)]
    fastest = {}
    for stage, scheme, launches in stages:
        for candidates in launches:
            times = []
            for index, launch in enumerate(candidates):
                if stage == 'forward':
                    args['partial_ptr'] = torch.empty(b, launch.grid[0], 3, **fp32)
                fused.run_launch(launch, args)  # compile, and the forward's cos and |z|² for the backward
                ms = triton.testing.do_bench(lambda launch=launch: fused.run_launch(launch, args), warmup=25, rep=100,
                                             return_mode='median')
                times.append(ms)
                records.append(dict(section='kernel_time', shape=name, kernel=fused.launch_label(launch),
                                    scheme=scheme, candidate=index, texts=launch.constexprs['BJ'],
                                    warps=launch.options['num_warps'], streamed=launch.constexprs['VOL'], b=b, B=B,
                                    time_ms=ms, design_tflop_per_s=2 * launch.macs / ms / 1e9))
            fastest[stage, scheme] = fastest.get((stage, scheme), 0.) + min(times)
    for (stage, scheme), backward_ms in fastest.items():
        if stage == 'backward':
            records.append(dict(section='step_time', shape=name, scheme=scheme, b=b, B=B,
                                forward_ms=fastest['forward', None], backward_ms=backward_ms))
    return records


def bench(name, device, b=256, B=32768):
    """scripts/bench_loss.py's records for one shape (its own table is printed too)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_loss
    impls = ['direct', 'torch', 'triton', 'siglip'] if name == 'b16' else ['direct', 'triton', 'siglip']
    records = bench_loss.main(['--shape', name, '--b', str(b), '--B', str(B), '--dtype', 'bfloat16',
                               '--device', str(device), '--impl', *impls, '--repeats', '5'])
    return [dict(record, section='bench', shape=name) for record in records]


def precision_matrix():
    """tests/test_precision.py on the GPU, in a subprocess: pass/fail and its summary line."""
    env = dict(os.environ, OPEN_CLIP_LLIP_TEST_DEVICE='cuda')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-s', '-p', 'no:cacheprovider',
                             str(REPO / 'tests' / 'test_precision.py')], cwd=REPO, env=env, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    figures = [line for line in lines if 'max |Δ' in line or '|Δ clip_val_loss|' in line]
    return [dict(section='precision', ok=result.returncode == 0, summary=lines[-1] if lines else '', figures=figures,
                 output_tail='' if result.returncode == 0 else result.stdout[-4000:] + result.stderr[-2000:])]


def training_speed(steps=12, batch=256):
    """open_clip_train steps of Llip-ViT-B-16 and ViT-B-16-quickgelu --siglip: median samples/s after 2 warm-up steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = []
    with tempfile.TemporaryDirectory() as logs:
        for model, extra in (('Llip-ViT-B-16', []), ('ViT-B-16-quickgelu', ['--siglip'])):
            command = [sys.executable, '-m', 'open_clip_train.main', '--model', model, '--dataset-type', 'synthetic',
                       '--train-num-samples', str(steps * batch), '--batch-size', str(batch), '--precision', 'amp_bf16',
                       '--workers', '4', '--epochs', '1', '--log-every-n-steps', '1', '--report-to', 'tensorboard',
                       '--save-frequency', '0', '--logs', logs, '--name', model, *extra]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            record = dict(section='train', model=model, flags=extra, ok=result.returncode == 0, batch=batch)
            if result.returncode == 0:
                events = EventAccumulator(str(Path(logs) / model / 'tensorboard')).Reload()
                speeds = [event.value for event in events.Scalars('train/samples_per_second')][2:]
                record.update(samples_per_second=float(sorted(speeds)[len(speeds) // 2]),
                              loss=[event.value for event in events.Scalars('train/loss')])
            else:
                record.update(output_tail=result.stdout[-3000:] + result.stderr[-3000:])
            records.append(record)
    return records


def environment(device):
    info = dict(section='environment', python=platform.python_version(), torch=torch.__version__,
                triton=__import__('triton').__version__, device=str(device),
                interpreted=fused.INTERPRETED)
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f'{props.major}.{props.minor}', sms=props.multi_processor_count,
                    memory_gb=props.total_memory / 2 ** 30)
    return info


def summary(records) -> str:
    lines = []
    for r in records:
        if r['section'] == 'correctness':
            lines.append(f'correctness {r["shape"]:5s} {r["dtype"]:9s} {r["scheme"]:8s} max error {r["max_error"]:.2e} '
                         f'{"ok" if r["ok"] else "FAIL"}')
        elif r['section'] == 'kernel_time':
            lines.append(f'kernel      {r["shape"]:5s} {r["kernel"]:12s} {r["scheme"] or "":8s} {r["candidate"]} '
                         f'{r["time_ms"]:8.3f} ms {r["design_tflop_per_s"]:7.1f} TFLOP/s (design)')
        elif r['section'] == 'step_time':
            lines.append(f'step        {r["shape"]:5s} {r["scheme"]:8s} forward {r["forward_ms"]:.2f} ms + backward '
                         f'{r["backward_ms"]:.2f} ms = {r["forward_ms"] + r["backward_ms"]:.2f} ms (fastest candidates)')
        elif r['section'] == 'bench':
            time_ms = f'{r["time_ms"]:.2f} ms' if r['time_ms'] is not None else 'n/a'
            lines.append(f'bench       {r["shape"]:5s} {r["impl"]:12s} {time_ms:>11s} {r["peak_mem_mb"]:9.1f} MB')
        elif r['section'] == 'precision':
            lines.append(f'precision   {"ok" if r["ok"] else "FAIL"}: {r["summary"]}')
            lines += [f'            {figure}' for figure in r['figures']]
        elif r['section'] == 'train':
            speed = f'{r["samples_per_second"]:.0f} samples/s' if r['ok'] else 'FAILED'
            lines.append(f'train       {r["model"]} {" ".join(r["flags"])}: {speed} at {r["batch"]} per GPU, amp_bf16')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_json_output(parser, 'every record')
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=list(SHAPES),
                        help='shapes for the correctness checks')
    parser.add_argument('--skip', nargs='*', default=[],
                        choices=['correctness', 'kernels', 'bench', 'precision', 'train'])
    parser.add_argument('--dry-run', action='store_true',
                        help='correctness at the tiny shape only, on the CPU (needs TRITON_INTERPRET=1)')
    args = parser.parse_args(argv)
    check_json_output(parser, args)
    if args.dry_run and not fused.INTERPRETED:
        parser.error('--dry-run runs the kernels on the CPU: set TRITON_INTERPRET=1')
    if not args.dry_run and not torch.cuda.is_available():
        parser.error('no CUDA device: run on a GPU, or --dry-run under TRITON_INTERPRET=1')
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device('cpu' if args.dry_run else 'cuda')
    started = time.perf_counter()
    records = [environment(device)]
    print(records[0], flush=True)
    if 'correctness' not in args.skip:
        shapes = ['tiny'] if args.dry_run else args.shapes
        sizes = dict(b=3, B=21) if args.dry_run else {}
        for name in shapes:
            for dtype in (torch.bfloat16, torch.float32):
                for scheme in schemes_at(name, dtype, device):
                    records.append(check_shape(name, dtype, device, scheme, **sizes))
                    print(summary(records[-1:]), f'({time.perf_counter() - started:.0f} s)', flush=True)
    if not args.dry_run and 'kernels' not in args.skip:
        for name in TIMED:
            records += kernel_times(name, device)
            print(summary([r for r in records if r.get('shape') == name and r['section'] in ('kernel_time', 'step_time')]),
                  f'({time.perf_counter() - started:.0f} s)', flush=True)
    if not args.dry_run and 'bench' not in args.skip:
        for name in ('b16', 'g14'):
            records += bench(name, device)
    if not args.dry_run and 'precision' not in args.skip:
        records += precision_matrix()
        print(summary(records[-1:]), f'({time.perf_counter() - started:.0f} s)', flush=True)
    if not args.dry_run and 'train' not in args.skip:
        records += training_speed()
        print(summary(records[-2:]), f'({time.perf_counter() - started:.0f} s)', flush=True)
    records.append(dict(section='total', seconds=time.perf_counter() - started,
                        ok=all(r['ok'] for r in records if r['section'] in ('correctness', 'precision', 'train'))))
    print('\n' + summary(records))
    print(f'total {records[-1]["seconds"]:.0f} s; checks {"ok" if records[-1]["ok"] else "FAILED"}')
    if args.json:
        write_json(args.json, records, args.overwrite)
    return records


if __name__ == '__main__':
    main()

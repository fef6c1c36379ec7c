"""Forward+backward time and peak memory of Llip's loss: the direct formulation, ours (PyTorch, Triton), SigLIP.

Implementations (``--impl``), each the loss of b images against B texts (world size 1: the b local
texts are the first of the B, the others negatives), forward and backward, from its own inputs
(random, requiring gradients):

    direct   the authors' formulation, from keys, values [b, H, K, d], queries (q / τ) [B, H, d],
             text embeddings t [B, D] and the mixer's W_O [D, D]: z = concat_h(Σ_k a·value) @ W_O
             materialised as [b, chunk, D] for every pair, cosine with t, sigmoid loss; each chunk of
             texts under activation checkpointing (``--chunk``, default 256: one rank's texts; 0: the
             whole [b, B, D] at once)
    torch    LlipLoss with OPEN_CLIP_LLIP_LOSS_IMPL=torch, from what LlipModel.forward gives it: keys and
             values [b, 2, H, K, d], the Gram matrices G = Ṽ Ṽᵀ [b, H·K, H·K], (q / τ, p = W_O t̂)
             [B, 2, H, d]. Those per-image and per-text factors are the model's work (b·H·K·D·(d + H·K)
             + B·D² multiply-adds), not timed here
    triton   the same with OPEN_CLIP_LLIP_LOSS_IMPL=triton (CUDA only)
    siglip   OpenCLIP's SigLipLoss on [b, D] and [B, D] features: the floor

Peak memory is what forward+backward allocates beyond the inputs (input gradients included): on
CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak of live tensor bytes, tracked with a
``TorchDispatchMode`` that counts each storage an op creates until the last tensor using it is freed,
over forward+backward traced under ``FakeTensorMode`` (the same ops as the timed run, no arithmetic;
tracking a real run gives the same bytes; the Triton kernels cannot run on fake tensors, so the fused loss is
measured by running it). Every size is traced first; one whose peak exceeds
``--memory-fraction`` of the free memory (or every one, with ``--memory-only``) is reported with its
traced peak and no time.

FLOP/s count useful arithmetic only: per pair, forward multiply-adds of docs/method.md (the cost) — ours 2·K·D + (H·K)²,
direct 2·K·D + D², SigLIP D — times 3 for forward+backward (backward ≈ 2× forward), times 2 FLOPs per
multiply-add; recomputation under checkpointing and the per-image/per-text factors are not counted.

Example: python scripts/bench_loss.py --shape b16 --batch 256 512 1024 2048 --json out.json
"""
import argparse
import contextlib
import logging
import os
import statistics
import time
import weakref

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from open_clip_llip import LlipLoss, LlipMixer, pack_image, pack_text
from open_clip_llip.written_files import add_json_output, check_json_output, write_json

SHAPES = {  # mixer shapes of the released configs (docs/method.md, configurations): K mixture tokens, D width, H heads
    'b16': dict(K=32, D=512, H=8),
    'g14': dict(K=64, D=1280, H=8),
}
IMPLS = ('direct', 'torch', 'triton', 'siglip')


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while this mode is active.

    A storage counts from the op that creates it until the last tensor seen using it (views and
    autograd's saved copies included) is freed; storages of ``exclude`` (the inputs) never count.
    """

    def __init__(self, exclude=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = {}  # storage id -> [tensors alive, bytes]
        for tensor in exclude:
            self._storages[self._key(tensor)] = [float('inf'), 0]

    @staticmethod
    def _key(tensor):
        return tensor.untyped_storage()._cdata

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # A fake tensor has no value to read (LlipLoss's finiteness check); memory does not depend on it.
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1. if dtype.is_floating_point else 1
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor):
        key = self._key(tensor)
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [0, tensor.untyped_storage().nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]


def direct_chunk_loss(keys, values, queries, texts, out_proj, logit_scale, logit_bias, first_text: int):
    """Σ −log σ(y·s) for b images × one chunk of texts, with z[i|j] materialised as [b, m, D]."""
    attention = torch.einsum('ihkd,jhd->ijhk', keys, queries).softmax(dim=-1)
    mixed = torch.einsum('ijhk,ihkd->ijhd', attention, values).flatten(2) @ out_proj  # [b, m, D]: W_O per pair
    cosine = (F.normalize(mixed, dim=-1) * F.normalize(texts, dim=-1)).sum(dim=-1)
    logits = logit_scale * cosine + logit_bias
    images = torch.arange(logits.shape[0], device=logits.device)[:, None]
    chunk_texts = torch.arange(logits.shape[1], device=logits.device)[None, :] + first_text
    labels = torch.where(images == chunk_texts, 1., -1.)
    return -F.logsigmoid(labels * logits).sum()


def direct_loss(leaves, mixer: LlipMixer, chunk: int):
    keys, values, queries, texts, out_proj, logit_scale, logit_bias = leaves
    queries = queries / mixer.temperature
    chunk = chunk or queries.shape[0]
    total = 0.
    for start in range(0, queries.shape[0], chunk):
        total = total + checkpoint(
            direct_chunk_loss, keys, values, queries[start:start + chunk], texts[start:start + chunk], out_proj,
            logit_scale, logit_bias, start, use_reentrant=False)
    return total / keys.shape[0]


def llip_loss(leaves, temperature):
    """One rank's loss: its b images against all B texts (LlipLoss's forward takes the local b pairs only)."""
    image_features, image_gram, text_features, logit_scale, logit_bias = leaves
    return LlipLoss(temperature)._loss((image_features, image_gram), text_features, logit_scale, logit_bias)


def siglip_loss(leaves):
    image_features, text_features, logit_scale, logit_bias = leaves
    num_images = image_features.shape[0]
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    loss = SigLipLoss()
    # The b local texts, then the others as negatives in chunks of b, as they come round the ring.
    total = loss._loss(image_features, text_features[:num_images], logit_scale, logit_bias)
    for start in range(num_images, text_features.shape[0], num_images):
        total = total + loss._loss(image_features, text_features[start:start + num_images], logit_scale, logit_bias,
                                   negative_only=True)
    return total


def make_case(impl, b, B, K, D, H, chunk, device, dtype):
    """(leaves, loss function of no arguments) for one implementation and size."""
    def leaf(*shape, scale=1.):
        return (scale * torch.randn(*shape, device=device, dtype=dtype)).requires_grad_()

    logit_scale = torch.tensor(1 / 0.07, device=device).requires_grad_()
    logit_bias = torch.tensor(-10., device=device).requires_grad_()
    if impl == 'siglip':
        leaves = [leaf(b, D), leaf(B, D), logit_scale, logit_bias]
        return leaves, lambda: siglip_loss(leaves)
    d = D // H
    with torch.device(device):
        mixer = LlipMixer(D, H, temperature=5.)
    if impl == 'direct':
        mixer.out_proj = torch.nn.Parameter(leaf(D, D, scale=D ** -0.5))
        leaves = [leaf(b, H, K, d), leaf(b, H, K, d), leaf(B, H, d), leaf(B, D), mixer.out_proj, logit_scale,
                  logit_bias]
        return leaves, lambda: direct_loss(leaves, mixer, chunk)
    with torch.no_grad():  # LlipLoss's inputs as LlipModel.forward makes them from the same kind of tensors
        keys, values = torch.randn(2, b, H, K, d, device=device)
        texts = pack_text(torch.randn(B, H, d, device=device), mixer.text_targets(torch.randn(B, D, device=device)))
        tensors = pack_image(keys, values), mixer.image_gram(values), texts
    leaves = [x.to(dtype).requires_grad_() for x in tensors] + [logit_scale, logit_bias]
    return leaves, lambda: llip_loss(leaves, mixer.temperature)


@contextlib.contextmanager
def loss_impl(impl):
    """OPEN_CLIP_LLIP_LOSS_IMPL for LlipLoss while one implementation runs."""
    previous = os.environ.get('OPEN_CLIP_LLIP_LOSS_IMPL')
    if impl in ('torch', 'triton'):
        os.environ['OPEN_CLIP_LLIP_LOSS_IMPL'] = impl
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop('OPEN_CLIP_LLIP_LOSS_IMPL', None)
        else:
            os.environ['OPEN_CLIP_LLIP_LOSS_IMPL'] = previous


def forward_backward(loss_fn, leaves):
    loss_fn().backward()
    for leaf in leaves:
        leaf.grad = None


def fake_peak_bytes(impl, size, args, device):
    """Peak live bytes of forward+backward traced with fake tensors (no memory, no arithmetic)."""
    with FakeTensorMode():
        leaves, loss_fn = make_case(impl, *size, args.chunk, device, args.dtype)
        with LiveTensorBytes(exclude=leaves) as tracker:
            loss_fn().backward()
    return tracker.peak


def free_bytes(device) -> int:
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    with open('/proc/meminfo') as meminfo:
        fields = dict(line.split(':', 1) for line in meminfo)
    return int(fields['MemAvailable'].split()[0]) * 1024


def measure(impl, size, args, device):
    """One record: time (median of ``--repeats``; None if it would not fit) and peak memory."""
    b, B, K, D, H = size
    record = dict(impl=impl, b=b, B=B, D=D, K=K, H=H, chunk=args.chunk if impl == 'direct' else None,
                  device=str(device), dtype=str(args.dtype).replace('torch.', ''))
    # Triton kernels cannot run on fake tensors: the fused loss is measured by running it (its memory is two fp32
    # numbers per pair beside the inputs and their gradients).
    traced_peak = 0 if impl == 'triton' else fake_peak_bytes(impl, size, args, device)
    if args.memory_only or traced_peak > args.memory_fraction * free_bytes(device):
        why = 'not run' if args.memory_only else 'too large to run'
        return dict(record, time_ms=None, peak_mem_mb=traced_peak / 2 ** 20,
                    memory=f'live tensor bytes, traced with fake tensors ({why})')

    leaves, loss_fn = make_case(impl, *size, args.chunk, device, args.dtype)
    for _ in range(args.warmup):
        forward_backward(loss_fn, leaves)
    cuda = device.type == 'cuda'
    times, peaks = [], []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start_bytes = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        forward_backward(loss_fn, leaves)
        if cuda:
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - start_bytes)
        times.append(time.perf_counter() - start)
    if cuda:
        return dict(record, time_ms=1e3 * statistics.median(times), peak_mem_mb=max(peaks) / 2 ** 20,
                    memory='torch.cuda.max_memory_allocated')
    # On the CPU the same tracker on the same ops gives the same peak traced as run; tracing keeps its
    # per-op Python overhead out of the timed runs.
    return dict(record, time_ms=1e3 * statistics.median(times), peak_mem_mb=traced_peak / 2 ** 20,
                memory='live tensor bytes, traced with fake tensors')


def pair_macs(impl, K, D, H) -> int:
    """Forward multiply-adds per (image, text) pair (docs/method.md, loss and cost)."""
    return {'direct': 2 * K * D + D * D, 'siglip': D}.get(impl, 2 * K * D + (H * K) ** 2)


def add_flops(record):
    flops = 3 * 2 * pair_macs(record['impl'], record['K'], record['D'], record['H']) * record['b'] * record['B']
    record['flops'] = flops
    record['tflop_per_s'] = flops / record['time_ms'] / 1e9 if record['time_ms'] else None
    return record


def table(records) -> str:
    header = f'{"impl":8s} {"b":>6s} {"B":>6s} {"D":>5s} {"K":>3s} {"time ms":>10s} {"peak MB":>10s} {"TFLOP/s":>8s}  memory'
    lines = [header, '-' * len(header)]
    for r in records:
        time_ms = f'{r["time_ms"]:.1f}' if r['time_ms'] is not None else 'n/a'
        rate = f'{r["tflop_per_s"]:.3f}' if r['tflop_per_s'] is not None else 'n/a'
        name = r['impl'] + (f'/{r["chunk"] or "all"}' if r['impl'] == 'direct' else '')
        lines.append(f'{name:8s} {r["b"]:6d} {r["B"]:6d} {r["D"]:5d} {r["K"]:3d} {time_ms:>10s} '
                     f'{r["peak_mem_mb"]:10.1f} {rate:>8s}  {r["memory"]}')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shape', choices=sorted(SHAPES), default='b16', help='mixer shapes (H = 8)')
    parser.add_argument('--batch', type=int, nargs='+', help='b = B, one run per value (default 256)')
    parser.add_argument('--b', type=int, help='images (with --B, instead of --batch)')
    parser.add_argument('--B', type=int, help='texts (with --b)')
    parser.add_argument('--impl', nargs='+', choices=IMPLS, help='default: all that run on the device')
    parser.add_argument('--chunk', type=int, default=256,
                        help="texts per checkpointed chunk of the direct formulation (the authors': one rank's "
                             'texts); 0 for the whole [b, B, D] at once')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs first')
    parser.add_argument('--repeats', type=int, help='timed runs, median reported (default: 5 on CUDA, 1 on the CPU)')
    parser.add_argument('--memory-fraction', type=float, default=0.5,
                        help='run for real only if the traced peak is below this fraction of free memory')
    parser.add_argument('--memory-only', action='store_true',
                        help='only trace the peak memory with fake tensors (any size, in seconds); no timing')
    add_json_output(parser, 'the records')
    args = parser.parse_args(argv)
    check_json_output(parser, args)
    if (args.b is None) != (args.B is None) or (args.b is not None and args.batch):
        parser.error('give --batch, or both --b and --B')
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype)
    cuda = args.device.type == 'cuda'
    args.repeats = (5 if cuda else 1) if args.repeats is None else args.repeats
    if args.impl is None:
        args.impl = [impl for impl in IMPLS if cuda or impl != 'triton']
    if 'triton' in args.impl and not cuda:
        parser.error('--impl triton needs --device cuda')
    if 'triton' in args.impl and args.memory_only:
        parser.error('--memory-only traces fake tensors, which Triton kernels cannot run on: leave out --impl triton')
    sizes = [(args.b, args.B)] if args.b is not None else [(n, n) for n in (args.batch or [256])]
    if 'siglip' in args.impl and any(B % b for b, B in sizes):
        parser.error('SigLipLoss takes texts in chunks of b (one per rank): B must be a multiple of b')
    args.sizes = sizes
    return args


def main(argv=None):
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    logging.info(f'{args.shape}: K {shape["K"]}, D {shape["D"]}, H {shape["H"]}; {args.dtype} on {args.device}; '
                 f'direct formulation in checkpointed chunks of {args.chunk or "all"} texts')
    records = []
    for b, B in args.sizes:
        for impl in args.impl:
            with loss_impl(impl):
                record = add_flops(measure(impl, (b, B, shape['K'], shape['D'], shape['H']), args, args.device))
            logging.info(f'{impl} b={b} B={B}: {record["time_ms"]} ms, {record["peak_mem_mb"]:.1f} MB')
            records.append(record)
    print(table(records))
    if args.json:
        write_json(args.json, records, args.overwrite)
    return records


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    main()

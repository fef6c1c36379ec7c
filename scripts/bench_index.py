"""The Llip index (``open_clip_llip.search``) on this machine: recall against exhaustive search, and speed at 1M images.

1. **Recall** (a trained ``Llip-Tiny`` on built-in data): the model is trained with OpenCLIP's stock
   loop on the built-in scenes (as ``scripts/demo.py`` does), unless ``--checkpoint`` gives one. The
   gallery is the retrieval set's images plus ``--gallery-images`` more scenes drawn with another seed,
   indexed with ``build_index``; the queries are the retrieval set's captions. The first stage's prototype
   queries (``--prototypes`` P of them; P = 1 is the zero query, uniform mixing) are k-means centres of the
   queries of the training captions (texts of the queries' kind, not the queries). For each P, probes and
   candidate count C: the share of each query's exact top 10 (conditioned cosines of all images,
   ``LlipModel.similarity``) that the two-stage search returns, and text→image R@1/R@10.
2. **Speed at ``--images`` (1M) images of B/16 shapes** (``Llip-ViT-B-16``: K 32, H 8, D 512; random
   weights and random features, since the arithmetic does not depend on the values), on this
   machine's CPUs:
   - the index is written with ``write_index`` for ``--stored-images`` random images (fp16); the
     first stage (``index.new_first_stage``, in memory) holds ``--speed-prototypes`` lists of ``--images``
     random vectors, of which a query scans one (as at any P with one probe), and candidate
     i is read from stored row i mod ``--stored-images``: the first stage is timed at full size, the
     re-scoring reads C rows of the stored features for each query (``LlipIndex.read_rows``) as it would
     at full size, from a smaller file (what full size changes is whether rows are in the page cache: both
     ends are timed, warm, and cold — the file's pages evicted before every call);
   - latency: one query at a time, and per query in a batch of ``--queries``: first stage + re-scoring
     of C = ``--speed-candidates`` candidates (text encoding excluded);
   - bytes per image: the stored features and the first stage per prototype, from the files' sizes;
   - exhaustive: the first ``--exhaustive-images`` stored rows (read into the page cache beforehand, which
     favours the exhaustive scan: at 1M images it would read 64 GB) scored against ``--exhaustive-queries``
     texts with ``index.mixed_cosine`` (the cheapest exact route for fewer than ~128 texts; no Gram matrices),
     keeping the top 10; the time per query is **extrapolated** linearly to ``--images`` images.

   Measured: recall; the first stage over a list of ``--images`` vectors; the re-scoring of C candidates read from a
   features file of ``--stored-images`` rows (warm and cold); the exhaustive scan of a slice. Not measured:
   the exhaustive scan of all ``--images`` images (extrapolated), and a features file of 1M rows (64 GiB, larger
   than this machine's disk): its total is computed from the bytes per image.

    python scripts/bench_index.py --json bench_index.json
"""
import argparse
import mmap
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from open_clip_llip.data import write_dataset
from open_clip_llip.evaluation.readers import RetrievalImages, read_retrieval_set
from open_clip_llip.evaluation.tasks import load_model
from open_clip_llip.search.index import (
    FEATURES,
    FIRST_STAGE,
    LlipIndex,
    add_first_stage,
    build_index,
    mixed_cosine,
    new_first_stage,
    prototype_queries,
    write_index,
)
from open_clip_llip.written_files import check_output_file, write_json

K = 10  # the top k compared with exhaustive search


def train(args, work: Path, data: dict) -> Path:
    """Train Llip-Tiny with OpenCLIP's stock loop on the built-in scenes; print its loss; return the checkpoint."""
    command = [
        sys.executable, '-m', 'open_clip_train.main', '--model', 'Llip-Tiny', '--dataset-type', 'webdataset',
        '--train-data', str(work / 'train' / data['train']['data']), '--train-num-samples',
        str(data['train']['num_samples']), '--epochs', str(args.epochs), '--batch-size', str(args.batch_size),
        '--lr', '2e-3', '--warmup', str(args.warmup), '--workers', '1', '--seed', '0', '--device', 'cpu',
        '--logs', str(work / 'runs'), '--name', 'llip-tiny', '--log-every-n-steps', '10', '--save-frequency', '0']
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    losses = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        for line in process.stdout:
            found = re.search(r'Train Epoch: (\d+) \[\s*(\d+)/.*Loss: ([\d.]+)', line)
            if found:
                losses.append(float(found.group(3)))
                print(f'  training: epoch {found.group(1)}, {found.group(2)} samples, loss {found.group(3)}', flush=True)
    if process.returncode:
        sys.exit(f'training failed; its log: {work / "runs" / "llip-tiny" / "out.log"}')
    args.figures['training_loss_first_last'] = [losses[0], losses[-1]]
    return work / 'runs' / 'llip-tiny' / 'checkpoints' / f'epoch_{args.epochs}.pt'


def recall(args, work: Path) -> dict:
    """Two-stage top 10 against exhaustive top 10, for a trained Llip-Tiny on built-in scenes, by prototypes, probes
    and candidates."""
    size = 32  # Llip-Tiny's images
    data = write_dataset(work / 'train', seed=0, train_images=args.train_images, retrieval_images=args.retrieval_images,
                         zeroshot_images=1, image_size=size)
    checkpoint = args.checkpoint or train(args, work, data)
    gallery = write_dataset(work / 'gallery', seed=1, train_images=args.gallery_images, captions_per_image=1,
                            retrieval_images=1, zeroshot_images=1, image_size=size)
    queries = read_retrieval_set(str(work / 'train' / data['retrieval']['csv']))
    images = queries.images + read_retrieval_set(str(work / 'gallery' / gallery['train']['data'])).images
    # The prototype texts: the training captions, a sample of the same kind of text as the queries (not the queries).
    sample = read_retrieval_set(str(work / 'train' / data['train']['data'])).captions
    model, transform, tokenizer = load_model('Llip-Tiny', str(checkpoint))
    index = build_index(work / 'tiny-index-1', model, RetrievalImages(images, transform), batch_size=256, workers=1,
                        tokenizer=tokenizer)
    image_features = torch.from_numpy(np.array(index.features))
    text_features = index.encode_texts(queries.captions)
    with torch.inference_mode():
        similarity = model.similarity(image_features, text_features).T  # [Q, N]
        exact = similarity.topk(K).indices
        sample_features = index.encode_texts(sample)
    truth = queries.image_index[:, None]
    figures = dict(gallery_images=len(index), queries=len(text_features), prototype_texts=len(sample),
                   checkpoint=str(checkpoint), exhaustive_R1=(exact[:, :1] == truth).any(1).double().mean().item(),
                   exhaustive_R10=(exact == truth).any(1).double().mean().item(), by_prototypes={})
    print(f'\nRecall of the exact top {K} (trained Llip-Tiny, {len(index)} images, {len(text_features)} caption '
          f'queries; exhaustive text→image R@1 {figures["exhaustive_R1"]:.3f}, R@10 {figures["exhaustive_R10"]:.3f}); '
          f'prototypes: k-means centres of the queries of {len(sample)} training captions (P = 1: the zero query, '
          'uniform mixing):')
    for prototypes in args.prototypes:
        if prototypes > 1:
            index = LlipIndex.open(write_index(work / f'tiny-index-{prototypes}', model, image_features.split(1024),
                                               len(image_features), prototypes=prototype_queries(sample_features,
                                                                                                 prototypes)).parent,
                                   model, tokenizer)
        by_probes = figures['by_prototypes'][prototypes] = {}
        for probes in sorted({1, *(probe for probe in args.probes if probe <= prototypes)}):
            by_candidates = by_probes[probes] = {}
            for candidates in args.candidates:
                # The re-scoring is exact (tests/test_index.py): the two stages return the top 10 of the candidates
                # by conditioned cosine, taken here from the similarity matrix rather than re-read from disk.
                chosen = index.first_stage_candidates(text_features, min(candidates, len(index)), probes)
                found = chosen.gather(1, similarity.gather(1, chosen).topk(K).indices)
                by_candidates[candidates] = dict(
                    recall_at_10=(found[:, :, None] == exact[:, None, :]).any(2).double().mean().item(),
                    R1=(found[:, :1] == truth).any(1).double().mean().item(),
                    R10=(found == truth).any(1).double().mean().item())
            print(f'  P = {prototypes:4d}, probes {probes}: ' + ', '.join(
                f'C = {candidates} ({candidates / len(index):.1%}) {result["recall_at_10"]:.4f}'
                for candidates, result in by_candidates.items()))
    return figures


def evict(index: LlipIndex):
    """Drop the stored features from this process's mapping and from the page cache: the next reads go to disk."""
    index.features._mmap.madvise(mmap.MADV_DONTNEED)
    with open(index.folder / FEATURES, 'rb') as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def fastest(function, repeats: int, before=None) -> float:
    """Seconds of the fastest of ``repeats`` calls (after one warm-up), ``before`` run untimed before each."""
    seconds = []
    for _ in range(repeats + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:])


def speed(args, work: Path) -> dict:
    torch.manual_seed(0)
    model = open_clip.create_model('Llip-ViT-B-16').eval()  # random weights: the arithmetic is what is timed
    heads, tokens, width = model.mixer.heads, model.llip_cfg.mixture_tokens, model.mixer.out_proj.shape[0]
    stored, block = args.stored_images, 1024

    def random_features(count):
        for start in range(0, count, block):
            yield torch.randn(min(block, count - start), 2, heads, tokens, width // heads)

    write_index(work / 'b16-index', model, random_features(stored), stored)
    index = LlipIndex.open(work / 'b16-index', model)
    # The first stage at full size: --speed-prototypes lists of --images random vectors each; a query scans one.
    first_stage = new_first_stage(torch.randn(args.speed_prototypes, heads, width // heads))
    rng = np.random.default_rng(0)
    for start in range(0, args.images, 1 << 15):
        count = min(1 << 15, args.images - start)
        add_first_stage(first_stage, rng.standard_normal((count, args.speed_prototypes, width), dtype=np.float32), start)
    index.first_stage = first_stage
    tokenizer = open_clip.get_tokenizer('Llip-ViT-B-16')
    with torch.inference_mode():
        text_features = model.encode_text(tokenizer([f'query number {i}' for i in range(args.queries)]))
    candidates = args.speed_candidates

    def search(batch):
        ids = index.first_stage_candidates(text_features[batch], candidates)
        return index.rescore(text_features[batch], ids % stored, K)

    def first_stage_only(batch):
        index.first_stage_candidates(text_features[batch], candidates)

    def rescore_only(batch):
        index.rescore(text_features[batch], torch.randint(0, stored, (len(text_features[batch]), candidates)), K)

    single, batch = slice(0, 1), slice(0, args.queries)
    timings = {}
    for label, function in (('two_stage', search), ('first_stage', first_stage_only), ('rescore', rescore_only)):
        for mode, before in (('warm', None), ('cold', lambda: evict(index))):
            if label == 'first_stage' and mode == 'cold':
                continue  # held in memory
            timings[f'{label}_{mode}_single_s'] = fastest(lambda f=function: f(single), args.repeats, before)
            timings[f'{label}_{mode}_batch_per_query_s'] = fastest(lambda f=function: f(batch), 1, before) / args.queries

    # Exhaustive: the first ``--exhaustive-images`` stored rows, read once beforehand so that they come from the page
    # cache, scored against ``--exhaustive-queries`` texts; the time is extrapolated linearly to ``--images``.
    exhaustive_texts, sliced = text_features[:args.exhaustive_queries], min(args.exhaustive_images, stored)

    def exhaustive():
        best = torch.empty(len(exhaustive_texts), 0)
        with torch.inference_mode():
            for start in range(0, sliced, block):
                features = torch.from_numpy(np.array(index.features[start:min(start + block, sliced)]))
                best = torch.cat([best, mixed_cosine(model, features, exhaustive_texts).T], 1).topk(K).values

    for start in range(0, sliced, block):
        np.array(index.features[start:min(start + block, sliced)])  # into the page cache
    exhaustive_slice_s = fastest(exhaustive, 1) / len(exhaustive_texts)
    exhaustive_s = exhaustive_slice_s * args.images / sliced

    features_bytes = (index.folder / FEATURES).stat().st_size / stored
    first_stage_bytes = (index.folder / FIRST_STAGE).stat().st_size / stored  # one prototype: the zero query
    figures = dict(images=args.images, stored_images=stored, candidates=candidates, queries=args.queries,
                   prototypes_in_first_stage=args.speed_prototypes, exhaustive_queries=len(exhaustive_texts),
                   exhaustive_images_measured=sliced, exhaustive_s_per_query_measured_slice=exhaustive_slice_s,
                   bytes_per_image_features=features_bytes, bytes_per_image_per_prototype=first_stage_bytes,
                   exhaustive_s_per_query_extrapolated=exhaustive_s, **timings)
    print(f'\nSpeed at {args.images:,} images of B/16 shapes (K {tokens}, H {heads}, D {width}; random features; '
          f'{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), C = {candidates}, k = {K}:')
    print(f'  bytes per image: {features_bytes:,.0f} stored features (fp16) + {first_stage_bytes:,.0f} per prototype '
          f'(first-stage vector, float32, and its id); both memory-mapped. At {args.images:,} images (computed):')
    figures['bytes_total_at_images'] = {}
    for prototypes in sorted({1, *args.prototypes}):
        total = figures['bytes_total_at_images'][prototypes] = (features_bytes + prototypes * first_stage_bytes) * \
            args.images
        print(f'    P = {prototypes:4d}: {total / 2 ** 30:8,.1f} GiB ({features_bytes * args.images / 2 ** 30:,.1f} GiB '
              f'features + {prototypes * first_stage_bytes * args.images / 2 ** 30:,.1f} GiB first stage)')
    print(f'  measured: first stage scanning one list of {args.images:,} vectors (of {args.speed_prototypes}, in '
          f'memory; the scan does not depend on P); re-scoring from a features file of {stored:,} '
          f'rows ({stored * features_bytes / 2 ** 30:.1f} GiB), candidates spread over it')
    for mode in ('warm', 'cold'):
        print(f'  two-stage, page cache {mode}: {timings[f"two_stage_{mode}_single_s"] * 1e3:8.1f} ms for one query, '
              f'{timings[f"two_stage_{mode}_batch_per_query_s"] * 1e3:8.1f} ms per query in a batch of {args.queries} '
              f'(re-scoring alone {timings[f"rescore_{mode}_single_s"] * 1e3:.1f} / '
              f'{timings[f"rescore_{mode}_batch_per_query_s"] * 1e3:.1f} ms)')
    print(f'  first stage alone: {timings["first_stage_warm_single_s"] * 1e3:.1f} ms for one query, '
          f'{timings["first_stage_warm_batch_per_query_s"] * 1e3:.1f} ms per query in a batch')
    print(f'  exhaustive: {exhaustive_slice_s:.2f} s per query measured over {sliced:,} images (page cache warm, '
          f'{len(exhaustive_texts)} texts at once), extrapolated linearly to {exhaustive_s:.1f} s at {args.images:,}')
    for mode in ('warm', 'cold'):
        single = exhaustive_s / timings[f'two_stage_{mode}_single_s']
        batched = exhaustive_s / timings[f'two_stage_{mode}_batch_per_query_s']
        figures[f'speedup_{mode}_single'], figures[f'speedup_{mode}_batch'] = single, batched
        print(f'  speed-up over exhaustive (extrapolated), two-stage {mode}: {single:.0f}× one query at a time, '
              f'{batched:.0f}× in batches')
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', type=Path, help='a trained Llip-Tiny (default: train one here)')
    parser.add_argument('--part', choices=('both', 'recall', 'speed'), default='both', help='what to measure')
    parser.add_argument('--work', type=Path, help='scratch folder, new or empty (default: a temporary one, removed)')
    recall_options = parser.add_argument_group('recall (trained Llip-Tiny)')
    recall_options.add_argument('--gallery-images', type=int, default=10000, help='scenes added to the retrieval set')
    recall_options.add_argument('--retrieval-images', type=int, default=300, help='their captions are the queries')
    recall_options.add_argument('--candidates', type=int, nargs='+', default=[30, 100, 300, 1000])
    recall_options.add_argument('--prototypes', type=int, nargs='+', default=[1, 16, 64, 256],
                                help='first-stage prototype queries (1: the zero query, uniform mixing)')
    recall_options.add_argument('--probes', type=int, nargs='+', default=[1, 2],
                                help='prototypes whose lists each query scans')
    recall_options.add_argument('--train-images', type=int, default=4000)
    recall_options.add_argument('--epochs', type=int, default=3, help='of 4 captions per training image')
    recall_options.add_argument('--batch-size', type=int, default=64)
    recall_options.add_argument('--warmup', type=int, default=100)
    speed_options = parser.add_argument_group('speed (B/16 shapes, random features)')
    speed_options.add_argument('--images', type=int, default=1_000_000)
    speed_options.add_argument('--stored-images', type=int, default=131072,
                               help='rows of the features file (64 KiB each: 8 GiB)')
    speed_options.add_argument('--exhaustive-images', type=int, default=32768,
                               help='stored rows scored exhaustively, the time extrapolated to --images')
    speed_options.add_argument('--speed-candidates', type=int, default=1000)
    speed_options.add_argument('--speed-prototypes', type=int, default=2,
                               help='lists of the full-size first stage (each of --images vectors)')
    speed_options.add_argument('--queries', type=int, default=32, help='queries in a batch')
    speed_options.add_argument('--exhaustive-queries', type=int, default=4)
    speed_options.add_argument('--repeats', type=int, default=5, help='timed calls of one query (the fastest counts)')
    parser.add_argument('--json', type=Path, help='also write the figures here')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    args = parser.parse_args(argv)
    if args.json is not None:
        try:
            check_output_file(args.json, args.overwrite)
        except OSError as error:
            parser.error(str(error))
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        parser.error(f'--work {args.work} must be a new or empty folder')
    if not 1 <= args.exhaustive_queries <= args.queries or not 1 <= args.stored_images <= args.images \
            or args.exhaustive_images < 1:
        parser.error('--exhaustive-queries must be in [1, --queries], --stored-images in [1, --images] and '
                     '--exhaustive-images at least 1')
    args.figures = {}
    with tempfile.TemporaryDirectory(prefix='bench_index.') as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        if args.part in ('both', 'recall'):
            args.figures['recall'] = recall(args, work)
        if args.part in ('both', 'speed'):
            args.figures['speed'] = speed(args, work)
        args.figures.update(threads=torch.get_num_threads(), torch=torch.__version__)
    if args.json is not None:
        write_json(args.json, args.figures, args.overwrite)
    return args.figures


if __name__ == '__main__':
    main()

"""The Llip index (``open_clip_llip.search``) on this machine: recall against exhaustive search, bytes per image, and
query time at 1M images.

1. **Recall** (a trained ``Llip-Tiny`` on built-in data): the model is trained with OpenCLIP's stock
   loop on the built-in scenes (as ``scripts/demo.py`` does), unless ``--checkpoint`` gives one. The
   gallery is the retrieval set's images plus ``--gallery-images`` more scenes drawn with another seed; the
   queries are the retrieval set's captions. The images are encoded once, and an index written of them
   (``write_index``) for each ``--prototypes`` P (k-means centres of the queries of the training captions:
   texts of the queries' kind, not the queries; P = 1 is the zero query, uniform mixing), with first-stage codes
   of ``--code-bytes`` bytes. For each P, probes and candidate count C: the share of each query's exact top 10
   (conditioned cosines of all images, ``LlipModel.similarity``, on the features as stored in float16) that the
   two stages return, and text→image R@1/R@10. Then the same at the largest P and one probe with the features
   stored as int8 (the whole search, int8 re-scoring included, against the float16 exhaustive top 10).
2. **Bytes per image, by file**, of an index of ``--speed-model``'s shapes (default ``Llip-ViT-B-16``: K 32,
   H 8, D 512; random weights and features) with ``--bytes-prototypes`` prototypes and ``--code-bytes``, from two
   indexes of ``--bytes-images`` and twice as many images: each file's growth per image (and its fixed part).
   Names are 20-character paths. Build time per image on this CPU: encoding a batch of ``--encode-images`` images,
   and writing the index (the growth between the two builds).
3. **Query time at ``--images`` (1M) images of ``--speed-model``'s shapes** (random weights and features: the
   arithmetic does not depend on the values), on this machine's CPUs:
   - the first stage at full size: a list of ``--images`` random codes (a query scans one list, whatever P is),
     with the rotation and codebooks of the stored index; the re-scoring reads its C = ``--speed-candidates``
     candidates' rows from a features file of ``--stored-images`` rows (candidate i is row i mod
     ``--stored-images``: what full size changes is whether rows are in the page cache; both ends are timed, warm,
     and cold — the file's pages evicted before every call);
   - latency: p50 and p95 of ``--repeats`` queries one at a time (each another text), and of the time per query of
     ``--batch-repeats`` batches of ``--queries``: first stage + re-scoring (text encoding excluded);
   - exhaustive: the first ``--exhaustive-images`` stored rows (read into the page cache beforehand, which
     favours the exhaustive scan: at 1M images it would read 64 GB) scored against ``--exhaustive-queries`` texts with
     ``index.mixed_cosine``, keeping the top 10; the time per query is **extrapolated** linearly to ``--images``.

   Measured: recall; bytes by file; the first stage over a list of ``--images`` codes; the re-scoring of C candidates
   read from a features file of ``--stored-images`` rows (warm and cold); the exhaustive scan of a slice. Not
   measured: the exhaustive scan of all ``--images`` images (extrapolated), and a features file of 1M rows (64 GiB,
   larger than this machine's disk).

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
from open_clip_llip.evaluation.retrieval import encode_texts
from open_clip_llip.evaluation.tasks import load_model
from open_clip_llip.search.index import (
    DEFAULT_CANDIDATES,
    DEFAULT_CODE_BYTES,
    DEFAULT_PROTOTYPES,
    FEATURES,
    FIRST_STAGE,
    MANIFEST,
    NAMES,
    LlipIndex,
    encode_images,
    first_stage_lists,
    mixed_cosine,
    prototype_queries,
    train_first_stage,
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


def overlap(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact top 10 [Q, 10] among the ids ``found`` [Q, 10]."""
    return (found[:, :, None] == exact[:, None, :]).any(2).double().mean().item()


def recall(args, work: Path) -> dict:
    """Two-stage top 10 against exhaustive top 10, for a trained Llip-Tiny on built-in scenes, by prototypes, probes
    and candidates; and with int8 features at the default settings."""
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
    image_features = torch.cat(list(encode_images(model, RetrievalImages(images, transform), 256, 1)))
    image_features = image_features.half()  # as the index stores them (float16): what the exact top 10 is of
    count = len(image_features)

    def indexed(prototypes: int, dtype: str = 'float16') -> LlipIndex:
        folder = work / f'tiny-index-{prototypes}-{dtype}'
        centres = None if prototypes == 1 else prototype_queries(sample_features, prototypes)
        write_index(folder, model, image_features.split(4096), count, dtype=dtype, prototypes=centres,
                    code_bytes=args.code_bytes)
        return LlipIndex.open(folder, model, tokenizer)

    text_features, sample_features = (encode_texts(model, tokenizer(texts).split(1024))
                                      for texts in (queries.captions, sample))
    with torch.inference_mode():
        similarity = torch.cat([model.similarity(image_features, part).T for part in text_features.split(128)])
    exact = similarity.topk(K).indices
    truth = queries.image_index[:, None]
    figures = dict(gallery_images=count, queries=len(text_features), prototype_texts=len(sample),
                   checkpoint=str(checkpoint), code_bytes=args.code_bytes,
                   exhaustive_R1=(exact[:, :1] == truth).any(1).double().mean().item(),
                   exhaustive_R10=(exact == truth).any(1).double().mean().item(), by_prototypes={})
    print(f'\nRecall of the exact top {K} (trained Llip-Tiny, {count} images, {len(text_features)} caption queries; '
          f'exhaustive text→image R@1 {figures["exhaustive_R1"]:.3f}, R@10 {figures["exhaustive_R10"]:.3f}); '
          f'prototypes: k-means centres of the queries of {len(sample)} training captions (P = 1: the zero query, '
          f'uniform mixing); first-stage codes of {args.code_bytes} bytes:')
    for prototypes in args.prototypes:
        index = indexed(prototypes)
        by_probes = figures['by_prototypes'][prototypes] = {}
        for probes in sorted({1, *(probe for probe in args.probes if probe <= prototypes)}):
            by_candidates = by_probes[probes] = {}
            for candidates in args.candidates:
                # The re-scoring is exact (tests/test_index.py): the two stages return the top 10 of the candidates
                # by conditioned cosine, taken here from the similarity matrix rather than re-read from disk.
                chosen = index.first_stage_candidates(text_features, min(candidates, count), probes)
                found = chosen.gather(1, similarity.gather(1, chosen).topk(K).indices)
                by_candidates[candidates] = dict(recall_at_10=overlap(found, exact),
                                                 R1=(found[:, :1] == truth).any(1).double().mean().item(),
                                                 R10=(found == truth).any(1).double().mean().item())
            print(f'  P = {prototypes:4d}, probes {probes}: ' + ', '.join(
                f'C = {candidates} ({candidates / count:.1%}) {result["recall_at_10"]:.4f}'
                for candidates, result in by_candidates.items()))
    # int8 features at the largest P: the whole search (int8 re-scoring) against the float16 exhaustive top 10.
    prototypes = max(args.prototypes)
    index = indexed(prototypes, 'int8')
    figures['int8'] = dict(prototypes=prototypes, probes=1, by_candidates={
        candidates: overlap(index.search_features(text_features, K, min(candidates, count)).ids, exact)
        for candidates in args.candidates})
    print(f'  int8 features, P = {prototypes:4d}, probes 1: ' + ', '.join(
        f'C = {candidates} {result:.4f}' for candidates, result in figures['int8']['by_candidates'].items())
        + f' of the float16 exhaustive top {K}')
    return figures


def bytes_by_file(args, work: Path, model) -> dict:
    """Each file's bytes per image (its growth per image) and fixed bytes, at ``--speed-model``'s shapes."""
    heads, tokens, width = model.mixer.heads, model.llip_cfg.mixture_tokens, model.mixer.out_proj.shape[0]
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randn(args.bytes_prototypes, heads, width // heads, generator=generator)
    features = torch.randn(2 * args.bytes_images, 2, heads, tokens, width // heads, generator=generator)
    start = time.perf_counter()
    trained = train_first_stage(model, features, prototypes, args.code_bytes)  # one first stage for both indexes
    training_s, sizes, seconds = time.perf_counter() - start, {}, {}
    for count in (args.bytes_images, 2 * args.bytes_images):
        folder, start = work / f'b16-bytes-{count}', time.perf_counter()
        write_index(folder, model, features[:count].split(256), count,
                    names=[f'images/{i:09d}.jpg' for i in range(count)], first_stage=trained)
        seconds[count] = time.perf_counter() - start
        sizes[count] = {name: (folder / name).stat().st_size for name in (FEATURES, FIRST_STAGE, NAMES, MANIFEST)}
    small, large = sizes[args.bytes_images], sizes[2 * args.bytes_images]
    per_image = {name: (large[name] - small[name]) / args.bytes_images for name in small}
    fixed = {name: small[name] - per_image[name] * args.bytes_images for name in small}
    besides = sum(value for name, value in per_image.items() if name != FEATURES)
    print(f'\nBytes per image at {args.speed_model} shapes (P = {args.bytes_prototypes}, codes of {args.code_bytes} bytes, '
          'float16 '
          f'features; growth per image between {args.bytes_images} and {2 * args.bytes_images} images, and each '
          'file\'s fixed part):')
    for name in per_image:
        print(f'  {name:20s} {per_image[name]:10,.1f} per image, {fixed[name]:12,.0f} fixed')
    print(f'  besides the re-scoring features: {besides:,.1f} bytes ({besides / 1024:.2f} KiB) per image')
    # Build time per image on this CPU: writing the index (first-stage vectors, codes, files), from the growth between
    # the two builds, and encoding images.
    write_s = (seconds[2 * args.bytes_images] - seconds[args.bytes_images]) / args.bytes_images
    images = torch.randn(args.encode_images, 3, *model.visual.image_size, generator=generator)
    with torch.inference_mode():
        encode_s = timed(lambda _: model.encode_image(images), [None]).min() / args.encode_images
    print(f'  build on this CPU ({torch.get_num_threads()} threads): {encode_s * 1e3:,.0f} ms per image to encode '
          f'(batches of {args.encode_images}, fp32), {write_s * 1e3:,.1f} ms per image to index; the first stage '
          f'trained in {training_s:.0f} s on {len(features)} images')
    return dict(per_image=per_image, fixed=fixed, besides_features=besides, prototypes=args.bytes_prototypes,
                code_bytes=args.code_bytes, encode_s_per_image=encode_s, index_s_per_image=write_s,
                training_s=training_s, training_images=len(features))


def evict(index: LlipIndex):
    """Drop the stored features from this process's mapping and from the page cache: the next reads go to disk."""
    index.features._mmap.madvise(mmap.MADV_DONTNEED)
    with open(index.folder / FEATURES, 'rb') as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(function, calls, before=None) -> np.ndarray:
    """Seconds of each call of ``function(call)`` for ``call`` in ``calls``, after one untimed warm-up call;
    ``before`` run untimed before each."""
    seconds = []
    for number, call in enumerate([calls[0], *calls]):
        if before is not None:
            before()
        start = time.perf_counter()
        function(call)
        if number:
            seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def percentiles(seconds: np.ndarray) -> dict:
    return dict(p50_s=float(np.percentile(seconds, 50)), p95_s=float(np.percentile(seconds, 95)))


def speed(args, work: Path) -> dict:
    import faiss
    torch.manual_seed(0)
    model = open_clip.create_model(args.speed_model).eval()  # random weights: the arithmetic is what is timed
    heads, tokens, width = model.mixer.heads, model.llip_cfg.mixture_tokens, model.mixer.out_proj.shape[0]
    figures = dict(bytes=bytes_by_file(args, work, model))
    stored, block = args.stored_images, 1024

    def random_features(count):
        for start in range(0, count, block):
            yield torch.randn(min(block, count - start), 2, heads, tokens, width // heads)

    write_index(work / 'b16-index', model, random_features(stored), stored)
    index = LlipIndex.open(work / 'b16-index', model)
    # Every block of rows checked against its SHA-256 before the timing: a search does it once per opened index, on a
    # row's first read (timed here on its own).
    start = time.perf_counter()
    index.check_rows(np.arange(stored))
    verify_s = time.perf_counter() - start
    # The first stage at full size: the stored index's (one list: the zero query; its rotation and codebooks), its list
    # refilled with --images random codes. A query scans one list whatever P is.
    first_stage = faiss.read_index(str(index.folder / FIRST_STAGE))  # in memory (opened, it is memory-mapped)
    lists, rng = first_stage_lists(first_stage), np.random.default_rng(0)
    lists.invlists.resize(0, 0)
    for start in range(0, args.images, 1 << 18):
        count = min(1 << 18, args.images - start)
        ids = np.arange(start, start + count, dtype=np.int64)
        codes = rng.integers(0, 256, (count, lists.code_size), dtype=np.uint8)
        lists.invlists.add_entries(0, count, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    lists.ntotal = first_stage.ntotal = args.images
    index.first_stage, index.lists = first_stage, lists
    tokenizer = open_clip.get_tokenizer(args.speed_model)
    with torch.inference_mode():
        text_features = model.encode_text(tokenizer([f'query number {i}' for i in range(args.queries * 2)]))
    candidates = args.speed_candidates

    def search(batch):
        ids = index.first_stage_candidates(text_features[batch], candidates)
        return index.rescore(text_features[batch], ids % stored, K)

    def first_stage_only(batch):
        index.first_stage_candidates(text_features[batch], candidates)

    def rescore_only(batch):
        index.rescore(text_features[batch], torch.randint(0, stored, (len(text_features[batch]), candidates)), K)

    singles = [slice(i, i + 1) for i in range(args.repeats)]
    batches = [slice(i % 2 * args.queries, (i % 2 + 1) * args.queries) for i in range(args.batch_repeats)]
    timings = {}
    # Every warm timing before the first cold one, which leaves most of the file out of the page cache.
    for mode, before in (('warm', None), ('cold', lambda: evict(index))):
        for label, function in (('two_stage', search), ('first_stage', first_stage_only), ('rescore', rescore_only)):
            if label == 'first_stage' and mode == 'cold':
                continue  # held in memory
            timings[f'{label}_{mode}_single'] = percentiles(timed(function, singles, before))
            timings[f'{label}_{mode}_batch_per_query'] = percentiles(timed(function, batches, before) / args.queries)

    # Exhaustive: the first ``--exhaustive-images`` stored rows, read once beforehand so that they come from the page
    # cache, scored against ``--exhaustive-queries`` texts; the time is extrapolated linearly to ``--images``.
    exhaustive_texts, sliced = text_features[:args.exhaustive_queries], min(args.exhaustive_images, stored)

    def exhaustive(_):
        best = torch.empty(len(exhaustive_texts), 0)
        with torch.inference_mode():
            for start in range(0, sliced, block):
                features = torch.from_numpy(np.array(index.features[start:min(start + block, sliced)]))
                best = torch.cat([best, mixed_cosine(model, features, exhaustive_texts).T], 1).topk(K).values

    for start in range(0, sliced, block):
        np.array(index.features[start:min(start + block, sliced)])  # into the page cache
    exhaustive_slice_s = timed(exhaustive, [None]).min() / len(exhaustive_texts)
    exhaustive_s = exhaustive_slice_s * args.images / sliced
    figures.update(images=args.images, stored_images=stored, candidates=candidates, queries=args.queries,
                   exhaustive_queries=len(exhaustive_texts),
                   exhaustive_images_measured=sliced, exhaustive_s_per_query_measured_slice=exhaustive_slice_s,
                   first_read_check_s_per_gib=verify_s / ((index.folder / FEATURES).stat().st_size / 2 ** 30),
                   exhaustive_s_per_query_extrapolated=exhaustive_s, **timings)
    print(f'\nQuery time at {args.images:,} images of {args.speed_model} shapes (K {tokens}, H {heads}, D {width}; '
          f'random features; {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), '
          f'C = {candidates}, k = {K}: '
          f'first stage scanning one list of {args.images:,} codes of {lists.code_size} bytes (the scan does not '
          f'depend on P); re-scoring from a features file of {stored:,} rows '
          f'({(index.folder / FEATURES).stat().st_size / 2 ** 30:.1f} GiB), candidates spread over it, each block of rows '
          f'checked against its SHA-256 beforehand ({verify_s:.1f} s: a search does it on first read). p50 / p95:')

    def shown(key):
        return f'{timings[key]["p50_s"] * 1e3:7.1f} / {timings[key]["p95_s"] * 1e3:7.1f} ms'

    for mode in ('warm', 'cold'):
        print(f'  two-stage, page cache {mode}: one query {shown(f"two_stage_{mode}_single")}, per query in a batch '
              f'of {args.queries} {shown(f"two_stage_{mode}_batch_per_query")} (re-scoring alone '
              f'{shown(f"rescore_{mode}_single")}; {shown(f"rescore_{mode}_batch_per_query")})')
    print(f'  first stage alone: one query {shown("first_stage_warm_single")}, per query in a batch '
          f'{shown("first_stage_warm_batch_per_query")}')
    print(f'  exhaustive: {exhaustive_slice_s:.2f} s per query measured over {sliced:,} images (page cache warm, '
          f'{len(exhaustive_texts)} texts at once), extrapolated linearly to {exhaustive_s:.1f} s at {args.images:,}')
    for mode in ('warm', 'cold'):
        single = exhaustive_s / timings[f'two_stage_{mode}_single']['p50_s']
        batched = exhaustive_s / timings[f'two_stage_{mode}_batch_per_query']['p50_s']
        figures[f'speedup_{mode}_single'], figures[f'speedup_{mode}_batch'] = single, batched
        print(f'  speed-up over exhaustive (extrapolated; p50), two-stage {mode}: {single:.0f}× one query at a time, '
              f'{batched:.0f}× in batches')
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', type=Path, help='a trained Llip-Tiny (default: train one here)')
    parser.add_argument('--part', choices=('both', 'recall', 'speed'), default='both', help='what to measure')
    parser.add_argument('--work', type=Path, help='scratch folder, new or empty (default: a temporary one, removed)')
    parser.add_argument('--code-bytes', type=int, default=DEFAULT_CODE_BYTES, help='bytes of a first-stage code')
    recall_options = parser.add_argument_group('recall (trained Llip-Tiny)')
    recall_options.add_argument('--gallery-images', type=int, default=100000, help='scenes added to the retrieval set')
    recall_options.add_argument('--retrieval-images', type=int, default=300, help='their captions are the queries')
    recall_options.add_argument('--candidates', type=int, nargs='+',
                                default=sorted({300, 1000, DEFAULT_CANDIDATES, 2000, 3000}),
                                help='candidate counts C re-scored (the default C among them)')
    recall_options.add_argument('--prototypes', type=int, nargs='+', default=[1, 64, 256],
                                help='first-stage prototype queries (1: the zero query, uniform mixing)')
    recall_options.add_argument('--probes', type=int, nargs='+', default=[1, 2],
                                help='prototypes whose lists each query scans')
    recall_options.add_argument('--train-images', type=int, default=4000)
    recall_options.add_argument('--epochs', type=int, default=9, help='of 4 captions per training image')
    recall_options.add_argument('--batch-size', type=int, default=64)
    recall_options.add_argument('--warmup', type=int, default=100)
    speed_options = parser.add_argument_group('bytes and speed (random weights and features)')
    speed_options.add_argument('--speed-model', default='Llip-ViT-B-16', help='the Llip config whose shapes are used')
    speed_options.add_argument('--bytes-images', type=int, default=512,
                               help='images of the smaller of the two indexes whose files are compared')
    speed_options.add_argument('--bytes-prototypes', type=int, default=DEFAULT_PROTOTYPES,
                               help='prototypes of the indexes whose files are compared')
    speed_options.add_argument('--encode-images', type=int, default=8, help='images of the batch whose encoding is timed')
    speed_options.add_argument('--images', type=int, default=1_000_000)
    speed_options.add_argument('--stored-images', type=int, default=131072,
                               help='rows of the features file (64 KiB each: 8 GiB)')
    speed_options.add_argument('--exhaustive-images', type=int, default=32768,
                               help='stored rows scored exhaustively, the time extrapolated to --images')
    speed_options.add_argument('--speed-candidates', type=int, default=DEFAULT_CANDIDATES)
    speed_options.add_argument('--queries', type=int, default=64, help='queries in a batch')
    speed_options.add_argument('--exhaustive-queries', type=int, default=4)
    speed_options.add_argument('--repeats', type=int, default=20, help='queries timed one at a time')
    speed_options.add_argument('--batch-repeats', type=int, default=4, help='batches timed')
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
            or args.exhaustive_images < 1 or args.repeats < 1 or args.batch_repeats < 1 \
            or args.repeats > 2 * args.queries:
        parser.error('--exhaustive-queries must be in [1, --queries], --stored-images in [1, --images], '
                     '--exhaustive-images, --repeats and --batch-repeats at least 1, --repeats at most 2 × --queries')
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

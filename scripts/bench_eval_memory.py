"""Peak memory of ``open_clip_llip eval --retrieval`` on the CPU, for galleries of N images × M captions.

For each size it writes a synthetic retrieval set (random 32 px PNG images, random-letter captions,
M / N captions per image) and a randomly initialised model's checkpoint into ``--work``, runs the eval
command in a subprocess and reports its peak resident memory: ``/usr/bin/time -v``'s "Maximum resident
set size" where that program exists, else ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of the finished
subprocess (both: the largest process, not a sum). The [N, M] float32 score matrix alone is 4·N·M bytes and
the image and caption features the command holds while scoring N and M times one image's and one caption's;
the rest is the interpreter, the model and the working set, which should not grow with N and M.

    python scripts/bench_eval_memory.py --work /tmp/eval-memory --sizes 4000x12000 20000x60000 --json memory.json
"""
import argparse
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from open_clip_llip.written_files import add_json_output, check_json_output, write_json

TIME = '/usr/bin/time'


def size(text: str):
    images, captions = (int(part) for part in text.lower().split('x'))
    if images < 1 or captions < images or captions % images:
        raise argparse.ArgumentTypeError(f'{text}: give NxM with M a multiple of N (captions per image), e.g. 4000x12000')
    return images, captions


def write_retrieval_set(folder: Path, images: int, captions: int, seed: int = 0) -> Path:
    """``folder/set.csv`` (tab-separated filepath, title) over ``images`` random 32 px PNGs, ``captions`` in all."""
    rng = np.random.default_rng(seed)
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
    rows = ['filepath\ttitle']
    for i in range(images):
        path = folder / 'images' / f'{i}.png'
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        for _ in range(captions // images):
            words = [''.join(rng.choice(letters, rng.integers(2, 9))) for _ in range(rng.integers(3, 12))]
            rows.append(f'images/{i}.png\t{" ".join(words)}')
    (folder / 'set.csv').write_text('\n'.join(rows) + '\n', encoding='utf-8')
    return folder / 'set.csv'


def peak_rss_mb(command) -> float:
    """Peak resident memory (MB) of ``command``, run to completion; CalledProcessError if it fails."""
    if os.path.exists(TIME):
        done = subprocess.run([TIME, '-v', *command], capture_output=True, text=True)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
        return int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', done.stderr).group(1)) / 1024
    subprocess.run(command, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work', type=Path, required=True,
                        help='folder for the synthetic sets and the checkpoint (created; kept, so reruns reuse images)')
    parser.add_argument('--sizes', type=size, nargs='+', default=[(4000, 12000), (20000, 60000)], metavar='NxM')
    parser.add_argument('--model', default='Llip-Tiny')
    parser.add_argument('--batch-size', type=int, default=256)
    add_json_output(parser)
    args = parser.parse_args(argv)
    check_json_output(parser, args)

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / f'{args.model}.pt'
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    torch.save(model.state_dict(), checkpoint)
    with torch.inference_mode():  # bytes of one image's and one caption's features, as the command holds them
        image_bytes = model.encode_image(torch.zeros(1, 3, *model.visual.image_size)).nbytes
        caption_bytes = model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long)).nbytes
    figures = dict(model=args.model, torch=torch.__version__, threads=torch.get_num_threads(),
                   measured_with=TIME if os.path.exists(TIME) else 'getrusage', runs=[])
    for images, captions in args.sizes:
        folder = args.work / f'{images}x{captions}'
        csv = write_retrieval_set(folder, images, captions)
        command = [sys.executable, '-m', 'open_clip_llip', 'eval', '--model', args.model, '--pretrained',
                   str(checkpoint), '--retrieval', str(csv), '--workers', '0', '--batch-size', str(args.batch_size),
                   '--device', 'cpu']
        peak = peak_rss_mb(command)
        scores_mb = 4 * images * captions / 2 ** 20
        features_mb = (images * image_bytes + captions * caption_bytes) / 2 ** 20
        rest_mb = peak - scores_mb - features_mb
        figures['runs'].append(dict(images=images, captions=captions, peak_rss_mb=peak, score_matrix_mb=scores_mb,
                                    features_mb=features_mb, rest_mb=rest_mb))
        print(f'{images:,} images × {captions:,} captions: peak resident {peak:,.0f} MB = score matrix '
              f'{scores_mb:,.0f} MB + features {features_mb:,.0f} MB + the rest {rest_mb:,.0f} MB', flush=True)
    if args.json:
        write_json(args.json, figures, args.overwrite)
    return figures


if __name__ == '__main__':
    main()

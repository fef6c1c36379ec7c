"""CLIP_benchmark on Llip (``open_clip_llip benchmark``) against ``open_clip_llip eval``, on the same tiny datasets.

    python scripts/compare_clip_benchmark.py --json compare.json         # trains Llip-Tiny briefly; CPU, minutes
    python scripts/compare_clip_benchmark.py --pretrained epoch_2.pt     # a given Llip-Tiny checkpoint

1. Writes the built-in scenes (``open_clip_llip.data``, small) and, unless ``--pretrained`` is
   given, trains ``--model`` on them briefly with OpenCLIP's stock loop (``open_clip_train.main``).
2. Writes each zero-shot task and the retrieval set again in CLIP_benchmark's webdataset format,
   with the same PNG files: ``wds/<task>/test/0.tar`` (``cls`` labels, or ``txt`` captions one a
   line), ``test/nshards.txt``, ``classnames.txt`` and ``zeroshot_classification_templates.txt``
   (``{c}`` for the class), or ``dataset_type.txt`` for retrieval.
3. Runs CLIP_benchmark's own command through ``open_clip_llip benchmark`` (printed), and
   ``open_clip_llip eval``'s evaluation (``open_clip_llip.evaluation.tasks``) on the ImageFolders those shards
   were made from and on the retrieval shard itself; both fp32 (CLIP_benchmark's ``--no_amp``),
   on CUDA when there is one (CLIP_benchmark chooses so itself).
4. Prints every metric both report, side by side, and their difference; exits with status 1 if one differs.

Both count the same hits as long as no two scores tie: CLIP_benchmark's ``topk`` orders tied scores
arbitrarily, ``open_clip_llip eval`` counts ties against the model.
"""
import argparse
import io
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from open_clip_llip.commands import benchmark
from open_clip_llip.data import write_dataset
from open_clip_llip.evaluation.readers import read_retrieval_set
from open_clip_llip.evaluation.tasks import RetrievalTask, ZeroShotTask, evaluate, load_model
from open_clip_llip.written_files import add_json_output, check_json_output, write_json

# open_clip_llip eval's metric -> CLIP_benchmark's (image→text retrieval is its "text retrieval").
METRICS = {'top1': 'acc1', 'top5': 'acc5', **{f'{ours}_R@{k}': f'{theirs}_recall@{k}' for k in (1, 5, 10)
                                                for ours, theirs in (('image_to_text', 'text_retrieval'),
                                                                     ('text_to_image', 'image_retrieval'))}}
# The same fraction of the same items (CLIP_benchmark's recalls are float32 means): equal up to rounding.
SAME = 1e-6


def write_shard(folder: Path, samples):
    """CLIP_benchmark's single test shard: ``folder/test/0.tar`` of {extension: bytes} samples, and ``nshards.txt``."""
    (folder / 'test').mkdir(parents=True)
    (folder / 'test' / 'nshards.txt').write_text('1\n')
    with tarfile.open(folder / 'test' / '0.tar', 'w') as tar:
        for index, sample in enumerate(samples):
            for extension, content in sample.items():
                info = tarfile.TarInfo(f's{index:06d}.{extension}')
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def write_zero_shot(task: ZeroShotTask, folder: Path):
    """An ImageFolder task (class i in the i-th folder, sorted) in CLIP_benchmark's format."""
    class_folders = sorted(path for path in task.images.iterdir() if path.is_dir())
    write_shard(folder, [{'png': path.read_bytes(), 'cls': str(label).encode()}
                         for label, class_folder in enumerate(class_folders) for path in sorted(class_folder.glob('*.png'))])
    (folder / 'classnames.txt').write_text(''.join(name + '\n' for name in task.classnames))
    (folder / 'zeroshot_classification_templates.txt').write_text(''.join(template.replace('{}', '{c}') + '\n'
                                                                          for template in task.templates))


def write_retrieval(csv_path: Path, folder: Path):
    """A retrieval CSV (rows of filepath, title) as CLIP_benchmark's retrieval shard: each image with its captions."""
    retrieval_set = read_retrieval_set(str(csv_path))
    captions = [[] for _ in retrieval_set.images]
    for caption, image in zip(retrieval_set.captions, retrieval_set.image_index.tolist()):
        captions[image].append(caption)
    write_shard(folder, [{'png': Path(image).read_bytes(), 'txt': '\n'.join(texts).encode()}
                         for image, texts in zip(retrieval_set.images, captions)])
    (folder / 'dataset_type.txt').write_text('retrieval\n')


def train(args, data: Path, manifest: dict) -> Path:
    """A brief run of OpenCLIP's stock training loop on the scenes; its final checkpoint."""
    command = [sys.executable, '-m', 'open_clip_train.main', '--model', args.model, '--dataset-type', 'webdataset',
               '--train-data', str(data / manifest['train']['data']),
               '--train-num-samples', str(manifest['train']['num_samples']), '--epochs', str(args.epochs),
               '--batch-size', '64', '--lr', '2e-3', '--warmup', '10', '--workers', '1', '--seed', '0',
               '--device', args.device, '--logs', str(args.work_dir / 'runs'), '--name', 'llip', '--save-frequency', '0']
    print('python', shlex.join(command[1:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f'training failed:\n{result.stderr[-3000:]}')
    return args.work_dir / 'runs' / 'llip' / 'checkpoints' / f'epoch_{args.epochs}.pt'


def clip_benchmark(args, pretrained: Path, datasets, task: str) -> dict:
    """CLIP_benchmark's metrics per dataset, from its own command run through ``open_clip_llip benchmark``."""
    command = ['eval', '--model', args.model, '--pretrained', str(pretrained), '--task', task,
               '--dataset', *[f'wds/{name}' for name in datasets],
               '--dataset_root', str(args.work_dir / 'wds' / '{dataset}'),
               '--recall_k', '1', '5', '10', '--batch_size', str(args.batch_size), '--num_workers', '0', '--no_amp',
               '--quiet', '--output', str(args.work_dir / 'clip_benchmark' / '{dataset}.json')]
    print('open_clip_llip benchmark', shlex.join(command), flush=True)
    (args.work_dir / 'clip_benchmark').mkdir(exist_ok=True)
    benchmark.main(command)
    return {name: json.loads((args.work_dir / 'clip_benchmark' / f'{name}.json').read_text())['metrics']
            for name in datasets}


def compare(records, theirs):
    """One row per metric both report: task, metric names, items counted, CLIP_benchmark's value, ours, difference."""
    rows = []
    for record in records:
        for metric, value in record['metrics'].items():
            their_value = theirs[record['task']].get(METRICS.get(metric))
            if their_value is None or their_value != their_value:  # not reported; acc5 is NaN under 5 classes
                continue
            items = record['num_texts'] if metric.startswith('text_to_image') else record['num_images']
            rows.append(dict(task=record['task'], clip_benchmark_metric=METRICS[metric], metric=metric, items=items,
                             clip_benchmark=their_value, open_clip_llip_eval=value, difference=their_value - value))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='Llip-Tiny', help='A Llip config name that OpenCLIP knows.')
    parser.add_argument('--pretrained', type=Path, help='Its checkpoint (default: train it briefly on the scenes).')
    parser.add_argument('--epochs', type=int, default=1, help='Training epochs without --pretrained (4,000 samples each).')
    parser.add_argument('--batch-size', type=int, default=64, help='Evaluation batch size, the same for both.')
    parser.add_argument('--work-dir', type=Path,
                        help='A new folder for the data, the training run and CLIP_benchmark\'s result files '
                             '(default: a temporary folder, removed at the end).')
    add_json_output(parser, 'the comparison')
    args = parser.parse_args(argv)
    check_json_output(parser, args)
    if args.pretrained is not None and not args.pretrained.is_file():
        parser.error(f'--pretrained {args.pretrained}: no such file')
    if args.work_dir is not None and args.work_dir.exists():
        parser.error(f'--work-dir {args.work_dir} exists; give a new folder')
    args.device = 'cuda' if torch.cuda.is_available() else 'cpu'

    with tempfile.TemporaryDirectory() as temporary:
        args.work_dir = args.work_dir or Path(temporary)
        data = args.work_dir / 'scenes'
        # Training shards are always written: one image's worth when a checkpoint is given.
        manifest = write_dataset(data, train_images=1 if args.pretrained else 1000, retrieval_images=100,
                                 zeroshot_images=20)
        pretrained = args.pretrained or train(args, data, manifest)

        tasks = [ZeroShotTask.from_files(data / task['folder'], data / task['classnames'], data / task['templates'],
                                         name=name) for name, task in manifest['zeroshot'].items()]
        for task in tasks:
            write_zero_shot(task, args.work_dir / 'wds' / task.name)
        write_retrieval(data / manifest['retrieval']['csv'], args.work_dir / 'wds' / 'retrieval')
        tasks.append(RetrievalTask(str(args.work_dir / 'wds' / 'retrieval' / 'test' / '0.tar'), name='retrieval'))

        theirs = {**clip_benchmark(args, pretrained, [task.name for task in tasks[:-1]], 'zeroshot_classification'),
                  **clip_benchmark(args, pretrained, ['retrieval'], 'zeroshot_retrieval')}
        model, transform, tokenizer = load_model(args.model, str(pretrained), device=args.device)
        records = evaluate(model, tasks, transform, tokenizer, batch_size=args.batch_size, workers=0)

    rows = compare(records, theirs)
    differing = sum(abs(row['difference']) > SAME for row in rows)
    print('\n| task | CLIP_benchmark / open_clip_llip eval | items | CLIP_benchmark (%) | open_clip_llip eval (%) '
          '| difference (items) |\n|---|---|---|---|---|---|')
    for row in rows:
        print(f"| {row['task']} | {row['clip_benchmark_metric']} / {row['metric']} | {row['items']} | "
              f"{100 * row['clip_benchmark']:.2f} | {100 * row['open_clip_llip_eval']:.2f} | "
              f"{round(row['difference'] * row['items'])} |")
    print(f'\n{len(rows)} metrics, {differing} different.')
    if args.json is not None:
        write_json(args.json, dict(model=args.model, pretrained=args.pretrained and str(args.pretrained),
                                   trained_epochs=None if args.pretrained else args.epochs, device=args.device,
                                   clip_benchmark_version=version('clip_benchmark'),
                                   rows=rows, differing=differing), args.overwrite)
    if differing:
        sys.exit(1)


if __name__ == '__main__':
    main()

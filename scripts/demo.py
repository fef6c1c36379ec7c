"""The main job: Llip against a SigLIP baseline with the same towers, trained and evaluated on one machine.

1. Writes the built-in scenes data (``open_clip_llip.data``: images of several coloured shapes,
   several captions each, each naming part of the scene), unless ``--train-data`` gives a dataset.
2. For each seed, trains ``--model`` (a Llip config) and its baseline with OpenCLIP's stock loop
   (``python -m open_clip_train.main``): the baseline is the same config without the mixer — the
   same towers, width and depth — trained with ``--siglip`` (OpenCLIP's SigLipLoss) on the same
   data, steps, batch and learning-rate schedule.
3. Evaluates every checkpoint with ``open_clip_llip.eval`` (zero-shot tasks, retrieval), prints a
   side-by-side table (mean ± standard deviation over seeds) and writes ``results.json``,
   ``results.md`` and plots: ``training_curves.png`` and ``attention.png`` (for a few held-out
   images, how much of each mixture token each of several captions mixes).

    python scripts/demo.py                      # built-in data, Llip-Tiny, 3 seeds, CPU
    python scripts/demo.py --model Llip-ViT-B-16 --device cuda \\
        --train-data '/data/shards/{00000..00999}.tar' --train-num-samples 10000000 \\
        --zeroshot-images imagenet/val --classnames classnames.txt --templates templates.txt
"""
import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import torch

import open_clip_llip
from open_clip_llip import unpack_image, unpack_text
from open_clip_llip.data import write_dataset
from open_clip_llip.eval import add_task_arguments, tasks_from_arguments
from open_clip_llip.evaluation import RetrievalTask, ZeroShotTask, load_model
from open_clip_llip.evaluation import evaluate as evaluate_tasks
from open_clip_llip.written_files import WrittenFiles, remove_written

MARKER = 'demo.json'  # this script's record of a run in --output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--output', type=Path, default=Path('demo-output'), help='where everything is written')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier run of this script in --output')
    parser.add_argument('--model', default='Llip-Tiny',
                        help='a Llip config: a name OpenCLIP knows or a JSON file; the baseline drops its mixer')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (then torchrun-free, one GPU)")
    add_task_arguments(parser)  # evaluation data, as open_clip_llip_eval takes it
    data = parser.add_argument_group('training data (default: the built-in scenes, written to OUTPUT/data)')
    data.add_argument('--train-data', help='webdataset shards (brace pattern) instead of the built-in scenes')
    data.add_argument('--train-num-samples', type=int, help='samples per epoch of --train-data')
    data.add_argument('--train-images', type=int, default=4000, help='built-in scenes: training images')
    data.add_argument('--eval-images', type=int, default=50, help='built-in scenes: images per zero-shot class')
    train = parser.add_argument_group('training (the same for Llip and the baseline)')
    train.add_argument('--epochs', type=int, default=3)
    train.add_argument('--batch-size', type=int, default=64)
    train.add_argument('--lr', type=float, default=2e-3)
    train.add_argument('--warmup', type=int, default=100)
    train.add_argument('--precision', default='fp32')
    train.add_argument('--workers', type=int, default=1)
    parser.add_argument('--quick', action='store_true', help='a smoke test: tiny data, one short epoch')
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.eval_images, args.epochs, args.warmup = 32, 2, 1, 2
    if args.train_data and not (args.train_num_samples and (args.zeroshot_images or args.retrieval)):
        parser.error('--train-data needs --train-num-samples and evaluation data (--zeroshot-images … or --retrieval)')
    try:  # every evaluation file read and checked before any training
        tasks = tasks_from_arguments(parser, args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    # Rows of the table: a zero-shot task by its folder's name, the retrieval set as 'retrieval'.
    args.tasks = [replace(task, name=Path(task.images).name if isinstance(task, ZeroShotTask) else 'retrieval')
                  for task in tasks]
    return args


def prepare_output(args) -> WrittenFiles:
    """Make ``--output`` ready: new or empty, or holding an earlier run of this script, whose files (and only
    those) ``--overwrite`` removes. Returns the record of what this run writes there."""
    marker = args.output / MARKER
    if args.output.exists() and any(args.output.iterdir()):
        if not args.overwrite:
            sys.exit(f'{args.output} is not empty; pass --overwrite to replace an earlier demo run there, '
                     'or choose another --output.')
        try:
            previous = json.loads(marker.read_text())['files']
        except (OSError, ValueError, KeyError, TypeError):
            sys.exit(f'{args.output} is not empty and holds no record ({MARKER}) of an earlier demo run listing its '
                     'files; not overwriting anything there: choose another --output.')
        try:
            remove_written(args.output, previous)
        except FileExistsError as error:
            sys.exit(str(error))
        marker.unlink()
    args.output.mkdir(parents=True, exist_ok=True)
    written = WrittenFiles(args.output)
    save_record(args, written)
    return written


def save_record(args, written: WrittenFiles):
    """The options and every file written so far: kept up to date, so that even an interrupted run can be replaced."""
    (args.output / MARKER).write_text(json.dumps(
        {'options': {k: str(v) for k, v in vars(args).items()}, 'files': written.files}, indent=2))


def built_in_data(args, image_size):
    """Write the scenes, drawn at the model's image size, and point the training and evaluation options at them."""
    logging.info('== Writing the built-in scenes data')
    folder = args.output / 'data'
    sizes = dict(retrieval_images=12, samples_per_shard=64) if args.quick else {}
    # The data folder keeps its own record (its manifest): an earlier run's dataset is replaced by write_dataset.
    manifest = write_dataset(folder, seed=0, train_images=args.train_images, zeroshot_images=args.eval_images,
                             image_size=image_size, overwrite=(folder / 'manifest.json').is_file(), **sizes)
    args.train_data = str(folder / manifest['train']['data'])
    args.train_num_samples = manifest['train']['num_samples']
    args.tasks = [ZeroShotTask.from_files(folder / task['folder'], folder / task['classnames'], folder / task['templates'],
                                          name=name) for name, task in manifest['zeroshot'].items()]
    args.tasks.append(RetrievalTask(str(folder / manifest['retrieval']['csv']), name='retrieval'))


def write_config(args, written, name, config):
    """Register ``config`` as ``name`` here (for evaluation) and write it where open_clip_train finds it.

    Returns the ``--model`` value for open_clip_train: ``local-dir:OUTPUT/<name>``.
    """
    folder = written.write_text(f'{name}/open_clip_config.json', json.dumps({'model_cfg': config}, indent=2)).parent
    open_clip.add_model_config(written.write_text(f'{name}.json', json.dumps(config, indent=2)))
    save_record(args, written)
    return f'local-dir:{folder}'


def llip_model(args, written):
    """``--model``, a Llip config name or JSON file: (config name, how open_clip_train finds it, config)."""
    from_file = args.model.endswith('.json')
    if from_file:
        path = Path(args.model)
        if not path.is_file():
            sys.exit(f'--model {args.model}: no such config file')
        name, config = path.stem, json.loads(path.read_text())
        config = config.get('model_cfg', config)  # a bare config or an open_clip_config.json
    else:
        try:
            name, config = args.model, open_clip.get_model_config(args.model) or {}
        except RuntimeError as error:  # a near-miss of a Llip name: the error names the Llip configs
            sys.exit(f'--model: {error}')
    if config.get('model_class') != 'LlipModel':
        sys.exit(f"--model {args.model} is not a Llip config (known: {', '.join(open_clip_llip.llip_model_names())}; "
                 'or a JSON file with "model_class": "LlipModel")')
    return name, write_config(args, written, name, config) if from_file else name, config


def baseline_model(args, written, name, config):
    """The Llip config without its mixer: an OpenCLIP CLIP config with the same towers, trained with --siglip.

    The name must not contain "siglip", which would make OpenCLIP pick a Hugging Face tokenizer.
    """
    config = {k: v for k, v in config.items() if k not in ('model_class', 'llip_cfg')}  # the logit bias stays
    baseline = f'Twin-{name}'
    return baseline, write_config(args, written, baseline, config)


def train(args, written, name, model, seed, extra=()):
    """One run of OpenCLIP's stock training loop; returns its final checkpoint. Its log lines stream through."""
    command = [
        sys.executable, '-m', 'open_clip_train.main', '--model', model, '--dataset-type', 'webdataset',
        '--train-data', args.train_data, '--train-num-samples', str(args.train_num_samples),
        '--epochs', str(args.epochs), '--batch-size', str(args.batch_size), '--lr', str(args.lr),
        '--warmup', str(args.warmup), '--precision', args.precision, '--workers', str(args.workers),
        '--seed', str(seed), '--device', args.device, '--logs', str(args.output / 'runs'), '--name', name,
        '--log-every-n-steps', '10', '--save-frequency', '0', '--report-to', 'tensorboard', *extra]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if args.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        if 'Train Epoch' in line or 'Error' in line or 'error' in line:
            print(f'  {name} | {line.split(" | ")[-1].rstrip()}', flush=True)
    status = process.wait()
    if (args.output / 'runs' / name).is_dir():
        written.record_tree(f'runs/{name}')
        save_record(args, written)
    if status:
        sys.exit(f'training {name} failed; its log: {args.output / "runs" / name / "out.log"}')
    return args.output / 'runs' / name / 'checkpoints' / f'epoch_{args.epochs}.pt'


def training_curve(run_dir, batch_size):
    """(samples seen, loss) pairs and the median samples/s of a run, from the tensorboard scalars the loop writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / 'tensorboard')).Reload()
    points = [(event.step * batch_size, event.value) for event in events.Scalars('train/loss')]
    speeds = [event.value for event in events.Scalars('train/samples_per_second')[1:]]  # the first includes start-up
    return points, (float(np.median(speeds)) if speeds else float('nan'))


def evaluate(args, model_name, checkpoint):
    """Task name -> metrics of one checkpoint, through open_clip_llip.evaluation."""
    model, transform, tokenizer = load_model(model_name, str(checkpoint), device=args.device)
    records = evaluate_tasks(model, args.tasks, transform, tokenizer, batch_size=256, workers=0)
    return {record['task']: record['metrics'] for record in records}


def summary_rows(results):
    """Per task and metric, mean ± sample standard deviation over seeds (in %) for each model."""
    models = list(results)
    rows = []
    for task, metrics in results[models[0]][0].items():
        names = ['top1'] if 'top1' in metrics else [
            'image_to_text_R@1', 'image_to_text_R@5', 'text_to_image_R@1', 'text_to_image_R@5']
        for metric in names:
            cells = []
            for model in models:
                values = np.array([seed_results[task][metric] for seed_results in results[model]]) * 100
                cells.append((values.mean(), values.std(ddof=1) if len(values) > 1 else 0.))
            rows.append((task, metric, cells))
    return models, rows


def format_table(models, rows, markdown=False):
    header = ['task', 'metric'] + models
    lines = [[task, metric] + [f'{m:.1f} ± {s:.1f}' for m, s in cells] for task, metric, cells in rows]
    if markdown:
        out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        return '\n'.join(out + ['| ' + ' | '.join(line) + ' |' for line in lines])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + lines)


def plot_training_curves(curves, batch_size, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, runs), colour in zip(curves.items(), ('tab:blue', 'tab:orange')):
        for index, points in enumerate(runs):
            steps, losses = zip(*points)
            ax.plot(steps, losses, color=colour, alpha=0.8, label=model if index == 0 else None)
    # A model that learns only the bias: σ(b) = 1/B for the one positive among B texts.
    bias_only = -math.log(1 / batch_size) - (batch_size - 1) * math.log((batch_size - 1) / batch_size)
    ax.axhline(bias_only, color='grey', linestyle='--', label='bias only (no image-text learning)')
    ax.set(xlabel='samples seen', ylabel='training loss (sigmoid, per image)', yscale='log',
           title='Training loss, one line per seed')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(model_name, checkpoint, retrieval_csv, path, num_images=3):
    """For a few held-out images: the mixing weights of each of their captions over the K tokens."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image

    from open_clip_llip.eval_data import read_retrieval_set

    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name)
    retrieval_set = read_retrieval_set(retrieval_csv)
    fig, axes = plt.subplots(num_images, 2, figsize=(10, 2.2 * num_images), gridspec_kw={'width_ratios': [1, 4]})
    for row, image_number in enumerate(range(num_images)):
        captions = [c for c, i in zip(retrieval_set.captions, retrieval_set.image_index.tolist()) if i == image_number]
        image = Image.open(retrieval_set.images[image_number]).convert('RGB')
        with torch.no_grad():
            keys, _ = unpack_image(model.encode_image(transform(image)[None]))
            queries, _ = unpack_text(model.encode_text(tokenizer(captions)))
            weights = model.mixer.attention(keys, queries)[0].mean(dim=1)  # [captions, K], averaged over heads
        axes[row, 0].imshow(image, interpolation='nearest')
        axes[row, 0].axis('off')
        shown = axes[row, 1].imshow(weights.numpy(), aspect='auto', cmap='viridis', vmin=0)
        axes[row, 1].set_yticks(range(len(captions)), [c if len(c) < 48 else c[:45] + '…' for c in captions], fontsize=8)
        axes[row, 1].set_xticks(range(weights.shape[1]))
        axes[row, 1].yaxis.tick_right()
        fig.colorbar(shown, ax=axes[row, 1], location='left', fraction=0.04, pad=0.02)
    axes[-1, 1].set_xlabel('mixture token k (weight averaged over heads)')
    fig.suptitle(f'{model_name}: which mixture tokens each caption mixes (held-out images)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(message)s', datefmt='%H:%M:%S')
    start = time.time()
    written = prepare_output(args)
    llip_name, llip_found_as, llip_config = llip_model(args, written)
    if args.train_data is None:
        built_in_data(args, llip_config['vision_cfg']['image_size'])
    baseline_name, baseline_found_as = baseline_model(args, written, llip_name, llip_config)
    # label -> (config name, how open_clip_train finds it, extra training flags)
    models = {llip_name: (llip_name, llip_found_as, ()),
              f'SigLIP ({baseline_name})': (baseline_name, baseline_found_as, ('--siglip',))}

    results = {label: [] for label in models}
    curves = {label: [] for label in models}
    speeds = {label: [] for label in models}
    checkpoints = {}
    runs = [(seed, label) for seed in args.seeds for label in models]
    for number, (seed, label) in enumerate(runs, 1):
        config_name, train_model, extra = models[label]
        name = f'{config_name}-seed{seed}'
        logging.info(f'== [{number}/{len(runs)}] Training {label}, seed {seed} ({time.time() - start:.0f} s so far)')
        checkpoint = train(args, written, name, train_model, seed, extra)
        points, speed = training_curve(args.output / 'runs' / name, args.batch_size)
        curves[label].append(points)
        speeds[label].append(speed)
        logging.info(f'== Evaluating {label}, seed {seed}')
        results[label].append(evaluate(args, config_name, checkpoint))
        checkpoints[label, seed] = checkpoint

    labels, rows = summary_rows(results)
    table = format_table(labels, rows)
    print(f'\n{table}\n')
    for label in labels:
        ends = np.array([(points[0][1], points[-1][1]) for points in curves[label]])
        print(f'{label}: training loss {ends[:, 0].mean():.2f} at the first step, {ends[:, 1].mean():.2f} at the last '
              f'(mean over seeds); {np.mean(speeds[label]):.0f} samples/s')
    written.write_text('results.md', format_table(labels, rows, markdown=True) + '\n')
    written.write_text('results.json', json.dumps(dict(
        seeds=args.seeds, results=results, samples_per_second=speeds,
        loss_start_end={label: [(points[0][1], points[-1][1]) for points in runs] for label, runs in curves.items()},
        wall_seconds=time.time() - start), indent=2))
    plot_training_curves(curves, args.batch_size, written.path('training_curves.png'))
    written.record('training_curves.png')
    retrieval = next((task.path for task in args.tasks if isinstance(task, RetrievalTask)), '')
    if retrieval.endswith('.csv'):
        plot_attention(llip_name, checkpoints[llip_name, args.seeds[0]], retrieval, written.path('attention.png'))
        written.record('attention.png')
    save_record(args, written)
    logging.info(f'Done in {time.time() - start:.0f} s: {args.output}/results.md, training_curves.png, attention.png')


if __name__ == '__main__':
    main()

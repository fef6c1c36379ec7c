"""The main job: Llip against its SigLIP twin and a non-contextual control, trained and evaluated on one machine.

Up to three arms, alike in everything but what is compared — the towers, width and depth, the data and its order,
the steps, batch and learning-rate schedule, and the initialisation (seeded weights, logit scale 10 and
logit bias −log(B − 1), the prior of one positive among B: OpenCLIP's SigLIP value, −10, is the prior for
batches of 32k):

- ``llip``: ``--model`` (a Llip config), trained with LlipLoss;
- ``siglip``: the same config without the mixer, an OpenCLIP CLIP config trained with ``--siglip``
  (OpenCLIP's SigLipLoss);
- ``control``: the same Llip config with ``llip_cfg.contextual = false``: every caption mixes the K
  mixture tokens with the same, uniform weights (the paper's control: "more image tokens" without
  "caption-conditioned mixing").

By default ``llip`` and ``siglip`` (3 seeds × 2 arms fit 15 minutes on 2 CPU cores); ``--arms llip siglip
control`` adds the control. Runs go ``--parallel`` at a time (default: one per CPU core), each with
``--threads`` torch threads (default 1): a model this small gains little from a second thread.

1. Writes the built-in scenes data (``open_clip_llip.data``: images of several coloured shapes, several
   captions each, each naming part of the scene) with its training set as OpenCLIP's CSV, whose order
   ``--seed`` fixes (webdataset's sample shuffle is not seeded); or takes ``--train-data``.
2. For each seed and arm: the initial weights (``init/<run>/``), then OpenCLIP's stock loop
   (``open_clip_train --model local-dir:init/<run>``, run as ``python -m open_clip_llip.commands.train``, so that
   Llip's checkpoints are saved whole), its log lines streamed. On the
   built-in data, whose captions use a few dozen of the tokenizer's 49,408 tokens, the text tower's token
   and position embeddings keep their initial values (OpenCLIP's ``--lock-text`` with every layer above
   them unlocked; ``--train-text-embedding`` trains them too).
3. Evaluates every checkpoint with ``open_clip_llip.evaluation.tasks`` (zero-shot tasks, retrieval), prints the
   table (mean ± standard deviation over seeds) and writes ``results.json``, ``results.md`` and plots:
   ``training_curves.png`` (from the loop's tensorboard scalars), ``gap.png`` (each arm's difference from
   SigLIP per metric, with its spread over seeds) and ``attention.png`` (for a few held-out images, how
   much of each mixture token each of their captions mixes).

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
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import torch

import open_clip_llip
from open_clip_llip import unpack_image, unpack_text
from open_clip_llip.commands.evaluate import add_task_arguments, tasks_from_arguments
from open_clip_llip.data import write_dataset
from open_clip_llip.evaluation.tasks import RetrievalTask, ZeroShotTask, load_model
from open_clip_llip.evaluation.tasks import evaluate as evaluate_tasks
from open_clip_llip.written_files import WrittenFiles, inside, prepare_folder, write_json

MARKER = 'demo.json'  # this script's record of a run in --output
GENERATOR = 'scripts/demo.py'
# Every path this script writes in --output (the data folder keeps its own record): all that --overwrite may remove.
NAMES = re.compile(r'results\.(md|json)|(training_curves|gap|attention)\.png'
                   r'|init/[^/]+/(open_clip_config\.json|open_clip_pytorch_model\.bin)|runs/[^/]+/.+')


ARMS = ('llip', 'siglip', 'control')
LOG = logging.getLogger('demo')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--output', type=Path, default=Path('demo-output'), help='where everything is written')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier run of this script in --output')
    parser.add_argument('--model', default='Llip-Tiny',
                        help='a Llip config: a name OpenCLIP knows or a JSON file; the twin drops its mixer')
    parser.add_argument('--arms', nargs='+', choices=ARMS, default=['llip', 'siglip'],
                        help='llip: the model; siglip: its twin without the mixer; control: the model mixing uniformly')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (then torchrun-free, one GPU)")
    add_task_arguments(parser)  # evaluation data, as open_clip_llip eval takes it
    data = parser.add_argument_group('training data (default: the built-in scenes, written to OUTPUT/data)')
    data.add_argument('--train-data', help='your own training data instead: webdataset shards (brace pattern) or a CSV')
    data.add_argument('--dataset-type', choices=['webdataset', 'csv'], default='webdataset', help='of --train-data')
    data.add_argument('--train-num-samples', type=int, help='samples per epoch of --train-data')
    data.add_argument('--train-images', type=int, default=4000, help='built-in scenes: training images')
    data.add_argument('--eval-images', type=int, default=50, help='built-in scenes: images per zero-shot class')
    train = parser.add_argument_group('training (the same for every arm)')
    train.add_argument('--epochs', type=int, default=9)
    train.add_argument('--batch-size', type=int, default=64)
    train.add_argument('--lr', type=float, default=2e-3)
    train.add_argument('--warmup', type=int, default=100)
    train.add_argument('--precision', default='fp32')
    train.add_argument('--workers', type=int, default=1, help='data loading processes per run')
    train.add_argument('--train-text-embedding', action='store_true',
                       help='built-in data: train the token and position embeddings too (by default they keep their '
                            'initial values there; with --train-data they always train)')
    parser.add_argument('--parallel', type=int,
                        help='runs trained at once, each a process of its own (default: one per CPU core on the CPU, '
                             'one on a GPU)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads of each run')
    parser.add_argument('--quick', action='store_true', help='a smoke test: tiny data, one short epoch')
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.eval_images, args.epochs, args.warmup = 32, 2, 1, 2
    if args.parallel is None:
        args.parallel = (os.cpu_count() or 1) if args.device == 'cpu' else 1
    if args.parallel < 1 or args.threads < 1:
        parser.error('--parallel and --threads must be at least 1')
    if 'llip' not in args.arms:
        parser.error('--arms must include llip: the other arms are compared with it')
    if args.batch_size < 2:
        parser.error('--batch-size must be at least 2 (the logit bias starts at -log(B - 1))')
    if args.train_data and not (args.train_num_samples and (args.zeroshot_images or args.retrieval)):
        parser.error('--train-data needs --train-num-samples and evaluation data (--zeroshot-images … or --retrieval)')
    try:  # every evaluation file read and checked before any training
        tasks = tasks_from_arguments(parser, args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    # Rows of the table: a zero-shot task by its folder's name, the retrieval set as 'retrieval'.
    args.tasks = [replace(task, name=Path(task.images).name if isinstance(task, ZeroShotTask) else 'retrieval')
                  for task in tasks]
    args.train_cwd = None  # where open_clip_train runs: a built-in CSV's paths are relative to its folder
    args.frozen_text_embedding = False  # set for the built-in data (``built_in_data``)
    return args


def prepare_output(args) -> WrittenFiles:
    """Make ``--output`` ready: new or empty, or holding an earlier run of this script, whose files (and only
    those) ``--overwrite`` removes. Returns the record of what this run writes there."""
    try:
        prepare_folder(args.output, MARKER, GENERATOR, args.overwrite, NAMES, what='demo run', option='--overwrite')
        for folder in ('data', 'init', 'runs'):  # written into by other code (the data writer, the training runs)
            inside(args.output, folder)
    except OSError as error:
        sys.exit(str(error))
    written = WrittenFiles(args.output, NAMES)
    save_record(args, written)
    return written


def save_record(args, written: WrittenFiles):
    """The options and every file written so far: kept up to date, so that even an interrupted run can be replaced."""
    options = {k: str(v) for k, v in vars(args).items()}
    write_json(args.output / MARKER, {'generator': GENERATOR, 'options': options, 'files': written.files}, overwrite=True)


def built_in_data(args, image_size):
    """Write the scenes, drawn at the model's image size, and point the training and evaluation options at them."""
    LOG.info('== Writing the built-in scenes data')
    folder = inside(args.output, 'data').resolve()
    sizes = dict(retrieval_images=12) if args.quick else {}
    # The data folder keeps its own record (its manifest): an earlier run's dataset is regenerated by write_dataset,
    # which first checks every file it lists against its SHA-256, and refuses, naming a file that was changed.
    try:
        manifest = write_dataset(folder, seed=0, train_images=args.train_images, zeroshot_images=args.eval_images,
                                 image_size=image_size, train_format='csv',
                                 overwrite=(folder / 'manifest.json').is_file(), **sizes)
    except OSError as error:
        sys.exit(f'The built-in data: {error}')
    train_csv = folder / manifest['train']['data']
    args.train_data, args.dataset_type, args.train_cwd = train_csv.name, 'csv', train_csv.parent
    args.train_num_samples = manifest['train']['num_samples']
    # Its captions use a few dozen of the tokenizer's 49,408 tokens: the token (and position) embeddings stay at
    # their random initialisation, every arm alike, which spares each step the optimizer's pass over the table.
    args.frozen_text_embedding = not args.train_text_embedding
    args.tasks = [ZeroShotTask.from_files(folder / task['folder'], folder / task['classnames'], folder / task['templates'],
                                          name=name) for name, task in manifest['zeroshot'].items()]
    args.tasks.append(RetrievalTask(str(folder / manifest['retrieval']['csv']), name='retrieval'))


def llip_config(args):
    """``--model``, a Llip config name or JSON file: (its name, its config)."""
    if args.model.endswith('.json'):
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
    return name, config


def arms(args, name, config):
    """Arm -> (label, run name, config, extra open_clip_train flags), for the arms asked for.

    The twin drops the mixer: an OpenCLIP CLIP config with the same towers (its name must not contain
    "siglip", which would make OpenCLIP pick a Hugging Face tokenizer). The control keeps everything but
    the caption-conditioned mixing (``llip_cfg.contextual = false``).
    """
    twin = {k: v for k, v in config.items() if k not in ('model_class', 'llip_cfg')}
    control = dict(config, llip_cfg=dict(config['llip_cfg'], contextual=False))
    every = {'llip': (name, name, config, ()),
             'siglip': (f'SigLIP (Twin-{name})', f'Twin-{name}', twin, ('--siglip',)),
             'control': (f'{name}, uniform mixing', f'{name}-uniform', control, ())}
    return {arm: every[arm] for arm in ARMS if arm in args.arms}


def initial_weights(args, written, run, config, seed) -> str:
    """The run's starting point as an OpenCLIP ``local-dir:`` model: its config, and the seed's random weights
    with logit scale 10 and bias −log(B − 1), the same for every arm. Returns the ``--model`` value."""
    folder = f'init/{run}'
    written.write_text(f'{folder}/open_clip_config.json', json.dumps({'model_cfg': config}, indent=2))
    torch.manual_seed(seed)
    if config.get('model_class') == 'LlipModel':
        model = open_clip_llip.LlipModel(**{k: v for k, v in config.items() if k != 'model_class'})
    else:
        model = open_clip.CLIP(**config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
        model.logit_bias.fill_(-math.log(args.batch_size - 1))
    torch.save(model.state_dict(), written.claim(f'{folder}/open_clip_pytorch_model.bin'))
    written.record(f'{folder}/open_clip_pytorch_model.bin')
    save_record(args, written)
    return f'local-dir:{(args.output / folder).resolve()}'


def train(args, written, name, model, seed, config, extra, lock):
    """One run of OpenCLIP's stock training loop; returns its final checkpoint. Its log lines stream through."""
    runs = (args.output / 'runs').resolve()
    command = [
        sys.executable, '-m', 'open_clip_llip.commands.train', '--model', model, '--dataset-type', args.dataset_type,
        '--train-data', args.train_data, '--train-num-samples', str(args.train_num_samples),
        '--epochs', str(args.epochs), '--batch-size', str(args.batch_size), '--lr', str(args.lr),
        '--warmup', str(args.warmup), '--precision', args.precision, '--workers', str(args.workers),
        '--seed', str(seed), '--device', args.device, '--logs', str(runs),
        '--name', name, '--log-every-n-steps', '10', '--save-frequency', '0', '--report-to', 'tensorboard', *extra]
    if args.frozen_text_embedding:  # OpenCLIP's text-tower lock with every group above the embeddings left trainable
        command += ['--lock-text', '--lock-text-unlocked-layers', str(config['text_cfg'].get('layers', 12) + 1),
                    '--lock-text-freeze-layer-norm']
    # Threads: a model this small gains little from a second thread, and several runs' threads on few cores
    # would wait on each other.
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(args.threads))
    if args.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=args.train_cwd)
    for line in process.stdout:
        if 'Train Epoch' in line or 'Error' in line or 'error' in line:
            print(f'  {name} | {line.split(" | ")[-1].rstrip()}', flush=True)
    status = process.wait()
    if (runs / name).is_dir():
        with lock:
            written.record_tree(f'runs/{name}')
            save_record(args, written)
    if status:
        sys.exit(f'training {name} failed; its log: {runs / name / "out.log"}')
    return runs / name / 'checkpoints' / f'epoch_{args.epochs}.pt'


def training_curve(run_dir, batch_size):
    """(samples seen, loss) pairs and the median samples/s of a run, from the tensorboard scalars the loop writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / 'tensorboard')).Reload()
    points = [(event.step * batch_size, event.value) for event in events.Scalars('train/loss')]
    speeds = [event.value for event in events.Scalars('train/samples_per_second')[1:]]  # the first includes start-up
    return points, (float(np.median(speeds)) if speeds else float('nan'))


def evaluate(args, model, checkpoint):
    """Task name -> metrics of one checkpoint, through open_clip_llip.evaluation.tasks."""
    model, transform, tokenizer = load_model(model, str(checkpoint), device=args.device)
    records = evaluate_tasks(model, args.tasks, transform, tokenizer, batch_size=256, workers=0)
    return {record['task']: record['metrics'] for record in records}


def table_metrics(metrics):
    """The metrics of a task shown in the table: top-1 of a zero-shot task, R@1 and R@5 both ways of retrieval."""
    return ['top1'] if 'top1' in metrics else [
        'image_to_text_R@1', 'image_to_text_R@5', 'text_to_image_R@1', 'text_to_image_R@5']


def summary_rows(results):
    """Per task and metric, mean ± sample standard deviation over seeds (in %) for each arm."""
    rows = []
    for task, metrics in next(iter(results.values()))[0].items():
        for metric in table_metrics(metrics):
            cells = []
            for runs in results.values():
                values = np.array([seed_results[task][metric] for seed_results in runs]) * 100
                cells.append((values.mean(), values.std(ddof=1) if len(values) > 1 else 0.))
            rows.append((task, metric, cells))
    return rows


def format_table(models, rows, markdown=False):
    header = ['task', 'metric'] + models
    lines = [[task, metric] + [f'{m:.1f} ± {s:.1f}' for m, s in cells] for task, metric, cells in rows]
    if markdown:
        out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        return '\n'.join(out + ['| ' + ' | '.join(line) + ' |' for line in lines])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + lines)


COLOURS = {'llip': 'tab:blue', 'siglip': 'tab:orange', 'control': 'tab:green'}


def plot_training_curves(curves, labels, batch_size, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, runs in curves.items():
        for index, points in enumerate(runs):
            steps, losses = zip(*points)
            ax.plot(steps, losses, color=COLOURS[arm], alpha=0.8, label=labels[arm] if index == 0 else None)
    # A model that learns only the bias: σ(b) = 1/B for the one positive among B texts.
    bias_only = -math.log(1 / batch_size) - (batch_size - 1) * math.log((batch_size - 1) / batch_size)
    ax.axhline(bias_only, color='grey', linestyle='--', label='bias only (no image-text learning)')
    ax.set(xlabel='samples seen', ylabel='training loss (sigmoid, per image)', yscale='log',
           title='Training loss, one line per seed')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')  # path: a temporary name (WrittenFiles.claim)
    plt.close(fig)


def gaps(results, arm, baseline='siglip'):
    """(task, metric) -> (mean, sample std) over seeds of ``arm``'s score minus the baseline's on the same seed, in %."""
    out = {}
    for task, metrics in results[baseline][0].items():
        for metric in table_metrics(metrics):
            differences = np.array([(ours[task][metric] - theirs[task][metric]) * 100
                                    for ours, theirs in zip(results[arm], results[baseline])])
            out[task, metric] = differences.mean(), differences.std(ddof=1) if len(differences) > 1 else 0.
    return out


def plot_gap(results, labels, path):
    """Each arm's difference from SigLIP per metric, mean over seeds with its spread (± sample std)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    arms = [arm for arm in results if arm != 'siglip']
    per_arm = {arm: gaps(results, arm) for arm in arms}
    keys = list(per_arm[arms[0]])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(arms)
    for offset, arm in enumerate(arms):
        means, spreads = zip(*(per_arm[arm][key] for key in keys))
        positions = np.arange(len(keys)) + (offset - (len(arms) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=spreads, capsize=3, color=COLOURS[arm], label=labels[arm])
    ax.axhline(0, color='black', linewidth=0.8)
    ax.set_xticks(range(len(keys)), [f'{task}\n{metric.replace("image_to_text", "I→T").replace("text_to_image", "T→I")}'
                                     for task, metric in keys], fontsize=7)
    ax.set(ylabel='difference from SigLIP (points)',
           title=f'Gain over the SigLIP twin, mean ± std over {len(results["siglip"])} seeds (paired by seed)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')  # path: a temporary name (WrittenFiles.claim)
    plt.close(fig)


def plot_attention(model_name, found_as, checkpoint, retrieval_csv, path, num_images=3):
    """For a few held-out images: the mixing weights of each of their captions over the K tokens."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from open_clip_llip.evaluation.readers import load_image, read_retrieval_set

    model, transform, tokenizer = load_model(found_as, str(checkpoint))
    retrieval_set = read_retrieval_set(retrieval_csv)
    fig, axes = plt.subplots(num_images, 2, figsize=(10, 2.2 * num_images), gridspec_kw={'width_ratios': [1, 4]})
    for row, image_number in enumerate(range(num_images)):
        captions = [c for c, i in zip(retrieval_set.captions, retrieval_set.image_index.tolist()) if i == image_number]
        image = load_image(retrieval_set.images[image_number], retrieval_set.images[image_number])
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
    fig.savefig(path, dpi=120, format='png')  # path: a temporary name (WrittenFiles.claim)
    plt.close(fig)


def run_all(args, written, arm_specs, found, runs, start):
    """Train and evaluate every run of ``runs`` ((seed, arm) -> run name), ``--parallel`` at a time; returns
    (seed, arm) -> its checkpoint, metrics, training curve and samples/s. Each run is a process of its own with
    ``--threads`` threads, so its numbers do not depend on what runs beside it."""
    lock = threading.Lock()  # the record of written files, and the progress count
    done = []

    def one(seed, arm):
        label, _, config, extra = arm_specs[arm]
        run = runs[seed, arm]
        LOG.info(f'== Training {label}, seed {seed}')
        checkpoint = train(args, written, run, found[seed, arm], seed, config, extra, lock)
        curve, speed = training_curve(args.output / 'runs' / run, args.batch_size)
        metrics = evaluate(args, found[seed, arm], checkpoint)
        with lock:
            done.append(run)
            elapsed = time.time() - start
            LOG.info(f'== [{len(done)}/{len(runs)}] {label}, seed {seed}: trained and evaluated ({elapsed:.0f} s so '
                     f'far, about {elapsed / len(done) * (len(runs) - len(done)):.0f} s to go)')
        return dict(checkpoint=checkpoint, metrics=metrics, curve=curve, speed=speed)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {key: pool.submit(one, *key) for key in runs}
        try:
            return {key: future.result() for key, future in futures.items()}
        except BaseException:  # a failed run: start no more (the ones running finish, their files recorded)
            for future in futures.values():
                future.cancel()
            raise


def main(argv=None):
    args = parse_args(argv)
    # This script's progress at INFO; OpenCLIP's (which logs on the root logger) only from warnings up.
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s | %(message)s', datefmt='%H:%M:%S')
    LOG.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)  # evaluation, here, one run per thread
    start = time.time()
    written = prepare_output(args)
    name, config = llip_config(args)
    if args.train_data is None:
        built_in_data(args, config['vision_cfg']['image_size'])
    arm_specs = arms(args, name, config)
    labels = {arm: label for arm, (label, *_) in arm_specs.items()}
    runs = {(seed, arm): f'{arm_specs[arm][1]}-seed{seed}' for seed in args.seeds for arm in arm_specs}
    found = {(seed, arm): initial_weights(args, written, run, arm_specs[arm][2], seed) for (seed, arm), run in runs.items()}
    outcomes = run_all(args, written, arm_specs, found, runs, start)
    results, curves, speeds = ({arm: [outcomes[seed, arm][key] for seed in args.seeds] for arm in arm_specs}
                               for key in ('metrics', 'curve', 'speed'))
    checkpoints = {(seed, arm): outcome['checkpoint'] for (seed, arm), outcome in outcomes.items()}

    rows = summary_rows(results)
    columns = [labels[arm] for arm in results]
    print(f'\n{format_table(columns, rows)}\n')
    for arm in results:
        ends = np.array([(points[0][1], points[-1][1]) for points in curves[arm]])
        print(f'{labels[arm]}: training loss {ends[:, 0].mean():.2f} at the first step, {ends[:, 1].mean():.2f} at the '
              f'last (mean over seeds); {np.mean(speeds[arm]):.0f} samples/s')
    written.write_text('results.md', format_table(columns, rows, markdown=True) + '\n')
    written.write_text('results.json', json.dumps(dict(
        seeds=args.seeds, labels=labels, results=results, samples_per_second=speeds,
        loss_start_end={arm: [(points[0][1], points[-1][1]) for points in runs] for arm, runs in curves.items()},
        gap_to_siglip={arm: {f'{task} {metric}': value for (task, metric), value in gaps(results, arm).items()}
                       for arm in results if arm != 'siglip' and 'siglip' in results},
        wall_seconds=time.time() - start), indent=2))
    plots = ['training_curves.png']
    plot_training_curves(curves, labels, args.batch_size, written.claim('training_curves.png'))
    if 'siglip' in results and len(results) > 1:
        plot_gap(results, labels, written.claim('gap.png'))
        plots.append('gap.png')
    retrieval = next((task.path for task in args.tasks if isinstance(task, RetrievalTask)), '')
    if retrieval.endswith('.csv'):
        plot_attention(name, found[args.seeds[0], 'llip'], checkpoints[args.seeds[0], 'llip'], retrieval,
                       written.claim('attention.png'))
        plots.append('attention.png')
    for plot in plots:
        written.record(plot)
    save_record(args, written)
    LOG.info(f'Done in {time.time() - start:.0f} s: {args.output}/results.md, {", ".join(plots)}')


if __name__ == '__main__':
    main()

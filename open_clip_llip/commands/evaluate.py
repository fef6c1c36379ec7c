"""``open_clip_llip eval``: zero-shot classification and retrieval.

Example::

    open_clip_llip eval --model Llip-ViT-B-16 --pretrained llip_b16_k32.pt \\
        --zeroshot-images imagenet/val --classnames imagenet.txt --templates openai.txt \\
        --retrieval coco/test.csv --temperatures 1 5 --json results.json

The command line of ``open_clip_llip.evaluation.tasks``: it builds the typed tasks from the options,
loads exactly the weights asked for, evaluates, prints a table and writes JSON (OpenCLIP's metric
names, as fractions). Data formats: see ``open_clip_llip.evaluation.readers``.
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List

import open_clip

from ..evaluation.tasks import RETRIEVAL, ZERO_SHOT, RetrievalTask, Task, ZeroShotTask, evaluate, load_model
from ..modeling.llip_model import LlipModel, llip_model_names
from ..written_files import check_output_file, write_json
from .options import add_model_arguments, add_runtime_arguments, add_skip_bad_samples_argument, check_runtime_arguments

# Table columns (JSON keys stay OpenCLIP's names).
TABLE_COLUMNS = {
    ZERO_SHOT: {'top1': 'top1', 'top5': 'top5'},
    RETRIEVAL: {f'{direction}_R@{k}': f'{short} R@{k}'
                for direction, short in (('image_to_text', 'I→T'), ('text_to_image', 'T→I')) for k in (1, 5, 10)},
}


def add_task_arguments(parser: argparse.ArgumentParser):
    """The options that describe evaluation tasks (shared with the main job, ``scripts/demo.py``)."""
    task = parser.add_argument_group('tasks (each option may be repeated)')
    task.add_argument('--zeroshot-images', action='append', default=[], metavar='DIR',
                      help='ImageFolder of a zero-shot classification task (one folder per class).')
    task.add_argument('--classnames', action='append', default=[], metavar='FILE',
                      help='Class names, one per line, for the class folders in sorted order; one per --zeroshot-images.')
    task.add_argument('--templates', action='append', default=[], metavar='FILE',
                      help='Templates with {} for the class name, one per line; one file for all tasks or one per task.')
    task.add_argument('--retrieval', action='append', default=[], metavar='PATH',
                      help='Retrieval set: a tab-separated CSV (filepath, title) or webdataset shards '
                           '(.tar, or a brace pattern).')


def tasks_from_arguments(parser: argparse.ArgumentParser, args, skip_bad_samples: bool = False) -> List[Task]:
    """The typed tasks of ``add_task_arguments``' options, every file read and checked (before any model loads);
    with ``skip_bad_samples`` the samples at fault are left out and counted (``task.skipped``)."""
    if len(args.classnames) != len(args.zeroshot_images):
        parser.error(f'give one --classnames per --zeroshot-images (got {len(args.classnames)} and '
                     f'{len(args.zeroshot_images)})')
    if args.zeroshot_images and len(args.templates) not in (1, len(args.zeroshot_images)):
        parser.error(f'give one --templates for all zero-shot tasks or one per --zeroshot-images (got '
                     f'{len(args.templates)} for {len(args.zeroshot_images)})')
    if args.templates and not args.zeroshot_images:
        parser.error('--templates needs --zeroshot-images')
    templates = args.templates * len(args.zeroshot_images) if len(args.templates) == 1 else args.templates
    tasks = [ZeroShotTask.from_files(images, classnames, task_templates, skip_bad_samples=skip_bad_samples)
             for images, classnames, task_templates in zip(args.zeroshot_images, args.classnames, templates)]
    retrieval = [RetrievalTask(path, skip_bad_samples=skip_bad_samples) for path in args.retrieval]
    for task in retrieval:
        task.retrieval_set  # noqa: B018  (read now: bad input fails before the model loads)
    return tasks + retrieval


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='open_clip_llip eval', description='Zero-shot classification and retrieval of a Llip (or OpenCLIP) model.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser, pretrained_help='weights: a checkpoint file or a pretrained tag (required for a config '
                        'name or file; for local-dir:/hf-hub:, a file instead of their own weights); an OpenCLIP '
                        'model that is not Llip is scored by dot products')
    add_task_arguments(parser)
    parser.add_argument('--temperatures', type=float, nargs='+', metavar='TAU',
                        help="Mixer temperatures τ to evaluate (default: the model's).")
    add_runtime_arguments(parser)
    add_skip_bad_samples_argument(parser)
    parser.add_argument('--json', type=Path, metavar='PATH', help='Write the results here as JSON.')
    parser.add_argument('--overwrite', action='store_true', help='Replace an existing --json file.')
    args = parser.parse_args(argv)

    if not args.zeroshot_images and not args.retrieval:
        parser.error('nothing to evaluate: give --zeroshot-images DIR --classnames FILE --templates FILE, '
                     'and/or --retrieval PATH')
    check_runtime_arguments(parser, args)
    if args.temperatures is not None and not all(tau > 0 for tau in args.temperatures):
        parser.error(f'--temperatures must be positive, got {args.temperatures}')
    args.parser = parser
    return args


def format_table(records: List[Dict]) -> str:
    """One block of rows per kind of task: task, τ and the metrics of ``TABLE_COLUMNS``."""
    blocks = []
    for kind, columns in TABLE_COLUMNS.items():
        rows = [[r['task'], '-' if r['temperature'] is None else f"{r['temperature']:g}"]
                + [f"{r['metrics'][k]:.4f}" for k in columns] for r in records if r['type'] == kind]
        if rows:
            header = [kind, 'τ'] + list(columns.values())
            widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
            blocks.append('\n'.join('  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                              for i, (cell, w) in enumerate(zip(row, widths)))
                                    for row in [header] + rows))
    return '\n\n'.join(blocks)


def evaluate_args(args) -> dict:
    if args.json is not None:
        check_output_file(args.json, args.overwrite)
    tasks = tasks_from_arguments(args.parser, args, args.skip_bad_samples)
    skipped = {task.label: task.skipped for task in tasks}  # 0 each without --skip-bad-samples
    if args.skip_bad_samples:
        for label, count in skipped.items():
            print(f'Skipped {count} bad sample(s) of {label} (--skip-bad-samples).')
    if args.temperatures and args.model in open_clip.list_models() and args.model not in llip_model_names():
        raise ValueError(f"--temperatures applies to Llip models only; '{args.model}' is scored by dot products.")
    model, transform, tokenizer = load_model(args.model, args.pretrained, args.precision, args.device)
    if args.temperatures and not isinstance(model, LlipModel):  # local-dir:, hf-hub: or a config file
        raise ValueError(f"--temperatures applies to Llip models only; '{args.model}' is scored by dot products.")
    records = evaluate(model, tasks, transform, tokenizer, args.temperatures, args.precision, args.batch_size,
                       args.workers)
    return dict(model=args.model, pretrained=args.pretrained, precision=args.precision, results=records,
                skipped_samples=skipped)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    try:
        results = evaluate_args(args)
        print(format_table(results['results']))
        if args.json is not None:
            write_json(args.json, results, args.overwrite)
            logging.info(f'Results written to {args.json}.')
    except (ValueError, OSError) as error:  # bad input: say what is wrong, without a traceback
        sys.exit(f'open_clip_llip eval: error: {error}')


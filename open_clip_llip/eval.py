"""``python -m open_clip_llip.eval`` (``open_clip_llip_eval``): zero-shot classification and retrieval.

Example::

    open_clip_llip_eval --model Llip-ViT-B-16 --pretrained llip_b16_k32.pt \\
        --zeroshot-images imagenet/val --classnames imagenet.txt --templates openai.txt \\
        --retrieval coco/test.csv --temperatures 1 5 --json results.json

A Llip model is scored with conditioned cosines, every τ in ``--temperatures`` in the same pass
over the images; any other OpenCLIP model (a baseline) by dot products of its unit embeddings. The table and the
JSON use OpenCLIP's metric names (``top1``, ``top5``, ``image_to_text_R@1``, …) as fractions.
Data formats: see ``open_clip_llip.eval_data``.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import open_clip
from open_clip_train.precision import get_autocast

from .eval_data import RetrievalImages, read_classnames, read_retrieval_set, read_templates, zero_shot_dataset
from .plugin import llip_model_names
from .model import LlipModel
from .retrieval import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics
from .written_files import check_output_file, write_json
from .zero_shot import build_zero_shot_classifier, evaluation_temperatures, run_zero_shot, topk_correct

PRECISIONS = ('amp', 'amp_bf16', 'amp_bfloat16', 'bf16', 'fp16', 'pure_bf16', 'pure_fp16', 'fp32')  # open_clip_train's
ZERO_SHOT, RETRIEVAL = 'zeroshot_classification', 'retrieval'
# Table columns (JSON keys stay OpenCLIP's names).
TABLE_COLUMNS = {
    ZERO_SHOT: {'top1': 'top1', 'top5': 'top5'},
    RETRIEVAL: {f'{direction}_R@{k}': f'{short} R@{k}'
                for direction, short in (('image_to_text', 'I→T'), ('text_to_image', 'T→I')) for k in (1, 5, 10)},
}


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='open_clip_llip_eval', description='Zero-shot classification and retrieval of a Llip (or OpenCLIP) model.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--model', required=True,
                        help='What open_clip_train takes: a config name (a Llip config such as Llip-ViT-B-16, or any '
                             'OpenCLIP model, scored by dot products), local-dir:DIR, hf-hub:REPO or a JSON config file.')
    parser.add_argument('--pretrained', help='Weights: a checkpoint file or a pretrained tag (required for a config name '
                                             'or file; for local-dir:/hf-hub:, a file instead of their own weights).')
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
    parser.add_argument('--temperatures', type=float, nargs='+', metavar='TAU',
                        help="Mixer temperatures τ to evaluate (default: the model's).")
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=4, help='Data loader workers.')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32')
    parser.add_argument('--json', type=Path, metavar='PATH', help='Write the results here as JSON.')
    parser.add_argument('--overwrite', action='store_true', help='Replace an existing --json file.')
    args = parser.parse_args(argv)

    if not args.zeroshot_images and not args.retrieval:
        parser.error('nothing to evaluate: give --zeroshot-images DIR --classnames FILE --templates FILE, '
                     'and/or --retrieval PATH')
    if len(args.classnames) != len(args.zeroshot_images):
        parser.error(f'give one --classnames per --zeroshot-images (got {len(args.classnames)} and '
                     f'{len(args.zeroshot_images)})')
    if args.zeroshot_images and len(args.templates) not in (1, len(args.zeroshot_images)):
        parser.error(f'give one --templates for all zero-shot tasks or one per --zeroshot-images (got '
                     f'{len(args.templates)} for {len(args.zeroshot_images)})')
    if args.templates and not args.zeroshot_images:
        parser.error('--templates needs --zeroshot-images')
    if args.batch_size < 1 or args.workers < 0:
        parser.error('--batch-size must be at least 1 and --workers at least 0')
    if args.temperatures is not None and not all(tau > 0 for tau in args.temperatures):
        parser.error(f'--temperatures must be positive, got {args.temperatures}')
    return args


def _json_config_as_local_dir(path: Path, folder: Path) -> str:
    """A model config file (bare, or ``open_clip_config.json``'s ``{"model_cfg": …}``) as a ``local-dir:`` model."""
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f'--model {path}: not a readable JSON model config ({error}).') from None
    if not isinstance(config, dict):
        raise ValueError(f'--model {path}: a model config must be a JSON object.')
    if 'model_cfg' not in config:
        config = {'model_cfg': config}
    (folder / 'open_clip_config.json').write_text(json.dumps(config), encoding='utf-8')
    return f'local-dir:{folder}'


def create_model(args):
    """Model, evaluation transform and tokenizer, with exactly the weights asked for; never random weights.

    ``--model`` takes what ``open_clip_train`` takes: a config name (weights from ``--pretrained``,
    a file or a pretrained tag), ``local-dir:DIR`` or ``hf-hub:REPO`` (their own weights, or
    ``--pretrained`` FILE instead), or a JSON config file (weights from ``--pretrained``).
    """
    schema = next((s for s in ('local-dir:', 'hf-hub:') if args.model.startswith(s)), None)
    is_file = schema is None and args.model.endswith('.json')
    if schema is None and not is_file:
        try:
            config = open_clip.get_model_config(args.model)
        except RuntimeError as error:  # with Llip registered, a Llip-like unknown name says which configs exist
            raise ValueError(str(error)) from None
        if config is None:
            raise ValueError(f"Unknown model '{args.model}'. Llip configs: {', '.join(llip_model_names())}.")
        if args.temperatures and args.model not in llip_model_names():
            raise ValueError(f"--temperatures applies to Llip models only; '{args.model}' is scored by dot products.")
        if args.pretrained is not None and not os.path.isfile(args.pretrained) \
                and not open_clip.get_pretrained_cfg(args.model, args.pretrained):
            tags = open_clip.list_pretrained_tags_by_model(args.model)
            raise FileNotFoundError(f'Checkpoint {args.pretrained} not found, and it is not a pretrained tag of '
                                    f'{args.model} (its tags: {", ".join(tags) or "none"}).')
    if is_file and not os.path.isfile(args.model):
        raise FileNotFoundError(f'Model config file {args.model} not found.')
    if args.pretrained is None and schema is None:
        raise ValueError(f'--model {args.model} has no weights of its own: give --pretrained (a checkpoint file or a '
                         'pretrained tag). Evaluating randomly initialised weights would report meaningless numbers.')
    options = dict(precision=args.precision, device=args.device)
    with tempfile.TemporaryDirectory() as folder:
        model_name = _json_config_as_local_dir(Path(args.model), Path(folder)) if is_file else args.model
        # OpenCLIP ignores `pretrained` for local-dir:/hf-hub: models: such a file is loaded here instead.
        own_file = args.pretrained is not None and model_name.startswith(('local-dir:', 'hf-hub:'))
        if own_file and not os.path.isfile(args.pretrained):
            raise FileNotFoundError(f'Checkpoint {args.pretrained} not found.')
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=None if own_file else args.pretrained, load_weights=not own_file,
                require_pretrained=not own_file, **options)
        except RuntimeError as error:  # OpenCLIP's "could not be loaded" / "not a known tag or valid file path"
            raise ValueError(f'--model {args.model} --pretrained {args.pretrained}: {error}') from None
        if own_file:
            open_clip.load_checkpoint(model, args.pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
    if args.temperatures and not isinstance(model, LlipModel):  # local-dir:, hf-hub: or a file
        raise ValueError(f"--temperatures applies to Llip models only; '{args.model}' is scored by dot products.")
    return model.eval(), transform, tokenizer


def dot_product_zero_shot(model, classifier, dataloader, device, autocast, input_dtype) -> Dict[str, float]:
    """Top-1/top-5 of an OpenCLIP model: unit image embeddings against OpenCLIP's ``[D, C]`` classifier."""
    correct, count = torch.zeros(2, dtype=torch.long, device=device), 0
    with torch.inference_mode():
        for images, targets in tqdm(dataloader, desc='Zero-shot', unit='batch'):
            with autocast():
                scores = model.encode_image(images.to(device=device, dtype=input_dtype), normalize=True) @ classifier
            correct += topk_correct(scores.float(), targets.to(device), (1, 5))
            count += len(images)
    top1, top5 = (correct.double() / count).tolist()
    return {'top1': top1, 'top5': top5}


def dot_product_retrieval(model, images, texts, image_index, device, autocast, input_dtype) -> Dict[str, float]:
    """Retrieval metrics of an OpenCLIP model: dot products of unit image and text embeddings."""
    with torch.inference_mode(), autocast():
        image_features = torch.cat([model.encode_image(x.to(device=device, dtype=input_dtype), normalize=True)
                                    for x in tqdm(images, desc='Images', unit='batch')])
        text_features = torch.cat([model.encode_text(t.to(device), normalize=True) for t in texts])
    return retrieval_metrics((image_features @ text_features.T).float(), image_index)


def format_table(records: List[Dict]) -> str:
    """One block of rows per kind of task: task, τ and the metrics of ``TABLE_COLUMNS``."""
    blocks = []
    for kind, columns in TABLE_COLUMNS.items():
        rows = [[r['task'], '-' if r['temperature'] is None else f"{r['temperature']:g}"] + [f"{r['metrics'][k]:.4f}" for k in columns]
                for r in records if r['type'] == kind]
        if rows:
            header = [kind, 'τ'] + list(columns.values())
            widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
            blocks.append('\n'.join('  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                              for i, (cell, w) in enumerate(zip(row, widths)))
                                    for row in [header] + rows))
    return '\n\n'.join(blocks)


def evaluate(args) -> dict:
    if args.json is not None:
        check_output_file(args.json, args.overwrite)
    # Read every task before loading the model, so that bad input fails fast.
    templates = [read_templates(path) for path in args.templates]
    zero_shot_tasks = [
        (root, classnames, templates[i if len(templates) > 1 else 0], zero_shot_dataset(root, classnames))
        for i, (root, classnames) in enumerate(zip(args.zeroshot_images, map(read_classnames, args.classnames)))]
    retrieval_tasks = [(path, read_retrieval_set(path)) for path in args.retrieval]

    model, transform, tokenizer = create_model(args)
    # Llip models are scored with conditioned cosines, for each τ; any other OpenCLIP model by dot products.
    is_llip = isinstance(model, LlipModel)
    temperatures = evaluation_temperatures(model, args.temperatures) if is_llip else (None,)
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = open_clip.get_input_dtype(args.precision)
    loader_options = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == 'cuda')
    records = []

    for root, classnames, task_templates, dataset in zero_shot_tasks:
        logging.info(f'Zero-shot {root}: {len(dataset)} images, {len(classnames)} classes, {len(task_templates)} templates.')
        dataset.transform = transform
        build = build_zero_shot_classifier if is_llip else open_clip.build_zero_shot_classifier
        with autocast():
            classifier = build(model, tokenizer, classnames, task_templates, device=device, use_tqdm=True)
        loader = DataLoader(dataset, **loader_options)
        if is_llip:
            results = run_zero_shot(model, classifier, loader, temperatures, device=device, autocast=autocast,
                                    input_dtype=input_dtype, use_tqdm=True)
        else:
            results = {None: dot_product_zero_shot(model, classifier, loader, device, autocast, input_dtype)}
        records += [dict(task=root, type=ZERO_SHOT, temperature=tau, num_images=len(dataset),
                         num_classes=len(classnames), metrics=metrics) for tau, metrics in results.items()]

    for path, retrieval_set in retrieval_tasks:
        logging.info(f'Retrieval {path}: {len(retrieval_set.images)} images, {len(retrieval_set.captions)} captions.')
        images = DataLoader(RetrievalImages(retrieval_set.images, transform), **loader_options)
        texts = tokenizer(retrieval_set.captions).split(args.batch_size)
        if is_llip:
            keys, values = encode_images(model, images, device, autocast, input_dtype, use_tqdm=True)
            features, queries = encode_texts(model, texts, device, autocast, use_tqdm=True)
            results = evaluate_retrieval(
                model, keys, values, features, queries, retrieval_set.image_index, temperatures, autocast)
        else:
            results = {None: dot_product_retrieval(
                model, images, texts, retrieval_set.image_index, device, autocast, input_dtype)}
        records += [dict(task=path, type=RETRIEVAL, temperature=tau, num_images=len(retrieval_set.images),
                         num_texts=len(retrieval_set.captions), metrics=metrics) for tau, metrics in results.items()]

    return dict(model=args.model, pretrained=args.pretrained, precision=args.precision, results=records)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    try:
        results = evaluate(args)
        print(format_table(results['results']))
        if args.json is not None:
            write_json(args.json, results, args.overwrite)
            logging.info(f'Results written to {args.json}.')
    except (ValueError, OSError) as error:  # bad input: say what is wrong, without a traceback
        sys.exit(f'open_clip_llip_eval: error: {error}')


if __name__ == '__main__':
    main()

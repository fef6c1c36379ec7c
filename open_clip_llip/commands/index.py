"""``open_clip_llip index build|query|verify``: build a Llip retrieval index of images, search one by text, or check
one's files against the SHA-256 its manifest records."""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from ..modeling.llip_model import LlipModel
from ..search.index import (
    DEFAULT_CANDIDATES,
    DEFAULT_PROTOTYPES,
    DTYPES,
    LlipIndex,
    build_index,
    list_images,
    read_manifest,
    verify_index,
)
from .options import add_model_arguments, add_runtime_arguments, add_skip_bad_samples_argument, check_runtime_arguments


def _absolute(spec: Optional[str]) -> Optional[str]:
    """A model or checkpoint given as a path, made absolute so that the index finds it from any folder."""
    if spec is None:
        return None
    schema = 'local-dir:' if spec.startswith('local-dir:') else ''
    path = Path(spec[len(schema):])
    return f'{schema}{path.resolve()}' if schema or path.is_file() else spec


def _load(args):
    """Model, transform and tokenizer of ``--model``/``--pretrained``; ValueError unless a Llip model."""
    from ..evaluation.tasks import load_model

    model, transform, tokenizer = load_model(args.model, args.pretrained, args.precision, args.device)
    if not isinstance(model, LlipModel):
        raise ValueError(f"--model {args.model} is not a Llip model; a Llip index needs one.")
    return model, transform, tokenizer


def _build(args):
    from ..evaluation.readers import RetrievalImages
    names, images, skipped = list_images(args.images, args.skip_bad_samples)
    if args.skip_bad_samples:
        print(f'Skipped {skipped} bad sample(s) of {args.images} (--skip-bad-samples).')
    texts = None
    if args.prototype_texts is not None:
        texts = [line.strip() for line in args.prototype_texts.read_text(encoding='utf-8').splitlines() if line.strip()]
    model, transform, tokenizer = _load(args)
    index = build_index(args.output, model, RetrievalImages(images, transform), names, args.batch_size, args.workers,
                        args.precision, args.dtype, args.overwrite, model_name=_absolute(args.model),
                        pretrained=_absolute(args.pretrained), tokenizer=tokenizer, prototype_texts=texts,
                        prototypes=args.prototypes, skipped_samples=skipped)
    print(f'Indexed {len(index)} images into {args.output}.')


def _query(args):
    manifest = read_manifest(args.index)
    args.model = args.model or manifest['model']
    args.pretrained = args.pretrained or manifest['pretrained']
    if args.model is None:
        raise ValueError(f'The index in {args.index} does not record its model: give --model (and --pretrained).')
    model, _, tokenizer = _load(args)
    index = LlipIndex.open(args.index, model, tokenizer, args.precision)
    results = index.search(args.texts, args.k, args.candidates, args.probes)
    if args.json:
        print(json.dumps(results.records(args.texts), indent=2, ensure_ascii=False))
        return
    for text, scores, ids in zip(args.texts, results.scores.tolist(), results.ids.tolist()):
        print(f'{text}')
        for rank, (score, image) in enumerate(zip(scores, ids), 1):
            name = f'\t{index.names[image]}' if index.names is not None else ''
            if image >= 0:  # −1: fewer than k images with finite scores
                print(f'{rank:4d}\t{score:.4f}\t{image}{name}')


def _verify(args):
    problems = verify_index(args.index)
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(f'open_clip_llip index verify: error: {len(problems)} damaged part(s) of the index in {args.index}; '
                 'build it again.')
    print(f'The index in {args.index} is whole: every file and block matches the SHA-256 its manifest records.')


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='open_clip_llip index', description='Build a Llip retrieval index of images, '
                                     'or search one by text.')
    commands = parser.add_subparsers(dest='command', required=True)

    build = commands.add_parser('build', help='encode images into a new index folder',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument('output', type=Path, help='the index folder to create (new or empty; see --overwrite)')
    build.add_argument('--images', required=True,
                       help='a folder of images (searched recursively), a retrieval CSV (filepath column) or '
                            'webdataset shards (.tar, or a brace pattern)')
    add_model_arguments(build)
    add_runtime_arguments(build)
    add_skip_bad_samples_argument(build)
    build.add_argument('--dtype', choices=DTYPES, default='float16', help='how the image features are stored')
    build.add_argument('--overwrite', action='store_true', help='replace an index this command wrote in OUTPUT')
    build.add_argument('--prototype-texts', type=Path, metavar='FILE',
                       help='a sample of texts like the queries to come, one per line: the first stage ranks by '
                            'the mixtures for --prototypes centres of their queries (default: the uniform mixture)')
    build.add_argument('--prototypes', type=int,
                       help=f'prototype queries made from --prototype-texts (default {DEFAULT_PROTOTYPES})')

    query = commands.add_parser('query', help='the best images of an index for each text',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    query.add_argument('index', type=Path, help='an index folder written by open_clip_llip index build')
    query.add_argument('texts', nargs='+', metavar='TEXT')
    query.add_argument('--k', type=int, default=10, help='images per text')
    query.add_argument('--candidates', type=int, default=DEFAULT_CANDIDATES,
                       help='first-stage candidates per text, re-scored exactly')
    query.add_argument('--probes', type=int, default=1, help="prototypes per text whose lists the first stage scans")
    query.add_argument('--json', action='store_true',
                       help='print the results as JSON: per text, its images best first with rank, id, name and score')
    add_model_arguments(query, required=False, model_help="default: the index's (another path to the same model)",
                        pretrained_help="default: the index's")
    add_runtime_arguments(query, workers=False)

    verify = commands.add_parser('verify', help="check every file and block of an index against its manifest's SHA-256, "
                                 'naming each damaged one (exit status 1 if any)')
    verify.add_argument('index', type=Path, help='an index folder written by open_clip_llip index build')
    args = parser.parse_args(argv)
    if args.command == 'build':
        check_runtime_arguments(build, args)
    if args.command == 'build' and args.prototypes is not None and args.prototype_texts is None:
        build.error('--prototypes needs --prototype-texts, the sample of texts to make them of')
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    try:
        dict(build=_build, query=_query, verify=_verify)[args.command](args)
    except (ValueError, OSError, ImportError) as error:  # bad input: say what is wrong, without a traceback
        sys.exit(f'open_clip_llip index {args.command}: error: {error}')


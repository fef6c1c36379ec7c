"""``open_clip_llip index build|query|verify``: build a Llip retrieval index of images, search one by text, or check
one's files against the SHA-256 its manifest records."""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from ..modeling.llip_model import LlipModel
from ..search.index import (
    DEFAULT_CANDIDATES,
    DEFAULT_CODE_BYTES,
    DEFAULT_PROTOTYPES,
    DTYPES,
    LlipIndex,
    build_index,
    list_images,
    read_manifest,
    verify_index,
)
from ..search.shards import ShardedIndex, build_sharded_index, distributed_context, is_gallery, read_plan, verify_gallery
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
    rank, world_size, share = distributed_context()
    if args.resume and args.shards is None and world_size == 1:
        raise ValueError('--resume resumes a build of shards: give the killed build\'s --shards (or run it under '
                         'torchrun as before).')
    if world_size > 1 and args.device == 'cuda':
        args.device = f'cuda:{os.environ.get("LOCAL_RANK", rank)}'  # one GPU per process
    names, images, skipped = list_images(args.images, args.skip_bad_samples)
    if args.skip_bad_samples and rank == 0:
        print(f'Skipped {skipped} bad sample(s) of {args.images} (--skip-bad-samples).')
    texts = None
    if args.prototype_texts is not None:
        texts = [line.strip() for line in args.prototype_texts.read_text(encoding='utf-8').splitlines() if line.strip()]
    model, transform, tokenizer = _load(args)
    options = dict(batch_size=args.batch_size, workers=args.workers, precision=args.precision, dtype=args.dtype,
                   overwrite=args.overwrite, model_name=_absolute(args.model), pretrained=_absolute(args.pretrained),
                   tokenizer=tokenizer, prototype_texts=texts, prototypes=args.prototypes, code_bytes=args.code_bytes,
                   skipped_samples=skipped)
    if args.shards is None and world_size == 1:
        index = build_index(args.output, model, RetrievalImages(images, transform), names, **options)
        print(f'Indexed {len(index)} images into {args.output}.')
        return
    try:
        index = build_sharded_index(args.output, model, RetrievalImages(images, transform), names,
                                    args.shards or world_size, resume=args.resume, rank=rank, world_size=world_size,
                                    share=share, **options)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    if index is not None:
        print(f'Indexed {len(index)} images into {len(index.shards)} shards in {args.output}.')


def _open(args):
    """The index or gallery of shards ``args.index``, opened with the model it records (or ``--model``)."""
    sharded = is_gallery(args.index)
    manifest = read_plan(args.index) if sharded else read_manifest(args.index)
    args.model = args.model or manifest['model']
    args.pretrained = args.pretrained or manifest['pretrained']
    if args.model is None:
        raise ValueError(f'The index in {args.index} does not record its model: give --model (and --pretrained).')
    model, _, tokenizer = _load(args)
    return (ShardedIndex if sharded else LlipIndex).open(args.index, model, tokenizer, args.precision)


def _query(args):
    index = _open(args)
    results = index.search(args.texts, args.k, args.candidates, args.probes)
    if args.json:
        print(json.dumps(results.records(args.texts), indent=2, ensure_ascii=False))
        return
    for text, record in zip(args.texts, results.records(args.texts)):
        print(f'{text}')
        for result in record['results']:
            name = f'\t{result["name"]}' if result['name'] is not None else ''
            shard = f'\tshard {result["shard"]}' if 'shard' in result else ''
            print(f'{result["rank"]:4d}\t{result["score"]:.4f}\t{result["id"]}{name}{shard}')


def _verify(args):
    problems = verify_gallery(args.index) if is_gallery(args.index) else verify_index(args.index)
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
    build.add_argument('--dtype', choices=DTYPES, default='float16',
                       help='how the image features are stored for re-scoring (int8: a float16 scale per vector)')
    build.add_argument('--overwrite', action='store_true', help='replace an index this command wrote in OUTPUT')
    build.add_argument('--shards', type=int,
                       help='split the gallery into this many shards, each an index folder in OUTPUT (default: one '
                            'index; under torchrun, one shard per process); the processes of torchrun build them '
                            'together')
    build.add_argument('--resume', action='store_true',
                       help='resume a killed build of shards in OUTPUT: keep its finished shards, build the rest')
    build.add_argument('--code-bytes', type=int, default=DEFAULT_CODE_BYTES,
                       help="bytes of an image's first-stage code per prototype (a divisor of the model's width)")
    build.add_argument('--prototype-texts', type=Path, metavar='FILE',
                       help='a sample of texts like the queries to come, one per line: the first stage ranks by '
                            'the mixtures for --prototypes centres of their queries (default: the uniform mixture)')
    build.add_argument('--prototypes', type=int,
                       help=f'prototype queries made from --prototype-texts (default {DEFAULT_PROTOTYPES})')

    query = commands.add_parser('query', help='the best images of an index for each text',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    query.add_argument('index', type=Path, help='an index folder or gallery of shards written by open_clip_llip '
                       'index build')
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
    verify.add_argument('index', type=Path, help='an index folder or gallery of shards written by open_clip_llip '
                        'index build')
    args = parser.parse_args(argv)
    if args.command == 'build':
        check_runtime_arguments(build, args)
    if args.command == 'build' and args.prototypes is not None and args.prototype_texts is None:
        build.error('--prototypes needs --prototype-texts, the sample of texts to make them of')
    if args.command == 'build' and args.resume and args.overwrite:
        build.error('--resume keeps the finished shards, --overwrite builds afresh: give one')
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    try:
        dict(build=_build, query=_query, verify=_verify)[args.command](args)
    except (ValueError, OSError, ImportError) as error:  # bad input: say what is wrong, without a traceback
        sys.exit(f'open_clip_llip index {args.command}: error: {error}')


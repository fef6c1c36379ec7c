"""The options that several subcommands take, defined once so that they are spelled alike everywhere."""
import argparse

import torch

PRECISIONS = ('amp', 'amp_bf16', 'amp_bfloat16', 'bf16', 'fp16', 'pure_bf16', 'pure_fp16', 'fp32')  # open_clip_train's
MODEL_HELP = ('a config name (a Llip config such as Llip-ViT-B-16, or any OpenCLIP model), local-dir:DIR, '
              'hf-hub:REPO or a JSON config file: what open_clip_train takes')
PRETRAINED_HELP = 'weights: a checkpoint file or a pretrained tag'


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True, model_help: str = MODEL_HELP,
                        pretrained_help: str = PRETRAINED_HELP):
    """``--model`` and ``--pretrained``."""
    parser.add_argument('--model', required=required, help=model_help)
    parser.add_argument('--pretrained', help=pretrained_help)


def add_runtime_arguments(parser: argparse.ArgumentParser, workers: bool = True):
    """``--device``, ``--precision`` and, for commands that read images, ``--batch-size`` and ``--workers``."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32')
    if workers:
        parser.add_argument('--batch-size', type=int, default=64)
        parser.add_argument('--workers', type=int, default=4, help='data loader workers')


def check_runtime_arguments(parser: argparse.ArgumentParser, args):
    if args.batch_size < 1 or args.workers < 0:
        parser.error('--batch-size must be at least 1 and --workers at least 0')


def add_skip_bad_samples_argument(parser: argparse.ArgumentParser):
    """``--skip-bad-samples``: leave out the samples the readers find at fault, counted, instead of stopping."""
    parser.add_argument('--skip-bad-samples', action='store_true',
                        help='leave out bad samples (a damaged or cut tar member, a bad CSV row, an image that does '
                             'not decode), each logged, and report how many, instead of stopping at the first '
                             '(every image is then decoded before the model runs)')

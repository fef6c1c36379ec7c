"""``open_clip_llip benchmark``: CLIP_benchmark's own command line (its subcommands and arguments), with Llip's scores.

    open_clip_llip benchmark eval --model Llip-ViT-B-16 --pretrained llip_b16_k32.pt \\
        --dataset cifar10 --task zeroshot_classification --dataset_root DATA

runs ``clip_benchmark`` inside ``integration.clip_benchmark.llip_support()``. Plain ``clip_benchmark eval`` gives a
Llip model the same numbers (its tasks route Llip models into that block); here, other models also get its numpy fix.
"""
import sys

from ..integration.clip_benchmark import INSTALL, llip_support

PROG = 'open_clip_llip benchmark'


def main(argv=None):
    try:
        from clip_benchmark import cli
    except ImportError as error:
        sys.exit(f'{PROG}: CLIP_benchmark is not installed ({error}): {INSTALL}')
    saved = sys.argv
    # CLIP_benchmark's parser reads sys.argv.
    sys.argv = [PROG, *(saved[1:] if argv is None else argv)]
    try:
        with llip_support():
            cli.main()
    finally:
        sys.argv = saved

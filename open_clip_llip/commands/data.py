"""``open_clip_llip data OUTPUT_DIR``: write the built-in scenes dataset (see ``writer.py``)."""
import argparse
import logging

from ..data.writer import write_dataset
from ..written_files import UnsafePathError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='open_clip_llip data',
        description='Write seeded scenes of coloured shapes, several partial captions per image: OpenCLIP-ready '
                    'training shards, an image-text retrieval set and zero-shot classification tasks.')
    parser.add_argument('output_dir', help='directory to write into: new or empty (or see --overwrite)')
    parser.add_argument('--seed', type=int, default=0, help='random seed; the same seed writes the same bytes')
    parser.add_argument('--train-images', type=int, default=4000, help='training images')
    parser.add_argument('--captions-per-image', type=int, default=4,
                        help='different captions per training image, one training sample each')
    parser.add_argument('--retrieval-images', type=int, default=300, help='images in the retrieval set')
    parser.add_argument('--retrieval-captions', type=int, default=3,
                        help='captions per retrieval image, each true of that image only')
    parser.add_argument('--zeroshot-images', type=int, default=50, help='images per class of each zero-shot task')
    parser.add_argument('--image-size', type=int, default=32, help='image side in pixels (32 for Llip-Tiny)')
    parser.add_argument('--samples-per-shard', type=int, default=2000, help='training samples per shard')
    parser.add_argument('--train-format', choices=['webdataset', 'csv'], default='webdataset',
                        help="training data as webdataset shards, or as OpenCLIP's CSV (its order is seeded by "
                             "open_clip_train --seed; webdataset's sample shuffle is not)")
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a dataset this command wrote into OUTPUT_DIR before (nothing else is removed)')
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    try:
        write_dataset(**vars(args))
    except (FileExistsError, NotADirectoryError, UnsafePathError, ValueError, RuntimeError) as error:
        parser.exit(2, f'{parser.prog}: error: {error}\n')


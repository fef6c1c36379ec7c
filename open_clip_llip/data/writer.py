"""Write the scenes dataset: OpenCLIP-ready training shards, a retrieval set and zero-shot tasks.

Layout of ``output_dir`` (paths in ``manifest.json`` are relative to it):

    manifest.json                 what was written: the arguments, counts, and every file below with its
                                  SHA-256 (``files``), which is all that ``overwrite`` removes
    train-000000.tar, ...         webdataset shards; a sample is an image ('png'), one caption ('txt')
                                  and its scene ('json'); each image appears once per caption
    train/train.csv, train/images instead, with train_format='csv': OpenCLIP's CsvDataset
    sizes.json                    samples per shard, which open_clip_train reads when
                                  --train-num-samples is not given
    retrieval/retrieval.csv       tab-separated: filepath, title, unseen_pair (1 when the caption
                                  names a held-out colour-shape pair); paths relative to retrieval/
    retrieval/images/000000.png
    zeroshot/<task>/000/000000.png  an ImageFolder per task: class i in folder f'{i:03d}'
    zeroshot/<task>/classnames.txt  class i's name on line i
    zeroshot/<task>/templates.txt   one template a line, '{}' where the class name goes

Everything is a pure function of the arguments: the same seed gives the same bytes.
"""
import json
import logging
import re
from pathlib import Path
from typing import Union

import numpy as np
from tqdm import tqdm

from ..version import __version__
from ..written_files import WrittenFiles, prepare_folder
from .captions import named_pairs, sample_captions
from .classification import ZERO_SHOT_TASKS
from .gallery import sample_retrieval_set
from .render import png_bytes, render
from .scenes import HELD_OUT_PAIRS, MAX_OBJECTS, TRAIN_PAIRS, rng_for, sample_scene

GENERATOR = 'open_clip_llip.data'
# Every path this module writes (relative to ``output_dir``): all that ``overwrite`` may remove.
NAMES = re.compile(r'manifest\.json|sizes\.json|train-\d{6,}\.tar|train/train\.csv|train/images/\d{6,}\.png'
                   r'|retrieval/retrieval\.csv|retrieval/images/\d{6,}\.png'
                   r'|zeroshot/[a-z-]+/(\d{3,}/\d{6,}\.png|classnames\.txt|templates\.txt)')
# How many objects a training scene holds, with what probability (1 to MAX_OBJECTS).
TRAIN_OBJECT_PROBS = (0.1, 0.3, 0.3, 0.3)
MAX_CAPTIONS_PER_IMAGE = 8
TRAIN_FORMATS = ('webdataset', 'csv')
MIN_IMAGE_SIZE = 16


def _train_example(seed: int, index: int, captions_per_image: int, image_size: int):
    """Training image ``index``: (png bytes, its scene, its captions)."""
    rng = rng_for(seed, 'train', index)
    scene = sample_scene(rng, 1 + int(rng.choice(MAX_OBJECTS, p=TRAIN_OBJECT_PROBS)), TRAIN_PAIRS)
    captions = sample_captions(scene, captions_per_image, rng)
    if captions is None:
        raise RuntimeError(f'training image {index} has fewer than {captions_per_image} different captions; '
                           f'ask for fewer captions per image')
    return png_bytes(render(scene, image_size)), scene, captions


def _write_train(written: WrittenFiles, seed: int, num_images: int, captions_per_image: int, image_size: int,
                 samples_per_shard: int, train_format: str) -> dict:
    images, samples = [], []
    for index in tqdm(range(num_images), desc='training images', unit='image'):
        png, scene, captions = _train_example(seed, index, captions_per_image, image_size)
        images.append(png)
        scene_json = scene.to_dict()
        samples += [(index, number, caption.text, {'image': index, 'caption_kind': caption.kind, 'scene': scene_json})
                    for number, caption in enumerate(captions)]
    # A global shuffle, so that the copies of one image rarely meet in a batch.
    order = rng_for(seed, 'shuffle').permutation(len(samples))
    width = max(6, len(str(num_images - 1)))
    counts = {'num_samples': len(samples), 'num_images': num_images, 'captions_per_image': captions_per_image}
    if train_format == 'csv':
        return {'format': 'csv', **_write_train_csv(written, images, [samples[i] for i in order], width), **counts}
    return {'format': 'webdataset', **_write_train_shards(written, images, samples, order, width, samples_per_shard),
            **counts}


def _write_train_shards(written: WrittenFiles, images, samples, order, width: int, samples_per_shard: int) -> dict:
    import webdataset as wds  # an open_clip_llip[training] dependency, needed for this part only

    num_shards = -(-len(samples) // samples_per_shard)
    sizes = {}
    for shard in range(num_shards):
        name = f'train-{shard:06d}.tar'
        chunk = order[shard * samples_per_shard:(shard + 1) * samples_per_shard]
        # Fixed metadata in the tar headers keeps the shards byte-identical from run to run.
        with wds.TarWriter(str(written.claim(name)), mtime=0, user='', group='', mode=0o644) as sink:
            for i in chunk:
                index, number, text, meta = samples[i]
                sink.write({'__key__': f'{index:0{width}d}-{number}', 'png': images[index], 'txt': text,
                            'json': json.dumps(meta, sort_keys=True)})
        written.record(name)  # moved into place whole
        sizes[name] = len(chunk)
    written.write_text('sizes.json', json.dumps(sizes, indent=1) + '\n')
    pattern = f'train-{{{0:06d}..{num_shards - 1:06d}}}.tar'
    logging.info(f'wrote {len(samples)} training samples in {num_shards} shard(s): {written.root / pattern}')
    return {'data': pattern}


def _write_train_csv(written: WrittenFiles, images, samples, width: int) -> dict:
    """OpenCLIP's CsvDataset: images in train/images, one row per (image, caption), in the shuffled order."""
    for index, png in enumerate(images):
        written.write_bytes(f'train/images/{index:0{width}d}.png', png)
    rows = ['filepath\ttitle'] + [f'images/{index:0{width}d}.png\t{text}' for index, _, text, _ in samples]
    path = written.write_text('train/train.csv', '\n'.join(rows) + '\n')
    logging.info(f'wrote {len(samples)} training samples as a CSV (paths relative to its folder): {path}')
    return {'data': 'train/train.csv'}


def _write_retrieval(written: WrittenFiles, seed: int, num_images: int, captions_per_image: int,
                     image_size: int) -> dict:
    rows = ['filepath\ttitle\tunseen_pair']
    retrieval_set = sample_retrieval_set(seed, num_images, captions_per_image)
    for index, (scene, captions) in enumerate(retrieval_set):
        path = f'images/{index:06d}.png'
        written.write_bytes(f'retrieval/{path}', png_bytes(render(scene, image_size)))
        rows += [f'{path}\t{c.text}\t{int(bool(named_pairs(c) & HELD_OUT_PAIRS))}' for c in captions]
    csv_path = written.write_text('retrieval/retrieval.csv', '\n'.join(rows) + '\n')
    num_unseen = sum(row.endswith('\t1') for row in rows)
    logging.info(f'wrote a retrieval set of {num_images} images and {len(rows) - 1} captions, each true of its '
                 f'image only ({num_unseen} name a held-out pair): {csv_path}')
    return {'csv': 'retrieval/retrieval.csv', 'num_images': num_images, 'num_captions': len(rows) - 1,
            'num_unseen_pair_captions': num_unseen}


def _write_zeroshot(written: WrittenFiles, seed: int, images_per_class: int, image_size: int) -> dict:
    tasks = {}
    total = images_per_class * sum(len(task.classnames) for task in ZERO_SHOT_TASKS)
    with tqdm(total=total, desc='zero-shot images', unit='image') as progress:
        for task_index, task in enumerate(ZERO_SHOT_TASKS):
            relative = f'zeroshot/{task.name}'
            for label in range(len(task.classnames)):
                for number in range(images_per_class):
                    index = label * images_per_class + number
                    scene = task.sample(rng_for(seed, 'zeroshot', task_index, index), label)
                    written.write_bytes(f'{relative}/{label:03d}/{index:06d}.png', png_bytes(render(scene, image_size)))
                    progress.update()
            written.write_text(f'{relative}/classnames.txt', '\n'.join(task.classnames) + '\n')
            written.write_text(f'{relative}/templates.txt', '\n'.join(task.templates) + '\n')
            tasks[task.name] = {'folder': relative, 'classnames': f'{relative}/classnames.txt',
                                'templates': f'{relative}/templates.txt',
                                'num_images': images_per_class * len(task.classnames)}
            logging.info(f'wrote zero-shot task {task.name!r}: {len(task.classnames)} classes × {images_per_class} '
                         f'images, {len(task.templates)} template(s): {written.root / relative}')
    return tasks


def write_dataset(
        output_dir: Union[str, Path],
        seed: int = 0,
        train_images: int = 4000,
        captions_per_image: int = 4,
        retrieval_images: int = 300,
        retrieval_captions: int = 3,
        zeroshot_images: int = 50,
        image_size: int = 32,
        samples_per_shard: int = 2000,
        train_format: str = 'webdataset',
        overwrite: bool = False,
) -> dict:
    """Write training shards, a retrieval set and zero-shot tasks into ``output_dir``; return the manifest.

    Args:
        seed: everything written is a pure function of the arguments; the same seed, the same bytes.
        train_images: training images; each gives ``captions_per_image`` samples with different captions.
        retrieval_images, retrieval_captions: the retrieval set's images and captions per image.
        zeroshot_images: images per class in each zero-shot task.
        image_size: images are square, of this many pixels a side (32 for ``Llip-Tiny``).
        samples_per_shard: training samples per webdataset shard.
        train_format: 'webdataset' (shards) or 'csv' (OpenCLIP's CsvDataset: ``train/train.csv`` and
            ``train/images``; ``open_clip_train --dataset-type csv`` shuffles it with the seeded torch
            generator, where webdataset's sample shuffle is not seeded).
        overwrite: replace a dataset this function wrote into ``output_dir`` before; without it a
            non-empty ``output_dir`` is refused.

    The manifest (also saved as ``output_dir/manifest.json``) holds the paths of what was written,
    relative to ``output_dir``: ``manifest['train']['data']`` and ``['num_samples']`` are
    ``open_clip_train``'s ``--train-data`` (once joined to ``output_dir``) and ``--train-num-samples``.
    """
    counts = {'seed': (seed, 0), 'train_images': (train_images, 1), 'captions_per_image': (captions_per_image, 1),
              'retrieval_images': (retrieval_images, 1), 'retrieval_captions': (retrieval_captions, 1),
              'zeroshot_images': (zeroshot_images, 1), 'image_size': (image_size, MIN_IMAGE_SIZE),
              'samples_per_shard': (samples_per_shard, 1)}
    for name, (value, least) in counts.items():
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f'{name} must be an integer of at least {least}, got {value!r}')
    if train_format not in TRAIN_FORMATS:
        raise ValueError(f'train_format must be one of {TRAIN_FORMATS}, got {train_format!r}')
    for name in ('captions_per_image', 'retrieval_captions'):
        if counts[name][0] > MAX_CAPTIONS_PER_IMAGE:
            raise ValueError(f'{name} must be at most {MAX_CAPTIONS_PER_IMAGE}, got {counts[name][0]}')
    output_dir = Path(output_dir)
    prepare_folder(output_dir, 'manifest.json', GENERATOR, overwrite, NAMES, what='dataset')

    with WrittenFiles(output_dir, NAMES, 'manifest.json', GENERATOR) as written:  # a failed run removes what it wrote
        manifest = {
            'generator': GENERATOR,
            'version': __version__,
            'seed': seed,
            'image_size': image_size,
            'held_out_pairs': sorted(f'{colour} {shape}' for colour, shape in HELD_OUT_PAIRS),
            'train': _write_train(written, seed, train_images, captions_per_image, image_size, samples_per_shard,
                                  train_format),
            'retrieval': _write_retrieval(written, seed, retrieval_images, retrieval_captions, image_size),
            'zeroshot': _write_zeroshot(written, seed, zeroshot_images, image_size),
        }
        # Written last: a directory with a manifest holds a complete dataset; it lists every file written.
        manifest['files'] = dict(written.files)
        written.write_text('manifest.json', json.dumps(manifest, indent=2) + '\n')
    train = manifest['train']
    if train_format == 'csv':
        logging.info(f"train with (from {output_dir / 'train'}): open_clip_train --dataset-type csv --train-data train.csv")
    else:
        logging.info(f"train with: open_clip_train --dataset-type webdataset --train-data '{output_dir / train['data']}' "
                     f"--train-num-samples {train['num_samples']}")
    return manifest

"""Evaluation data on disk, read for ``open_clip_llip.commands.evaluate``; every problem is a clear error.

- **Zero-shot classification**: an ImageFolder (``DIR/<class folder>/<image>``, class folders in
  sorted order, as torchvision's ``ImageFolder``), a class-names file (UTF-8, line i names the
  i-th class folder) and a templates file (one ``str.format`` template with ``{}`` a line);
  blank lines are ignored.
- **Retrieval**: a tab-separated CSV with columns ``filepath`` and ``title`` (OpenCLIP's
  ``CsvDataset`` defaults; one row per caption, rows sharing a ``filepath`` are captions of
  one image, relative paths relative to the CSV's folder), or webdataset shards (``.tar``, or a
  brace pattern such as ``dir/{000..003}.tar``) whose samples hold an image under ``png``,
  ``jpg``, ``jpeg`` or ``webp`` and its captions, one a line, under ``txt``.
"""
import csv
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

CSV_IMAGE_KEY, CSV_CAPTION_KEY, CSV_SEPARATOR = 'filepath', 'title', '\t'
SHARD_IMAGE_EXTENSIONS = ('png', 'jpg', 'jpeg', 'webp')
SHARD_CAPTION_EXTENSION = 'txt'


def read_lines(path: Union[str, Path], what: str) -> List[str]:
    """The non-blank lines of a UTF-8 text file, stripped; errors name the file and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{what} file {path} not found.')
    try:
        lines = [line.strip() for line in path.read_text(encoding='utf-8').splitlines()]
    except UnicodeDecodeError as error:
        raise ValueError(f'{what} file {path} is not UTF-8 text ({error}).') from None
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f'{what} file {path} is empty.')
    return lines


def read_classnames(path: Union[str, Path]) -> List[str]:
    """One class name per line."""
    return read_lines(path, 'Class-names')


def read_templates(path: Union[str, Path]) -> List[str]:
    """One template per line, each with one ``{}`` where the class name goes."""
    templates = read_lines(path, 'Templates')
    for number, template in enumerate(templates, 1):
        try:
            template.format('class name')
            valid = '{}' in template
        except (IndexError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f'Template {number} of {path}, {template!r}, must contain {{}} where the class name goes '
                '(and no other braces).')
    return templates


def load_image(source, name: str) -> Image.Image:
    """An RGB image from a path or file object; a ValueError that names the file when it cannot be decoded."""
    try:
        return Image.open(source).convert('RGB')
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unreadable, truncated or not an image
        raise ValueError(f'Could not read the image {name}: {error}. Replace or remove that file.') from None


def _load_image_file(path: str) -> Image.Image:
    return load_image(path, path)


def zero_shot_dataset(root: Union[str, Path], classnames: List[str], transform: Optional[Callable] = None) -> ImageFolder:
    """torchvision's ``ImageFolder`` of ``root``, checked against the class names (one per class folder)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f'Zero-shot image folder {root} not found.')
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=_load_image_file)
    except FileNotFoundError as error:  # no class folder, or a class folder without images
        raise ValueError(
            f'Zero-shot image folder {root}: {error} It must hold one folder of images per class.') from None
    if len(dataset.classes) != len(classnames):
        shown = ', '.join(dataset.classes[:5]) + (', …' if len(dataset.classes) > 5 else '')
        raise ValueError(
            f'{len(classnames)} class names for {len(dataset.classes)} class folders in {root} ({shown}); '
            'the class-names file needs one line per class folder, in sorted folder order.')
    return dataset


class ShardMember(NamedTuple):
    """Where an image's bytes lie inside an uncompressed tar shard, and the tar member's name."""
    shard: str
    offset: int
    size: int
    name: str


@dataclass
class RetrievalSet:
    """Distinct images and their captions: caption j describes ``images[image_index[j]]``."""
    images: List[Union[str, ShardMember]]
    captions: List[str]
    image_index: torch.Tensor  # [M], long


class RetrievalImages(Dataset):
    """The images of a ``RetrievalSet``, each passed through ``transform``."""

    def __init__(self, images: List[Union[str, ShardMember]], transform: Callable):
        self.images = images
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        source = name = self.images[index]
        if isinstance(source, ShardMember):
            name = f'{source.name} in shard {source.shard}'
            with open(source.shard, 'rb') as file:
                file.seek(source.offset)
                source = io.BytesIO(file.read(source.size))
        return self.transform(load_image(source, name))


def _read_csv(path: Path) -> RetrievalSet:
    images, captions, image_index, numbers = [], [], [], {}
    try:
        with path.open(newline='', encoding='utf-8') as file:
            reader = csv.DictReader(file, delimiter=CSV_SEPARATOR)
            columns = reader.fieldnames or []
            if CSV_IMAGE_KEY not in columns or CSV_CAPTION_KEY not in columns:
                raise ValueError(
                    f'Retrieval CSV {path} has columns {columns}; it needs a tab-separated header with the columns '
                    f'{CSV_IMAGE_KEY!r} (image path) and {CSV_CAPTION_KEY!r} (caption), as OpenCLIP\'s CsvDataset.')
            for row in reader:
                filepath, caption = row[CSV_IMAGE_KEY], row[CSV_CAPTION_KEY]
                if not filepath or caption is None:
                    missing = CSV_CAPTION_KEY if filepath else CSV_IMAGE_KEY
                    raise ValueError(f'Retrieval CSV {path}, line {reader.line_num}: no {missing}.')
                image = str(path.parent / filepath)  # an absolute filepath stays as it is
                if image not in numbers:
                    numbers[image] = len(images)
                    images.append(image)
                image_index.append(numbers[image])
                captions.append(caption)
    except UnicodeDecodeError as error:
        raise ValueError(f'Retrieval CSV {path} is not UTF-8 text ({error}).') from None
    if not captions:
        raise ValueError(f'Retrieval CSV {path} has no rows.')
    missing = [image for image in images if not os.path.isfile(image)]
    if missing:
        raise FileNotFoundError(
            f'Retrieval CSV {path} names {len(missing)} image file(s) that do not exist, e.g. {missing[:3]}; '
            'relative paths are relative to the CSV\'s folder.')
    return RetrievalSet(images, captions, torch.tensor(image_index))


def _shard_paths(pattern: str) -> List[str]:
    from braceexpand import braceexpand
    shards = list(braceexpand(pattern))
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of the {len(shards)} shard(s) of {pattern} not found, e.g. {missing[:3]}.')
    return shards


def _index_shard(shard: str) -> dict:
    """Sample key -> {extension: ``TarInfo``} of an uncompressed tar, in order; captions decoded under 'txt'."""
    from webdataset.tariterators import base_plus_ext  # webdataset's split of a member name into key and extension
    samples = {}
    try:
        with tarfile.open(shard, 'r:') as tar:
            for member in tar:
                key, extension = base_plus_ext(member.name)
                if member.isfile() and key is not None:
                    extension = extension.lower()
                    content = member
                    if extension == SHARD_CAPTION_EXTENSION:
                        content = tar.extractfile(member).read().decode('utf-8')
                    samples.setdefault(key, {})[extension] = content
    except (tarfile.TarError, UnicodeDecodeError) as error:
        raise ValueError(
            f'Could not read shard {shard} as an uncompressed tar of images and UTF-8 captions: {error}') from None
    return samples


def _read_shards(pattern: str) -> RetrievalSet:
    """Index every sample of the shards: images stay on disk, captions are read."""
    try:
        import braceexpand  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as error:
        raise ValueError(f"Reading webdataset shards needs {error.name}: pip install 'open_clip_llip[training]'.") from None
    images, captions, image_index = [], [], []
    for shard in _shard_paths(pattern):
        for key, sample in _index_shard(shard).items():
            image = next((sample[ext] for ext in SHARD_IMAGE_EXTENSIONS if ext in sample), None)
            sample_captions = [line.strip() for line in sample.get(SHARD_CAPTION_EXTENSION, '').splitlines() if line.strip()]
            if image is None:
                raise ValueError(f'Sample {key!r} of shard {shard} has no image ({", ".join(SHARD_IMAGE_EXTENSIONS)}).')
            if not sample_captions:
                raise ValueError(f'Sample {key!r} of shard {shard} has no caption ({SHARD_CAPTION_EXTENSION}).')
            image_index += [len(images)] * len(sample_captions)
            images.append(ShardMember(shard, image.offset_data, image.size, image.name))
            captions += sample_captions
    if not images:
        raise ValueError(f'The shards {pattern} hold no samples.')
    return RetrievalSet(images, captions, torch.tensor(image_index))


def read_retrieval_set(path: str) -> RetrievalSet:
    """A retrieval CSV, or webdataset shards when ``path`` ends with ``.tar`` (a brace pattern allowed)."""
    if path.endswith('.tar'):
        return _read_shards(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Retrieval set {path} not found (a tab-separated CSV, or .tar shards).')
    return _read_csv(Path(path))


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

Every reader reads all of its input or says where it stopped. Faults refused, each naming the file and
the place (CSV line, tar member or byte offset): a CSV line whose quote is left open (it would swallow
the rows after it), a wrong number of fields, an empty image path or caption, an image file that does
not exist; a tar header damaged or cut, a member whose data is cut, a shard without its end-of-archive
marker (cut between members), a sample without its image or its caption, a caption that is not UTF-8;
an image that does not decode (when it is read). With ``skip_bad_samples`` the samples at fault are
left out and counted instead (``RetrievalSet.skipped``, the zero-shot dataset's ``skipped``), and every
image is decoded up front so that one that does not decode is left out too.

Images are read by one function, ``load_image``, as a viewer shows them (``to_rgb``).
"""
import csv
import io
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
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


# Shown transparent pixels are composited on white, as most image viewers show them.
BACKGROUND = (255, 255, 255)
SKIP_HINT = 'Repair or remove it, or pass --skip-bad-samples to leave bad samples out (they are counted).'
IMAGE_HINT = 'Replace or remove that file, or pass --skip-bad-samples to leave it out (it is counted).'


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, the way a viewer shows it.

    EXIF orientation applied; 16-bit (and 32-bit integer) greyscale scaled to 8 bits by ``value >> 8``
    (``convert('RGB')`` would clip it to 255: white); transparency (an alpha band, or a palette's or
    colour's ``tRNS``) composited on ``BACKGROUND``; CMYK, 1-bit, palettes and the rest by Pillow's
    ``convert``.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith('I'):  # I;16, I;16B, I;16L, I;16N, I: integers, 16-bit as PNG stores them
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), 'L')
    if 'A' in image.getbands() or 'a' in image.getbands() or 'transparency' in image.info:
        background = Image.new('RGBA', image.size, BACKGROUND + (255,))
        image = Image.alpha_composite(background, image.convert('RGBA'))
    return image.convert('RGB')


def load_image(source, name: str) -> Image.Image:
    """An RGB image (``to_rgb``) from a path or file object; a ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(source) as image:
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # unreadable, truncated, no image
        raise ValueError(f'Could not read the image {name}: {error}. {IMAGE_HINT}') from None


def _load_image_file(path: str) -> Image.Image:
    return load_image(path, path)


class BadSamples:
    """Each fault in the input either refused (``ValueError`` naming file and place) or, with ``skip``, logged and
    its samples counted in ``count``."""

    def __init__(self, skip: bool = False):
        self.skip, self.count = skip, 0

    def __call__(self, message: str, samples: int = 1):
        if not self.skip:
            raise ValueError(f'{message} {SKIP_HINT}')
        logging.warning(f'Skipped {samples} sample(s): {message}' if samples else f'Reading on past: {message}')
        self.count += samples


def readable_images(images: Sequence[Union[str, 'ShardMember']], bad: BadSamples) -> List[int]:
    """The positions of the images of ``images`` that decode; each other one is a fault of ``bad``."""
    keep = []
    for position, image in enumerate(images):
        try:
            RetrievalImages.read(image)
        except ValueError as error:
            bad(str(error).removesuffix(f' {IMAGE_HINT}'))
            continue
        keep.append(position)
    return keep


def zero_shot_dataset(root: Union[str, Path], classnames: List[str], transform: Optional[Callable] = None,
                      skip_bad_samples: bool = False) -> ImageFolder:
    """torchvision's ``ImageFolder`` of ``root``, checked against the class names (one per class folder).

    With ``skip_bad_samples`` every image is decoded now and those that do not decode are left out:
    the dataset's ``skipped`` counts them (otherwise 0, and a bad image stops the evaluation, named).
    """
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
    dataset.skipped = 0
    if skip_bad_samples:
        bad = BadSamples(skip=True)
        keep = readable_images([path for path, _ in dataset.samples], bad)
        dataset.samples = dataset.imgs = [dataset.samples[i] for i in keep]
        dataset.targets = [dataset.targets[i] for i in keep]
        dataset.skipped = bad.count
        if not keep:
            raise ValueError(f'Zero-shot image folder {root}: no image could be read.')
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
    skipped: int = 0  # samples left out by skip_bad_samples


class RetrievalImages(Dataset):
    """The images of a ``RetrievalSet``, each passed through ``transform``."""

    def __init__(self, images: List[Union[str, ShardMember]], transform: Callable):
        self.images = images
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.read(self.images[index]))

    @staticmethod
    def read(image: Union[str, ShardMember]) -> Image.Image:
        """One image file, or a shard's member, as RGB (``load_image``)."""
        if isinstance(image, ShardMember):
            with open(image.shard, 'rb') as file:
                file.seek(image.offset)
                return load_image(io.BytesIO(file.read(image.size)), f'{image.name} in shard {image.shard}')
        return load_image(image, image)


def group_rows_by_image(paths: Sequence[Union[str, Path]]) -> Tuple[List[int], torch.Tensor]:
    """Rows that name the same image file are captions of one image: -> (the first row of each image, in order of
    appearance; each row's image number [M]). Paths are compared as paths (``a/./b.png`` is ``a/b.png``)."""
    numbers, first_rows = {}, []
    for row, path in enumerate(paths):
        key = Path(path)
        if key not in numbers:
            numbers[key] = len(first_rows)
            first_rows.append(row)
    return first_rows, torch.tensor([numbers[Path(path)] for path in paths], dtype=torch.long)


def _read_csv(path: Path, bad: BadSamples) -> RetrievalSet:
    """The rows of a retrieval CSV, each checked: one line each (a quote left open would swallow the rows after it
    into one caption), as many fields as the header, a filepath, a caption, an image file that exists."""
    rows = []  # (line, image, caption)
    try:
        with path.open(newline='', encoding='utf-8') as file:
            reader = csv.reader(file, delimiter=CSV_SEPARATOR, strict=True)
            try:
                columns = next(reader, [])
            except csv.Error as error:
                raise ValueError(f'Retrieval CSV {path}, line 1 (the header): {error}.') from None
            if CSV_IMAGE_KEY not in columns or CSV_CAPTION_KEY not in columns:
                raise ValueError(
                    f'Retrieval CSV {path} has columns {columns}; it needs a tab-separated header with the columns '
                    f'{CSV_IMAGE_KEY!r} (image path) and {CSV_CAPTION_KEY!r} (caption), as OpenCLIP\'s CsvDataset.')
            image_column, caption_column = columns.index(CSV_IMAGE_KEY), columns.index(CSV_CAPTION_KEY)
            while True:
                first = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:  # strict: a quote inside a quoted field, or a quote left open at the end
                    lines = f'line {first}' if reader.line_num == first else f'lines {first} to {reader.line_num}'
                    bad(f'Retrieval CSV {path}, {lines}: {error} (an unbalanced quote?). '
                        'A field that starts with " must end with "; a " inside it is written "".',
                        samples=reader.line_num - first + 1)
                    continue
                lines = reader.line_num - first + 1
                place = f'Retrieval CSV {path}, line {first}'
                if not row:  # a blank line
                    continue
                if lines > 1:
                    bad(f'{place}: a quoted field runs over {lines} lines, to line {reader.line_num}: a quote (") '
                        'opens a field that is closed lines later (an unbalanced quote?). Captions are one line; '
                        'a field that starts with " must end with " on its line, a " inside it is written "".',
                        samples=lines)
                elif len(row) != len(columns):
                    bad(f'{place}: {len(row)} tab-separated field(s) for the header\'s {len(columns)} columns.')
                elif not row[image_column].strip():
                    bad(f'{place}: no {CSV_IMAGE_KEY} (image path).')
                elif not row[caption_column].strip():
                    bad(f'{place}: no {CSV_CAPTION_KEY} (an empty caption).')
                else:
                    rows.append((first, str(path.parent / row[image_column]), row[caption_column]))
    except UnicodeDecodeError as error:
        raise ValueError(f'Retrieval CSV {path} is not UTF-8 text ({error}).') from None
    missing = [(line, image) for line, image, _ in rows if not os.path.isfile(image)]
    if missing:
        shown = '; '.join(f'line {line}: {image}' for line, image in missing[:3])
        message = (f'Retrieval CSV {path} names {len(missing)} image file(s) that do not exist ({shown}); relative '
                   'paths are relative to the CSV\'s folder.')
        bad(message, samples=len(missing))
        rows = [row for row in rows if os.path.isfile(row[1])]
    if not rows:
        raise ValueError(f'Retrieval CSV {path} has no rows' + (' that could be read.' if bad.count else '.'))
    paths = [image for _, image, _ in rows]  # an absolute filepath stays as it is
    first_rows, image_index = group_rows_by_image(paths)
    return RetrievalSet([paths[row] for row in first_rows], [caption for _, _, caption in rows], image_index)


def _shard_paths(pattern: str) -> List[str]:
    from braceexpand import braceexpand
    shards = list(braceexpand(pattern))
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of the {len(shards)} shard(s) of {pattern} not found, e.g. {missing[:3]}.')
    return shards


def _tar_run(file, start: int) -> Tuple[List[tarfile.TarInfo], int, Optional[Exception]]:
    """The tar members from byte ``start`` on, until ``tarfile`` stops: (members, the byte offset where it
    stopped, its error). ``tarfile`` stops silently at a damaged header after the first one: the caller checks
    what lies at that offset."""
    file.seek(start)
    members = []
    try:
        tar = tarfile.TarFile(fileobj=file, mode='r')  # reads the first header
    except tarfile.TarError as error:
        return members, start, error
    try:
        while (member := tar.next()) is not None:
            members.append(member)
    except tarfile.TarError as error:  # "unexpected end of data": the previous member's data is cut
        return members, tar.offset, error
    return members, tar.offset, None


def _next_header(file, offset: int, size: int) -> Optional[int]:
    """The byte offset of the first 512-byte block from ``offset`` on that is a valid tar header (its checksum
    right), or None."""
    for position in range(offset, size - tarfile.BLOCKSIZE + 1, tarfile.BLOCKSIZE):
        file.seek(position)
        try:
            tarfile.TarInfo.frombuf(file.read(tarfile.BLOCKSIZE), 'utf-8', 'surrogateescape')
        except tarfile.HeaderError:
            continue
        return position
    return None


def _zeros_to_end(file, offset: int, chunk: int = 1 << 20) -> bool:
    """Whether the file holds only zero bytes from ``offset`` on (a tar's end-of-archive marker and padding)."""
    file.seek(offset)
    while block := file.read(chunk):
        if block.strip(b'\0'):
            return False
    return True


def _shard_members(shard: str, bad: BadSamples) -> Tuple[List[tarfile.TarInfo], Optional[tarfile.TarInfo]]:
    """Every whole member of an uncompressed tar, checked to its end-of-archive marker (two zero blocks), and the
    member whose data is cut, if any.

    A header that is damaged or cut, a member whose data is cut, or a file that ends without the marker is a
    fault of ``bad``; skipped, reading goes on at the next valid header.
    """
    size, members, start = os.path.getsize(shard), [], 0
    with open(shard, 'rb') as file:
        while True:
            run, stop, error = _tar_run(file, start)
            members += run
            after = f'after member {members[-1].name!r}' if members else 'before any member'
            if members and members[-1].offset_data + members[-1].size > size:
                cut = members.pop()
                bad(f'Shard {shard}: member {cut.name!r} is cut: its header gives {cut.size} bytes from byte offset '
                    f'{cut.offset_data}, the file ends at byte {size}.', samples=0)
                return members, cut
            zeros = _zeros_to_end(file, stop)
            if stop >= size or zeros and size - stop < 2 * tarfile.BLOCKSIZE:
                bad(f'Shard {shard} ends {after} without the end-of-archive marker: the file was cut at byte '
                    f'{size}.', samples=0)
                return members, None
            if zeros:
                return members, None
            what = 'cut inside a tar header' if size - stop < tarfile.BLOCKSIZE else 'a damaged tar header'
            start_of = 'Could not read shard {} as an uncompressed tar of images and UTF-8 captions:' if stop == 0 \
                else 'Shard {}:'
            bad(f'{start_of.format(shard)} {what} at byte offset {stop}, {after}' + (f' ({error})' if error else '')
                + '.', samples=0)
            start = _next_header(file, stop + tarfile.BLOCKSIZE, size)
            if start is None:
                return members, None
            logging.warning(f'Shard {shard}: reading on from the next valid header, at byte offset {start}.')


def _read_shard(shard: str, bad: BadSamples) -> List[Tuple[ShardMember, List[str]]]:
    """(image, captions) of each sample of a shard, in order; a sample without an image or a caption is a fault."""
    from webdataset.tariterators import base_plus_ext  # webdataset's split of a member name into key and extension
    samples = {}
    members, cut = _shard_members(shard, bad)
    for member in members:
        key, extension = base_plus_ext(member.name)
        if member.isfile() and key is not None:
            samples.setdefault(key, {})[extension.lower()] = member
    cut_key = None if cut is None else base_plus_ext(cut.name)[0]
    if cut_key is not None:
        samples.setdefault(cut_key, {})
    read = []
    with open(shard, 'rb') as file:
        for key, sample in samples.items():
            image = next((sample[ext] for ext in SHARD_IMAGE_EXTENSIONS if ext in sample), None)
            text = sample.get(SHARD_CAPTION_EXTENSION)
            place = f'Sample {key!r} of shard {shard}'
            if key == cut_key:
                bad(f'{place}: its member {cut.name!r} is cut.')
                continue
            if image is None:
                bad(f'{place} has no image ({", ".join(SHARD_IMAGE_EXTENSIONS)}).')
                continue
            if text is None:
                bad(f'{place} has no caption ({SHARD_CAPTION_EXTENSION}).')
                continue
            file.seek(text.offset_data)
            try:
                captions = [line.strip() for line in file.read(text.size).decode('utf-8').splitlines() if line.strip()]
            except UnicodeDecodeError as error:
                bad(f'{place}: its caption {text.name!r} (byte offset {text.offset_data}) is not UTF-8 text ({error}).')
                continue
            if not captions:
                bad(f'{place} has no caption ({SHARD_CAPTION_EXTENSION}): {text.name!r} is blank.')
                continue
            read.append((ShardMember(shard, image.offset_data, image.size, image.name), captions))
    return read


def _read_shards(pattern: str, bad: BadSamples) -> RetrievalSet:
    """Index every sample of the shards: images stay on disk, captions are read."""
    try:
        import braceexpand  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as error:
        raise ValueError(f"Reading webdataset shards needs {error.name}: pip install 'open_clip_llip[training]'.") from None
    images, captions, image_index = [], [], []
    for shard in _shard_paths(pattern):
        for image, sample_captions in _read_shard(shard, bad):
            image_index += [len(images)] * len(sample_captions)
            images.append(image)
            captions += sample_captions
    if not images:
        raise ValueError(f'The shards {pattern} hold no samples' + (' that could be read.' if bad.count else '.'))
    return RetrievalSet(images, captions, torch.tensor(image_index))


def read_retrieval_set(path: str, skip_bad_samples: bool = False) -> RetrievalSet:
    """A retrieval CSV, or webdataset shards when ``path`` ends with ``.tar`` (a brace pattern allowed), read whole.

    Any fault (the module docstring lists them) is a ValueError that names the file and the place. With
    ``skip_bad_samples`` the samples at fault are left out instead, each logged, their number in ``skipped``
    (CSV: rows; shards: samples); every image is then decoded now, and one that does not decode is left out
    with its captions.
    """
    bad = BadSamples(skip_bad_samples)
    if path.endswith('.tar'):
        retrieval_set = _read_shards(path, bad)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f'Retrieval set {path} not found (a tab-separated CSV, or .tar shards).')
    else:
        retrieval_set = _read_csv(Path(path), bad)
    if skip_bad_samples:
        keep = readable_images(retrieval_set.images, bad)
        if not keep:
            raise ValueError(f'Retrieval set {path}: no image could be read.')
        number = torch.full((len(retrieval_set.images),), -1, dtype=torch.long)
        number[keep] = torch.arange(len(keep))
        kept = number[retrieval_set.image_index] >= 0
        retrieval_set = RetrievalSet([retrieval_set.images[i] for i in keep],
                                     [c for c, k in zip(retrieval_set.captions, kept.tolist()) if k],
                                     number[retrieval_set.image_index][kept])
    retrieval_set.skipped = bad.count
    return retrieval_set

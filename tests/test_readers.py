"""The readers read all of their input or say where they stopped, and read every image as a viewer shows it.

Each fault is refused with the file and the place (tar byte offset or member, CSV line), and with
``skip_bad_samples`` left out and counted; each image mode is compared with a plain conversion written here.
"""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from open_clip_llip.commands.evaluate import main as evaluate_main
from open_clip_llip.commands.index import main as index_main
from open_clip_llip.evaluation.readers import RetrievalImages, read_retrieval_set, zero_shot_dataset
from open_clip_llip.search.index import list_images

SAMPLES = 5


def png_bytes(seed, size=(24, 20)):
    """A noisy RGB PNG: big enough (several 512-byte blocks) to cut inside its data."""
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)).save(image, 'PNG')
    return image.getvalue()


def write_shard(path, samples=SAMPLES):
    """Samples ``sample{i}`` of a png and a txt; returns {member name: TarInfo} with byte offsets."""
    with tarfile.open(path, 'w') as tar:
        for i in range(samples):
            for name, content in ((f'sample{i}.png', png_bytes(i)), (f'sample{i}.txt', f'caption {i}\n'.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    with tarfile.open(path) as tar:
        return {member.name: member for member in tar}


def cut(path, length):
    path.write_bytes(path.read_bytes()[:length])


def overwrite(path, offset, garbage):
    data = bytearray(path.read_bytes())
    data[offset:offset + len(garbage)] = garbage
    path.write_bytes(bytes(data))


# How a shard is damaged -> the message (file and place) and the captions that survive with skip_bad_samples.
# One sample loses a member (it is skipped and counted); the samples after a cut are gone with the file's end
# (their number cannot be known: the message says where the file was cut).
SHARD_FAULTS = {
    'cut inside a header': (
        lambda path, m: cut(path, m['sample2.txt'].offset + 100),
        lambda m: rf"cut inside a tar header at byte offset {m['sample2.txt'].offset}, after member 'sample2.png'",
        [0, 1]),
    'cut inside member data': (
        lambda path, m: cut(path, m['sample2.txt'].offset_data + 3),
        lambda m: rf"member 'sample2.txt' is cut: its header gives 10 bytes from byte offset "
                  rf"{m['sample2.txt'].offset_data}",
        [0, 1]),
    'cut inside member data at a block boundary': (
        lambda path, m: cut(path, m['sample2.png'].offset_data + 512),
        lambda m: rf"member 'sample2.png' is cut: its header gives {m['sample2.png'].size} bytes",
        [0, 1]),
    'cut at a block boundary between members': (
        lambda path, m: cut(path, m['sample2.txt'].offset),
        lambda m: r"ends after member 'sample2.png' without the end-of-archive marker: the file was cut at byte",
        [0, 1]),
    'a header overwritten by a random block': (
        lambda path, m: overwrite(path, m['sample2.png'].offset,
                                  np.random.default_rng(0).integers(1, 256, 512, dtype=np.uint8).tobytes()),
        lambda m: rf"a damaged tar header at byte offset {m['sample2.png'].offset}, after member 'sample1.txt'",
        [0, 1, 3, 4]),  # read on from the next valid header
    'a header overwritten by zeros': (
        lambda path, m: overwrite(path, m['sample2.txt'].offset, bytes(512)),
        lambda m: rf"a damaged tar header at byte offset {m['sample2.txt'].offset}, after member 'sample2.png'",
        [0, 1, 3, 4]),
    'the first header overwritten': (
        lambda path, m: overwrite(path, 0, b'garbage' * 73),
        lambda m: r"Could not read shard .* as an uncompressed tar of images and UTF-8 captions: a damaged tar header "
                  r"at byte offset 0, before any member",
        [1, 2, 3, 4]),  # sample 0 lost its png
}


@pytest.mark.parametrize('fault', SHARD_FAULTS)
def test_a_damaged_shard_is_refused_with_the_place_and_skipped_and_counted_with_the_flag(tmp_path, fault):
    damage, message, survivors = SHARD_FAULTS[fault]
    path = tmp_path / 'shard.tar'
    members = write_shard(path)
    damage(path, members)
    with pytest.raises(ValueError, match=message(members)) as refused:
        read_retrieval_set(str(path))
    assert str(path) in str(refused.value) and '--skip-bad-samples' in str(refused.value)

    retrieval_set = read_retrieval_set(str(path), skip_bad_samples=True)
    assert retrieval_set.captions == [f'caption {i}' for i in survivors]
    assert retrieval_set.skipped == 1
    assert [image.name for image in retrieval_set.images] == [f'sample{i}.png' for i in survivors]
    read = RetrievalImages(retrieval_set.images, np.asarray)
    assert all(np.array_equal(read[k], np.asarray(Image.open(io.BytesIO(png_bytes(i)))))
               for k, i in enumerate(survivors))


@pytest.mark.parametrize('members, message', [
    (['sample0.png', 'sample0.txt', 'sample1.png'], r"Sample 'sample1' of shard .* has no caption \(txt\)"),
    (['sample0.txt', 'sample0.png', 'sample1.txt'], r"Sample 'sample1' of shard .* has no image"),
])
def test_a_member_without_its_pair_is_refused_and_skipped_and_counted_with_the_flag(tmp_path, members, message):
    path = tmp_path / 'shard.tar'
    with tarfile.open(path, 'w') as tar:
        for name in members:
            content = png_bytes(0) if name.endswith('png') else b'a caption'
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    with pytest.raises(ValueError, match=message):
        read_retrieval_set(str(path))
    retrieval_set = read_retrieval_set(str(path), skip_bad_samples=True)
    assert (retrieval_set.captions, retrieval_set.skipped) == (['a caption'], 1)


def test_an_undecodable_image_in_a_shard_is_skipped_and_counted_with_its_captions(tmp_path):
    path = tmp_path / 'shard.tar'
    members = write_shard(path)
    overwrite(path, members['sample3.png'].offset_data, b'\0' * 64)  # the PNG signature and header gone
    assert len(read_retrieval_set(str(path)).images) == SAMPLES  # the structure is whole: read when decoded
    retrieval_set = read_retrieval_set(str(path), skip_bad_samples=True)
    assert retrieval_set.captions == ['caption 0', 'caption 1', 'caption 2', 'caption 4']
    assert retrieval_set.image_index.tolist() == [0, 1, 2, 3] and retrieval_set.skipped == 1


@pytest.fixture
def images(tmp_path):
    """Four image files a.png … d.png."""
    for i, name in enumerate('abcd'):
        (tmp_path / f'{name}.png').write_bytes(png_bytes(i))
    return tmp_path


# A CSV line that is wrong -> the message, the captions that survive, the rows skipped.
CSV_FAULTS = {
    'a quote left open to the end of the file': (
        'a.png\tone\nb.png\t"a big dog\nc.png\tthree\nd.png\tfour\n',
        r'lines 3 to 5: unexpected end of data \(an unbalanced quote\?\)', ['one'], 3),
    'a quote closed lines later': (
        'a.png\tone\nb.png\t"a big dog\nc.png\tthree"\nd.png\tfour\n',
        r'line 3: a quoted field runs over 2 lines, to line 4', ['one', 'four'], 2),
    'a quote inside a quoted field': (
        'a.png\tone\nb.png\t"a big" dog\nc.png\tthree\n',
        r"line 3: '\t' expected after '\"' \(an unbalanced quote\?\)", ['one', 'three'], 1),
    'too many fields': ('a.png\tone\nb.png\ttwo\textra\nc.png\tthree\n',
                        r"line 3: 3 tab-separated field\(s\) for the header's 2 columns", ['one', 'three'], 1),
    'too few fields': ('a.png\tone\nb.png two\nc.png\tthree\n',
                       r"line 3: 1 tab-separated field\(s\) for the header's 2 columns", ['one', 'three'], 1),
    'an empty caption': ('a.png\tone\nb.png\t  \nc.png\tthree\n', r'line 3: no title \(an empty caption\)',
                         ['one', 'three'], 1),
    'an empty image path': ('a.png\tone\n\ttwo\nc.png\tthree\n', r'line 3: no filepath', ['one', 'three'], 1),
    'a missing image file': ('a.png\tone\nmissing.png\ttwo\nc.png\tthree\n',
                             r'names 1 image file\(s\) that do not exist \(line 3: .*missing.png\)', ['one', 'three'], 1),
}


@pytest.mark.parametrize('fault', CSV_FAULTS)
def test_a_bad_csv_line_is_refused_with_its_line_and_skipped_and_counted_with_the_flag(images, fault):
    rows, message, survivors, skipped = CSV_FAULTS[fault]
    path = images / 'set.csv'
    path.write_text('filepath\ttitle\n' + rows)
    with pytest.raises(ValueError, match=message) as refused:
        read_retrieval_set(str(path))
    assert f'Retrieval CSV {path}' in str(refused.value)
    retrieval_set = read_retrieval_set(str(path), skip_bad_samples=True)
    assert (retrieval_set.captions, retrieval_set.skipped) == (survivors, skipped)


def test_quotes_that_open_and_close_on_their_line_are_read_as_openclip_reads_them(images):
    path = images / 'set.csv'
    path.write_text('title\tfilepath\n"a ""big"" dog"\ta.png\na "quoted" word\tb.png\n\n')
    retrieval_set = read_retrieval_set(str(path))
    assert retrieval_set.captions == ['a "big" dog', 'a "quoted" word'] and retrieval_set.skipped == 0


CORRUPT_IMAGES = {
    'empty.png': b'',
    'text.jpg': b'not an image at all',
    'truncated.png': png_bytes(7)[:200],
    'header-only.jpg': None,  # a JPEG cut after its header
}


def write_corrupt_images(folder):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, 'JPEG')
    for name, content in CORRUPT_IMAGES.items():
        (folder / name).write_bytes(jpeg.getvalue()[:400] if content is None else content)


def test_corrupt_images_in_a_folder_are_named_and_skipped_and_counted_with_the_flag(images):
    write_corrupt_images(images)
    names, sources, skipped = list_images(images)
    assert skipped == 0 and len(sources) == 4 + len(CORRUPT_IMAGES)
    read = RetrievalImages(sources, np.asarray)
    for position, name in enumerate(names):
        if Path(name).name in CORRUPT_IMAGES:
            with pytest.raises(ValueError, match=rf'Could not read the image .*{Path(name).name}: .*--skip-bad-samples'):
                read[position]
    names, sources, skipped = list_images(images, skip_bad_samples=True)
    assert [Path(name).name for name in names] == ['a.png', 'b.png', 'c.png', 'd.png'] and skipped == len(CORRUPT_IMAGES)


def test_corrupt_images_of_a_zero_shot_folder_are_named_and_skipped_and_counted_with_the_flag(tmp_path):
    for c, folder in enumerate(['cat', 'dog']):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'good.png').write_bytes(png_bytes(c))
    write_corrupt_images(tmp_path / 'dog')
    dataset = zero_shot_dataset(tmp_path, ['cat', 'dog'])
    assert dataset.skipped == 0 and len(dataset) == 2 + len(CORRUPT_IMAGES)
    with pytest.raises(ValueError, match=r'Could not read the image .*dog/empty.png'):
        [dataset[i] for i in range(len(dataset))]
    dataset = zero_shot_dataset(tmp_path, ['cat', 'dog'], skip_bad_samples=True)
    assert dataset.skipped == len(CORRUPT_IMAGES) and dataset.targets == [0, 1]
    assert [Path(path).name for path, _ in dataset.samples] == ['good.png', 'good.png']


def test_eval_refuses_a_cut_shard_naming_the_place_and_with_the_flag_reports_the_count(checkpoint, tmp_path, capsys):
    path = tmp_path / 'shard.tar'
    members = write_shard(path)
    cut(path, members['sample2.txt'].offset)
    args = ['--model', 'Llip-Tiny', '--pretrained', str(checkpoint), '--workers', '0', '--retrieval', str(path)]
    with pytest.raises(SystemExit, match=r"shard.tar ends after member 'sample2.png' without the end-of-archive"):
        evaluate_main(args)
    evaluate_main([*args, '--skip-bad-samples', '--json', str(tmp_path / 'out.json')])
    results = json.loads((tmp_path / 'out.json').read_text())
    assert results['skipped_samples'] == {str(path): 1}
    assert results['results'][0]['num_images'] == 2
    assert f'Skipped 1 bad sample(s) of {path}' in capsys.readouterr().out


def test_index_build_refuses_a_corrupt_image_and_with_the_flag_records_the_count(checkpoint, images, tmp_path, capsys):
    (images / 'broken.png').write_bytes(png_bytes(9)[:150])
    args = ['build', str(tmp_path / 'index'), '--images', str(images), '--model', 'Llip-Tiny', '--pretrained',
            str(checkpoint), '--workers', '0', '--device', 'cpu']
    with pytest.raises(SystemExit, match=r'Could not read the image .*broken.png'):
        index_main(args)
    assert not (tmp_path / 'index' / 'index.json').exists()
    index_main([*args, '--skip-bad-samples'])
    manifest = json.loads((tmp_path / 'index' / 'index.json').read_text())
    assert (manifest['count'], manifest['skipped_samples']) == (4, 1)
    assert 'Skipped 1 bad sample(s)' in capsys.readouterr().out


# Image modes: each image built with numpy, saved, read through the package (the index build's and the retrieval
# readers' RetrievalImages, and the zero-shot ImageFolder), and compared with the plain conversion written here.
RNG = np.random.default_rng(3)
SIZE = (12, 16)  # rows, columns: not square, so that a rotation shows


def on_white(colour, alpha):
    """Plain alpha compositing on white: colour [..., C] and alpha [...] in 0..255 -> uint8 [..., C]."""
    alpha = alpha[..., None] / 255.
    return np.rint(colour * alpha + 255. * (1. - alpha)).astype(np.uint8)


def grey(values):
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def sixteen_bit_png(path):
    values = RNG.integers(0, 65536, SIZE, dtype=np.uint16)
    Image.fromarray(values).save(path)  # mode I;16
    return grey(values >> 8)


def thirty_two_bit_integer_tiff(path):
    values = RNG.integers(0, 65536, SIZE).astype(np.int32)
    Image.fromarray(values).save(path)  # mode I
    return grey(values >> 8)


def one_bit_png(path):
    values = RNG.random(SIZE) > .5
    Image.fromarray(values).save(path)  # mode 1
    return grey(values * 255)


def palette_png_with_transparency(path):
    palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
    alpha = np.array([255, 0, 128, 30])
    indices = RNG.integers(0, 4, SIZE, dtype=np.uint8)
    image = Image.fromarray(indices, 'P')
    image.putpalette(palette.flatten().tolist())
    image.save(path, transparency=bytes(alpha.tolist()))  # a tRNS chunk: one alpha per palette entry
    return on_white(palette[indices].astype(float), alpha[indices])


def cmyk_jpeg(path):
    Image.fromarray(RNG.integers(0, 256, SIZE + (4,), dtype=np.uint8), 'CMYK').save(path, quality=95)
    c, m, y, k = np.moveaxis(np.asarray(Image.open(path), dtype=float), -1, 0)  # as decoded, before any conversion
    return np.rint(np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255)


def exif_rotated_jpeg(orientation, turns):
    """A JPEG whose EXIF says how to turn it: ``turns`` counter-clockwise quarter turns show it upright."""
    def write(path):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(RNG.integers(0, 256, SIZE + (3,), dtype=np.uint8)).save(path, exif=exif.tobytes())
        with Image.open(path) as stored:  # the stored pixels, not turned
            return np.rot90(np.asarray(stored), turns)
    return write


def greyscale_with_alpha_png(path):
    values = RNG.integers(0, 256, SIZE + (2,), dtype=np.uint8)
    Image.fromarray(values, 'LA').save(path)
    return grey(on_white(values[..., :1].astype(float), values[..., 1].astype(float))[..., 0])


def rgba_png(path):
    values = RNG.integers(0, 256, SIZE + (4,), dtype=np.uint8)
    Image.fromarray(values, 'RGBA').save(path)
    return on_white(values[..., :3].astype(float), values[..., 3].astype(float))


def rgb_png_with_a_transparent_colour(path):
    values = RNG.integers(0, 4, SIZE + (3,), dtype=np.uint8) * 60
    transparent = (60, 0, 120)
    values[0, :3] = transparent
    Image.fromarray(values).save(path, transparency=transparent)  # a tRNS chunk: this colour is transparent
    return np.where((values == transparent).all(-1, keepdims=True), np.uint8(255), values)


IMAGE_MODES = {
    'RGB PNG with a transparent colour (tRNS)': ('png', rgb_png_with_a_transparent_colour, 0),
    '16-bit greyscale PNG (I;16)': ('png', sixteen_bit_png, 0),
    '32-bit integer TIFF (I)': ('tif', thirty_two_bit_integer_tiff, 0),
    '1-bit PNG (1)': ('png', one_bit_png, 0),
    'palette PNG with tRNS (P)': ('png', palette_png_with_transparency, 1),
    'CMYK JPEG': ('jpg', cmyk_jpeg, 1),
    'JPEG turned 180 degrees by EXIF': ('jpg', exif_rotated_jpeg(3, 2), 0),
    'JPEG turned 90 degrees clockwise by EXIF': ('jpg', exif_rotated_jpeg(6, -1), 0),
    'JPEG turned 90 degrees counter-clockwise by EXIF': ('jpg', exif_rotated_jpeg(8, 1), 0),
    'greyscale with alpha PNG (LA)': ('png', greyscale_with_alpha_png, 1),
    'RGBA PNG': ('png', rgba_png, 1),
}


@pytest.mark.parametrize('mode', IMAGE_MODES)
def test_every_image_mode_is_read_as_a_viewer_shows_it(tmp_path, mode):
    extension, write, tolerance = IMAGE_MODES[mode]
    (tmp_path / 'class').mkdir()
    path = tmp_path / 'class' / f'image.{extension}'
    expected = write(path)
    index_build = RetrievalImages([str(path)], np.asarray)[0]
    zero_shot = np.asarray(zero_shot_dataset(tmp_path, ['class'])[0][0])
    for read in (index_build, zero_shot):
        assert read.dtype == np.uint8 and read.shape == expected.shape
        assert np.abs(read.astype(int) - expected.astype(int)).max() <= tolerance
    assert np.ptp(expected) > 0  # the test image is not one colour (a white image would not be caught)

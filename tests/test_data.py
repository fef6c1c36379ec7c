"""Built-in scenes data: determinism, true captions, held-out pairs, and readability by OpenCLIP and torchvision.

Captions are checked by an oracle written here, independently of ``open_clip_llip.data``: it
parses a caption's text and evaluates it on the objects of a scene.
"""
import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from open_clip_train.data import CsvDataset, get_dataset_size, get_wds_dataset
from open_clip_train.main import main as open_clip_train_main
from PIL import Image
from torchvision.datasets import ImageFolder

from open_clip_llip.commands.data import main as data_main
from open_clip_llip.data import gallery, write_dataset
from open_clip_llip.data.captions import sample_captions
from open_clip_llip.data.classification import ZERO_SHOT_TASKS
from open_clip_llip.data.gallery import sample_retrieval_set
from open_clip_llip.data.render import png_bytes, render
from open_clip_llip.data.scenes import ALL_PAIRS, COLOURS, Scene, rng_for, sample_scene

TINY = dict(train_images=24, captions_per_image=4, retrieval_images=12, retrieval_captions=3, zeroshot_images=2,
            samples_per_shard=40)
HELD_OUT = {('red', 'circle'), ('blue', 'circle'), ('red', 'square'), ('blue', 'square')}


# The oracle: the caption grammar, as regular expressions, and its meaning on a scene's objects.
_COLOUR = 'red|green|blue|yellow|purple|cyan'
_SHAPE = 'circle|square|triangle|cross|shape'
_POSITION = {'at the top': (0, None), 'at the bottom': (2, None), 'on the left': (None, 0), 'on the right': (None, 2),
             'at the top left': (0, 0), 'at the top right': (0, 2), 'at the bottom left': (2, 0),
             'at the bottom right': (2, 2), 'in the centre': (1, 1)}
_RELATION = {
    'to the left of': lambda a, b: a['column'] < b['column'],
    'to the right of': lambda a, b: a['column'] > b['column'],
    'above': lambda a, b: a['row'] < b['row'],
    'below': lambda a, b: a['row'] > b['row'],
    'bigger than': lambda a, b: a['size'] == 'large' and b['size'] == 'small',
    'smaller than': lambda a, b: a['size'] == 'small' and b['size'] == 'large',
}
_NUMBER = {'one': 1, 'two': 2, 'three': 3, 'four': 4}


def _phrase(tag, plural=False):
    noun = rf'(?P<{tag}shape>{_SHAPE})' + ('(?:e?s)?' if plural else '')
    return rf'(?:(?P<{tag}size>small|large) )?(?:(?P<{tag}colour>{_COLOUR}) )?{noun}'


_OBJECT = re.compile(rf'a {_phrase("a")}(?: (?P<position>{"|".join(_POSITION)}))?')
_RELATIONAL = re.compile(rf'a {_phrase("a")} (?P<relation>{"|".join(_RELATION)}) a {_phrase("b")}')
_COUNT = re.compile(rf'(?P<number>{"|".join(_NUMBER)}) {_phrase("a", plural=True)}')


def _description(match, tag):
    shape = match[f'{tag}shape']
    return {'shape': None if shape == 'shape' else shape, 'colour': match[f'{tag}colour'], 'size': match[f'{tag}size']}


def _fits(obj, description, position=None):
    if any(value is not None and obj[key] != value for key, value in description.items()):
        return False
    row, column = _POSITION[position] if position else (None, None)
    return (row is None or obj['row'] == row) and (column is None or obj['column'] == column)


def parse(text):
    """A caption's text -> (kind, descriptions, truth function of a list of object dicts)."""
    if match := _OBJECT.fullmatch(text):
        a = _description(match, 'a')
        return 'object', [a], lambda objects: any(_fits(o, a, match['position']) for o in objects)
    if match := _RELATIONAL.fullmatch(text):
        a, b, relation = _description(match, 'a'), _description(match, 'b'), _RELATION[match['relation']]
        return 'relation', [a, b], lambda objects: any(
            _fits(x, a) and _fits(y, b) and relation(x, y) for i, x in enumerate(objects) for j, y in enumerate(objects)
            if i != j)
    if match := _COUNT.fullmatch(text):
        a, number = _description(match, 'a'), _NUMBER[match['number']]
        assert (number > 1) == (text.endswith('s') and not text.endswith(' cross')), f'wrong number in {text!r}'
        return 'count', [a], lambda objects: sum(_fits(o, a) for o in objects) == number
    raise AssertionError(f'caption outside the grammar: {text!r}')


def true_of(text, objects):
    return parse(text)[2](objects)


def names_held_out(text):
    return any((d['colour'], d['shape']) in HELD_OUT for d in parse(text)[1])


def objects_of(scene: Scene):
    return scene.to_dict()['objects']


def random_scenes(count, seed=0):
    rngs = [rng_for(seed, 'train', i) for i in range(count)]
    return [sample_scene(rng, 1 + i % 4, ALL_PAIRS) for i, rng in enumerate(rngs)], rngs


# The oracle itself must be able to fail.
def test_oracle_rejects_false_captions():
    objects = [{'shape': 'circle', 'colour': 'red', 'size': 'large', 'row': 0, 'column': 0},
               {'shape': 'cross', 'colour': 'cyan', 'size': 'small', 'row': 2, 'column': 1}]
    assert true_of('a large red circle at the top left', objects)
    assert true_of('a cyan cross to the right of a circle', objects)
    assert true_of('two shapes', objects) and true_of('one cross', objects)
    for text in ('a red circle at the bottom', 'a small red circle', 'a cross to the left of a circle',
                 'a circle smaller than a shape', 'three shapes', 'two circles', 'a red square'):
        assert not true_of(text, objects), text
    with pytest.raises(AssertionError, match='outside the grammar'):
        parse('a circle near a cross')


def test_captions_are_true_different_and_agree_with_the_oracle():
    scenes, rngs = random_scenes(400)
    kinds = Counter()
    for index, (scene, rng) in enumerate(zip(scenes, rngs)):
        captions = sample_captions(scene, 5, rng)
        texts = [c.text for c in captions]
        assert len(set(texts)) == 5, texts
        for caption in captions:
            kinds[caption.kind] += 1
            assert parse(caption.text)[0] == caption.kind
            assert caption.holds(scene) and true_of(caption.text, objects_of(scene)), (caption.text, scene)
            # Against another scene the model's truth and the oracle's agree, false ones included.
            other = scenes[(index + 1) % len(scenes)]
            assert caption.holds(other) == true_of(caption.text, objects_of(other)), (caption.text, other)
    assert min(kinds.values()) > 100, kinds


def test_captions_of_one_image_focus_on_different_objects():
    """With as many captions as objects, object captions of one image rarely all name the same object."""
    scenes, rngs = random_scenes(300, seed=1)
    spread = []
    for scene, rng in zip(scenes, rngs):
        if len(scene.objects) >= 3:
            named = [{i for i, o in enumerate(objects_of(scene)) if _fits(o, parse(c.text)[1][0])}
                     for c in sample_captions(scene, len(scene.objects), rng) if c.kind == 'object']
            unique = [next(iter(n)) for n in named if len(n) == 1]
            if len(unique) >= 2:
                spread.append(len(set(unique)) == len(unique))
    assert len(spread) > 20 and np.mean(spread) > 0.9, np.mean(spread)


def test_renderer_draws_each_object_in_its_cell():
    scenes, _ = random_scenes(50, seed=2)
    for scene in scenes:
        pixels = np.asarray(render(scene, 64)).astype(int)
        cell = 64 / 3
        occupied = {(o.row, o.column) for o in scene.objects}
        for obj in scene.objects:
            x = int((obj.column + 0.5 + obj.offset[0]) * cell)
            y = int((obj.row + 0.5 + obj.offset[1]) * cell)
            expected = np.clip(np.add(COLOURS[obj.colour], obj.tint), 0, 255)
            assert np.abs(pixels[y, x] - expected).max() <= 1, (obj, pixels[y, x])
        for row, column in {(r, c) for r in range(3) for c in range(3)} - occupied:
            rows, columns = (slice(math.ceil(i * cell), math.floor((i + 1) * cell)) for i in (row, column))
            patch = pixels[rows, columns]
            assert (patch.max(axis=-1) == patch.min(axis=-1)).all(), 'an empty cell is not grey'


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp('scenes') / 'data'
    manifest = write_dataset(folder, seed=0, **TINY)
    return folder, manifest


def read_shards(folder, manifest):
    """[(key, png bytes, text, metadata)] in shard order."""
    samples = []
    for shard in sorted(folder.glob('train-*.tar')):
        members = defaultdict(dict)
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split('.', 1)
                members[key][ext] = tar.extractfile(member).read()
        samples += [(k, m['png'], m['txt'].decode(), json.loads(m['json'])) for k, m in members.items()]
    return samples


def all_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    folder, _ = dataset
    write_dataset(tmp_path / 'again', seed=0, **TINY)
    write_dataset(tmp_path / 'other', seed=1, **TINY)
    first, again, other = all_files(folder), all_files(tmp_path / 'again'), all_files(tmp_path / 'other')
    assert first.keys() == again.keys() and all(first[k] == again[k] for k in first)
    assert first.keys() == other.keys()
    assert first['train-000000.tar'] != other['train-000000.tar']
    assert first['retrieval/retrieval.csv'] != other['retrieval/retrieval.csv']


def test_training_shards_hold_every_image_once_per_true_caption(dataset):
    folder, manifest = dataset
    samples = read_shards(folder, manifest)
    assert len(samples) == manifest['train']['num_samples'] == 24 * 4
    by_image = defaultdict(list)
    for _key, png, text, meta in samples:
        objects = meta['scene']['objects']
        assert true_of(text, objects), (text, objects)
        assert parse(text)[0] == meta['caption_kind']
        assert png == png_bytes(render(Scene.from_dict(meta['scene']), 32))  # the metadata is the image's scene
        by_image[meta['image']].append((png, text))
    assert sorted(by_image) == list(range(24))
    for copies in by_image.values():
        assert len(copies) == 4 and len({png for png, _ in copies}) == 1
        assert len({text for _, text in copies}) == 4, copies
    # Shuffled: neighbours in the shards rarely come from one image (unshuffled, 3 in 4 would).
    images = [meta['image'] for *_, meta in samples]
    assert np.mean([a == b for a, b in zip(images, images[1:])]) < 0.1
    sizes = json.loads((folder / 'sizes.json').read_text())
    assert sizes == {'train-000000.tar': 40, 'train-000001.tar': 40, 'train-000002.tar': 16}


def test_held_out_pairs_never_in_training_but_in_evaluation(dataset):
    folder, manifest = dataset
    assert set(manifest['held_out_pairs']) == {f'{c} {s}' for c, s in HELD_OUT}
    for _, _, text, meta in read_shards(folder, manifest):
        assert not names_held_out(text), text
        assert not {(o['colour'], o['shape']) for o in meta['scene']['objects']} & HELD_OUT
    # A larger training set, without writing it: no scene holds a held-out pair.
    from open_clip_llip.data.writer import _train_example
    scenes = [_train_example(5, index, 4, 32)[1] for index in range(300)]
    assert not {o.pair for s in scenes for o in s.objects} & HELD_OUT
    # The retrieval set names them, and marks the captions that do.
    table = pd.read_csv(folder / manifest['retrieval']['csv'], sep='\t')
    assert list(table.unseen_pair) == [int(names_held_out(t)) for t in table.title]
    assert table.unseen_pair.sum() == manifest['retrieval']['num_unseen_pair_captions'] > 0
    # The unseen-pairs task's classes are the held-out pairs.
    unseen = folder / manifest['zeroshot']['unseen-pairs']['classnames']
    assert {tuple(line.split()) for line in unseen.read_text().splitlines()} == HELD_OUT


def test_retrieval_captions_are_true_of_their_image_only(dataset):
    retrieval_set = sample_retrieval_set(3, 40, 3)
    objects = [objects_of(scene) for scene, _ in retrieval_set]
    unseen = 0
    for index, (scene, captions) in enumerate(retrieval_set):
        assert 3 <= len(scene.objects) <= 4 and len({c.text for c in captions}) == 3
        for caption in captions:
            truth = [true_of(caption.text, o) for o in objects]
            assert truth[index] and sum(truth) == 1, (caption.text, index)
            unseen += names_held_out(caption.text)
    assert unseen > 0
    # What was written is this set, rendered.
    folder, manifest = dataset
    table = pd.read_csv(folder / manifest['retrieval']['csv'], sep='\t')
    expected = sample_retrieval_set(0, 12, 3)
    assert list(table.title) == [c.text for _, captions in expected for c in captions]
    assert list(table.filepath) == [f'images/{i:06d}.png' for i in range(12) for _ in range(3)]
    first = np.asarray(Image.open(folder / 'retrieval' / table.filepath[0]))
    assert np.array_equal(first, np.asarray(render(expected[0][0], 32)))


def test_retrieval_set_without_enough_unique_captions_is_refused(monkeypatch):
    monkeypatch.setattr(gallery, 'MAX_TRIES', 1)
    with pytest.raises(RuntimeError, match=r'found only \d+ of 50 retrieval images with 3 captions true of no other '
                                           r'image; ask for fewer retrieval images or fewer captions per image'):
        sample_retrieval_set(0, 50, 3)


@pytest.mark.parametrize('task', ZERO_SHOT_TASKS, ids=lambda task: task.name)
def test_zero_shot_templates_are_true_of_their_class_only(task):
    assert all(template.count('{}') == 1 for template in task.templates)
    for label in range(len(task.classnames)):
        for index in range(20):
            scene = task.sample(rng_for(0, 'zeroshot', 99, label * 20 + index), label)
            objects = objects_of(scene)
            assert ({(o['colour'], o['shape']) for o in objects} & HELD_OUT) == (
                {tuple(task.classnames[label].split())} if task.name == 'unseen-pairs' else set())
            for template in task.templates:
                truth = [true_of(template.format(name), objects) for name in task.classnames]
                assert truth == [i == label for i in range(len(truth))], (template, task.classnames[label], objects)


def test_zero_shot_folders_are_image_folders_with_class_names(dataset):
    folder, manifest = dataset
    assert list(manifest['zeroshot']) == [task.name for task in ZERO_SHOT_TASKS]
    for task in ZERO_SHOT_TASKS:
        entry = manifest['zeroshot'][task.name]
        images = ImageFolder(str(folder / entry['folder']))
        names = (folder / entry['classnames']).read_text(encoding='utf-8').splitlines()
        templates = (folder / entry['templates']).read_text(encoding='utf-8').splitlines()
        assert names == list(task.classnames) and templates == list(task.templates)
        assert images.classes == sorted(images.classes) == [f'{i:03d}' for i in range(len(names))]
        assert Counter(images.targets) == {label: 2 for label in range(len(names))} and len(images) == entry['num_images']
        assert images[0][0].size == (32, 32)


def test_openclip_webdataset_pipeline_reads_the_shards(dataset):
    folder, manifest = dataset
    pattern = str(folder / manifest['train']['data'])
    assert get_dataset_size(pattern) == (96, 3)
    _, _, preprocess = open_clip.create_model_and_transforms('Llip-Tiny')
    args = argparse.Namespace(train_data=pattern, train_num_samples=manifest['train']['num_samples'],
                              dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=16,
                              workers=0, world_size=1)
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer('Llip-Tiny'))
    batches = list(data.dataloader)
    assert len(batches) == data.dataloader.num_batches == 6
    batch = batches[0]
    images, texts = (batch['image'], batch['text']) if isinstance(batch, dict) else batch  # OpenCLIP 4: dicts
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert texts.shape == (16, 16) and texts.dtype == torch.long


def test_open_clip_train_trains_llip_on_the_shards(dataset, tmp_path, restore_logging):
    """The stock loop, with the sample count from sizes.json (no --train-num-samples)."""
    folder, manifest = dataset
    open_clip_train_main([
        '--model', 'Llip-Tiny', '--train-data', str(folder / manifest['train']['data']), '--dataset-type', 'webdataset',
        '--batch-size', '16', '--epochs', '1', '--workers', '0', '--precision', 'fp32', '--logs', str(tmp_path),
        '--name', 'run'])
    log = (tmp_path / 'run' / 'out.log').read_text()
    assert 'training with LlipLoss' in log and '[96/96 (100%)]' in log


def test_openclip_csv_dataset_reads_the_retrieval_set(dataset, monkeypatch):
    folder, manifest = dataset
    csv = folder / manifest['retrieval']['csv']
    _, _, preprocess = open_clip.create_model_and_transforms('Llip-Tiny')
    monkeypatch.chdir(csv.parent)  # CsvDataset opens paths as given; ours are relative to the CSV's folder
    data = CsvDataset(str(csv), preprocess, img_key='filepath', caption_key='title',
                      tokenizer=open_clip.get_tokenizer('Llip-Tiny'))
    assert len(data) == manifest['retrieval']['num_captions'] == 36
    item = data[0]
    image, text = (item['image'], item['text']) if isinstance(item, dict) else item  # OpenCLIP 4: dicts
    assert image.shape == (3, 32, 32) and text.shape == (16,)


def test_larger_images(tmp_path):
    manifest = write_dataset(tmp_path, image_size=64, **{**TINY, 'train_images': 2, 'samples_per_shard': 100})
    assert manifest['image_size'] == 64
    assert Image.open(tmp_path / 'retrieval' / 'images' / '000000.png').size == (64, 64)
    assert Image.open(next((tmp_path / 'zeroshot' / 'shape' / '000').iterdir())).size == (64, 64)


def test_command_writes_refuses_and_overwrites_only_its_own_files(tmp_path, capsys):
    folder = tmp_path / 'data'
    flags = ['--train-images', '4', '--retrieval-images', '3', '--zeroshot-images', '1', '--samples-per-shard', '4']
    result = subprocess.run([sys.executable, '-m', 'open_clip_llip', 'data', str(folder), *flags],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"--train-data '{folder}/train-{{000000..000003}}.tar' --train-num-samples 16" in result.stderr
    assert 'training images: 100%' in result.stderr  # tqdm
    before = all_files(folder)

    with pytest.raises(SystemExit) as exit_info:
        data_main([str(folder), *flags])
    assert exit_info.value.code == 2
    assert ('is not empty; choose a new or empty folder, or pass --overwrite (overwrite=True) to replace an earlier '
            'dataset that open_clip_llip.data wrote there') in capsys.readouterr().err
    assert all_files(folder) == before

    (folder / 'notes.txt').write_text('mine')
    data_main([str(folder), *flags[:-1], '8', '--overwrite'])  # 2 shards instead of 4
    assert (folder / 'notes.txt').read_text() == 'mine'
    assert sorted(p.name for p in folder.glob('train-*.tar')) == ['train-000000.tar', 'train-000001.tar']

    other = tmp_path / 'other'
    other.mkdir()
    (other / 'photo.png').write_bytes(b'precious')
    with pytest.raises(SystemExit):
        data_main([str(other), '--overwrite'])
    assert ('holds nothing that open_clip_llip.data wrote (no manifest.json listing the files of its dataset); not '
            'overwriting it') in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ['photo.png']


def test_overwrite_keeps_a_users_file_in_every_folder_it_writes_to(tmp_path):
    folder = tmp_path / 'data'
    write_dataset(folder, **TINY)
    folders = {p.parent for p in folder.rglob('*') if p.is_file()}
    assert len(folders) > 20  # the root, retrieval/, retrieval/images/, zeroshot/<task>/, every class folder
    planted = {folder_ / 'mine.txt': f'user file in {folder_}' for folder_ in folders}
    for path, text in planted.items():
        path.write_text(text)

    write_dataset(folder, **{**TINY, 'train_images': 8, 'zeroshot_images': 1}, overwrite=True)
    assert all(path.read_text() == text for path, text in planted.items())
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert set(manifest['files']) == {str(p.relative_to(folder)) for p in folder.rglob('*')
                                      if p.is_file() and p.name not in ('mine.txt', 'manifest.json')}


def test_overwrite_refuses_when_a_written_file_was_changed_and_removes_nothing(tmp_path):
    folder = tmp_path / 'data'
    write_dataset(folder, **TINY)
    (folder / 'retrieval' / 'retrieval.csv').write_text('edited by hand')
    before = all_files(folder)
    with pytest.raises(FileExistsError, match=r'retrieval.csv was changed after this command wrote it; not removing'):
        write_dataset(folder, **TINY, overwrite=True)
    assert all_files(folder) == before


def test_a_users_file_where_a_new_file_goes_is_kept_and_the_run_undone(tmp_path):
    folder = tmp_path / 'data'
    write_dataset(folder, **TINY)
    # The new run writes more retrieval images than the first: one of them is where the user put a file.
    user_file = folder / 'retrieval' / 'images' / f'{TINY["retrieval_images"] + 1:06d}.png'
    user_file.write_bytes(b'precious')
    with pytest.raises(FileExistsError, match=r'000013.png exists and was not written by this command'):
        write_dataset(folder, **{**TINY, 'retrieval_images': 16}, overwrite=True)
    assert user_file.read_bytes() == b'precious'
    assert [p for p in folder.rglob('*') if p.is_file()] == [user_file]  # the failed run took back what it wrote


def test_a_manifest_without_its_files_is_not_overwritten(tmp_path):
    folder = tmp_path / 'data'
    write_dataset(folder, **TINY)
    manifest = json.loads((folder / 'manifest.json').read_text())
    del manifest['files']  # as an earlier version wrote it
    (folder / 'manifest.json').write_text(json.dumps(manifest))
    before = all_files(folder)
    with pytest.raises(FileExistsError, match=r'manifest.json does not list the files it wrote \(an older version of '
                                              r'open_clip_llip.data wrote it\)'):
        write_dataset(folder, **TINY, overwrite=True)
    assert all_files(folder) == before


@pytest.mark.parametrize('changes, message', [
    ({'seed': -1}, r'seed must be an integer of at least 0, got -1'),
    ({'train_images': 0}, r'train_images must be an integer of at least 1, got 0'),
    ({'captions_per_image': 9}, r'captions_per_image must be at most 8, got 9'),
    ({'image_size': 8}, r'image_size must be an integer of at least 16, got 8'),
    ({'zeroshot_images': 2.5}, r'zeroshot_images must be an integer of at least 1, got 2.5'),
])
def test_bad_arguments(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / 'data', **{**TINY, **changes})
    assert not (tmp_path / 'data').exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / 'data').write_text('not a folder')
    with pytest.raises(NotADirectoryError, match='exists and is not a folder; choose a folder to write the dataset into'):
        write_dataset(tmp_path / 'data', **TINY)
    assert (tmp_path / 'data').read_text() == 'not a folder'


def test_training_data_as_a_csv_that_the_stock_loop_reads_in_a_seeded_order(tmp_path, restore_logging):
    manifest = write_dataset(tmp_path / 'data', **{**TINY, 'train_images': 8}, train_format='csv')
    assert manifest['train'] == {'format': 'csv', 'data': 'train/train.csv', 'num_samples': 32, 'num_images': 8,
                                 'captions_per_image': 4}
    frame = pd.read_csv(tmp_path / 'data' / 'train' / 'train.csv', sep='\t')
    assert len(frame) == 32 and frame['filepath'].nunique() == 8
    assert all((tmp_path / 'data' / 'train' / path).is_file() for path in frame['filepath'])
    with pytest.raises(ValueError, match=r"train_format must be one of \('webdataset', 'csv'\), got 'tfrecord'"):
        write_dataset(tmp_path / 'other', **TINY, train_format='tfrecord')

    # The same seed twice: the same order of samples, so the same weights, bit for bit.
    states = []
    for run in ('a', 'b'):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.chdir(tmp_path / 'data' / 'train')  # CsvDataset opens its paths as given
            open_clip_train_main(['--model', 'Llip-Tiny', '--train-data', 'train.csv', '--dataset-type', 'csv',
                                  '--batch-size', '8', '--epochs', '1', '--workers', '1', '--precision', 'fp32',
                                  '--seed', '3', '--logs', str(tmp_path / 'logs'), '--name', run])
        states.append(torch.load(tmp_path / 'logs' / run / 'checkpoints' / 'epoch_1.pt', weights_only=True)['state_dict'])
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])

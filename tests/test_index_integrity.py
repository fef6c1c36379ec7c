"""A search index checks what its manifest records: every file's SHA-256 on open (the features per block, on first
read), ``verify`` names each damaged file and block, and non-finite features or scores are never ranked."""
import json
import logging
import shutil

import numpy as np
import open_clip
import pytest
import torch

import open_clip_llip.search.index as index_module
from open_clip_llip.commands.index import main
from open_clip_llip.search.index import (
    FEATURES,
    FIRST_STAGE,
    MANIFEST,
    NAMES,
    LlipIndex,
    build_index,
    manifest_digest,
    seal_manifest,
    verify_index,
    write_index,
)
from open_clip_llip.written_files import file_digest

NUM_IMAGES = 37
BLOCK_ROWS = 4  # blocks of 4 rows: 10 blocks, the last of one row
ROW = 13  # in block 3 (rows 12 to 15)
NAMES_OF = [f'image-{i}.png' for i in range(NUM_IMAGES)]


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, count):
        self.images = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny').eval()


@pytest.fixture(scope='module')
def built(model, tmp_path_factory):
    """An index of NUM_IMAGES images (float16 features) hashed in blocks of BLOCK_ROWS rows, never opened for
    writing again: each test damages a copy."""
    folder = tmp_path_factory.mktemp('integrity') / 'gallery'
    row_bytes = 2 * 4 * 8 * 16 * 2  # [2, H, K, d] float16
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(index_module, '_HASH_BLOCK_BYTES', BLOCK_ROWS * row_bytes)
        build_index(folder, model, RandomImages(NUM_IMAGES), NAMES_OF, batch_size=16, workers=0, model_name='Llip-Tiny')
    return folder


@pytest.fixture
def folder(built, tmp_path):
    copy = tmp_path / 'gallery'
    shutil.copytree(built, copy)
    return copy


def text_features(model, count=3):
    tokens = open_clip.get_tokenizer('Llip-Tiny')(['a red circle', 'a blue square', 'nothing'][:count])
    with torch.no_grad():
        return model.encode_text(tokens)


def search_every_row(index, model):
    return index.search_features(text_features(model), k=5, candidates=NUM_IMAGES)


def flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def write_row(folder, row, value, part=1):
    """Write ``value`` into image ``row``'s first value (``part`` 1) or key (0)."""
    features = np.load(folder / FEATURES, mmap_mode='r+')
    features[row, part, 0, 0, 0] = value
    features.flush()
    del features


def reseal(folder):
    """Record the files as they are now, as if the index had been written so: the hashes agree with the content."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest['files'] = {relative: file_digest(folder / relative) for relative in manifest['files']}
    seal_manifest(manifest, folder)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_an_intact_index_verifies_opens_and_checks_each_block_once(folder, model):
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest['feature_blocks']['rows'] == BLOCK_ROWS and len(manifest['feature_blocks']['sha256']) == 10
    assert manifest['sha256'] == manifest_digest(manifest)
    assert verify_index(folder) == []
    index = LlipIndex.open(folder, model)
    assert not index._verified.any()
    index.read_rows(np.array([ROW, 0, 14]))
    assert index._verified.nonzero()[0].tolist() == [0, 3]
    assert search_every_row(index, model).ids.min() >= 0 and index._verified.all()


@pytest.mark.parametrize('name', [FIRST_STAGE, NAMES])
@pytest.mark.parametrize('where', ['first', 'middle', 'last'])
def test_a_flipped_byte_in_a_small_file_is_refused_on_open_and_named_by_verify(folder, model, name, where):
    path = folder / name
    flip_byte(path, dict(first=0, middle=path.stat().st_size // 2, last=-1)[where])
    with pytest.raises(ValueError, match=f'{name}: does not match the SHA-256 the manifest records.*Build it again'):
        LlipIndex.open(folder, model)
    assert verify_index(folder) == [f'{path}: does not match the SHA-256 the manifest records: changed or damaged '
                                    'after the index was written.']


@pytest.mark.parametrize('position, rows', [('header', None), (-1, 'rows 36 to 36 \\(block 9\\)'),
                                            ('row', 'rows 12 to 15 \\(block 3\\)')])
def test_a_flipped_byte_in_the_features_is_found_in_its_header_on_open_or_in_its_block_on_first_read(
        folder, model, position, rows):
    path = folder / FEATURES
    offset = np.load(path, mmap_mode='r').offset
    flip_byte(path, dict(header=offset - 2, row=offset + ROW * 2048 + 100).get(position, position))
    if rows is None:  # the .npy header, checked on open
        with pytest.raises(ValueError, match=f'{FEATURES}: (its header does not match the SHA-256|not a readable .npy)'):
            LlipIndex.open(folder, model)
        assert len(verify_index(folder)) == 1 and verify_index(folder)[0].startswith(f'{path}: ')
        return
    index = LlipIndex.open(folder, model)  # rows are checked on first read, not on open
    index.read_rows(np.array([0, 1]))  # block 0: intact
    with pytest.raises(ValueError, match=f'{FEATURES}: {rows} do not match the SHA-256.*index verify'):
        search_every_row(index, model)
    with pytest.raises(ValueError, match=rows):
        index.exhaustive_search(text_features(model), k=5)
    assert [problem.split(': ')[1] for problem in verify_index(folder)] == [rows.replace('\\', '') + ' do not match the '
                                                                             'SHA-256 the manifest records']


@pytest.mark.parametrize('value', [np.inf, -np.inf, np.nan])
def test_a_non_finite_feature_written_at_a_row_is_refused_on_read_and_named_by_verify(folder, model, value):
    write_row(folder, ROW, value)
    index = LlipIndex.open(folder, model)
    with pytest.raises(ValueError, match='rows 12 to 15 \\(block 3\\) do not match'):
        index.read_rows(np.array([ROW]))
    problems = verify_index(folder)
    assert len(problems) == 2 and 'rows 12 to 15 (block 3)' in problems[0]
    assert problems[1].endswith(f'non-finite features (NaN or infinity) in the rows of images {ROW}.')


def test_a_changed_or_unreadable_manifest_is_refused(folder, model):
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(dict(manifest, temperature=2.0)))  # still valid, but not as written
    with pytest.raises(ValueError, match='index.json: its content does not match the SHA-256 it records'):
        LlipIndex.open(folder, model)
    assert len(verify_index(folder)) == 1 and 'index.json: its content does not match' in verify_index(folder)[0]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    flip_byte(folder / MANIFEST, 0)
    with pytest.raises(ValueError, match='index.json is not a readable index manifest'):
        LlipIndex.open(folder, model)
    with pytest.raises(ValueError, match='not a readable index manifest'):
        verify_index(folder)


@pytest.mark.parametrize('outside', ['../elsewhere.npy', '/etc/hostname', 'sub/image_features.npy', 'notes.txt'])
@pytest.mark.parametrize('where', ['features', 'files'])
def test_a_manifest_naming_a_file_that_is_not_the_indexs_own_is_refused_before_reading_it(folder, model, outside,
                                                                                          where):
    """Even with its own SHA-256 recomputed to match: no path the manifest names is read outside the index's files."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if where == 'features':
        manifest['image_features'] = dict(manifest['image_features'], file=outside)
    else:
        manifest['files'] = dict(manifest['files'], **{outside: manifest['files'][FEATURES]})
    manifest['sha256'] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"names files that are not an index's own .*{outside}"):
        LlipIndex.open(folder, model)
    with pytest.raises(ValueError, match="names files that are not an index's own"):
        verify_index(folder)


@pytest.mark.parametrize('name', [FEATURES, FIRST_STAGE, NAMES])
@pytest.mark.parametrize('keep', [0, 0.5, -1])  # empty, half, one byte short
def test_a_truncated_or_missing_file_is_refused_on_open_and_named_by_verify(folder, model, name, keep):
    path = folder / name
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:int(keep * size) if keep >= 0 else size - 1])
    with pytest.raises(ValueError, match=f'The index in .* is damaged: .*{name}'):
        LlipIndex.open(folder, model)
    problems = verify_index(folder)
    assert len(problems) == 1 and problems[0].startswith(f'{path}: ')
    path.unlink()
    with pytest.raises(ValueError, match=f'{name}: missing'):
        LlipIndex.open(folder, model)
    assert verify_index(folder) == [f'{path}: missing.']


def test_bytes_appended_to_the_features_are_refused(folder, model):
    with open(folder / FEATURES, 'ab') as file:
        file.write(b'\0' * 2048)
    with pytest.raises(ValueError, match='bytes; the manifest records .* \\(cut short, or extended\\)'):
        LlipIndex.open(folder, model)


def as_written_before_block_hashes(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest['feature_blocks'], manifest['sha256']
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def test_an_index_from_before_block_hashes_opens_says_what_it_lacks_and_checks_its_features_whole(
        folder, model, caplog):
    as_written_before_block_hashes(folder)
    with caplog.at_level(logging.WARNING):
        index = LlipIndex.open(folder, model)
    assert 'written before block hashes: it has no SHA-256 of its manifest and no per-block SHA-256 of its ' \
           'features, so its features file is checked whole on every open' in caplog.text
    assert search_every_row(index, model).ids.shape == (3, 5)
    assert verify_index(folder) == []
    write_row(folder, ROW, np.inf)
    with pytest.raises(ValueError, match=f'{FEATURES}: does not match the SHA-256'):
        LlipIndex.open(folder, model)
    problems = verify_index(folder)
    assert len(problems) == 2 and f'{FEATURES}: does not match' in problems[0] and f'images {ROW}.' in problems[1]


@pytest.mark.parametrize('value', [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize('part', [0, 1])  # a key (−inf: given no weight, the score would stay finite), a value
@pytest.mark.parametrize('legacy', [False, True])
def test_search_leaves_out_images_with_non_finite_features_with_a_warning(folder, model, caplog, value, part, legacy):
    """Hashes that agree with a non-finite row (an index written so): the row is never ranked."""
    index = LlipIndex.open(folder, model)
    queries = text_features(model)
    first = index.search_features(queries, k=5, candidates=NUM_IMAGES).ids[:, 0]
    write_row(folder, first[0].item(), value, part)
    write_row(folder, first[1].item(), value, part)
    reseal(folder)
    if legacy:
        as_written_before_block_hashes(folder)
    index = LlipIndex.open(folder, model)
    bad = {first[0].item(), first[1].item()}
    with caplog.at_level(logging.WARNING):
        for results in (index.search_features(queries, k=NUM_IMAGES, candidates=NUM_IMAGES),
                        index.exhaustive_search(queries, k=NUM_IMAGES)):
            assert not bad & set(results.ids[:, :-len(bad)].flatten().tolist())
            assert (results.ids[:, -len(bad):] == -1).all() and (results.scores[:, -len(bad):] == -np.inf).all()
            assert torch.isfinite(results.scores[:, :-len(bad)]).all()
    named = ', '.join(f'{i} (image-{i}.png)' for i in sorted(bad))
    assert caplog.text.count(f'Images {named} of the index in {folder} have non-finite features or scores') == 2


def test_non_finite_text_features_are_refused(folder, model):
    queries = text_features(model)
    queries[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r'Text features of queries \[1\] are not finite'):
        LlipIndex.open(folder, model).search_features(queries)


@pytest.mark.parametrize('value', [np.inf, np.nan, 1e6])  # 1e6: finite, but not in float16
def test_build_refuses_non_finite_features_naming_the_image(model, tmp_path, value):
    features = torch.randn(9, 2, 4, 8, 16)
    features[6, 1, 2] = value
    with pytest.raises(ValueError, match=r'Image 6 \(f6\) has non-finite features in float16'):
        write_index(tmp_path / 'index', model, [features[:4], features[4:]], 9, names=[f'f{i}' for i in range(9)])
    assert not (tmp_path / 'index' / MANIFEST).exists()


def test_the_verify_command_names_each_damaged_part_and_fails(folder, capsys):
    main(['verify', str(folder)])
    assert 'is whole' in capsys.readouterr().out
    flip_byte(folder / NAMES, 3)
    write_row(folder, 1, np.nan)
    write_row(folder, 30, np.inf)
    with pytest.raises(SystemExit, match='4 damaged part\\(s\\)'):
        main(['verify', str(folder)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and f'{NAMES}: does not match' in out[0] and 'rows 0 to 3 (block 0)' in out[1]
    assert 'rows 28 to 31 (block 7)' in out[2] and out[3].endswith('rows of images 1, 30.')


def test_an_index_whose_first_stage_this_version_does_not_read_is_refused(folder, model):
    """An index of before the codes (its first stage an IndexIVFFlat of full vectors) says to build it again."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest['first_stage']['faiss'] = 'IndexIVFFlat'
    manifest['sha256'] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r'written by an earlier version .* \(IndexIVFFlat\) .*build it again'):
        LlipIndex.open(folder, model)

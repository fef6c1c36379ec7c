"""``open_clip_llip.written_files``: no command writes or removes a path outside its folder, removes only what it can
prove it wrote, and writes every file whole or not at all, even when killed; for the data generator, the index
and the main job's output folder."""
import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch
from conftest import REPO

from open_clip_llip.commands.data import main as data_main
from open_clip_llip.data import write_dataset
from open_clip_llip.search.index import LlipIndex, write_index
from open_clip_llip.written_files import (
    TEMPORARY,
    UnsafePathError,
    WrittenFiles,
    check_output_file,
    inside,
    prepare_folder,
    write_json,
)

SMALL = dict(train_images=4, captions_per_image=2, retrieval_images=3, retrieval_captions=2, zeroshot_images=1,
             samples_per_shard=4)
FEATURES = torch.randn(5, 2, 4, 8, 16, generator=torch.Generator().manual_seed(0))  # Llip-Tiny's [n, 2, H, K, d]


def load_demo():
    spec = importlib.util.spec_from_file_location('demo_script', REPO / 'scripts' / 'demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny').eval()


@pytest.fixture(scope='module')
def demo():
    return load_demo()


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder):
    """Every entry under ``folder``, links not followed: path -> bytes, or the link's target."""
    found = {}
    for parent, subfolders, files in os.walk(folder):
        for name in files + [s for s in subfolders if os.path.islink(os.path.join(parent, s))]:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = ('link', os.readlink(path)) if os.path.islink(path) else \
                open(path, 'rb').read()
    return found


class Kind:
    """A command that writes a folder: how to write it, rerun it with overwrite, and which of its files and
    subfolders to use in a fault."""

    def __init__(self, manifest, listed_file, subfolder, write, rerun):
        self.manifest, self.listed_file, self.subfolder, self.write, self.rerun = \
            manifest, listed_file, subfolder, write, rerun


def demo_output(demo, folder):
    """A main job's output, as an earlier run left it (its record, a result, a run's start and log)."""
    args = argparse.Namespace(output=folder, overwrite=False)
    written = demo.prepare_output(args)
    written.write_text('results.md', '| table |\n')
    written.write_text('init/Llip-Tiny-seed0/open_clip_config.json', '{}')
    (folder / 'runs' / 'Llip-Tiny-seed0').mkdir(parents=True)
    (folder / 'runs' / 'Llip-Tiny-seed0' / 'out.log').write_text('a log')  # written by the training run
    written.record_tree('runs/Llip-Tiny-seed0')
    demo.save_record(args, written)


def rerun_demo(demo, folder):
    try:
        demo.prepare_output(argparse.Namespace(output=folder, overwrite=True))
    except SystemExit as error:  # the main job's way to refuse
        raise FileExistsError(str(error)) from None


@pytest.fixture(params=['dataset', 'index', 'main job'])
def kind(request, model, demo):
    if request.param == 'dataset':
        return Kind('manifest.json', 'retrieval/retrieval.csv', 'retrieval', lambda folder: write_dataset(folder, **SMALL),
                    lambda folder: write_dataset(folder, **SMALL, overwrite=True))
    if request.param == 'index':
        names = [f'{i}.png' for i in range(5)]
        return Kind('index.json', 'names.json', None, lambda folder: write_index(folder, model, [FEATURES], 5, names),
                    lambda folder: write_index(folder, model, [FEATURES], 5, names, overwrite=True))
    return Kind('demo.json', 'results.md', 'runs', lambda folder: demo_output(demo, folder),
                lambda folder: rerun_demo(demo, folder))


FAULTS = ['an entry with ..', 'an absolute entry', 'entries through a linked folder', 'a link in place of a file',
          'an entry of another name']


@pytest.mark.parametrize('fault', FAULTS)
def test_overwrite_removes_nothing_outside_its_folder_nor_anything_not_provably_its_own(kind, fault, tmp_path, caplog):
    folder, outside = tmp_path / 'out', tmp_path / 'outside'
    outside.mkdir()
    victim = outside / 'victim.txt'
    victim.write_text('precious')
    kind.write(folder)
    record = json.loads((folder / kind.manifest).read_text())
    if fault == 'an entry with ..':
        named = '../outside/victim.txt'
        record['files'][named] = sha256(victim)
    elif fault == 'an absolute entry':
        named = str(victim)
        record['files'][named] = sha256(victim)
    elif fault == 'entries through a linked folder':
        if kind.subfolder is None:  # the index has no subfolder: an entry naming one, linked elsewhere
            (outside / 'moved').mkdir()
            shutil.copy(folder / kind.listed_file, outside / 'moved' / kind.listed_file)
            record['files'][f'linked/{kind.listed_file}'] = sha256(folder / kind.listed_file)
            named = str(folder / 'linked')
        else:  # the subfolder moved outside, a link in its place: every entry under it still holds what was written
            shutil.move(folder / kind.subfolder, outside / 'moved')
            named = str(folder / kind.subfolder)
        os.symlink(outside / 'moved', folder / named.rsplit('/', 1)[-1])
    elif fault == 'a link in place of a file':  # the same bytes, so the same hash, but elsewhere
        shutil.move(folder / kind.listed_file, outside / 'moved')
        os.symlink(outside / 'moved', folder / kind.listed_file)
        named = str(folder / kind.listed_file)
    else:
        (folder / 'notes.txt').write_text('mine')
        record['files']['notes.txt'] = sha256(folder / 'notes.txt')
        named = 'notes.txt'
    (folder / kind.manifest).write_text(json.dumps(record))
    before_outside, links = snapshot(outside), {k: v for k, v in snapshot(folder).items() if isinstance(v, tuple)}

    with caplog.at_level(logging.WARNING):
        try:
            kind.rerun(folder)
            said = caplog.text
        except OSError as error:  # a link where the new run writes: refused, naming it
            said = caplog.text + str(error)
    assert snapshot(outside) == before_outside
    assert named in said
    assert all(os.readlink(folder / path) == target for path, (_, target) in links.items())  # links stay links
    if fault == 'an entry of another name':
        assert (folder / 'notes.txt').read_text() == 'mine'


def test_overwrite_refuses_when_a_file_of_ours_was_changed_and_removes_nothing(kind, tmp_path):
    folder = tmp_path / 'out'
    kind.write(folder)
    (folder / kind.listed_file).write_text('edited by hand')
    before = snapshot(folder)
    with pytest.raises(FileExistsError, match=f'{kind.listed_file} was changed after this command wrote it; not '
                                              'removing it, nor anything else'):
        kind.rerun(folder)
    assert snapshot(folder) == before


def test_a_linked_subfolder_is_never_written_through(tmp_path, demo):
    outside = tmp_path / 'outside'
    outside.mkdir()
    data = tmp_path / 'data'
    write_dataset(data, **SMALL)
    shutil.rmtree(data / 'retrieval')
    os.symlink(outside, data / 'retrieval')
    with pytest.raises(UnsafePathError, match=r'retrieval is a symbolic link; not writing or removing anything '
                                              r'through it'):
        write_dataset(data, **SMALL, overwrite=True)
    assert list(outside.iterdir()) == []
    assert snapshot(data) == {'retrieval': ('link', str(outside))}  # the failed run took back what it wrote

    output = tmp_path / 'demo'
    demo_output(demo, output)  # an earlier run, whose data folder was replaced by a link
    os.symlink(outside, output / 'data')
    with pytest.raises(SystemExit, match=r'demo/data is a symbolic link'):
        demo.prepare_output(argparse.Namespace(output=output, overwrite=True))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize('relative', ['../x', '/tmp/x', 'a/../../x', './x', 'a//x', ''])
def test_paths_that_are_not_plain_relative_paths_are_refused(tmp_path, relative):
    with pytest.raises(UnsafePathError, match='is not a plain path inside'):
        inside(tmp_path, relative)


def test_a_link_as_the_file_itself_is_refused_and_not_followed(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (tmp_path / 'target').write_text('precious')
    os.symlink(tmp_path / 'target', out / 'a.txt')
    with pytest.raises(UnsafePathError, match='a.txt is a symbolic link'):
        WrittenFiles(out, re.compile(r'a\.txt')).write_text('a.txt', 'new')
    assert (tmp_path / 'target').read_text() == 'precious' and os.path.islink(out / 'a.txt')


def run_killed(code, folder):
    """Run ``code`` in a fresh interpreter (``folder`` its variable) that SIGKILLs itself where ``kill()`` is called."""
    script = 'import os, signal\ndef kill():\n    os.kill(os.getpid(), signal.SIGKILL)\n' + textwrap.dedent(code)
    result = subprocess.run([sys.executable, '-c', script, str(folder)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


KILLS = {
    'a file written by other code, killed halfway': '''
        import re, sys
        from open_clip_llip.written_files import WrittenFiles
        written = WrittenFiles(sys.argv[1], re.compile(r'a\\.bin'))
        with open(written.claim('a.bin'), 'wb') as file:
            file.write(b'x' * 1000)
            file.flush()
            kill()''',
    'write_bytes, killed before its rename': '''
        import re, sys
        from open_clip_llip import written_files
        written_files.os.fsync = lambda descriptor: kill()
        written_files.WrittenFiles(sys.argv[1], re.compile(r'a\\.bin')).write_bytes('a.bin', b'x' * 1000)''',
}


@pytest.mark.parametrize('kill', KILLS)
def test_a_killed_write_leaves_no_file_and_the_next_run_removes_its_temporary(kill, tmp_path):
    folder = tmp_path / 'out'
    folder.mkdir()
    run_killed(KILLS[kill], folder)
    [temporary] = os.listdir(folder)  # the new file never appeared, not even in part
    assert TEMPORARY.fullmatch(temporary) and temporary.startswith('.a.bin.')
    (folder / '.notes.txt.abcdefgh.tmp').write_text('a user file of that form, of a name the command never writes')
    with pytest.raises(FileExistsError, match='holds nothing that gen wrote'):
        prepare_folder(folder, 'record.json', 'gen', True, re.compile(r'a\.bin'))
    (folder / '.notes.txt.abcdefgh.tmp').unlink()
    prepare_folder(folder, 'record.json', 'gen', True, re.compile(r'a\.bin'))
    assert os.listdir(folder) == []


def test_a_killed_json_rewrite_leaves_the_old_file(tmp_path):
    path = tmp_path / 'results.json'
    write_json(path, {'old': True}, overwrite=False)
    run_killed('''
        import sys
        from pathlib import Path
        from open_clip_llip import written_files
        written_files.os.fsync = lambda descriptor: kill()
        written_files.write_json(Path(sys.argv[1]) / 'results.json', {'new': True}, overwrite=True)''', tmp_path)
    assert json.loads(path.read_text()) == {'old': True}


def test_a_failed_write_removes_its_temporary_and_what_it_wrote(tmp_path):
    with pytest.raises(OSError, match='disk full'):
        with WrittenFiles(tmp_path, re.compile(r'[ab]\.bin')) as written:
            written.write_bytes('a.bin', b'whole')
            with open(written.claim('b.bin'), 'wb') as file:
                file.write(b'part')
                raise OSError('disk full')
    assert os.listdir(tmp_path) == []


def test_a_killed_index_build_leaves_no_index_and_the_next_build_replaces_its_temporaries(model, tmp_path):
    folder = tmp_path / 'index'
    run_killed('''
        import sys, open_clip, torch
        from open_clip_llip.search.index import write_index
        torch.manual_seed(0)
        model = open_clip.create_model('Llip-Tiny').eval()
        def batches():  # killed while the features' memory map is half written
            yield torch.randn(2, 2, 4, 8, 16)
            kill()
        write_index(sys.argv[1], model, batches(), 5)''', folder)
    [temporary] = [name for name in os.listdir(folder) if TEMPORARY.fullmatch(name)]
    assert temporary.startswith('.image_features.npy.')
    assert set(os.listdir(folder)) == {temporary, '.index.json.partial'}  # no index, no file of one in part
    with pytest.raises(FileNotFoundError):
        LlipIndex.open(folder, model)
    write_index(folder, model, [FEATURES], 5, overwrite=True)
    assert sorted(os.listdir(folder)) == ['first_stage.faiss', 'image_features.npy', 'index.json']
    assert len(LlipIndex.open(folder, model)) == 5


def test_a_killed_dataset_run_leaves_no_shard_in_part_and_the_next_run_replaces_its_temporary(tmp_path):
    folder = tmp_path / 'data'
    run_killed(f'''
        import sys, webdataset
        from open_clip_llip.data import write_dataset
        write = webdataset.TarWriter.write
        count = []
        def write_then_kill(self, sample):  # killed after the shard's second sample
            write(self, sample)
            count.append(1)
            if len(count) == 2:
                kill()
        webdataset.TarWriter.write = write_then_kill
        write_dataset(sys.argv[1], **{SMALL!r})''', folder)
    [temporary] = [name for name in os.listdir(folder) if TEMPORARY.fullmatch(name)]
    assert set(os.listdir(folder)) == {temporary, '.manifest.json.partial'}
    assert temporary.startswith('.train-000000.tar.')  # the shard never appeared, not even in part
    data_main([str(folder), *[f'--{k.replace("_", "-")}={v}' for k, v in SMALL.items()], '--overwrite'])
    assert not [name for name in os.listdir(folder) if TEMPORARY.fullmatch(name)]
    assert (folder / 'manifest.json').is_file() and (folder / 'train-000001.tar').is_file()


# Killed at the n-th image drawn or sample written (SMALL: 4 training images, 2 shards of 4 samples, 3 retrieval
# images, then the zero-shot images), and a file that is whole by then.
KILLED_AT = {'drawing the training images': (2, None), 'in shard 1': (9, 'train-000000.tar'),
             'in the retrieval set': (14, 'sizes.json'), 'in the zero-shot tasks': (30, 'retrieval/retrieval.csv')}


@pytest.mark.parametrize('at', KILLED_AT)
def test_a_dataset_run_killed_after_some_files_is_replaced_by_the_next_run_from_its_journal(at, tmp_path):
    after, whole = KILLED_AT[at]
    folder = tmp_path / 'data'
    run_killed(f'''
        import sys, webdataset
        from open_clip_llip.data import writer
        calls = []
        def kill_at(function):
            def counted(*args, **kwargs):
                calls.append(1)
                if len(calls) == {after}:
                    kill()
                return function(*args, **kwargs)
            return counted
        webdataset.TarWriter.write = kill_at(webdataset.TarWriter.write)
        writer.png_bytes = kill_at(writer.png_bytes)
        writer.write_dataset(sys.argv[1], **{SMALL!r})''', folder)
    assert not (folder / 'manifest.json').exists() and (folder / '.manifest.json.partial').is_file()
    assert whole is None or (folder / whole).is_file()
    (folder / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit):
        data_main([str(folder), '--train-images', '4'])  # without --overwrite: refused, as any folder not empty
    write_dataset(folder, **SMALL, overwrite=True)
    assert (folder / 'notes.txt').read_text() == 'mine' and not (folder / '.manifest.json.partial').exists()
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert set(manifest['files']) | {'manifest.json', 'notes.txt'} == set(snapshot(folder))


DAMAGES = {'cut short': lambda data: data[:len(data) // 2], 'emptied': lambda data: b'',
           'one byte changed': lambda data: data[:40] + bytes([data[40] ^ 1]) + data[41:]}


@pytest.mark.parametrize('damage', DAMAGES)
@pytest.mark.parametrize('damaged', ['train-000000.tar', 'sizes.json', 'retrieval/images/000002.png',
                                     'zeroshot/shape/000/000000.png'])
def test_the_generator_checks_every_file_of_an_earlier_dataset_before_regenerating_it(damaged, damage, tmp_path):
    folder = tmp_path / 'data'
    write_dataset(folder, **SMALL)
    path = folder / damaged
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    before = snapshot(folder)
    with pytest.raises(FileExistsError, match=f'{damaged} was changed after this command wrote it; not removing it, '
                                              'nor anything else. Move it away, or choose another folder.'):
        write_dataset(folder, **SMALL, overwrite=True)
    assert snapshot(folder) == before


def test_the_main_job_names_a_damaged_training_file_of_its_data_folder(tmp_path, demo):
    args = argparse.Namespace(output=tmp_path, quick=True, train_images=4, eval_images=1, train_text_embedding=False)
    demo.built_in_data(args, 32)
    damaged = tmp_path / 'data' / 'train' / 'images' / '000001.png'
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r'The built-in data: .*data/train/images/000001.png was changed after this '
                                         r'command wrote it'):
        demo.built_in_data(args, 32)
    assert len(damaged.read_bytes()) == 100 and (tmp_path / 'data' / 'manifest.json').is_file()
    (tmp_path / 'data' / 'train' / 'images' / '000001.png').unlink()  # a missing file: regenerated with the rest
    demo.built_in_data(args, 32)
    assert len(damaged.read_bytes()) > 100


def test_a_json_output_that_is_a_link_is_replaced_not_written_through(tmp_path):
    target = tmp_path / 'target.json'
    target.write_text('precious')
    link = tmp_path / 'results.json'
    os.symlink(target, link)
    with pytest.raises(FileExistsError, match='results.json exists; pass --overwrite'):
        check_output_file(link, overwrite=False)
    write_json(link, {'new': True}, overwrite=True)
    assert target.read_text() == 'precious' and not link.is_symlink() and json.loads(link.read_text()) == {'new': True}

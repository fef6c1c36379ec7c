"""A gallery built in shards (``open_clip_llip.search.shards``): two processes under torchrun build it, its shards
searched together answer exactly as one index of the same images, and a killed build resumes without redoing the
shards it finished."""
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from conftest import REPO
from test_index import SAMPLE_TEXTS, write_images

from open_clip_llip.commands.index import main
from open_clip_llip.search.index import FEATURES, FIRST_STAGE, MANIFEST, NAMES, LlipIndex, write_index
from open_clip_llip.search.shards import (
    PLAN,
    TRAINED_FIRST_STAGE,
    ShardedIndex,
    build_sharded_index,
    plan_shards,
    verify_gallery,
)

QUERIES = ['a red circle', 'two blue squares', 'a big yellow star', 'a cross left of a circle']
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))


def one_index_of(gallery: ShardedIndex, folder):
    """One index of the gallery's images as its shards store them, with the gallery's trained first stage."""
    import faiss
    rows = np.concatenate([shard.decode_rows(shard.read_block(0, len(shard))) for shard in gallery.shards])
    names = [name for shard in gallery.shards for name in shard.names]
    trained = faiss.read_index(str(gallery.folder / TRAINED_FIRST_STAGE))
    write_index(folder, gallery.model, torch.from_numpy(rows).split(5), len(rows), names, first_stage=trained)
    return LlipIndex.open(folder, gallery.model, gallery.tokenizer)


def assert_same_answers(gallery, index):
    text_features = index.encode_texts(QUERIES)
    for candidates in (3, 7, len(index)):
        for probes in range(1, min(2, gallery.prototypes) + 1):
            ours = gallery.search_features(text_features, k=3, candidates=candidates, probes=probes)
            theirs = index.search_features(text_features, k=3, candidates=candidates, probes=probes)
            assert torch.equal(ours.ids, theirs.ids) and torch.equal(ours.scores, theirs.scores)
            assert ours.names == theirs.names
            assert torch.equal(ours.shards, torch.from_numpy(gallery.locate(ours.ids.numpy())[0]))


def test_plan_shards_splits_the_images_into_contiguous_ranges():
    assert plan_shards(10, 3) == [dict(folder='shard-00000', first_id=0, count=3),
                                  dict(folder='shard-00001', first_id=3, count=3),
                                  dict(folder='shard-00002', first_id=6, count=4)]
    with pytest.raises(ValueError, match=r'shards must be an integer in \[1, 2\]'):
        plan_shards(2, 3)


def test_two_processes_under_torchrun_build_shards_that_answer_as_one_index(checkpoint, tmp_path):
    images, output, sample = tmp_path / 'images', tmp_path / 'gallery', tmp_path / 'captions.txt'
    write_images(images, 14)
    sample.write_text('\n'.join(SAMPLE_TEXTS) + '\n')
    built = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'open_clip_llip',
         'index', 'build', str(output), '--images', str(images), '--model', 'Llip-Tiny', '--pretrained',
         str(checkpoint), '--workers', '0', '--batch-size', '4', '--device', 'cpu', '--prototype-texts', str(sample),
         '--prototypes', '3'], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert 'Indexed 14 images into 2 shards' in built.stdout
    assert 'Shard 0: 100%' in built.stderr and 'Shard 1: 100%' in built.stderr  # a progress bar per process
    plan = json.loads((output / PLAN).read_text())
    assert [entry['count'] for entry in plan['shards']] == [7, 7] and plan['first_stage']['prototypes'] == 3
    for entry in plan['shards']:  # each shard a self-contained index folder with its own manifest
        assert sorted(path.name for path in (output / entry['folder']).iterdir()) == sorted(
            [MANIFEST, FEATURES, FIRST_STAGE, NAMES])
    assert sorted(path.name for path in output.iterdir()) == sorted([PLAN, TRAINED_FIRST_STAGE, 'shard-00000',
                                                                     'shard-00001'])
    assert verify_gallery(output) == []

    from open_clip_llip.evaluation.tasks import load_model
    model, _, tokenizer = load_model('Llip-Tiny', str(checkpoint))
    gallery = ShardedIndex.open(output, model, tokenizer)
    assert len(gallery) == 14 and gallery.image_names([0, 13]) == [str(images / '00.png'), str(images / '13.png')]
    assert_same_answers(gallery, one_index_of(gallery, tmp_path / 'one'))

    # The command queries a gallery as an index, saying which shard each image came from.
    queried = subprocess.run([sys.executable, '-m', 'open_clip_llip', 'index', 'query', str(output), QUERIES[0], '--k',
                              '3', '--candidates', '5', '--json'], capture_output=True, text=True, env=ENV)
    assert queried.returncode == 0, queried.stderr
    (printed,), (expected,) = json.loads(queried.stdout), gallery.search(QUERIES[:1], k=3, candidates=5).records()
    assert [{**result, 'score': pytest.approx(result['score'], abs=1e-6)} for result in printed['results']] == \
        expected['results']  # another process, another thread count: scores within float32 rounding
    assert printed['query'] == QUERIES[0] and set(printed['results'][0]) == {'rank', 'id', 'name', 'score', 'shard'}


KILLED_BUILD = '''
import logging, os, signal, sys
import open_clip, torch
from open_clip_llip.search.shards import build_sharded_index

output, checkpoint, log, kill_at, resume = sys.argv[1:]
logging.basicConfig(level=logging.INFO)


class Images(torch.utils.data.Dataset):
    """Random images; reading image ``kill_at`` a second time (the first: in the first stage's sample) kills this
    process, as a machine failure would."""
    images = torch.randn(30, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index == int(kill_at):
            Images.reads += 1
            if Images.reads == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        with open(log, 'a') as file:
            file.write(f'{index}\\n')
        return self.images[index]


model = open_clip.create_model('Llip-Tiny', pretrained=checkpoint).eval()
build_sharded_index(output, model, Images(), [f'image-{i}' for i in range(30)], shards=3, batch_size=5, workers=0,
                    resume=resume == 'resume')
'''


def test_a_killed_build_resumes_without_redoing_its_finished_shards(checkpoint, tmp_path):
    script, output, log = tmp_path / 'build.py', tmp_path / 'gallery', tmp_path / 'read.log'
    script.write_text(KILLED_BUILD)

    def build(kill_at, resume):
        return subprocess.run([sys.executable, str(script), str(output), str(checkpoint), str(log), str(kill_at),
                               resume], capture_output=True, text=True, env=ENV, timeout=300)

    killed = build(kill_at=15, resume='new')  # in shard 1 (images 10 to 19), after shard 0 was written
    assert killed.returncode == -9, killed.stderr[-3000:]
    finished = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in (output / 'shard-00000').iterdir()}
    assert set(finished) == {MANIFEST, FEATURES, FIRST_STAGE, NAMES} and not (output / 'shard-00002').exists()
    assert not (output / 'shard-00001' / MANIFEST).exists()  # the killed shard: a journal and temporaries
    model = open_clip.create_model('Llip-Tiny', pretrained=str(checkpoint)).eval()
    with pytest.raises(ValueError, match='not fully built: shard-00001, shard-00002 missing. Resume the build'):
        ShardedIndex.open(output, model)
    assert [problem.split(': ')[1] for problem in verify_gallery(output)] == ['not built (or not for this plan)'] * 2
    with pytest.raises(ValueError, match=r'planned for other images \(30; this build has 29, or other names\)'):
        build_sharded_index(output, model, torch.utils.data.TensorDataset(torch.zeros(29)), shards=3, resume=True)

    log.unlink()
    resumed = build(kill_at=-1, resume='resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Shard 0 of' in resumed.stderr and 'built already: kept' in resumed.stderr
    assert sorted(map(int, log.read_text().split())) == list(range(10, 30))  # shard 0's images never read again
    assert {path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in (output / 'shard-00000').iterdir()} == finished
    assert sorted(path.name for path in (output / 'shard-00001').iterdir()) == sorted(
        [MANIFEST, FEATURES, FIRST_STAGE, NAMES])  # nothing left of the killed attempt
    assert verify_gallery(output) == []
    gallery = ShardedIndex.open(output, model, open_clip.get_tokenizer('Llip-Tiny'))
    assert_same_answers(gallery, one_index_of(gallery, tmp_path / 'one'))

    # --overwrite builds afresh: every shard's files and the plan replaced, nothing else touched.
    (output / 'notes.txt').write_text('mine')
    again = build_sharded_index(output, model, list(torch.randn(8, 3, 32, 32)), shards=2, workers=0, batch_size=4,
                                overwrite=True)
    assert len(again) == 8 and (output / 'notes.txt').read_text() == 'mine'
    assert sorted(path.name for path in output.iterdir()) == sorted([PLAN, TRAINED_FIRST_STAGE, 'shard-00000',
                                                                     'shard-00001', 'notes.txt'])


def test_the_command_refuses_resume_without_shards(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['build', str(tmp_path / 'x'), '--images', str(tmp_path), '--model', 'Llip-Tiny', '--resume',
              '--overwrite'])
    assert exit_info.value.code == 2 and '--resume keeps the finished shards' in capsys.readouterr().err

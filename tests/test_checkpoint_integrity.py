"""Checkpoints are saved whole with a digest of their tensors; cut or altered ones are refused by name, never loaded.

Unit tests on ``modeling.checkpoint``, then tiny Llip-Tiny trainings with OpenCLIP's own loop
(``open_clip_train.main``) resumed with ``--resume latest`` over damaged checkpoints.
"""
import errno
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import open_clip
import open_clip_train.main as train_main
import pytest
import torch
from conftest import REFERENCE

from open_clip_llip import LlipModel
from open_clip_llip.integration.adapters import is_llip_model
from open_clip_llip.modeling.checkpoint import (
    DIGEST_KEY,
    DamagedCheckpoint,
    checkpoint_problem,
    read_state_dict,
    save_checkpoint,
    state_dict_digest,
)


def tiny_checkpoint():
    torch.manual_seed(0)
    return {'epoch': 1, 'name': 'run', 'state_dict': open_clip.create_model('Llip-Tiny').state_dict(),
            'optimizer': {'state': {}, 'param_groups': []}}


def tensor_data_span(path):
    """(offset, length) in the file of the bytes of the largest tensor storage (torch's zip member data/N)."""
    with zipfile.ZipFile(path) as archive:
        info = max((info for info in archive.infolist() if '/data/' in info.filename), key=lambda info: info.file_size)
    with open(path, 'rb') as file:
        file.seek(info.header_offset)
        header = file.read(30)
    name_length, extra_length = struct.unpack('<HH', header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def flip_bytes(path, count=4):
    """Invert ``count`` bytes in the middle of a tensor's data."""
    offset, length = tensor_data_span(path)
    data = bytearray(path.read_bytes())
    for index in range(offset + length // 2, offset + length // 2 + count):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def cut(path, where):
    """Cut the file short: inside the first zip header, inside a tensor's data, or just before its end."""
    data = path.read_bytes()
    offset, length = tensor_data_span(path)
    size = {'in the zip header': 20, 'in tensor data': offset + length // 2, 'at the end': len(data) - 10}[where]
    path.write_bytes(data[:size])


CUTS = ['in the zip header', 'in tensor data', 'at the end']


def test_a_saved_checkpoint_records_the_digest_of_its_tensors_and_loads(tmp_path):
    checkpoint = tiny_checkpoint()
    save_checkpoint(checkpoint, tmp_path / 'epoch_1.pt')
    saved = torch.load(tmp_path / 'epoch_1.pt', weights_only=True)
    assert saved[DIGEST_KEY] == state_dict_digest(checkpoint['state_dict'])
    assert checkpoint_problem(tmp_path / 'epoch_1.pt') is None
    assert read_state_dict(tmp_path / 'epoch_1.pt').keys() == checkpoint['state_dict'].keys()
    assert [path.name for path in tmp_path.iterdir()] == ['epoch_1.pt']  # no temporary file left


def test_the_digest_depends_on_every_tensor_but_not_on_key_order():
    state = tiny_checkpoint()['state_dict']
    assert state_dict_digest(dict(reversed(state.items()))) == state_dict_digest(state)
    changed = dict(state, logit_scale=state['logit_scale'] + 1e-6)
    assert state_dict_digest(changed) != state_dict_digest(state)
    retyped = dict(state, logit_scale=state['logit_scale'].view(torch.int32))  # the same bytes, another dtype
    assert state_dict_digest(retyped) != state_dict_digest(state)


@pytest.mark.parametrize('count', [1, 64])
def test_a_checkpoint_with_flipped_bytes_in_its_tensors_is_refused_as_damaged(tmp_path, count):
    path = tmp_path / 'epoch_1.pt'
    save_checkpoint(tiny_checkpoint(), path)
    flip_bytes(path, count)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(DamagedCheckpoint, match=rf'{path} is damaged: its tensors do not match the SHA-256 digest'):
        read_state_dict(path)
    with pytest.raises(DamagedCheckpoint, match='is damaged'):
        LlipModel(**{k: v for k, v in open_clip.get_model_config('Llip-Tiny').items() if k != 'model_class'}) \
            .load_checkpoint(str(path))
    assert 'is damaged' in checkpoint_problem(path)


@pytest.mark.parametrize('where', CUTS)
def test_a_checkpoint_cut_short_is_refused_by_name(tmp_path, where):
    path = tmp_path / 'epoch_1.pt'
    save_checkpoint(tiny_checkpoint(), path)
    cut(path, where)
    with pytest.raises(DamagedCheckpoint, match=rf'Could not read {path} as a checkpoint .*cut short or damaged'):
        read_state_dict(path)
    assert str(path) in checkpoint_problem(path) and 'cut short' in checkpoint_problem(path)


def test_a_save_that_fails_midway_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / 'epoch_latest.pt'
    save_checkpoint(tiny_checkpoint(), path)
    before = path.read_bytes()

    def disk_fills_up(obj, file):
        file.write(before[:len(before) // 2])
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_fills_up)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint(tiny_checkpoint(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['epoch_latest.pt']


@pytest.mark.parametrize('name', ['tiny', 'tiny-norm'])
def test_a_released_layout_checkpoint_without_digest_still_loads(name):
    saved = torch.load(REFERENCE / f'{name}.release-layout.pt', weights_only=True)
    assert DIGEST_KEY not in saved
    assert checkpoint_problem(REFERENCE / f'{name}.release-layout.pt') is None
    assert read_state_dict(REFERENCE / f'{name}.release-layout.pt').keys() == saved['state_dict'].keys()


# Trainings with OpenCLIP's loop.


def train(tmp_path, *args, epochs=2, name='run'):
    """Run open_clip_train on 8 synthetic samples, saving every epoch; return (main's result, the run's folder)."""
    result = train_main.main([
        '--model', 'Llip-Tiny', '--dataset-type', 'synthetic', '--train-num-samples', '8', '--batch-size', '8',
        '--epochs', str(epochs), '--lr', '1e-3', '--warmup', '1', '--workers', '0', '--precision', 'fp32',
        '--seed', '0', '--save-frequency', '1', '--logs', str(tmp_path / 'logs'), '--name', name, *args])
    return result, tmp_path / 'logs' / name


def damage(path, how):
    flip_bytes(path) if how == 'flipped bytes' else cut(path, how)


DAMAGE = ['flipped bytes', *CUTS]


@pytest.mark.usefixtures('restore_logging')
def test_llip_training_saves_checkpoints_with_a_digest_and_restores_open_clip_train(tmp_path):
    result, run = train(tmp_path, epochs=1)
    assert result is None
    saved = torch.load(run / 'checkpoints' / 'epoch_1.pt', weights_only=True)
    assert saved[DIGEST_KEY] == state_dict_digest(saved['state_dict'])
    assert sorted(path.name for path in (run / 'checkpoints').iterdir()) == ['epoch_1.pt']
    assert train_main.torch is torch and train_main.get_latest_checkpoint.__module__ == 'open_clip_train.main'


@pytest.mark.usefixtures('restore_logging')
@pytest.mark.parametrize('how', DAMAGE)
def test_resume_latest_skips_a_damaged_latest_checkpoint_and_says_so(tmp_path, how):
    train(tmp_path, epochs=2)
    checkpoints = tmp_path / 'logs' / 'run' / 'checkpoints'
    damage(checkpoints / 'epoch_2.pt', how)
    result, run = train(tmp_path, '--resume', 'latest', epochs=3)
    log = (run / 'out.log').read_text()
    assert result is None
    assert f'Skipping a damaged checkpoint: {checkpoints / "epoch_2.pt"}' in log
    assert f'Resuming from {checkpoints / "epoch_1.pt"}, the latest intact checkpoint, instead.' in log
    assert f"resuming checkpoint '{checkpoints / 'epoch_1.pt'}' (epoch 1)" in log
    assert torch.load(checkpoints / 'epoch_3.pt', weights_only=True)['epoch'] == 3
    assert torch.load(checkpoints / 'epoch_2.pt', weights_only=True)['epoch'] == 2  # saved again, whole


@pytest.mark.usefixtures('restore_logging')
def test_resume_latest_with_only_damaged_checkpoints_refuses_with_their_names_and_no_traceback(tmp_path, capsys):
    train(tmp_path, epochs=2)
    checkpoints = tmp_path / 'logs' / 'run' / 'checkpoints'
    damage(checkpoints / 'epoch_1.pt', 'in tensor data')
    damage(checkpoints / 'epoch_2.pt', 'flipped bytes')
    result, run = train(tmp_path, '--resume', 'latest', epochs=3)
    assert result == -1
    log = (run / 'out.log').read_text()
    assert (f'Error. No intact checkpoint to resume from in {checkpoints}: {checkpoints / "epoch_2.pt"}, '
            f'{checkpoints / "epoch_1.pt"} cannot be used') in log
    assert 'Move them out of the folder and run again to start afresh' in log
    assert 'Traceback' not in log + capsys.readouterr().err
    assert not (checkpoints / 'epoch_3.pt').exists()


@pytest.mark.usefixtures('restore_logging')
def test_resuming_an_explicit_damaged_checkpoint_refuses_with_its_name(tmp_path):
    train(tmp_path, epochs=1, name='first')
    path = tmp_path / 'logs' / 'first' / 'checkpoints' / 'epoch_1.pt'
    flip_bytes(path)
    result, run = train(tmp_path, '--resume', str(path), epochs=2, name='second')
    assert result == -1
    assert f'Error. Cannot resume: {path} is damaged' in (run / 'out.log').read_text()


@pytest.mark.usefixtures('restore_logging')
def test_resume_latest_refuses_a_damaged_most_recent_checkpoint_with_its_name(tmp_path):
    train(tmp_path, '--save-most-recent', epochs=1)
    path = tmp_path / 'logs' / 'run' / 'checkpoints' / 'epoch_latest.pt'
    flip_bytes(path)
    result, run = train(tmp_path, '--save-most-recent', '--resume', 'latest', epochs=2)
    assert result == -1
    assert f'Error. Cannot resume: {path} is damaged' in (run / 'out.log').read_text()


def test_the_open_clip_train_command_refuses_damaged_checkpoints_with_status_1_and_no_traceback(tmp_path):
    checkpoints = tmp_path / 'logs' / 'run' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    for epoch, where in ((1, 'at the end'), (2, 'in the zip header')):
        save_checkpoint(tiny_checkpoint(), checkpoints / f'epoch_{epoch}.pt')
        cut(checkpoints / f'epoch_{epoch}.pt', where)
    result = subprocess.run(
        [str(Path(sys.executable).parent / 'open_clip_train'), '--model', 'Llip-Tiny', '--dataset-type', 'synthetic',
         '--train-num-samples', '8', '--batch-size', '8', '--epochs', '3', '--workers', '0', '--precision', 'fp32',
         '--logs', str(tmp_path / 'logs'), '--name', 'run', '--resume', 'latest'],
        capture_output=True, text=True)
    assert result.returncode == 1
    assert 'Traceback' not in result.stdout + result.stderr
    assert f'Error. No intact checkpoint to resume from in {checkpoints}' in result.stdout + result.stderr


def test_only_llip_runs_are_adapted():
    assert is_llip_model('Llip-Tiny') and not is_llip_model('RN50') and not is_llip_model('ViT-B-32')
    assert not is_llip_model('Llip-Tny') and not is_llip_model('local-dir:/nonexistent')


@pytest.mark.usefixtures('restore_logging')
def test_python_dash_m_open_clip_train_saves_with_a_digest_and_resumes_past_a_damaged_checkpoint(tmp_path):
    """``python -m open_clip_train.main`` (and torchrun's workers) run the module as ``__main__``: adapted all the same."""
    _, run = train(tmp_path, epochs=1)
    checkpoints = run / 'checkpoints'
    save_checkpoint(tiny_checkpoint(), checkpoints / 'epoch_2.pt')
    cut(checkpoints / 'epoch_2.pt', 'in tensor data')
    result = subprocess.run(
        [sys.executable, '-m', 'open_clip_train.main', '--model', 'Llip-Tiny', '--dataset-type', 'synthetic',
         '--train-num-samples', '8', '--batch-size', '8', '--epochs', '2', '--workers', '0', '--precision', 'fp32',
         '--logs', str(tmp_path / 'logs'), '--name', 'run', '--resume', 'latest'],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f'Resuming from {checkpoints / "epoch_1.pt"}, the latest intact checkpoint, instead.' in result.stderr
    saved = torch.load(checkpoints / 'epoch_2.pt', weights_only=True)
    assert saved['epoch'] == 2 and saved[DIGEST_KEY] == state_dict_digest(saved['state_dict'])

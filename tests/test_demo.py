"""The main job, shortened (--quick: tiny data, a few steps): every output it promises, from one command."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'demo.py'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def test_quick_main_job_trains_evaluates_and_plots(tmp_path):
    output = tmp_path / 'demo'
    result = subprocess.run([sys.executable, str(SCRIPT), '--quick', '--seeds', '0', '1', '--output', str(output),
                             '--arms', 'llip', 'siglip', 'control'], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout
    assert 'Llip-Tiny' in table and 'SigLIP (Twin-Llip-Tiny)' in table and 'Llip-Tiny, uniform mixing' in table
    assert 'big-colour' in table and 'samples/s' in table
    assert '[6/6] ' in result.stderr and 's to go' in result.stderr  # progress

    results = json.loads((output / 'results.json').read_text())
    assert results['labels'] == {'llip': 'Llip-Tiny', 'siglip': 'SigLIP (Twin-Llip-Tiny)',
                                 'control': 'Llip-Tiny, uniform mixing'}
    for runs in results['results'].values():
        assert len(runs) == 2  # one per seed
        assert {'shape', 'left-colour', 'big-colour', 'big-shape', 'relation', 'unseen-pairs', 'retrieval'} <= set(runs[0])
        assert 0 <= runs[0]['retrieval']['text_to_image_R@1'] <= 1
    llip, siglip = results['results']['llip'], results['results']['siglip']
    gap = [(a['big-colour']['top1'] - b['big-colour']['top1']) * 100 for a, b in zip(llip, siglip)]
    assert results['gap_to_siglip']['llip']['big-colour top1'][0] == pytest.approx(sum(gap) / 2)
    assert (output / 'results.md').read_text().startswith('| task | metric | Llip-Tiny |')
    for plot in ('training_curves.png', 'gap.png', 'attention.png'):
        assert (output / plot).read_bytes()[:8] == PNG_SIGNATURE
    # Every arm trained through OpenCLIP's stock loop, the twin with its SigLipLoss, all from the same kind of start.
    assert 'training with LlipLoss' in (output / 'runs' / 'Llip-Tiny-seed0' / 'out.log').read_text()
    assert 'training with LlipLoss' in (output / 'runs' / 'Llip-Tiny-uniform-seed0' / 'out.log').read_text()
    assert 'siglip: True' in (output / 'runs' / 'Twin-Llip-Tiny-seed0' / 'params.txt').read_text()
    for run in ('Llip-Tiny-seed0', 'Twin-Llip-Tiny-seed0', 'Llip-Tiny-uniform-seed0'):
        # Built-in data: every arm keeps its token embedding at the initial weights, everything above it trains.
        params = (output / 'runs' / run / 'params.txt').read_text()
        assert 'lock_text: True' in params and 'lock_text_unlocked_layers: 3' in params
        trained = torch.load(output / 'runs' / run / 'checkpoints' / 'epoch_1.pt', weights_only=True)['state_dict']
        initial = torch.load(output / 'init' / run / 'open_clip_pytorch_model.bin', weights_only=True)
        embedding = next(key for key in initial if key.endswith('token_embedding.weight'))
        assert torch.equal(trained[embedding], initial[embedding])
        projection = next(key for key in initial if key.endswith('text_projection'))
        assert not torch.equal(trained[projection], initial[projection])
    control = json.loads((output / 'init' / 'Llip-Tiny-uniform-seed1' / 'open_clip_config.json').read_text())
    assert control['model_cfg']['llip_cfg']['contextual'] is False
    for run in ('Llip-Tiny-seed1', 'Twin-Llip-Tiny-seed1', 'Llip-Tiny-uniform-seed1'):
        initial = torch.load(output / 'init' / run / 'open_clip_pytorch_model.bin', weights_only=True)
        assert initial['logit_bias'].item() == pytest.approx(-math.log(63)) and initial['logit_scale'].item() == \
            pytest.approx(math.log(10))


def test_main_job_keeps_what_is_already_in_its_output(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    command = [sys.executable, str(SCRIPT), '--quick', '--output', str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and 'is not empty; choose a new or empty folder, or pass --overwrite to replace an ' \
        'earlier demo run that scripts/demo.py wrote there' in result.stderr
    result = subprocess.run(command + ['--overwrite'], capture_output=True, text=True)
    assert result.returncode != 0 and 'is not empty and holds nothing that scripts/demo.py wrote (no demo.json listing ' \
        'the files of its demo run); not overwriting it' in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ['notes.txt'] and (tmp_path / 'notes.txt').read_text() == 'mine'


def test_main_job_overwrites_only_its_own_files(tmp_path):
    """--overwrite of an earlier run removes what that run wrote; a user's file in any of its folders stays."""
    output = tmp_path / 'demo'
    command = [sys.executable, str(SCRIPT), '--quick', '--seeds', '0', '--output', str(output)]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    planted = {folder / 'mine.txt': str(folder) for folder in {p.parent for p in output.rglob('*') if p.is_file()}}
    assert output / 'runs' / 'Llip-Tiny-seed0' / 'checkpoints' / 'mine.txt' in planted
    for path, text in planted.items():
        path.write_text(text)
    result = subprocess.run(command + ['--overwrite'], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(path.read_text() == text for path, text in planted.items())
    assert (output / 'results.json').is_file()


def test_main_job_takes_a_llip_config_file(tmp_path):
    """--model may be a JSON config (the way to try another K, τ or size): trained as local-dir:, same twin."""
    config = json.loads((SCRIPT.parents[1] / 'model_configs' / 'Llip-Tiny.json').read_text())
    config['llip_cfg']['mixture_tokens'] = 3
    (tmp_path / 'Llip-K3.json').write_text(json.dumps(config))
    output = tmp_path / 'demo'
    result = subprocess.run([sys.executable, str(SCRIPT), '--quick', '--seeds', '0',
                             '--model', str(tmp_path / 'Llip-K3.json'), '--output', str(output)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((output / 'results.json').read_text())['labels']['siglip'] == 'SigLIP (Twin-Llip-K3)'
    state = torch.load(output / 'runs' / 'Llip-K3-seed0' / 'checkpoints' / 'epoch_1.pt', weights_only=True)['state_dict']
    assert state['visual.k_proj'].shape[0] == 3
    twin = json.loads((output / 'init' / 'Twin-Llip-K3-seed0' / 'open_clip_config.json').read_text())['model_cfg']
    assert 'llip_cfg' not in twin and twin['vision_cfg'] == config['vision_cfg']


@pytest.mark.parametrize('model, message', [
    ('ViT-B-32', 'is not a Llip config'),
    ('missing.json', 'no such config file'),
    ('Llip-ViT-B16', "Did you mean 'Llip-ViT-B-16'?"),
])
def test_main_job_refuses_a_model_that_is_not_llip(tmp_path, model, message):
    model = str(tmp_path / model) if model.endswith('.json') else model
    result = subprocess.run([sys.executable, str(SCRIPT), '--quick', '--model', model, '--output', str(tmp_path / 'demo')],
                            capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


def test_main_job_on_given_shards_and_evaluation_sets(tmp_path):
    """The real workflow's shape: --train-data shards, --train-num-samples and evaluation sets of one's own."""
    from open_clip_llip.data import write_dataset
    data = tmp_path / 'data'
    manifest = write_dataset(data, train_images=16, zeroshot_images=2, retrieval_images=8, samples_per_shard=32)
    task = manifest['zeroshot']['big-colour']
    output = tmp_path / 'demo'
    result = subprocess.run([
        sys.executable, str(SCRIPT), '--seeds', '0', '--epochs', '1', '--warmup', '1', '--output', str(output),
        '--train-data', str(data / manifest['train']['data']), '--train-num-samples', str(manifest['train']['num_samples']),
        '--zeroshot-images', str(data / task['folder']), '--classnames', str(data / task['classnames']),
        '--templates', str(data / task['templates']), '--retrieval', str(data / manifest['retrieval']['csv'])],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (output / 'data').exists()  # nothing built in was written
    runs = json.loads((output / 'results.json').read_text())['results']['llip']
    assert set(runs[0]) == {'big-colour', 'retrieval'}


def test_main_job_checks_evaluation_options_before_training(tmp_path):
    result = subprocess.run([
        sys.executable, str(SCRIPT), '--output', str(tmp_path / 'demo'), '--train-data', 'shards/{0..1}.tar',
        '--train-num-samples', '8', '--zeroshot-images', 'a', '--zeroshot-images', 'b', '--classnames', 'a.txt',
        '--templates', 't.txt'], capture_output=True, text=True)
    assert result.returncode != 0 and 'give one --classnames per --zeroshot-images (got 1 and 2)' in result.stderr
    assert not (tmp_path / 'demo').exists()

"""Llip trains with OpenCLIP's own loop (open_clip_train.main), unchanged."""
import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from conftest import EPS32, write_retrieval_csv
from open_clip_train.main import main as open_clip_train_main
from PIL import Image

from open_clip_llip import LlipModel

COLOURS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 70, 220), 'yellow': (230, 210, 40),
           'purple': (140, 50, 180), 'orange': (240, 140, 30), 'white': (235, 235, 235), 'black': (20, 20, 20)}
CORNERS = {'top left': (0, 0), 'top right': (16, 0), 'bottom left': (0, 16), 'bottom right': (16, 16)}
LOSS = re.compile(r'Contrastive_loss: ([0-9.naninf]+)')

pytestmark = pytest.mark.usefixtures('restore_logging')


def train(tmp_path, *args, name='run', model='Llip-Tiny', samples=32, epochs=1):
    """Run open_clip_train on synthetic data (unless ``args`` give data); return the run's log folder."""
    data = [] if '--train-data' in args else ['--dataset-type', 'synthetic', '--train-num-samples', str(samples)]
    open_clip_train_main([
        '--model', model, *data, '--batch-size', '8', '--epochs', str(epochs), '--lr', '1e-3', '--warmup', '2',
        '--workers', '0', '--precision', 'fp32', '--seed', '0', '--logs', str(tmp_path / 'logs'), '--name', name,
        *args])
    return tmp_path / 'logs' / name


def logged_losses(run_dir):
    return [float(x) for x in LOSS.findall((run_dir / 'out.log').read_text())]


def final_state(run_dir, epoch=1):
    return torch.load(run_dir / 'checkpoints' / f'epoch_{epoch}.pt', weights_only=True)


def initial_state():
    torch.manual_seed(0)  # main's random_seed(0) before the model is built
    return open_clip.create_model('Llip-Tiny').state_dict()


@pytest.mark.parametrize('flags', [
    [],
    ['--accum-freq', '2'],
    ['--grad-checkpointing'],
    ['--precision', 'amp_bf16'],
    ['--report-to', 'tensorboard'],
    ['--siglip', '--loss-dist-impl', 'gather'],
], ids=lambda flags: ' '.join(flags) or 'plain')
def test_stock_loop_trains_llip(tmp_path, flags):
    run = train(tmp_path, *flags)
    log = (run / 'out.log').read_text()
    assert 'training with LlipLoss' in log
    losses = logged_losses(run)
    assert losses and all(np.isfinite(losses))
    state = final_state(run)['state_dict']
    initial = initial_state()
    assert any(not torch.equal(state[k], initial[k]) for k in initial), 'no parameter changed'
    if '--report-to' in flags:
        assert list((run / 'tensorboard').glob('events.out.tfevents.*'))


def test_local_dir_llip_config_trains_with_llip_loss(tmp_path):
    """OpenCLIP's ``--model local-dir:FOLDER`` (a folder with open_clip_config.json) selects the loss from that config."""
    config = dict(open_clip.get_model_config('Llip-Tiny'), embed_dim=32)
    (tmp_path / 'my-llip').mkdir()
    (tmp_path / 'my-llip' / 'open_clip_config.json').write_text(json.dumps({'model_cfg': config}))
    run = train(tmp_path, model=f'local-dir:{tmp_path / "my-llip"}')
    log = (run / 'out.log').read_text()
    assert 'training with LlipLoss' in log
    assert 'This run validates nothing: give --val-data' in log  # no --val-data, no --imagenet-val
    assert final_state(run)['state_dict']['text.text_projection'].shape == (64, 32)


def test_lock_image_keeps_image_tower(tmp_path):
    state = final_state(train(tmp_path, '--lock-image'))['state_dict']
    initial = initial_state()
    assert all(torch.equal(state[k], initial[k]) for k in initial if k.startswith('visual.'))
    assert not torch.equal(state['mixer.out_proj'], initial['mixer.out_proj'])


def test_lock_text_keeps_text_tower_but_its_layer_norms(tmp_path):
    state = final_state(train(tmp_path, '--lock-text'))['state_dict']
    initial = initial_state()
    frozen = [k for k in initial if k.startswith(('text.', 'query_head.')) and '.ln_' not in k]
    assert frozen and all(torch.equal(state[k], initial[k]) for k in frozen)
    assert not torch.equal(state['text.ln_final.weight'], initial['text.ln_final.weight'])


def test_torchcompile_trains_several_steps_without_recompiling(tmp_path, monkeypatch):
    """OpenCLIP 3 compiles the model, OpenCLIP 4 its task (model and loss): once, for all 4 steps.

    Dynamo's guards decide recompiles, whatever the backend: aot_eager stands in for inductor, whose C++ build
    fails in a session where the standard library's distutils was imported before setuptools.
    """
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        run = train(tmp_path, '--torchcompile', samples=32)
    assert all(np.isfinite(logged_losses(run)))
    assert 'visual.k_proj' in final_state(run)['state_dict']  # saved without torch.compile's prefix


def test_resume_continues_from_saved_step_optimizer_and_scaler(tmp_path):
    """Two epochs straight equal one epoch, saved, then resumed: weights, optimizer and scaler state."""
    # amp: a GradScaler whose state is saved; a constant schedule (after warm-up) does not depend on --epochs.
    args = ('--precision', 'amp', '--save-frequency', '1', '--lr-scheduler', 'const')
    straight = train(tmp_path, *args, name='straight', epochs=2)
    first = train(tmp_path, *args, name='first', epochs=1)
    resumed = train(tmp_path, *args, '--resume', str(first / 'checkpoints' / 'epoch_1.pt'), name='resumed', epochs=2)
    assert "resuming checkpoint" in (resumed / 'out.log').read_text()
    expected, got = final_state(straight, 2), final_state(resumed, 2)
    assert got['epoch'] == 2 and 'scaler' in got
    for key, value in expected['state_dict'].items():
        torch.testing.assert_close(got['state_dict'][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for index, state in expected['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(got['optimizer']['state'][index][name], value, rtol=1e-6, atol=1e-7)
    assert got['scaler'] == expected['scaler']


def learnable_samples(count, seed=0):
    """(PNG bytes, caption) of images with one coloured square in one corner; the caption names both."""
    rng = np.random.default_rng(seed)
    names, corners = list(COLOURS), list(CORNERS)
    for _ in range(count):
        colour, corner = names[rng.integers(len(names))], corners[rng.integers(len(corners))]
        x, y = CORNERS[corner]
        image = np.full((32, 32, 3), 128.)
        image[y:y + 16, x:x + 16] = COLOURS[colour]
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format='PNG')
        yield buffer.getvalue(), f'a {colour} square at the {corner}'


def write_learnable_shards(folder, count=2048, seed=0):
    with wds.TarWriter(str(folder / 'train-0.tar')) as sink:
        for index, (png, caption) in enumerate(learnable_samples(count, seed)):
            sink.write({'__key__': f'{index:06d}', 'png': png, 'txt': caption})
    return folder / 'train-0.tar'


def write_learnable_csv(folder, count=2048, seed=0):
    """The same samples as files and OpenCLIP's CSV, which its loader shuffles with the seeded generator
    (webdataset's sample shuffle is not seeded): the same run, the same losses."""
    (folder / 'images').mkdir()
    rows = ['filepath\ttitle']
    for index, (png, caption) in enumerate(learnable_samples(count, seed)):
        (folder / 'images' / f'{index:06d}.png').write_bytes(png)
        rows.append(f'{folder / "images" / f"{index:06d}.png"}\t{caption}')
    (folder / 'train.csv').write_text('\n'.join(rows) + '\n')
    return folder / 'train.csv'


def test_loss_falls_on_learnable_data(tmp_path):
    """Batch 32: a model that learns nothing but the bias reaches 4.45 (σ(b) = 1/32); we must go well below."""
    data = write_learnable_csv(tmp_path)
    run = train(tmp_path, '--train-data', str(data), '--dataset-type', 'csv', '--batch-size', '32', '--lr', '2e-3',
                '--warmup', '10', '--log-every-n-steps', '8', epochs=3)
    losses = logged_losses(run)
    bias_only = -np.log(1 / 32) - 31 * np.log(31 / 32)
    assert losses[0] > 9
    assert np.mean(losses[-4:]) < 0.8 * bias_only, losses


def test_corrupt_and_empty_shards_are_skipped_as_openclip_does(tmp_path):
    good = write_learnable_shards(tmp_path, count=64)
    (tmp_path / 'train-1.tar').write_bytes(b'')
    (tmp_path / 'train-2.tar').write_bytes(os.urandom(4096))
    run = train(tmp_path, '--train-data', f'{tmp_path}/train-{{0..2}}.tar', '--dataset-type', 'webdataset',
                '--train-num-samples', '64')
    assert all(np.isfinite(logged_losses(run)))
    log = (run / 'out.log').read_text()
    assert 'Handling webdataset error' in log or 'Skipped 1 webdataset samples' in log  # OpenCLIP 3, 4
    assert good.exists()


def test_non_finite_loss_stops_with_step_and_hint(tmp_path):
    with pytest.raises(FloatingPointError, match=r'is nan at epoch 0, step \d+; stopping rather than training on '
                                                 r'NaNs\. Try a lower learning rate \(--lr\), or --precision amp_bf16'):
        train(tmp_path, '--lr', '1e30', samples=128)


def test_near_miss_model_name_lists_llip_configs(tmp_path):
    with pytest.raises(RuntimeError, match=r"Unknown model 'Llip-ViT-B16'\. Did you mean 'Llip-ViT-B-16'\? "
                                           r"Llip configs: Llip-Tiny, Llip-ViT-B-16, Llip-ViT-B-32"):
        train(tmp_path, model='Llip-ViT-B16')


def run_python(code, **env):
    environ = dict(os.environ, **env)
    return subprocess.run([sys.executable, '-c', code], env=environ, capture_output=True, text=True, check=True)


def test_open_clip_models_train_and_evaluate_exactly_as_before(tmp_path):
    """CLIP and SigLIP runs give bit-identical weights and validation metrics with and without the plugin."""
    config = open_clip.get_model_config('Llip-Tiny')
    for key in ('model_class', 'llip_cfg', 'init_logit_bias'):
        config.pop(key)
    (tmp_path / 'Tiny-CLIP.json').write_text(json.dumps(config))
    val_csv, _ = write_retrieval_csv(tmp_path / 'val')  # also the training data: a CSV loader is seeded, wds is not
    epochs = 32  # open_clip_train's default: each epoch is validated, and only the last one's weights are saved
    results = {}
    for autoload in ('0', '1'):
        code = f"""if True:
            import open_clip, torch
            open_clip.add_model_config({str(tmp_path / 'Tiny-CLIP.json')!r})
            from open_clip_train.main import main
            for extra in ([], ['--siglip']):
                name = 'autoload{autoload}' + ''.join(extra)
                main(['--model', 'Tiny-CLIP', '--train-data', {str(val_csv)!r}, '--val-data', {str(val_csv)!r},
                      '--batch-size', '4', '--epochs', '{epochs}', '--lr', '1e-3', '--warmup', '2',
                      '--workers', '0', '--precision', 'fp32', '--logs', {str(tmp_path / 'logs')!r},
                      '--name', name, '--save-frequency', '0', *extra])
        """
        run_python(code, OPEN_CLIP_LLIP_AUTOLOAD=autoload)
        for extra in ('', '--siglip'):
            run_dir = tmp_path / 'logs' / f'autoload{autoload}{extra}'
            results[autoload, extra] = (final_state(run_dir, epochs)['state_dict'],
                                        (run_dir / 'checkpoints' / 'results.jsonl').read_text())
            # 40 MB, mostly Adam's moments of the token embedding; the weights compared are in results now.
            (run_dir / 'checkpoints' / f'epoch_{epochs}.pt').unlink()
    for extra in ('', '--siglip'):
        (without, without_metrics), (with_plugin, with_metrics) = results['0', extra], results['1', extra]
        assert without.keys() == with_plugin.keys()
        assert all(torch.equal(without[k], with_plugin[k]) for k in without)
        assert with_metrics == without_metrics and 'image_to_text_R@1' in with_metrics
    assert not torch.equal(results['1', ''][0]['logit_scale'], results['1', '--siglip'][0]['logit_scale'])


def test_open_clip_train_command_takes_exactly_openclips_arguments(tmp_path):
    # The console script pip installed beside this interpreter: the venv's bin need not be on PATH.
    command = str(Path(sys.executable).parent / 'open_clip_train')
    ours = subprocess.run([command, '--help'], capture_output=True, text=True, check=True).stdout
    stock = run_python('from open_clip_train.main import main; main(["--help"])', OPEN_CLIP_LLIP_AUTOLOAD='0')
    # The same text once argparse's line wrapping (which depends on the program's name) is undone.
    assert ours.replace('usage: open_clip_train', 'usage: -c').split() == stock.stdout.split()
    # With the autoload hook off, the command still registers Llip itself.
    subprocess.run([command, '--model', 'Llip-Tiny', '--dataset-type', 'synthetic', '--train-num-samples', '8',
                    '--batch-size', '4', '--epochs', '1', '--workers', '0', '--precision', 'fp32',
                    '--logs', str(tmp_path), '--name', 'cli'],
                   env=dict(os.environ, OPEN_CLIP_LLIP_AUTOLOAD='0'), check=True, capture_output=True)
    assert 'training with LlipLoss' in (tmp_path / 'cli' / 'out.log').read_text()


def test_resume_refuses_a_checkpoint_of_another_llip_config(tmp_path):
    """--resume loads with model.load_state_dict: the recorded config is checked there too."""
    cfg = open_clip.get_model_config('Llip-Tiny')
    cfg.pop('model_class')
    cfg['llip_cfg']['heads'] = 2  # the same tensor shapes as Llip-Tiny's H = 4
    path = tmp_path / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'other', 'state_dict': LlipModel(**cfg).state_dict(),
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    with pytest.raises(ValueError, match=r'made for a Llip model with K = 8, H = 2, τ = 5.0, norm = False, but this '
                                         r'model has K = 8, H = 4'):
        train(tmp_path, '--resume', str(path))


def test_open_clip_train_command_fails_when_openclip_refuses(tmp_path):
    """OpenCLIP's main returns -1 for an experiment name in use; the command must not exit 0."""
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'out.log').write_text('an earlier run')
    command = str(Path(sys.executable).parent / 'open_clip_train')
    result = subprocess.run([command, '--model', 'Llip-Tiny', '--dataset-type', 'synthetic', '--train-num-samples', '8',
                             '--logs', str(tmp_path), '--name', 'taken'], capture_output=True, text=True)
    assert result.returncode == 1
    assert 'Experiment already exists' in result.stdout + result.stderr
    assert (tmp_path / 'taken' / 'out.log').read_text() == 'an earlier run'


@pytest.mark.skipif(not hasattr(open_clip, 'create_task'), reason="OpenCLIP 4's training tasks")
def test_the_llip_task_keeps_an_ema_that_is_a_llip_model():
    """OpenCLIP 4's task EMA (``setup_ema``/``update_ema``, timm's ModelEmaV3) averages a Llip model's weights, and the
    averaged model scores, checkpoints and reloads as a Llip model."""
    from argparse import Namespace
    torch.manual_seed(0)
    model = open_clip.create_model('Llip-Tiny', output_dict=True)  # as OpenCLIP's loop builds it
    args = Namespace(model='Llip-Tiny', siglip=False, distill=False, horovod=False, fsdp=False, use_naflex=False,
                     rank=0, world_size=1, loss_dist_impl=None)
    task = open_clip.create_task(args, model).setup_ema(decay=0.5)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    images = torch.randn(4, 3, 32, 32)
    texts = open_clip.get_tokenizer('Llip-Tiny')(['a red circle', 'a blue square', 'a green cross', 'a big cyan shape'])
    task.train()
    losses, _ = task({'image': images, 'text': texts})
    losses['loss'].backward()
    optimizer.step()
    task.update_ema()

    ema = task.get_trainable_module(use_ema=True)
    assert isinstance(ema, LlipModel)
    trained = model.state_dict()
    for key in ('visual.k_proj', 'mixer.out_proj', 'text.text_projection'):
        assert not torch.equal(trained[key], initial[key])
        torch.testing.assert_close(ema.state_dict()[key], 0.5 * (initial[key] + trained[key]))
    image_logits, _ = ema.get_logits(images, texts)
    assert image_logits.shape == (4, 4) and torch.isfinite(image_logits).all()
    state = task.state_dict()
    reloaded = open_clip.create_model('Llip-Tiny')
    reloaded.load_state_dict(state['state_dict_ema'])
    torch.testing.assert_close(reloaded.get_logits(images, texts)[0], image_logits)


def test_siglip_keeps_the_configured_initialisation_and_model_kwargs_override_it(tmp_path):
    """OpenCLIP's main passes SigLIP's init_logit_scale (log 10) and bias with --siglip: a Llip run keeps its config's
    scale, takes --model-kwargs' bias, logs both, and starts from them (lr 0: the first step changes nothing)."""
    run = train(tmp_path, '--siglip', '--model-kwargs', '{"init_logit_bias": -4.5}', '--lr', '0', '--warmup', '0',
                samples=8)
    state = final_state(run)['state_dict']
    assert state['logit_scale'].item() == pytest.approx(np.log(1 / 0.07), abs=np.log(1 / 0.07) * EPS32)  # fp32 rounding
    assert state['logit_bias'].item() == -4.5
    log = (run / 'out.log').read_text()
    assert ("--siglip: Llip-Tiny keeps its configured initialisation (a Llip model trains with the sigmoid loss anyway); "
            "OpenCLIP's SigLIP values init_logit_scale = 2.30259, init_logit_bias = -10 are not applied.") in log
    assert 'LlipModel initialised with init_logit_scale 2.65926 (scores scaled by 14.29) and init_logit_bias -4.5.' in log
    assert "model_kwargs: {'init_logit_bias': -4.5}" in (run / 'params.txt').read_text()


@pytest.mark.parametrize('model, model_kwargs, message', [
    ('Llip-Tiny', '{"init_logit_bias": -5', r"--model-kwargs '\{\"init_logit_bias\": -5' is not JSON"),
    ('Llip-Tiny', '[-5]', r'must be a JSON object of keyword arguments'),
    ('Llip-Tiny', '{"logit_bias": -5}', r'logit_bias is not a keyword argument of a Llip model; it takes embed_dim, '),
    ('ViT-B-32', '{"init_logit_bias": -5}', '2'),  # OpenCLIP's own answer: an option it does not know
], ids=['not JSON', 'not an object', 'unknown key', 'not a Llip model'])
def test_model_kwargs_that_cannot_apply_are_refused_before_the_model_is_built(tmp_path, capsys, model, model_kwargs,
                                                                              message):
    with pytest.raises(SystemExit, match=message):
        train(tmp_path, '--model-kwargs', model_kwargs, model=model)
    if model == 'ViT-B-32':
        assert 'unrecognized arguments: --model-kwargs' in capsys.readouterr().err

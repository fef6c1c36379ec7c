"""The precision matrix: every path users run, in every precision they train with, agrees with fp32.

Cells: the stock loop (a few steps, then ``--val-data`` and ``--imagenet-val``), ``get_logits``,
``similarity`` (features from an autocast forward, scored outside it, as OpenCLIP's evaluation
does), zero-shot with a τ sweep, and ``open_clip_llip eval``; each under ``fp32``, ``amp_bf16``,
``amp`` (fp16) and ``pure_bf16``. Every result must be finite and within the tolerance stated in
``COSINE_TOLERANCE`` of fp32's. On the CPU by default; ``OPEN_CLIP_LLIP_TEST_DEVICE=cuda`` runs the
same cells on a GPU (``scripts/device_check.py``).

Tolerances, as |Δ cosine| (cosines lie in [-1, 1]): bf16 keeps 8 bits of mantissa (relative
error 2⁻⁸ ≈ 4e-3 per rounding, and a tower rounds many times), fp16 keeps 11. The metrics of
evaluation (accuracy, recall) may differ where two scores lie closer than that: by at most the
share of items whose margin is below the tolerance, which the tests compute.
"""
import json
import math
import os

import numpy as np
import open_clip
import open_clip_train.zero_shot as open_clip_zero_shot
import pytest
import torch
from conftest import write_retrieval_csv
from open_clip_train.main import main as open_clip_train_main
from open_clip_train.precision import get_autocast
from PIL import Image
from torchvision.datasets import ImageFolder

from open_clip_llip import build_zero_shot_classifier, zero_shot_cosine
from open_clip_llip.commands.evaluate import main as eval_main

DEVICE = os.environ.get('OPEN_CLIP_LLIP_TEST_DEVICE', 'cpu')
PRECISIONS = ('fp32', 'amp_bf16', 'amp', 'pure_bf16')
# bf16 keeps 8 significant bits (a rounding moves a value by up to 2^-9 of it) and fp16 11; a cosine that went through
# both towers, the mixer and the score carries a few such roundings of each of its terms.
COSINE_TOLERANCE = {'fp32': 1e-5, 'amp_bf16': 2e-2, 'amp': 2e-3, 'pure_bf16': 2e-2}
CLASSNAMES = ['goldfish', 'tench', 'shark', 'hen', 'ostrich', 'owl']  # OpenCLIP's top-5 needs 5 classes or more
TEMPLATES = ['a photo of a {}.', 'a drawing of the {}.']
TEMPERATURES = (1., 5., 10.)

pytestmark = pytest.mark.usefixtures('restore_logging')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A retrieval CSV of 12 pairs (also the training data) and an ImageFolder of 6 classes × 3 images."""
    root = tmp_path_factory.mktemp('precision')
    csv_path, _ = write_retrieval_csv(root / 'pairs')
    rng = np.random.default_rng(0)
    for label in range(len(CLASSNAMES)):
        (root / 'classes' / f'{label:02d}').mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                root / 'classes' / f'{label:02d}' / f'{index}.png')
    (root / 'classnames.txt').write_text('\n'.join(CLASSNAMES) + '\n')
    (root / 'templates.txt').write_text('\n'.join(TEMPLATES) + '\n')
    return root, csv_path


def model_in(precision, checkpoint):
    return open_clip.create_model('Llip-Tiny', pretrained=str(checkpoint), precision=precision, device=DEVICE,
                                   output_dict=True).eval()


def inputs(precision, count=6):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49000, (count, 16), generator=generator)
    texts[:, 7], texts[:, 8:] = 49407, 0
    return images.to(DEVICE, open_clip.get_input_dtype(precision)), texts.to(DEVICE)


def autocast(precision):
    return get_autocast(precision, device_type=torch.device(DEVICE).type)


def assert_close_to_fp32(got, expected, precision, what):
    got, expected = got.float().cpu(), expected.float().cpu()
    assert torch.isfinite(got).all(), what
    error = (got - expected).abs().max().item()
    assert error <= COSINE_TOLERANCE[precision], f'{what} under {precision}: max |Δ| {error:.3g} from fp32'
    print(f'{what} [{precision}]: max |Δ cosine| from fp32 = {error:.2g}')


def cosines_of_logits(model, logits):
    return (logits - model.logit_bias) / model.logit_scale.exp()


@pytest.mark.parametrize('precision', PRECISIONS)
def test_get_logits_and_similarity(precision, checkpoint):
    reference = model_in('fp32', checkpoint)
    model = model_in(precision, checkpoint)
    with torch.no_grad():
        expected = cosines_of_logits(reference, reference.get_logits(*inputs('fp32'))[0])
        with autocast(precision)():
            logits, text_logits = model.get_logits(*inputs(precision))
            out = model(*inputs(precision))
            inside = model.similarity(out['image_features'], out['text_features'])
        # As OpenCLIP's evaluation does: features accumulated (on the CPU), scored outside autocast.
        outside = model.similarity(out['image_features'].cpu(), out['text_features'].cpu())
    assert torch.equal(text_logits, logits.T)
    assert_close_to_fp32(cosines_of_logits(model, logits), expected, precision, 'get_logits')
    assert_close_to_fp32(inside, expected, precision, 'similarity under autocast')
    assert_close_to_fp32(outside, expected, precision, 'similarity of accumulated features')


@pytest.mark.parametrize('precision', PRECISIONS)
def test_zero_shot_with_a_temperature_sweep(precision, checkpoint, data):
    root, _ = data
    tokenizer = open_clip.get_tokenizer('Llip-Tiny')
    images = inputs(precision)[0]

    def scores(model, precision):
        with torch.no_grad(), autocast(precision)():
            classifier = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
            return zero_shot_cosine(model, classifier, images.to(open_clip.get_input_dtype(precision)), TEMPERATURES)

    expected = scores(model_in('fp32', checkpoint), 'fp32')
    got = scores(model_in(precision, checkpoint), precision)
    assert got.shape == expected.shape == (len(TEMPERATURES), len(images), len(CLASSNAMES))
    assert_close_to_fp32(got, expected, precision, 'zero-shot cosines, τ 1, 5, 10')


def unstable_share(scores, truth, tolerance):
    """Share of rows of ``scores`` [..., N, C] where another entry lies within 2·tolerance of the true one
    (``truth`` [N]): where a rounding error may change the rank of the truth, and so the most a recall may move."""
    true_scores = scores.gather(-1, truth.expand(*scores.shape[:-1])[..., None])
    close = ((scores - true_scores).abs() <= 2 * tolerance).sum(-1) > 1
    return close.double().mean().item()


@pytest.fixture
def short_imagenet(monkeypatch):
    """OpenCLIP's --imagenet-val always builds ImageNet's 1,000 classes × 80 templates: ours instead."""
    monkeypatch.setattr(open_clip_zero_shot, 'IMAGENET_CLASSNAMES', CLASSNAMES)
    monkeypatch.setattr(open_clip_zero_shot, 'OPENAI_IMAGENET_TEMPLATES', TEMPLATES)


def training_run(logs, precision, checkpoint, data):
    """A few steps of the stock loop at lr 0 (the weights stay the checkpoint's), then its evaluation."""
    root, csv_path = data
    open_clip_train_main([
        '--model', 'Llip-Tiny', '--pretrained', str(checkpoint), '--train-data', str(csv_path),
        '--val-data', str(csv_path), '--dataset-type', 'csv', '--imagenet-val', str(root / 'classes'),
        '--batch-size', '4', '--epochs', '1', '--lr', '0', '--warmup', '1', '--workers', '0',
        '--precision', precision, '--device', DEVICE, '--logs', str(logs), '--name', precision])
    return json.loads((logs / precision / 'checkpoints' / 'results.jsonl').read_text().splitlines()[-1])


@pytest.fixture(scope='module')
def fp32_run(checkpoint, data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(open_clip_zero_shot, 'IMAGENET_CLASSNAMES', CLASSNAMES)
        monkeypatch.setattr(open_clip_zero_shot, 'OPENAI_IMAGENET_TEMPLATES', TEMPLATES)
        return training_run(tmp_path_factory.mktemp('fp32-run'), 'fp32', checkpoint, data)


@pytest.mark.parametrize('precision', PRECISIONS[1:])
def test_stock_loop_trains_and_validates(precision, checkpoint, data, tmp_path, short_imagenet, fp32_run):
    """--val-data (conditioned retrieval) and --imagenet-val (conditioned zero-shot) after training steps."""
    expected = fp32_run
    got = training_run(tmp_path, precision, checkpoint, data)
    assert got.keys() == expected.keys() and 'image_to_text_R@1' in got and 'imagenet-zeroshot-val-top1' in got
    assert all(math.isfinite(value) for value in got.values())
    # The validation loss is InfoNCE of logit_scale · cosine: |Δ| ≤ 2 · scale · tolerance.
    scale = math.exp(torch.load(checkpoint, weights_only=True)['logit_scale'].item())
    loss_change = abs(got['clip_val_loss'] - expected['clip_val_loss'])
    assert loss_change <= 2 * scale * COSINE_TOLERANCE[precision], loss_change
    print(f'stock loop [{precision}]: |Δ clip_val_loss| = {loss_change:.2g}; metrics: '
          + ', '.join(f'{k} {got[k]:.3f} (fp32 {expected[k]:.3f})' for k in sorted(got) if k.endswith(('R@1', 'top1'))))


def eval_command(output, precision, checkpoint, data):
    root, csv_path = data
    eval_main(['--model', 'Llip-Tiny', '--pretrained', str(checkpoint), '--precision', precision, '--device', DEVICE,
               '--zeroshot-images', str(root / 'classes'), '--classnames', str(root / 'classnames.txt'),
               '--templates', str(root / 'templates.txt'), '--retrieval', str(csv_path),
               '--temperatures', *map(str, TEMPERATURES), '--workers', '0', '--json', str(output)])
    return json.loads(output.read_text())['results']


@pytest.fixture(scope='module')
def fp32_eval(checkpoint, data, tmp_path_factory):
    return eval_command(tmp_path_factory.mktemp('fp32-eval') / 'results.json', 'fp32', checkpoint, data)


@pytest.mark.parametrize('precision', PRECISIONS[1:])
def test_eval_command(precision, checkpoint, data, tmp_path, fp32_eval):
    root, csv_path = data
    results = {'fp32': fp32_eval, precision: eval_command(tmp_path / 'results.json', precision, checkpoint, data)}

    # How far a recall may move: the share of rows where a competitor scores within the tolerance of the truth.
    tolerance = COSINE_TOLERANCE[precision]
    model = model_in('fp32', checkpoint)
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    classes = ImageFolder(root / 'classes', transform)
    images, labels = map(torch.stack, zip(*[(image, torch.tensor(label)) for image, label in classes]))
    classifier = build_zero_shot_classifier(model, open_clip.get_tokenizer('Llip-Tiny'), CLASSNAMES, TEMPLATES)
    _, rows = write_retrieval_csv(tmp_path / 'same-pairs')  # the same seeded pairs as csv_path
    with torch.no_grad():
        zero_shot = unstable_share(zero_shot_cosine(model, classifier, images, TEMPERATURES), labels, tolerance)
        pairs = torch.stack([transform(Image.open(row['filepath'])) for row in rows])
        text = open_clip.get_tokenizer('Llip-Tiny')([row['title'] for row in rows])
        retrieval = model.similarity(model.encode_image(pairs), model.encode_text(text), TEMPERATURES)
    diagonal = torch.arange(len(rows))
    margins = {'zeroshot_classification': {tau: zero_shot for tau in TEMPERATURES},
               'retrieval': {tau: max(unstable_share(s, diagonal, tolerance), unstable_share(s.T, diagonal, tolerance))
                             for tau, s in zip(TEMPERATURES, retrieval)}}
    for expected, got in zip(results['fp32'], results[precision]):
        assert (got['task'], got['temperature']) == (expected['task'], expected['temperature'])
        margin = margins[got['type']][got['temperature']]
        for name, value in got['metrics'].items():
            assert math.isfinite(value), name
            if name in ('top1', 'top5') or '_R@' in name:
                assert abs(value - expected['metrics'][name]) <= margin + 1e-9, (name, value, expected['metrics'][name])
    print(f'eval command [{precision}]: ' + '; '.join(
        f"{r['type']} τ {r['temperature']:g}: " + ', '.join(f'{k} {v:.3f}' for k, v in r['metrics'].items()
                                                           if k in ('top1', 'image_to_text_R@1', 'text_to_image_R@1'))
        for r in results[precision]))

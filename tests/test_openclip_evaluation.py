"""OpenCLIP's own evaluation (open_clip_train --imagenet-val / --val-data) gives Llip's conditioned numbers."""
import json

import numpy as np
import open_clip
import open_clip_train.zero_shot as open_clip_zero_shot
import pytest
import torch
from conftest import write_retrieval_csv
from open_clip_train.main import main as open_clip_train_main
from PIL import Image
from torch.utils.data import DataLoader

from open_clip_llip import build_zero_shot_classifier, retrieval_metrics, run_zero_shot

CLASSNAMES = ['goldfish', 'tench', 'shark', 'hen', 'ostrich', 'owl']
TEMPLATES = ['a photo of a {}.', 'a drawing of the {}.']

pytestmark = pytest.mark.usefixtures('restore_logging')


def random_image(rng):
    return Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))


def evaluate_only(tmp_path, checkpoint, *data_args):
    open_clip_train_main([
        '--model', 'Llip-Tiny', '--pretrained', str(checkpoint), *data_args, '--batch-size', '5', '--workers', '0',
        '--precision', 'fp32', '--logs', str(tmp_path / 'logs'), '--name', 'eval'])
    lines = (tmp_path / 'logs' / 'eval' / 'checkpoints' / 'results.jsonl').read_text().splitlines()
    assert len(lines) == 1  # one record, as OpenCLIP writes
    return json.loads(lines[0])


def test_zero_shot_imagenet_val_uses_conditioned_scores(tmp_path, checkpoint, monkeypatch):
    # OpenCLIP's zero-shot always uses ImageNet's 1,000 classes and 80 templates: keep it short.
    monkeypatch.setattr(open_clip_zero_shot, 'IMAGENET_CLASSNAMES', CLASSNAMES)
    monkeypatch.setattr(open_clip_zero_shot, 'OPENAI_IMAGENET_TEMPLATES', TEMPLATES)
    rng = np.random.default_rng(0)
    for label in range(len(CLASSNAMES)):
        (tmp_path / 'val' / f'{label:02d}').mkdir(parents=True)
        for index in range(3):
            random_image(rng).save(tmp_path / 'val' / f'{label:02d}' / f'{index}.png')
    metrics = evaluate_only(tmp_path, checkpoint, '--imagenet-val', str(tmp_path / 'val'))

    model, _, transform = open_clip.create_model_and_transforms('Llip-Tiny', pretrained=str(checkpoint))
    from torchvision.datasets import ImageFolder
    classifier = build_zero_shot_classifier(model.eval(), open_clip.get_tokenizer('Llip-Tiny'), CLASSNAMES, TEMPLATES)
    expected, = run_zero_shot(model, classifier, DataLoader(ImageFolder(tmp_path / 'val', transform), batch_size=5)).values()
    assert metrics['imagenet-zeroshot-val-top1'] == pytest.approx(expected['top1'])
    assert metrics['imagenet-zeroshot-val-top5'] == pytest.approx(expected['top5'])


def test_val_data_retrieval_uses_conditioned_scores(tmp_path, checkpoint):
    csv_path, rows = write_retrieval_csv(tmp_path)
    metrics = evaluate_only(tmp_path, checkpoint, '--val-data', str(csv_path), '--dataset-type', 'csv')

    model, _, transform = open_clip.create_model_and_transforms('Llip-Tiny', pretrained=str(checkpoint), output_dict=True)
    tokenizer = open_clip.get_tokenizer('Llip-Tiny')
    with torch.no_grad():
        images = torch.stack([transform(Image.open(row['filepath'])) for row in rows])
        out = model.eval()(images, tokenizer([row['title'] for row in rows]))
        scores = model.similarity(out['image_features'], out['text_features'])
    expected = retrieval_metrics(scores, torch.arange(len(rows)))
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert metrics['num_samples'] == 12 and np.isfinite(metrics['clip_val_loss'])

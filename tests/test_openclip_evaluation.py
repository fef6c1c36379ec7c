"""OpenCLIP's own evaluation (open_clip_train --imagenet-val / --val-data) gives Llip's conditioned numbers."""
import json
from pathlib import Path

import numpy as np
import open_clip
import open_clip_train.zero_shot as open_clip_zero_shot
import pytest
import torch
from conftest import write_retrieval_csv
from open_clip_train.main import main as open_clip_train_main
from PIL import Image
from test_train import write_learnable_shards
from torch.utils.data import DataLoader

from open_clip_llip import build_zero_shot_classifier, retrieval_metrics, run_zero_shot
from open_clip_llip.commands.evaluate import main as evaluate_command

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


def eval_command_retrieval(checkpoint, *csv_paths):
    """``open_clip_llip eval --retrieval`` on each CSV: {path: metrics}."""
    output = Path(checkpoint).parent / 'eval.json'
    retrieval = [arg for path in csv_paths for arg in ('--retrieval', str(path))]
    evaluate_command(['--model', 'Llip-Tiny', '--pretrained', str(checkpoint), '--workers', '0', '--batch-size', '4',
                      *retrieval, '--json', str(output), '--overwrite'])
    return {record['task']: record['metrics'] for record in json.loads(output.read_text())['results']}


def test_loop_validates_a_csv_beside_webdataset_training_data_with_the_eval_commands_numbers(tmp_path):
    """The README's case: shards to train on, a CSV to validate on. Several captions per image (rows sharing a
    filepath) and one: the loop's retrieval metrics are the eval command's on the checkpoint it saved."""
    shards = write_learnable_shards(tmp_path, count=16)
    several, rows = write_retrieval_csv(tmp_path / 'val', count=6, captions_per_image=3, name='several.csv')
    one, _ = write_retrieval_csv(tmp_path / 'val', count=6, name='one.csv')
    open_clip_train_main([
        '--model', 'Llip-Tiny', '--train-data', str(shards), '--dataset-type', 'webdataset', '--train-num-samples', '16',
        '--val-data', str(several), '--batch-size', '8', '--epochs', '1', '--lr', '1e-3', '--warmup', '1',
        '--workers', '0', '--precision', 'fp32', '--logs', str(tmp_path / 'logs'), '--name', 'run'])
    run = tmp_path / 'logs' / 'run'
    assert 'is read as csv data' in (run / 'out.log').read_text()
    loop = {several: json.loads((run / 'checkpoints' / 'results.jsonl').read_text().splitlines()[-1])}
    checkpoint = run / 'checkpoints' / 'epoch_1.pt'
    loop[one] = evaluate_only(tmp_path / 'one', checkpoint, '--val-data', str(one), '--dataset-type', 'webdataset')
    expected = eval_command_retrieval(checkpoint, several, one)
    assert loop[several]['num_samples'] == len(rows) == 18
    for path in (several, one):
        # Ranks move in steps of 1/texts (1/18, 1/6): 1e-3 allows no rank to differ.
        assert {name: loop[path][name] for name in expected[str(path)]} == pytest.approx(expected[str(path)], abs=1e-3)


@pytest.mark.parametrize('fault, message', [
    ('columns', r"has the columns \['image', 'caption'\].*needs 'filepath' \(image path\) and 'title'.*--csv-img-key"),
    ('image', r"names 1 image file\(s\) that do not exist, e.g. \['images/0.png'\].*relative to the CSV's folder"),
    ('rows', r'has no rows'),
], ids=['columns', 'image', 'rows'])
def test_a_faulty_validation_csv_is_refused_before_the_first_step(tmp_path, fault, message):
    csv_path, _ = write_retrieval_csv(tmp_path / 'val', count=2)
    text = csv_path.read_text()
    if fault == 'columns':
        text = text.replace('filepath\ttitle', 'image\tcaption')
    elif fault == 'image':
        text = text.replace(str(tmp_path / 'val' / 'images' / '0.png'), 'images/0.png')
    else:
        text = text.splitlines()[0] + '\n'
    csv_path.write_text(text)
    with pytest.raises(ValueError, match=message):
        open_clip_train_main([
            '--model', 'Llip-Tiny', '--dataset-type', 'synthetic', '--train-num-samples', '8', '--val-data',
            str(csv_path), '--batch-size', '4', '--workers', '0', '--logs', str(tmp_path / 'logs'), '--name', 'run'])
    assert 'Train Epoch' not in (tmp_path / 'logs' / 'run' / 'out.log').read_text()

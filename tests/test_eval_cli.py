"""``open_clip_llip eval``: results against plain Llip, progress, JSON, and bad input."""
import io
import json
import os
import subprocess
import sys
import tarfile
from importlib import import_module
from pathlib import Path

import numpy as np
import open_clip
import pytest
import tomllib
import torch
import torch.nn.functional as F
from conftest import REPO
from PIL import Image
from test_bad_input import tiny_config
from test_retrieval import plain_metrics

from open_clip_llip import LlipModel, build_zero_shot_classifier, run_zero_shot, unpack_image
from open_clip_llip.commands.evaluate import main
from open_clip_llip.evaluation.readers import RetrievalImages, read_retrieval_set

CLASS_FOLDERS = ['b_dog', 'a_cat', 'c_red_car']  # sorted: a_cat, b_dog, c_red_car
CLASSNAMES = ['cat', '', 'dog', 'red car']  # a blank line is ignored
TEMPLATES = ['a photo of a {}.', 'a {} in a drawing']


def write_image(path, seed, format=None):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A zero-shot ImageFolder with its files, a retrieval CSV and two webdataset shards; multi-caption images."""
    root = tmp_path_factory.mktemp('data')
    for c, folder in enumerate(CLASS_FOLDERS):
        (root / 'zeroshot' / folder).mkdir(parents=True)
        for i in range(2):
            write_image(root / 'zeroshot' / folder / f'{i}.png', seed=10 * c + i)
    (root / 'classnames.txt').write_text('\n'.join(CLASSNAMES) + '\n')
    (root / 'templates.txt').write_text('\n'.join(TEMPLATES) + '\n\n')

    (root / 'retrieval' / 'images').mkdir(parents=True)
    rows = ['filepath\ttitle']
    for i, captions in enumerate([['a dog', 'a brown dog'], ['a cat'], ['a car', 'a red car', 'a fast car']]):
        write_image(root / 'retrieval' / 'images' / f'{i}.png', seed=100 + i)
        rows += [f'images/{i}.png\t{caption}' for caption in captions]
    rows.insert(3, 'images/2.png\tsomething red')  # captions of one image need not be adjacent
    (root / 'retrieval' / 'set.csv').write_text('\n'.join(rows) + '\n')

    (root / 'shards').mkdir()
    for shard in range(2):
        with tarfile.open(root / 'shards' / f'{shard:03d}.tar', 'w') as tar:
            for i in range(2):
                image = io.BytesIO()
                write_image(image, seed=200 + 10 * shard + i, format='JPEG')
                members = {'jpg': image.getvalue(), 'txt': f'caption {shard} {i}\n\nanother {shard} {i}\n'.encode()}
                for extension, content in members.items():
                    info = tarfile.TarInfo(f'sample{shard}{i}.{extension}')
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    return root


def zero_shot_args(data):
    return ['--zeroshot-images', str(data / 'zeroshot'), '--classnames', str(data / 'classnames.txt'),
            '--templates', str(data / 'templates.txt')]


def run(args, checkpoint):
    main(['--model', 'Llip-Tiny', '--pretrained', str(checkpoint), '--workers', '0', '--batch-size', '3', *args])


def plain_results(checkpoint, data, tau):
    """Zero-shot top-1/top-5 and CSV retrieval metrics, the plain way: z materialised, one class at a time."""
    model, _, preprocess = open_clip.create_model_and_transforms('Llip-Tiny', pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer('Llip-Tiny')
    classnames = ['cat', 'dog', 'red car']

    def cosine(images, features, queries):
        keys, values = unpack_image(model.encode_image(torch.stack([preprocess(Image.open(path)) for path in images])))
        return F.cosine_similarity(model.mixer(keys, values, queries, temperature=tau), F.normalize(features)[None], dim=-1)

    with torch.no_grad():
        features, queries = [], []
        for name in classnames:
            t, q = model.embed_text(tokenizer([template.format(name) for template in TEMPLATES]))
            features.append(F.normalize(F.normalize(t, dim=-1).mean(0), dim=0))
            queries.append(q.mean(0))
        images = [(path, c) for c, folder in enumerate(sorted(CLASS_FOLDERS))
                  for path in sorted((data / 'zeroshot' / folder).iterdir())]
        scores = cosine([path for path, _ in images], torch.stack(features), torch.stack(queries))
        targets = torch.tensor([c for _, c in images])
        ahead = (scores > scores.gather(1, targets[:, None])).sum(1)
        zero_shot = {'top1': (ahead < 1).double().mean().item(), 'top5': (ahead < 5).double().mean().item()}

        captions = ['a dog', 'a brown dog', 'something red', 'a cat', 'a car', 'a red car', 'a fast car']
        image_index = torch.tensor([0, 0, 2, 1, 2, 2, 2])
        features, queries = model.embed_text(tokenizer(captions))
        scores = cosine([data / 'retrieval' / 'images' / f'{i}.png' for i in range(3)], features, queries)
    return zero_shot, plain_metrics(scores, image_index)


def test_results_match_plain_llip(data, checkpoint, tmp_path, capsys):
    output = tmp_path / 'results' / 'out.json'
    run([*zero_shot_args(data), '--retrieval', str(data / 'retrieval' / 'set.csv'),
         '--retrieval', str(data / 'shards' / '{000..001}.tar'), '--temperatures', '1', '5', '--json', str(output)],
        checkpoint)
    results = json.loads(output.read_text())
    assert results['model'] == 'Llip-Tiny' and results['pretrained'] == str(checkpoint)
    records = {(r['task'], r['temperature']): r for r in results['results']}
    assert len(records) == 6
    for tau in (1., 5.):
        zero_shot, retrieval = plain_results(checkpoint, data, tau)
        record = records[str(data / 'zeroshot'), tau]
        assert record['type'] == 'zeroshot_classification' and (record['num_images'], record['num_classes']) == (6, 3)
        assert record['metrics'] == pytest.approx(zero_shot)
        record = records[str(data / 'retrieval' / 'set.csv'), tau]
        assert (record['num_images'], record['num_texts']) == (3, 7)
        assert record['metrics'] == pytest.approx(retrieval)
        record = records[str(data / 'shards' / '{000..001}.tar'), tau]
        assert (record['num_images'], record['num_texts']) == (4, 8)
        assert set(record['metrics']) == set(retrieval)

    table = capsys.readouterr().out
    assert 'zeroshot_classification' in table and 'top1' in table and 'I→T R@1' in table
    assert f"{records[str(data / 'zeroshot'), 5.]['metrics']['top1']:.4f}" in table
    assert not list(output.parent.glob('.*.tmp'))  # no temporary file left behind


def test_class_names_follow_sorted_class_folders(data, checkpoint, monkeypatch):
    """Random weights give every image one class, so check the wiring: names and targets in folder order."""
    import open_clip_llip.evaluation.tasks as cli_module
    seen = {}

    def build(model, tokenizer, classnames, templates, **kwargs):
        seen.update(classnames=classnames, templates=templates)
        return build_zero_shot_classifier(model, tokenizer, classnames, templates, **kwargs)

    def run_zero_shot_spy(model, classifier, dataloader, *args, **kwargs):
        seen['targets'] = [(Path(path).parent.name, target) for path, target in dataloader.dataset.samples]
        return run_zero_shot(model, classifier, dataloader, *args, **kwargs)

    monkeypatch.setattr(cli_module, 'build_zero_shot_classifier', build)
    monkeypatch.setattr(cli_module, 'run_zero_shot', run_zero_shot_spy)
    run(zero_shot_args(data), checkpoint)
    assert seen['classnames'] == ['cat', 'dog', 'red car'] and seen['templates'] == TEMPLATES
    assert seen['targets'] == [('a_cat', 0), ('a_cat', 0), ('b_dog', 1), ('b_dog', 1), ('c_red_car', 2), ('c_red_car', 2)]


def test_retrieval_sets_group_captions_by_image(data):
    csv_set = read_retrieval_set(str(data / 'retrieval' / 'set.csv'))
    assert [Path(image).name for image in csv_set.images] == ['0.png', '2.png', '1.png']  # in order of appearance
    assert csv_set.captions == ['a dog', 'a brown dog', 'something red', 'a cat', 'a car', 'a red car', 'a fast car']
    assert csv_set.image_index.tolist() == [0, 0, 1, 2, 1, 1, 1]
    shard_set = read_retrieval_set(str(data / 'shards' / '{000..001}.tar'))
    assert shard_set.captions == [f'{word} {s} {i}' for s in range(2) for i in range(2) for word in ('caption', 'another')]
    assert shard_set.image_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    images = RetrievalImages(shard_set.images, transform=lambda image: np.asarray(image.convert('RGB')))
    assert images[3].shape == (40, 36, 3)  # read back from the second shard


def test_existing_json_is_kept_without_overwrite(data, checkpoint, tmp_path):
    output = tmp_path / 'out.json'
    output.write_text('precious')
    # refused before any work: the missing folder would be the error otherwise
    args = ['--zeroshot-images', str(tmp_path / 'nowhere'), '--classnames', str(data / 'classnames.txt'),
            '--templates', str(data / 'templates.txt'), '--json', str(output)]
    with pytest.raises(SystemExit, match=r'out.json exists; pass --overwrite'):
        run(args, checkpoint)
    assert output.read_text() == 'precious'

    # a failure during the evaluation leaves the file whole
    bad_csv = tmp_path / 'bad.csv'
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    bad_csv.write_text('filepath\ttitle\nbroken.png\ta caption\n')
    with pytest.raises(SystemExit, match=r'cannot identify image file'):
        run(['--retrieval', str(bad_csv), '--json', str(output), '--overwrite'], checkpoint)
    assert output.read_text() == 'precious'
    assert not list(tmp_path.glob('.*.tmp'))

    run(['--retrieval', str(data / 'retrieval' / 'set.csv'), '--json', str(output), '--overwrite'], checkpoint)
    assert json.loads(output.read_text())['results'][0]['temperature'] == 5.  # the model's τ


def with_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize('make_args, message', [
    (lambda d, t: ['--zeroshot-images', str(d / 'zeroshot'), '--classnames', with_file(t, 'c.txt', 'cat\ndog\n'),
                   '--templates', str(d / 'templates.txt')],
     r'2 class names for 3 class folders in .*zeroshot \(a_cat, b_dog, c_red_car\)'),
    (lambda d, t: ['--zeroshot-images', str(t), '--classnames', str(d / 'classnames.txt'),
                   '--templates', str(d / 'templates.txt')],
     r"Couldn't find any class folder"),
    (lambda d, t: ['--zeroshot-images', str((t / 'zs' / 'empty').mkdir(parents=True) or t / 'zs'),
                   '--classnames', with_file(t, 'c.txt', 'empty\n'), '--templates', str(d / 'templates.txt')],
     r'Found no valid file for the classes empty'),
    (lambda d, t: [*zero_shot_args(d)[:4], '--templates', with_file(t, 'templates.txt', 'a photo of a {}\na photo\n')],
     r"Template 2 of .*templates.txt, 'a photo', must contain \{\}"),
    (lambda d, t: [*zero_shot_args(d)[:4], '--templates', with_file(t, 'templates.txt', 'a {} {0}\n')],
     r'must contain \{\} where the class name goes \(and no other braces\)'),
    (lambda d, t: [*zero_shot_args(d)[:4], '--templates', with_file(t, 'templates.txt', '\n\n')],
     r'Templates file .* is empty'),
    (lambda d, t: [*zero_shot_args(d)[:2], '--classnames', str(t / 'missing.txt'), *zero_shot_args(d)[4:]],
     r'Class-names file .*missing.txt not found'),
    (lambda d, t: ['--zeroshot-images', str(t / 'missing'), *zero_shot_args(d)[2:]],
     r'Zero-shot image folder .*missing not found'),
    (lambda d, t: ['--retrieval', str(t / 'missing.csv')], r'Retrieval set .*missing.csv not found'),
    (lambda d, t: ['--retrieval', with_file(t, 'comma.csv', 'filepath,title\na.png,a cat\n')],
     r"has columns \['filepath,title'\]; it needs a tab-separated header with the columns 'filepath'"),
    (lambda d, t: ['--retrieval', with_file(t, 'no-title.csv', 'filepath\ttitle\na.png\ta cat\nb.png\n')],
     r"no-title.csv, line 3: 1 tab-separated field\(s\) for the header's 2 columns"),
    (lambda d, t: ['--retrieval', with_file(t, 'no-title.csv', 'filepath\ttitle\na.png\ta cat\nb.png\t \n')],
     r'no-title.csv, line 3: no title'),
    (lambda d, t: ['--retrieval', with_file(t, 'empty.csv', 'filepath\ttitle\n')], r'empty.csv has no rows'),
    (lambda d, t: ['--retrieval', with_file(t, 'missing-images.csv', 'filepath\ttitle\nnope.png\ta cat\n')],
     r'names 1 image file\(s\) that do not exist'),
    (lambda d, t: ['--retrieval', str(d / 'shards' / '{000..002}.tar')], r'1 of the 3 shard\(s\) .* not found'),
    (lambda d, t: ['--retrieval', str(d / 'zeroshot' / '..' / 'zeroshot.tar')], r'1 of the 1 shard\(s\)'),
])
def test_bad_input(data, checkpoint, tmp_path, make_args, message):
    with pytest.raises(SystemExit, match=message):
        run(make_args(data, tmp_path), checkpoint)


@pytest.mark.parametrize('members, message', [
    ({'a.png': b'', 'b.png': b'', 'b.txt': b'a cat'}, r"Sample 'a' of shard .* has no caption \(txt\)"),
    ({'a.png': b'', 'a.txt': b'\n \n'}, r"Sample 'a' of shard .* has no caption \(txt\)"),
    ({'a.txt': b'a cat', 'a.json': b'{}'}, r"Sample 'a' of shard .* has no image \(png, jpg, jpeg, webp\)"),
    ({}, r'hold no samples'),
])
def test_bad_shard_samples(checkpoint, tmp_path, members, message):
    with tarfile.open(tmp_path / 'shard.tar', 'w') as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    with pytest.raises(SystemExit, match=message):
        run(['--retrieval', str(tmp_path / 'shard.tar')], checkpoint)


def test_shards_without_webdataset_installed(data, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, 'webdataset', None)  # import webdataset now raises ImportError
    with pytest.raises(SystemExit,
                       match=r"Reading webdataset shards needs webdataset: pip install 'open_clip_llip\[training\]'"):
        run(['--retrieval', str(data / 'shards' / '000.tar')], checkpoint)


def test_compressed_shard(checkpoint, tmp_path):
    with tarfile.open(tmp_path / 'shard.tar', 'w:gz'):
        pass
    with pytest.raises(SystemExit, match=r'Could not read shard .* as an uncompressed tar'):
        run(['--retrieval', str(tmp_path / 'shard.tar')], checkpoint)


@pytest.mark.parametrize('model, extra, message', [
    ('ViT-B-32', ['--temperatures', '1'], r"--temperatures applies to Llip models only; 'ViT-B-32' is scored"),
    ('NoSuchModel', [], r"Unknown model 'NoSuchModel'. Llip configs: Llip-Tiny"),
    ('Llip-Tinyy', [], r"Did you mean 'Llip-Tiny'"),
])
def test_unknown_models_and_temperatures_of_other_models(data, model, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(['--model', model, '--retrieval', str(data / 'retrieval' / 'set.csv'), *extra])


def test_openclip_models_are_scored_by_dot_products(data, tmp_path, register_config):
    """A baseline with the same towers: OpenCLIP's classifier and unit embeddings, the same metrics."""
    config = open_clip.get_model_config('Llip-Tiny')
    for key in ('model_class', 'llip_cfg', 'init_logit_bias'):
        config.pop(key)
    register_config('Tiny-Baseline', config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms('Tiny-Baseline')
    checkpoint = tmp_path / 'baseline.pt'
    torch.save(model.state_dict(), checkpoint)
    output = tmp_path / 'out.json'
    main(['--model', 'Tiny-Baseline', '--pretrained', str(checkpoint), '--workers', '0', *zero_shot_args(data),
          '--retrieval', str(data / 'retrieval' / 'set.csv'), '--json', str(output)])
    records = {r['type']: r for r in json.loads(output.read_text())['results']}
    assert all(r['temperature'] is None for r in records.values())

    tokenizer = open_clip.get_tokenizer('Tiny-Baseline')
    with torch.no_grad():
        def embed_images(paths):
            return model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        classes = torch.stack([F.normalize(model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]),
                                                             normalize=True).mean(0), dim=0)
                               for name in ['cat', 'dog', 'red car']])
        images = [(path, c) for c, folder in enumerate(sorted(CLASS_FOLDERS))
                  for path in sorted((data / 'zeroshot' / folder).iterdir())]
        predicted = (embed_images([p for p, _ in images]) @ classes.T).argmax(1)
        top1 = (predicted == torch.tensor([c for _, c in images])).double().mean().item()
        captions = ['a dog', 'a brown dog', 'something red', 'a cat', 'a car', 'a red car', 'a fast car']
        scores = embed_images([data / 'retrieval' / 'images' / f'{i}.png' for i in range(3)]) @ \
            model.encode_text(tokenizer(captions), normalize=True).T
    assert records['zeroshot_classification']['metrics']['top1'] == pytest.approx(top1)
    assert records['retrieval']['metrics'] == pytest.approx(plain_metrics(scores, torch.tensor([0, 0, 2, 1, 2, 2, 2])))


def test_json_path_is_a_folder(data, checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r'is a folder; give a file path'):
        run(['--retrieval', str(data / 'retrieval' / 'set.csv'), '--json', str(tmp_path), '--overwrite'], checkpoint)


def test_missing_checkpoint(data, tmp_path):
    with pytest.raises(SystemExit, match=r'Checkpoint .*nope.pt not found'):
        run(['--retrieval', str(data / 'retrieval' / 'set.csv')], tmp_path / 'nope.pt')


@pytest.mark.parametrize('args, message', [
    ([], r'nothing to evaluate'),
    (['--zeroshot-images', 'a', '--templates', 't'], r'one --classnames per --zeroshot-images \(got 0 and 1\)'),
    (['--retrieval', 'r', '--temperatures', '1', '0'], r'--temperatures must be positive'),
])
def test_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--model', 'Llip-Tiny', *args])
    assert exit_info.value.code == 2
    assert __import__('re').search(message, capsys.readouterr().err)


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, '-m', 'open_clip_llip', 'eval', *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_command_line_end_to_end(data, checkpoint, tmp_path):
    result = cli('--model', 'Llip-Tiny', '--pretrained', checkpoint, *zero_shot_args(data),
                 '--retrieval', data / 'retrieval' / 'set.csv', '--workers', '1', '--json', tmp_path / 'out.json')
    assert result.returncode == 0, result.stderr
    assert 'zeroshot_classification' in result.stdout and 'retrieval' in result.stdout
    assert 'Zero-shot: 100%' in result.stderr  # progress
    assert [r['type'] for r in json.loads((tmp_path / 'out.json').read_text())['results']] == [
        'zeroshot_classification', 'retrieval']


def test_checkpoint_of_another_model_is_a_short_error(data, tmp_path):
    """A Llip-Tiny with K = 4 mixture tokens instead of 8: the loader's message, no traceback."""
    path = tmp_path / 'k4.pt'
    torch.save(LlipModel(**tiny_config(llip_cfg__mixture_tokens=4)).state_dict(), path)
    result = cli('--model', 'Llip-Tiny', '--pretrained', path, '--retrieval', data / 'retrieval' / 'set.csv')
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    assert 'was made for another architecture (K = 4 mixture tokens' in result.stderr


def test_console_command_is_declared_and_eval_is_its_subcommand():
    scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']
    module, _, function = scripts['open_clip_llip'].partition(':')
    command = import_module(module)
    assert getattr(command, function) is command.main
    assert import_module(f'{module}.{command.SUBCOMMANDS["eval"][0]}').main is main


def retrieval_json(output):
    return json.loads(output.read_text())['results'][0]['metrics']


@pytest.fixture(scope='module')
def trained_like(tmp_path_factory):
    """A Llip-Tiny checkpoint other than a fresh model's: evaluating random weights instead would show."""
    torch.manual_seed(11)
    model = open_clip.create_model('Llip-Tiny')
    path = tmp_path_factory.mktemp('trained') / 'epoch_3.pt'
    torch.save({'epoch': 3, 'state_dict': model.state_dict()}, path)
    return path


def test_every_model_form_of_open_clip_train_evaluates_exactly_the_weights_given(data, trained_like, tmp_path):
    """A name, local-dir: (with --pretrained, or its own weights file) and a JSON config file."""
    from open_clip_llip.evaluation.tasks import load_model
    expected = torch.load(trained_like, weights_only=True)['state_dict']
    config = open_clip.get_model_config('Llip-Tiny')
    folder = tmp_path / 'my-llip'
    folder.mkdir()
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': config}))
    (tmp_path / 'my-llip.json').write_text(json.dumps(config))
    retrieval = ['--retrieval', str(data / 'retrieval' / 'set.csv'), '--workers', '0']
    for model_name in ['Llip-Tiny', f'local-dir:{folder}', str(tmp_path / 'my-llip.json')]:
        torch.manual_seed(0)
        model, _, tokenizer = load_model(model_name, str(trained_like))
        state = model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in expected.items()), model_name
        assert tokenizer(['a dog']).shape == (1, 16)

    run([*retrieval, '--json', str(tmp_path / 'name.json')], trained_like)
    torch.save(expected, folder / 'open_clip_pytorch_model.bin')
    main(['--model', f'local-dir:{folder}', *retrieval, '--json', str(tmp_path / 'own.json')])
    assert retrieval_json(tmp_path / 'own.json') == retrieval_json(tmp_path / 'name.json')


def test_a_model_without_weights_is_refused_not_evaluated_at_random(data, tmp_path):
    retrieval = ['--retrieval', str(data / 'retrieval' / 'set.csv'), '--workers', '0']
    with pytest.raises(SystemExit, match=r'--model Llip-Tiny has no weights of its own: give --pretrained'):
        main(['--model', 'Llip-Tiny', *retrieval])
    folder = tmp_path / 'no-weights'
    folder.mkdir()
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': open_clip.get_model_config('Llip-Tiny')}))
    with pytest.raises(SystemExit, match=r'Required pretrained weights .* could not be loaded'):
        main(['--model', f'local-dir:{folder}', *retrieval])


def test_diverged_weights_are_refused_by_the_command(data, tmp_path):
    state = open_clip.create_model('Llip-Tiny').state_dict()
    state['visual.k_proj'][0] = float('nan')
    path = tmp_path / 'nan.pt'
    torch.save(state, path)
    result = cli('--model', 'Llip-Tiny', '--pretrained', path, '--retrieval', data / 'retrieval' / 'set.csv')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'hold NaN or infinite values: visual.k_proj' in result.stderr


def test_a_truncated_image_is_named(data, checkpoint, tmp_path):
    (tmp_path / 'images').mkdir()
    image = (data / 'retrieval' / 'images' / '0.png').read_bytes()
    (tmp_path / 'images' / 'broken.png').write_bytes(image[:len(image) // 2])
    (tmp_path / 'set.csv').write_text('filepath\ttitle\nimages/broken.png\ta dog\n')
    with pytest.raises(SystemExit, match=r'Could not read the image .*images/broken.png: .*truncated.*Replace or remove'):
        run(['--retrieval', str(tmp_path / 'set.csv')], checkpoint)


def test_a_checkpoint_of_another_mixer_config_is_refused_by_the_command(data, tmp_path):
    """H = 2 instead of Llip-Tiny's 4: the same tensor shapes, refused from the recorded config."""
    path = tmp_path / 'h2.pt'
    torch.save(LlipModel(**tiny_config(llip_cfg__heads=2)).state_dict(), path)
    result = cli('--model', 'Llip-Tiny', '--pretrained', path, '--retrieval', data / 'retrieval' / 'set.csv')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'made for a Llip model with K = 8, H = 2, τ = 5.0, norm = False, but this model has' in result.stderr

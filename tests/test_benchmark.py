"""CLIP_benchmark on Llip (``open_clip_llip benchmark``): its own evaluation, our scores, ``open_clip_llip eval``'s numbers.

Tiny datasets in CLIP_benchmark's formats (webdataset ``wds/…`` for classification and retrieval, flickr-style
for retrieval) and the same images, captions, class names and templates in ours. Metric names:

    CLIP_benchmark                      open_clip_llip eval
    acc1, acc5                          top1, top5
    image_retrieval_recall@k (text→image)   text_to_image_R@k
    text_retrieval_recall@k (image→text)    image_to_text_R@k

Ties rank differently (CLIP_benchmark's ``topk`` picks any order, ours counts ties against the model), so
the tests check that the data has none.
"""
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import types
import warnings
from importlib import import_module

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import EPS32, REPO
from PIL import Image

from open_clip_llip import build_zero_shot_classifier, unpack_image, zero_shot_cosine
from open_clip_llip.commands.benchmark import main
from open_clip_llip.commands.evaluate import main as eval_main
from open_clip_llip.data.classification import ZERO_SHOT_TASKS
from open_clip_llip.evaluation.readers import RetrievalImages, read_retrieval_set
from open_clip_llip.integration import clip_benchmark as benchmark
from open_clip_llip.integration.clip_benchmark import METRICS_MODULES, REFUSED_TASKS, llip_support

clip_benchmark = pytest.importorskip('clip_benchmark', reason="CLIP_benchmark is not installed (the 'benchmark' extra)")
from clip_benchmark.metrics import linear_probe, zeroshot_classification, zeroshot_retrieval  # noqa: E402

CLASSNAMES = ['cat', 'dog', 'red car', 'tree', 'boat', 'house']  # >= 5 classes: CLIP_benchmark reports acc5
TEMPLATES = ['a photo of a {}.', 'a {} in a drawing']  # ours; CLIP_benchmark's write {c}
IMAGES_PER_CLASS = 4
RETRIEVAL_CAPTIONS = [['a dog on a red sofa', 'a brown dog'], ['a cat'], ['a fast car', 'a red car', 'two cars'],
                      ['a tree by a lake'], ['a boat at sea', 'sails'], ['a small house'], ['a bird', 'a bird in a tree'],
                      ['three apples'], ['a man riding a horse', 'a horse'], ['night sky with stars']]
NUMPY_REFUSES_FLOAT_OF_ARRAYS = tuple(int(part) for part in np.__version__.split('.')[:2]) >= (2, 4)
SCORING_NAMES = {('zeroshot_classification', 'zero_shot_classifier'), ('zeroshot_classification', 'run_classification'),
                 ('zeroshot_retrieval', 'evaluate')}


def image_bytes(seed, format='PNG'):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def write_shard(path, samples):
    """A webdataset shard: samples are {extension: bytes} under keys s0000, s0001, …"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w') as tar:
        for index, sample in enumerate(samples):
            for extension, content in sample.items():
                info = tarfile.TarInfo(f's{index:04d}.{extension}')
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def write_data(root):
    """Each dataset in CLIP_benchmark's format (``wds/…`` roots, flickr-style) and in ours (ImageFolder, files, CSV)."""
    # Zero-shot: CLIP_benchmark's webdataset (test/0.tar, nshards.txt, classnames.txt, templates with {c}) and an
    # ImageFolder of the same PNG files, in the same order.
    samples = []
    for label, name in enumerate(CLASSNAMES):
        (root / 'imagefolder' / f'{label}_{name}').mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            png = image_bytes(seed=10 * label + i)
            (root / 'imagefolder' / f'{label}_{name}' / f'{i}.png').write_bytes(png)
            samples.append({'png': png, 'cls': str(label).encode()})
    write_shard(root / 'wds_zeroshot' / 'test' / '0.tar', samples)
    (root / 'wds_zeroshot' / 'test' / 'nshards.txt').write_text('1\n')
    (root / 'wds_zeroshot' / 'classnames.txt').write_text('\n'.join(CLASSNAMES) + '\n')
    (root / 'wds_zeroshot' / 'zeroshot_classification_templates.txt').write_text(
        '\n'.join(t.replace('{}', '{c}') for t in TEMPLATES) + '\n')
    (root / 'classnames.txt').write_text('\n'.join(CLASSNAMES) + '\n')
    (root / 'templates.txt').write_text('\n'.join(TEMPLATES) + '\n')

    # Retrieval: CLIP_benchmark's webdataset (dataset_type.txt "retrieval"; captions one a line), which
    # open_clip_llip eval reads as it is, and a flickr-style folder (JPEG images, an annotation file) with our CSV.
    write_shard(root / 'wds_retrieval' / 'test' / '0.tar',
                [{'png': image_bytes(seed=100 + i), 'txt': '\n'.join(captions).encode()}
                 for i, captions in enumerate(RETRIEVAL_CAPTIONS)])
    (root / 'wds_retrieval' / 'test' / 'nshards.txt').write_text('1\n')
    (root / 'wds_retrieval' / 'dataset_type.txt').write_text('retrieval\n')
    (root / 'flickr').mkdir()
    annotations, rows = ['image,caption'], ['filepath\ttitle']
    for i, captions in enumerate(RETRIEVAL_CAPTIONS):
        (root / 'flickr' / f'{i}.jpg').write_bytes(image_bytes(seed=200 + i, format='JPEG'))
        annotations += [f'{i}.jpg,{caption}' for caption in captions]
        rows += [f'{i}.jpg\t{caption}' for caption in captions]
    (root / 'flickr' / 'annotations.txt').write_text('\n'.join(annotations) + '\n')
    (root / 'flickr' / 'retrieval.csv').write_text('\n'.join(rows) + '\n')
    return root


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp('benchmark'))


def clip_benchmark_args(data, checkpoint, dataset, output, model='Llip-Tiny'):
    """CLIP_benchmark's command line for one of the datasets of ``write_data``, in fp32 (--no_amp), batches of 8."""
    where = {'zeroshot': ['--dataset', 'wds/zeroshot', '--dataset_root', str(data / 'wds_zeroshot'),
                          '--task', 'zeroshot_classification'],
             'wds': ['--dataset', 'wds/retrieval', '--dataset_root', str(data / 'wds_retrieval'),
                     '--task', 'zeroshot_retrieval'],
             'flickr': ['--dataset', 'flickr30k', '--dataset_root', str(data / 'flickr'),
                        '--annotation_file', str(data / 'flickr' / 'annotations.txt'), '--task', 'zeroshot_retrieval']}
    return ['eval', '--model', model, '--pretrained', str(checkpoint), *where[dataset], '--recall_k', '1', '5', '10',
            '--batch_size', '8', '--num_workers', '0', '--no_amp', '--quiet', '--output', str(output)]


def our_args(data, dataset):
    return {'zeroshot': ['--zeroshot-images', str(data / 'imagefolder'), '--classnames', str(data / 'classnames.txt'),
                         '--templates', str(data / 'templates.txt')],
            'wds': ['--retrieval', str(data / 'wds_retrieval' / 'test' / '0.tar')],
            'flickr': ['--retrieval', str(data / 'flickr' / 'retrieval.csv')]}[dataset]


def eval_command_metrics(data, checkpoint, dataset, tmp_path) -> dict:
    """open_clip_llip eval's metrics on the same data, same batch size, fp32."""
    output = tmp_path / f'ours-{dataset}.json'
    eval_main(['--model', 'Llip-Tiny', '--pretrained', str(checkpoint), *our_args(data, dataset), '--batch-size', '8',
               '--workers', '0', '--device', 'cpu', '--json', str(output)])
    (record,) = json.loads(output.read_text())['results']
    return record['metrics']


def clip_benchmark_metrics(output) -> dict:
    return json.loads(output.read_text())['metrics']


def count(fraction, total) -> int:
    """A fraction of ``total`` items as a count, checked to be one (CLIP_benchmark's recalls are float32 means)."""
    assert abs(fraction * total - round(fraction * total)) < 1e-4, (fraction, total)
    return round(fraction * total)


def assert_same_numbers(theirs, ours, dataset):
    """CLIP_benchmark's metrics equal open_clip_llip eval's: the same number of images (texts) right at each k."""
    if dataset == 'zeroshot':
        images = len(CLASSNAMES) * IMAGES_PER_CLASS
        assert count(theirs['acc1'], images) == count(ours['top1'], images)
        assert count(theirs['acc5'], images) == count(ours['top5'], images)
        return
    images, texts = len(RETRIEVAL_CAPTIONS), sum(map(len, RETRIEVAL_CAPTIONS))
    assert len(theirs) == 6
    for k in (1, 5, 10):
        assert count(theirs[f'image_retrieval_recall@{k}'], texts) == count(ours[f'text_to_image_R@{k}'], texts)
        assert count(theirs[f'text_retrieval_recall@{k}'], images) == count(ours[f'image_to_text_R@{k}'], images)


def llip_scores(checkpoint, images, classnames=None, captions=None):
    """Our conditioned cosines [N, C or M]: images (paths or shard members) against classes (TEMPLATES) or captions."""
    model, _, preprocess = open_clip.create_model_and_transforms('Llip-Tiny', pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer('Llip-Tiny')
    with torch.no_grad():
        pixels = torch.stack(list(RetrievalImages(images, preprocess)))
        if classnames is not None:
            return zero_shot_cosine(model, build_zero_shot_classifier(model, tokenizer, classnames, TEMPLATES), pixels)[0]
        return model.similarity(model.encode_image(pixels), model.encode_text(tokenizer(captions)))


def assert_no_ties(scores):
    """No two classes (captions) score the same for an image, and no two images for a caption."""
    for rows in (scores, scores.T):
        assert all(len(row.unique()) == len(row) for row in rows)


def test_zero_shot_classification_gives_the_eval_commands_numbers(data, checkpoint, tmp_path):
    """``open_clip_llip benchmark eval`` (CLIP_benchmark's own CLI, datasets and metrics) on its
    webdataset format, against open_clip_llip eval on an ImageFolder of the same images."""
    output = tmp_path / 'clip_benchmark.json'
    result = subprocess.run([sys.executable, '-m', 'open_clip_llip', 'benchmark',
                             *clip_benchmark_args(data, checkpoint, 'zeroshot', output)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs, ours = clip_benchmark_metrics(output), eval_command_metrics(data, checkpoint, 'zeroshot', tmp_path)
    assert_same_numbers(theirs, ours, 'zeroshot')
    assert 0 < ours['top1'] < ours['top5'] < 1  # numbers that could differ

    # mean_per_class_recall (which open_clip_llip eval does not report) is that of the conditioned cosines too.
    scores = llip_scores(checkpoint, sorted(map(str, (data / 'imagefolder').glob('*/*.png'))), classnames=CLASSNAMES)
    assert_no_ties(scores)
    hits = (scores.argmax(dim=1) == torch.arange(len(CLASSNAMES)).repeat_interleave(IMAGES_PER_CLASS))
    assert hits.double().mean().item() == theirs['acc1']
    assert theirs['mean_per_class_recall'] == pytest.approx(hits.view(len(CLASSNAMES), -1).double().mean(1).mean().item())


@pytest.mark.parametrize('dataset', ['wds', 'flickr'])
def test_retrieval_gives_the_eval_commands_numbers(data, checkpoint, tmp_path, dataset):
    """CLIP_benchmark's webdataset (read as it is by open_clip_llip eval) and flickr-style format (our CSV)."""
    output = tmp_path / 'clip_benchmark.json'
    main(clip_benchmark_args(data, checkpoint, dataset, output))
    theirs, ours = clip_benchmark_metrics(output), eval_command_metrics(data, checkpoint, dataset, tmp_path)
    assert_same_numbers(theirs, ours, dataset)
    assert ours['text_to_image_R@1'] < ours['text_to_image_R@5'] < 1 and 0 < ours['image_to_text_R@1']

    retrieval_set = read_retrieval_set(our_args(data, dataset)[1])
    assert_no_ties(llip_scores(checkpoint, retrieval_set.images, captions=retrieval_set.captions))


@pytest.fixture
def baseline(register_config, tmp_path):
    """Llip-Tiny's towers without the mixer: an OpenCLIP CLIP, and a checkpoint of it."""
    config = open_clip.get_model_config('Llip-Tiny')
    for key in ('model_class', 'llip_cfg', 'init_logit_bias'):
        config.pop(key)
    register_config('Tiny-Baseline', config)
    torch.manual_seed(0)
    path = tmp_path / 'baseline.pt'
    torch.save(open_clip.create_model('Tiny-Baseline').state_dict(), path)
    return path


def test_other_models_take_clip_benchmarks_stock_path(data, baseline, tmp_path, monkeypatch):
    """The same numbers as stock CLIP_benchmark, whose zero-shot accuracy is given a numpy >= 2.4 fix here."""
    from clip_benchmark.cli import main as stock_main
    for dataset in ('zeroshot', 'wds', 'flickr'):
        ours, stock = tmp_path / f'ours-{dataset}.json', tmp_path / f'stock-{dataset}.json'
        main(clip_benchmark_args(data, baseline, dataset, ours, model='Tiny-Baseline'))
        with monkeypatch.context() as patch:
            patch.setattr(sys, 'argv', ['clip_benchmark', *clip_benchmark_args(data, baseline, dataset, stock,
                                                                                model='Tiny-Baseline')])
            if NUMPY_REFUSES_FLOAT_OF_ARRAYS:
                patch.setattr(zeroshot_classification, 'accuracy', lambda output, target, topk: [
                    output.topk(k, 1)[1].eq(target[:, None]).any(1).sum().item() / len(target) for k in topk])
            stock_main()
        assert clip_benchmark_metrics(ours) == clip_benchmark_metrics(stock)


def test_class_specific_prompts(checkpoint):
    """CLIP_benchmark's dict of prompts per class (e.g. CuPL): each class built from its own prompts."""
    model, _, _ = open_clip.create_model_and_transforms('Llip-Tiny', pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer('Llip-Tiny')
    prompts = {name: [t.format(name) for t in TEMPLATES] for name in CLASSNAMES}
    prompts['dog'] = ['a good dog']
    with llip_support():
        classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, CLASSNAMES, prompts, 'cpu', amp=False)
        with pytest.raises(ValueError, match='templates must be a list or a dict'):
            zeroshot_classification.zero_shot_classifier(model, tokenizer, CLASSNAMES, tuple(TEMPLATES), 'cpu')
    expected = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
    dog = build_zero_shot_classifier(model, tokenizer, ['dog'], ['a good {}'])
    assert classifier.shape == expected.shape == (len(CLASSNAMES), 2, 4, 16)
    torch.testing.assert_close(classifier[1:2], dog)
    torch.testing.assert_close(classifier[[0, 2, 3, 4, 5]], expected[[0, 2, 3, 4, 5]])


def metrics_names():
    """Every name in CLIP_benchmark's metrics modules that open_clip_llip.integration.clip_benchmark knows, and its value."""
    return {(name, attribute): value for name in METRICS_MODULES
            for attribute, value in vars(import_module(f'clip_benchmark.metrics.{name}')).items()}


def test_everything_is_restored_on_exit_and_the_numpy_fix_stays_inside(checkpoint):
    before = metrics_names()
    with pytest.raises(RuntimeError, match='inside'), llip_support():
        inside = metrics_names()
        hits = zeroshot_classification.accuracy(torch.tensor([[0., 1.], [1., 0.]]), torch.tensor([1, 1]), topk=(1, 2))
        raise RuntimeError('inside')
    assert metrics_names() == before
    replaced = {key for key in before if inside[key] is not before[key]}
    evaluated_whole = {(task, 'evaluate') for task in ('linear_probe', *REFUSED_TASKS)}
    fixed = {(task, 'accuracy') for task in ('zeroshot_classification', 'linear_probe')}
    assert replaced == SCORING_NAMES | evaluated_whole | (fixed if NUMPY_REFUSES_FLOAT_OF_ARRAYS else set())
    assert hits == [0.5, 1.0]
    if NUMPY_REFUSES_FLOAT_OF_ARRAYS:  # CLIP_benchmark's own accuracy, outside the block, as broken as before
        with pytest.raises(TypeError, match='0-dimensional'):
            zeroshot_classification.accuracy(torch.tensor([[0., 1.]]), torch.tensor([1]), topk=(1,))


@pytest.mark.parametrize('task', sorted(REFUSED_TASKS))
def test_tasks_without_llip_scores_refuse_llip_models(checkpoint, task):
    model = open_clip.create_model('Llip-Tiny', pretrained=str(checkpoint))
    with llip_support(), pytest.raises(ValueError, match=f"CLIP_benchmark's {task} cannot evaluate a Llip model"):
        import_module(f'clip_benchmark.metrics.{task}').evaluate(model=model)


def test_an_unexpected_clip_benchmark_is_left_alone_with_one_warning(monkeypatch):
    def zero_shot_classifier(model, tokenizer, classnames, templates):  # no device, no amp
        pass
    monkeypatch.setattr(zeroshot_classification, 'zero_shot_classifier', zero_shot_classifier)
    monkeypatch.setattr(benchmark, '_warned', set())
    run_classification, retrieval = zeroshot_classification.run_classification, zeroshot_retrieval.evaluate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):
            with llip_support():  # zero-shot left alone as a whole, retrieval adapted
                assert zeroshot_classification.zero_shot_classifier is zero_shot_classifier
                assert zeroshot_classification.run_classification is run_classification
                assert zeroshot_retrieval.evaluate is not retrieval
    (warning,) = caught
    assert 'leaves zero-shot classification alone' in str(warning.message)
    assert 'zero_shot_classifier takes no device, amp' in str(warning.message)


def test_a_clip_benchmark_that_lets_models_score_themselves_is_not_adapted(monkeypatch):
    """What patches/clip_benchmark-*/0001 adds is detected by its public name (tests/test_upstream_patch.py applies it)."""
    monkeypatch.setitem(sys.modules, 'clip_benchmark.metrics.similarity',
                        types.SimpleNamespace(has_own_similarity=lambda model: True))
    before = metrics_names()
    with llip_support():
        inside = metrics_names()
    assert not {key for key in SCORING_NAMES if inside[key] is not before[key]}


def test_without_clip_benchmark(monkeypatch):
    for name in [name for name in sys.modules if name.startswith('clip_benchmark')]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, 'clip_benchmark', None)
    with pytest.raises(ImportError, match=r"pip install 'open_clip_llip\[benchmark\]'"):
        with llip_support():
            pass
    with pytest.raises(SystemExit, match=r"CLIP_benchmark is not installed .*pip install 'open_clip_llip\[benchmark\]'"):
        main(['eval'])


def test_benchmark_extra_is_declared_and_tested():
    import tomllib
    extras = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies']
    assert any(requirement.startswith('clip_benchmark>=1.6') for requirement in extras['benchmark'])
    tested = {extra.strip() for requirement in extras['test'] if requirement.startswith('open_clip_llip[')
              for extra in requirement[len('open_clip_llip['):-1].split(',')}
    assert 'benchmark' in tested


def test_plain_clip_benchmark_gives_a_llip_model_the_wrappers_numbers(data, checkpoint, tmp_path):
    """``clip_benchmark eval`` as its console script runs it, in a fresh process: CLIP_benchmark loads first, then
    OpenCLIP (and so open_clip_llip) while it imports its model loaders. Each task's ``evaluate``, and nothing else
    of CLIP_benchmark, is replaced, with CLIP_benchmark's own underneath for other models; Llip gets the wrapper's
    numbers."""
    plain = {dataset: tmp_path / f'plain-{dataset}.json' for dataset in ('zeroshot', 'wds')}
    runs = [clip_benchmark_args(data, checkpoint, dataset, output) for dataset, output in plain.items()]
    result = subprocess.run([sys.executable, '-c', f"""if True:
        import importlib, inspect, json, sys
        from clip_benchmark.cli import main  # what the clip_benchmark console script runs
        for args in {runs!r}:
            sys.argv = ['clip_benchmark', *args]
            main()
        import open_clip_llip.integration.clip_benchmark as ours
        replaced = {{f'{{task}}.{{name}}': inspect.getsourcefile(value.__wrapped__) for task in {METRICS_MODULES!r}
                    for name, value in vars(importlib.import_module(f'clip_benchmark.metrics.{{task}}')).items()
                    if inspect.isfunction(value) and value.__code__.co_filename == ours.__file__}}
        print(json.dumps(replaced))
        """], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    replaced = json.loads(result.stdout.splitlines()[-1])
    assert replaced == {f'{task}.evaluate': import_module(f'clip_benchmark.metrics.{task}').__file__
                        for task in METRICS_MODULES}
    for dataset, output in plain.items():
        wrapper = tmp_path / f'wrapper-{dataset}.json'
        main(clip_benchmark_args(data, checkpoint, dataset, wrapper))
        assert clip_benchmark_metrics(output) == clip_benchmark_metrics(wrapper)
        assert_same_numbers(clip_benchmark_metrics(output), eval_command_metrics(data, checkpoint, dataset, tmp_path),
                            dataset)


@pytest.fixture
def cuda_on_the_cpu(monkeypatch):
    """CLIP_benchmark 1.6's linear probe runs on CUDA only (it asserts device == 'cuda' and calls .cuda()): here its
    'cuda' is the CPU, so that its own code runs as it is."""
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.nn.Module, 'cuda', lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.Tensor, 'to', lambda self, *args, **kwargs: (
        self if args[:1] == ('cuda',) else to(self, *args, **kwargs)))
    warnings.filterwarnings('ignore', message=".*(pin_memory|CUDA is not available).*")


def test_linear_probe_trains_on_the_uniform_mixture_of_each_llip_image(checkpoint, tmp_path, cuda_on_the_cpu):
    """CLIP_benchmark's linear probe, called as its command line calls it: it featurises, caches and trains on the
    normalised uniform mixture of each image's tokens (the mixer at a zero query)."""
    model = open_clip.create_model('Llip-Tiny', pretrained=str(checkpoint)).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, *model.visual.image_size, generator=generator)
    labels = torch.arange(20) % 6
    loaders = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[part], labels[part]), batch_size=8)
               for part in (slice(0, 12), slice(12, 20))]
    metrics = linear_probe.evaluate(model, *loaders, -1, 8, 0, 0.1, 2, 'llip-tiny', 0, str(tmp_path), device='cuda',
                                    normalize=True, amp=False)
    assert {'lp_acc1', 'lp_acc5', 'lp_mean_per_class_recall'} <= set(metrics)
    assert 0 <= metrics['lp_acc1'] <= metrics['lp_acc5'] <= 1
    with torch.no_grad():
        keys, values = unpack_image(model.encode_image(images))
        mixture = model.mixer(keys, values, torch.zeros(len(images), *values.shape[1::2]))[:, 0]
    expected = F.normalize(mixture, dim=-1)
    for split, part in (('train', slice(0, 12)), ('test', slice(12, 20))):
        features = torch.load(tmp_path / 'llip-tiny' / f'features_{split}.pt')
        # Unit vectors summed over D terms in another order (test_model's uniform mixture test bounds the mixture).
        torch.testing.assert_close(features, expected[part], rtol=0, atol=64 * mixture.shape[1] * EPS32)
        assert torch.equal(torch.load(tmp_path / 'llip-tiny' / f'targets_{split}.pt'), labels[part])


def test_compare_script_finds_the_same_numbers(checkpoint, tmp_path, capsys):
    """scripts/compare_clip_benchmark.py (the README's numbers) on a given checkpoint; it keeps an existing --json."""
    spec = importlib.util.spec_from_file_location('compare_clip_benchmark', REPO / 'scripts' / 'compare_clip_benchmark.py')
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    output = tmp_path / 'compare.json'
    compare.main(['--pretrained', str(checkpoint), '--json', str(output)])
    results = json.loads(output.read_text())
    assert results['differing'] == 0
    assert {row['task'] for row in results['rows']} == {task.name for task in ZERO_SHOT_TASKS} | {'retrieval'}
    assert len(results['rows']) == 14  # acc1 of every task, acc5 of those with 5 classes or more, 6 recalls
    assert '14 metrics, 0 different.' in capsys.readouterr().out
    output.write_text('kept')
    with pytest.raises(SystemExit) as exit_info:
        compare.main(['--pretrained', str(checkpoint), '--json', str(output)])
    assert exit_info.value.code == 2 and output.read_text() == 'kept'

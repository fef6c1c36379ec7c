"""Zero-shot classification: the classifier and the conditioned scores against the golden tensors and plain Llip."""
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import reference_model, reference_tensors
from test_golden import assert_matches
from torch.utils.data import DataLoader, TensorDataset

from open_clip_llip import (
    build_zero_shot_classifier,
    run_zero_shot,
    topk_correct,
    unpack_image,
    unpack_text,
    zero_shot_cosine,
)


class TokenTable:
    """A tokenizer for texts named '<class>/<template>': returns the golden token ids of that pair."""

    def __init__(self, class_texts):
        self.class_texts = class_texts  # [C, T, L]

    def __call__(self, texts):
        return torch.stack([self.class_texts[int(c), int(t)] for c, t in (text.split('/') for text in texts)])


def golden_classifier(model, class_texts, num_classes_per_batch):
    classes, templates, _ = class_texts.shape
    return build_zero_shot_classifier(
        model, TokenTable(class_texts), [str(c) for c in range(classes)],
        ['{}/' + str(t) for t in range(templates)], num_classes_per_batch=num_classes_per_batch)


@pytest.mark.parametrize('num_classes_per_batch', [None, 2])
def test_classifier_and_scores_reproduce_reference(golden_name, num_classes_per_batch):
    io, zs = reference_tensors(golden_name, 'io'), reference_tensors(golden_name, 'zeroshot')
    model = reference_model(golden_name)
    classifier = golden_classifier(model, zs['class_texts'], num_classes_per_batch)
    queries, targets = unpack_text(classifier)
    assert_matches(queries, zs['class_queries'])
    assert_matches(targets, model.mixer.text_targets(zs['class_text_features']))

    scores = zero_shot_cosine(model, classifier, io['images'], temperatures=[1, 5])
    assert scores.shape == (2, *zs['zeroshot_logits_tau1'].shape)
    assert_matches(scores[0], zs['zeroshot_logits_tau1'])
    assert_matches(scores[1], zs['zeroshot_logits_tau5'])
    assert_matches(zero_shot_cosine(model, classifier, io['images'])[0], zs['zeroshot_logits_tau5'])  # the model's τ


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny').eval()


CLASSNAMES = ['cat', 'dog', 'red car', 'tree']
TEMPLATES = ['a photo of a {}.', 'a drawing of the {}', lambda c: f'{c}!']


def plain_classifier(model, tokenizer):
    """Class by class, template by template: unit class embeddings [C, D] and class queries [C, H, d]."""
    features, queries = [], []
    for name in CLASSNAMES:
        texts = [t.format(name) if isinstance(t, str) else t(name) for t in TEMPLATES]
        feats, qs = zip(*(model.embed_text(tokenizer([text])) for text in texts))
        features.append(F.normalize(torch.stack([F.normalize(f[0], dim=0) for f in feats]).mean(0), dim=0))
        queries.append(torch.stack([q[0] for q in qs]).mean(0))
    return torch.stack(features), torch.stack(queries)


def plain_cosine(model, classes, images, tau):
    """Materialise z[i|c] (docs/method.md) and take its cosine with t[c]; ``classes``: embeddings [C, D], queries."""
    embeddings, queries = classes
    keys, values = unpack_image(model.encode_image(images))
    z = model.mixer(keys, values, queries, temperature=tau)  # [N, C, D]
    return F.cosine_similarity(z, embeddings[None], dim=-1)


def test_classifier_matches_plain_recipe(model):
    tokenizer = open_clip.get_tokenizer('Llip-Tiny')
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=3)
        features, queries = plain_classifier(model, tokenizer)
    assert classifier.shape == (4, 2, 4, 16)  # class text features: [C, 2, H, d]
    torch.testing.assert_close(classifier, model.text_features(features, queries), rtol=1e-5, atol=1e-6)


def random_classes(model, classes=7, seed=1):
    """Unit class embeddings [C, D] and raw class queries [C, H, d]."""
    generator = torch.Generator().manual_seed(seed)
    heads, d = model.mixer.heads, model.mixer.out_proj.shape[0] // model.mixer.heads
    return (F.normalize(torch.randn(classes, heads * d, generator=generator), dim=-1),
            3 * torch.randn(classes, heads, d, generator=generator))


def random_classifier(model, classes=7, seed=1):
    with torch.no_grad():
        return model.text_features(*random_classes(model, classes, seed))


def test_scores_match_materialised_z_for_several_temperatures(model):
    classes = random_classes(model)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores = zero_shot_cosine(model, random_classifier(model), images, temperatures=[0.5, 5, 20])
        for tau, tau_scores in zip([0.5, 5, 20], scores):
            torch.testing.assert_close(tau_scores, plain_cosine(model, classes, images, tau), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scores[0], scores[2])  # τ changes the scores


def plain_topk(scores, targets, k):
    """Correct at k: fewer than k other classes score >= the true class."""
    return sum(int(sum(bool(scores[i, c] >= scores[i, t]) for c in range(scores.shape[1]) if c != t) < k)
               for i, t in enumerate(targets.tolist()))


def test_topk_correct_counts_ties_against():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # true class first: correct at 1
        [0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # tied with one other class: wrong at 1, right at 2
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # all tied: wrong at 1 and 5
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # true class (0) is last
        [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # true class (4) fifth
    ])
    targets = torch.tensor([0, 1, 2, 0, 4])
    counts = topk_correct(scores, targets, topk=(1, 2, 5))
    assert counts.tolist() == [1, 2, 3]
    assert counts.tolist() == [plain_topk(scores, targets, k) for k in (1, 2, 5)]
    random_scores = torch.randint(0, 4, (50, 6)).float()  # many ties
    random_targets = torch.randint(0, 6, (50,))
    assert topk_correct(random_scores, random_targets, (1, 3)).tolist() == [
        plain_topk(random_scores, random_targets, k) for k in (1, 3)]


def test_run_zero_shot_encodes_each_image_once_for_all_temperatures(model, monkeypatch):
    classes, classifier = random_classes(model), random_classifier(model)
    generator = torch.Generator().manual_seed(3)
    images, targets = torch.randn(10, 3, 32, 32, generator=generator), torch.randint(0, 7, (10,), generator=generator)
    with torch.no_grad():
        targets[:5] = plain_cosine(model, classes, images[:5], 5).argmax(1)  # some right, some wrong at τ 5
    encoded, stock_encode_image = [], model.encode_image
    monkeypatch.setattr(model, 'encode_image', lambda images: encoded.append(len(images)) or stock_encode_image(images))
    results = run_zero_shot(model, classifier, DataLoader(TensorDataset(images, targets), batch_size=4),
                            temperatures=[1, 5])
    monkeypatch.undo()
    assert sum(encoded) == 10
    assert list(results) == [1.0, 5.0]
    for tau in (1, 5):
        with torch.no_grad():
            scores = plain_cosine(model, classes, images, tau)
        expected = [plain_topk(scores, targets, k) / 10 for k in (1, 5)]
        assert [results[tau]['top1'], results[tau]['top5']] == pytest.approx(expected)


def test_default_temperature_is_the_models(model):
    classifier = random_classifier(model)
    loader = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))]
    assert list(run_zero_shot(model, classifier, loader)) == [model.mixer.temperature]


@pytest.mark.parametrize('temperatures', [[0], [1, -5], []])
def test_bad_temperatures(model, temperatures):
    with pytest.raises(ValueError, match='must be finite positive numbers'):
        zero_shot_cosine(model, random_classifier(model), torch.randn(1, 3, 32, 32), temperatures)


def test_classifier_needs_classes_and_templates(model):
    with pytest.raises(ValueError, match=r'0 template\(s\)'):
        build_zero_shot_classifier(model, open_clip.get_tokenizer('Llip-Tiny'), CLASSNAMES, [])

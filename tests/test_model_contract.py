"""The model contract OpenCLIP users rely on: τ in any form."""
import numpy as np
import open_clip
import pytest
import torch
from test_model import batch

from open_clip_llip import (
    LlipLoss,
    conditioned_cosine,
    evaluate_retrieval,
    unpack_image,
    unpack_text,
    zero_shot_cosine,
)
from open_clip_llip.search.index import mixed_cosine


@pytest.fixture
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny', output_dict=True).eval()


# One τ and several, in the forms a user may hold them; the first of each is the reference.
ONE_TAU = [5., 5, np.float32(5.), torch.tensor(5.), torch.tensor(5., dtype=torch.float64), np.array(5.)]
SEVERAL_TAUS = [[1., 5.], (1, 5), torch.tensor([1., 5.]), np.array([1., 5.]), torch.tensor([1., 5.], requires_grad=True)]
FORMS = [(tau, False) for tau in ONE_TAU] + [(tau, True) for tau in SEVERAL_TAUS]


def form_id(tau):
    if isinstance(tau, (torch.Tensor, np.ndarray)):
        grad = ' requiring grad' if getattr(tau, 'requires_grad', False) else ''
        return f'{type(tau).__name__} {tau.ndim}-d {tau.dtype}{grad}'
    return type(tau).__name__


@pytest.fixture
def features(model):
    images, texts = batch(model, 4, 3)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


@pytest.mark.parametrize('tau, several', FORMS, ids=[form_id(tau) for tau, _ in FORMS])
def test_every_form_of_temperature_scores_as_a_float_or_a_list(model, features, tau, several):
    reference = SEVERAL_TAUS[0] if several else ONE_TAU[0]
    image_features, text_features = features
    with torch.no_grad():
        expected = model.similarity(image_features, text_features, reference)
        assert expected.shape == ((2, 4, 3) if several else (4, 3))
        assert torch.equal(model.similarity(image_features, text_features, tau), expected)
        assert model.temperatures(tau) == model.temperatures(reference)
        images = batch(model, 2, 1)[0]
        classifier = text_features
        assert torch.equal(zero_shot_cosine(model, classifier, images, tau), zero_shot_cosine(model, classifier, images,
                                                                                              reference))
        assert evaluate_retrieval(model, image_features[:3], text_features, temperatures=tau) == \
            evaluate_retrieval(model, image_features[:3], text_features, temperatures=reference)
        # The APIs that score at one τ take every form of one, and refuse several.
        keys, values = unpack_image(image_features)
        queries, targets = unpack_text(text_features)
        gram = model.mixer.image_gram(values)
        one_tau_apis = {
            'LlipMixer.attention': lambda t: model.mixer.attention(keys, queries, t),
            'LlipMixer.forward': lambda t: model.mixer(keys, values, queries, t),
            'conditioned_cosine': lambda t: conditioned_cosine(keys, values, gram, queries, targets, t),
            'mixed_cosine': lambda t: mixed_cosine(model, image_features, text_features, t),
            'LlipLoss': lambda t: torch.tensor(LlipLoss(t).temperature),
        }
        for name, api in one_tau_apis.items():
            if several:
                with pytest.raises(ValueError, match=r'One temperature \(τ\) is needed here.*got a sequence of 2'):
                    api(tau)
            else:
                assert torch.equal(api(tau), api(reference)), name


@pytest.mark.parametrize('bad, message', [
    (0., r'finite positive numbers, got \[0.0\]'),
    (torch.tensor([1., -5.]), r'finite positive numbers, got \[1.0, -5.0\]'),
    (np.array(float('nan')), r'finite positive numbers, got \[nan\]'),
    ([1., float('inf')], r'finite positive numbers, got \[1.0, inf\]'),
    ([], r'finite positive numbers, got \[\]'),
    (torch.ones(2, 1), r'one number or a 1-d sequence of numbers .*got a 2-d Tensor of shape \[2, 1\]'),
    (np.ones((1, 2)), r'one number or a 1-d sequence of numbers .*got a 2-d ndarray of shape \[1, 2\]'),
    ([[1., 5.]], r'one number or a 1-d sequence of numbers .*got \[\[1.0, 5.0\]\]'),
    ('5', r"one number or a 1-d sequence of numbers .*got '5'"),
    (True, r'one number or a 1-d sequence of numbers .*got True'),
], ids=['zero', 'negative in a tensor', 'nan in an array', 'inf in a list', 'empty', '2-d tensor', '2-d array',
        'nested list', 'string', 'bool'])
def test_bad_temperatures_are_refused_saying_what_was_wrong(model, features, bad, message):
    with pytest.raises(ValueError, match=message):
        model.similarity(*features, bad)

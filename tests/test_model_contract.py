"""The model contract OpenCLIP users rely on: τ in any form, CLIP's tuple, torch.compile and torch.export."""
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from test_model import batch

from open_clip_llip import (
    LlipLoss,
    LlipModel,
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


@pytest.mark.parametrize('create', [
    lambda: open_clip.create_model('Llip-Tiny', output_dict=False),
    lambda: open_clip.create_model('Llip-Tiny'),  # CLIP's default
    lambda: LlipModel(**{k: v for k, v in open_clip.get_model_config('Llip-Tiny').items() if k != 'model_class'}),
], ids=['output_dict=False', 'create_model default', 'LlipModel default'])
def test_output_dict_false_returns_the_tuple_clip_returns(create):
    torch.manual_seed(0)
    model = create().eval()
    images, texts = batch(model)
    with torch.no_grad():
        image_features, text_features, logit_scale, logit_bias = model(images, texts)
        assert torch.equal(image_features, model.encode_image(images))  # Llip's packed shapes, as encode_* give them
        assert torch.equal(text_features, model.encode_text(texts))
        assert torch.equal(logit_scale, model.logit_scale.exp()) and logit_bias is model.logit_bias
        # As CLIP: None for the input not given.
        assert model(image=images)[1] is None and model(text=texts)[0] is None


def test_output_dict_true_returns_what_the_loss_takes(model):
    out = model(*batch(model, 4, 4))
    assert set(out) == {'image_features', 'image_gram', 'text_features', 'logit_scale', 'logit_bias'}
    assert torch.isfinite(LlipLoss(model.mixer.temperature)(**out))


def test_the_loss_refuses_clips_tuple_and_says_to_use_the_dict(model):
    model.output_dict = False
    with pytest.raises(ValueError, match=r'image_gram.*output_dict=True.*loss\(\*\*model\(images, texts\)\)'):
        LlipLoss(model.mixer.temperature)(*model(*batch(model)))


def test_openclips_zero_shot_loop_scores_a_tuple_model_as_the_dict_model(model):
    """The stock loop takes ``model(image=x)`` as a dict or CLIP's tuple; so does the similarity adapter."""
    import open_clip_train.zero_shot as stock
    run = getattr(stock, 'run_zero_shot_classifier', None) or stock.run  # OpenCLIP 4, 3
    args = SimpleNamespace(device='cpu', precision='fp32', batch_size=4, rank=0)
    images, texts = batch(model, 8, 5)
    with torch.no_grad():
        classifier = model.encode_text(texts)
    loader = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4) + 1)]
    as_dict = run(model, classifier, loader, args)
    model.output_dict = False
    assert run(model, classifier, loader, args) == as_dict


def test_a_compiled_training_forward_has_no_graph_break(model):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.train())(*batch(model, 4, 4))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_a_compiled_forward_still_refuses_token_ids_outside_the_vocabulary(model):
    images, texts = batch(model, 2, 2)
    texts[1, 3] = model.vocab_size
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r'Token ids must lie in \[0, 49408\)'):
        torch.compile(model.train(), backend='eager')(images, texts)


def test_the_compiled_loss_has_no_graph_break_and_gives_the_eager_loss_and_gradients(model):
    """The PyTorch path, compiled, checkpoints its blocks of images: the same loss, the same gradients."""
    out = model.train()(*batch(model, 6, 6))
    inputs = {name: value.detach().requires_grad_() for name, value in out.items()}
    loss_fn = LlipLoss(model.mixer.temperature, impl='torch', block_size=3)  # two blocks
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_fn)(**inputs)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]

    eager = loss_fn(**inputs)
    eager_grads = torch.autograd.grad(eager, list(inputs.values()))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend='aot_eager')(**inputs)
    compiled_grads = torch.autograd.grad(compiled, list(inputs.values()))
    # The same operations on the same blocks; the texts' gradients add the two blocks', in either order the same.
    assert torch.equal(compiled, eager)
    for name, got, want in zip(inputs, compiled_grads, eager_grads):
        assert torch.equal(got, want), name


def test_a_compiled_loss_still_stops_on_a_non_finite_loss(model):
    out = model.train()(*batch(model, 4, 4))
    out['logit_bias'] = torch.full_like(out['logit_bias'], float('nan'))
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match='The Llip loss is not finite; stopping rather than training on NaNs'):
        torch.compile(LlipLoss(model.mixer.temperature, impl='torch'), backend='aot_eager')(**out)


class Encoder(torch.nn.Module):
    """One of a model's encoders as a module's forward, as torch.export takes it."""

    def __init__(self, model, encode: str):
        super().__init__()
        self.model, self.encode = model, encode

    def forward(self, inputs):
        return getattr(self.model, self.encode)(inputs)


@pytest.mark.parametrize('encode', ['encode_image', 'encode_text'])
def test_exported_encoders_give_the_eager_features(model, encode):
    """Exactly: the exported program runs the eager kernels. (Not against an eager forward under no_grad, where
    OpenCLIP 3's nn.MultiheadAttention takes its fused fast path, another kernel with another round-off.)"""
    images, texts = batch(model, 3, 3)
    other_images, other_texts = batch(model, 5, 5, seed=1)
    inputs, other = (images, other_images) if encode == 'encode_image' else (texts, other_texts)
    program = torch.export.export(Encoder(model, encode), (inputs,))
    assert torch.equal(program.module()(inputs), getattr(model, encode)(inputs))
    program = torch.export.export(Encoder(model, encode), (inputs,), dynamic_shapes=({0: torch.export.Dim('batch')},))
    for x in (inputs, other):
        assert torch.equal(program.module()(x), getattr(model, encode)(x))

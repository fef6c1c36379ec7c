"""Our model reproduces the golden tensors made with the authors' code (tests/data/README.md)."""
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE, reference_config, reference_model, reference_tensors

from open_clip_llip import LlipLoss, conditioned_cosine, unpack_image, unpack_text
from open_clip_llip.modeling.checkpoint import convert_state_dict

# fp32 round-off: every golden tensor is matched to 1e-5 of its largest entry.
RTOL = 1e-5
# K_norm.bias has an exact gradient of zero (shifting every key leaves the softmax unchanged);
# the reference holds round-off of ~3e-8 there, so gradients get this absolute floor.
GRAD_ATOL = 1e-6


def assert_matches(ours, ref, atol=0.):
    ours, ref = ours.detach().reshape(ref.shape), ref
    error = (ours - ref).abs().max().item()
    assert error <= RTOL * ref.abs().max().item() + atol, f'max error {error:.3g}, reference scale {ref.abs().max():.3g}'


def test_encoders_reproduce_keys_values_queries_and_text_embedding(golden_name):
    io = reference_tensors(golden_name, 'io')
    model = reference_model(golden_name)
    keys, values = unpack_image(model.encode_image(io['images']))
    text_embeddings, queries = model.embed_text(io['texts'])
    assert_matches(keys, io['K'])
    assert_matches(values, io['V'])
    assert_matches(queries, io['Q'])
    assert_matches(text_embeddings, io['zt'])
    assert_matches(unpack_text(model.encode_text(io['texts']))[0], io['Q'])
    assert_matches(model.mixer(keys, values, queries), io['z'])


def test_logits_reproduce_reference(golden_name):
    io = reference_tensors(golden_name, 'io')
    image_logits, text_logits = reference_model(golden_name).get_logits(io['images'], io['texts'])
    assert_matches(image_logits, io['logits'])
    assert_matches(text_logits, io['logits'].T)


@pytest.mark.parametrize('block_size', [None, 2])
def test_loss_and_every_gradient_reproduce_reference(golden_name, block_size):
    io = reference_tensors(golden_name, 'io')
    model = reference_model(golden_name)
    loss = LlipLoss(model.mixer.temperature, block_size=block_size)(**model(io['images'], io['texts']))
    loss.backward()
    assert_matches(loss, io['loss'])

    reference_grads = convert_state_dict({k[len('grad.'):]: v for k, v in io.items() if k.startswith('grad.')}, model)
    params = dict(model.named_parameters())
    assert set(reference_grads) == set(params)
    for name, ref in reference_grads.items():
        assert params[name].grad is not None, name
        assert_matches(params[name].grad, ref, atol=GRAD_ATOL)


@pytest.mark.parametrize('tau', [1, 5])
def test_zero_shot_logits_reproduce_reference(golden_name, tau):
    """Class embedding: normalised mean of normalised template embeddings; class query: mean query."""
    io, zs = reference_tensors(golden_name, 'io'), reference_tensors(golden_name, 'zeroshot')
    model = reference_model(golden_name)
    classes, templates, length = zs['class_texts'].shape
    embeddings, queries = model.embed_text(zs['class_texts'].reshape(-1, length))
    class_features = F.normalize(F.normalize(embeddings, dim=-1).reshape(classes, templates, -1).mean(1), dim=-1)
    class_queries = queries.reshape(classes, templates, *queries.shape[1:]).mean(1)
    assert_matches(class_features, zs['class_text_features'])
    assert_matches(class_queries, zs['class_queries'])

    keys, values = unpack_image(model.encode_image(io['images']))
    cosine = conditioned_cosine(keys, values, model.mixer.image_gram(values), class_queries,
                                model.mixer.text_targets(class_features), temperature=tau)
    assert_matches(cosine, zs[f'zeroshot_logits_tau{tau}'])
    # The same through the model: the classifier (class text features) and similarity at τ.
    classifier = torch.cat([model.text_features(f[None], q[None]) for f, q in zip(class_features, class_queries)])
    assert_matches(model.similarity(model.encode_image(io['images']), classifier, temperature=tau),
                   zs[f'zeroshot_logits_tau{tau}'])


def test_release_layout_checkpoint_loads_through_create_model(golden_name, register_config):
    """The tiny files in the released checkpoints' layout (module. prefix, top-level out_proj), through OpenCLIP's
    factory as through ``LlipModel.load_checkpoint``."""
    saved = torch.load(REFERENCE / f'{golden_name}.release-layout.pt', weights_only=True)['state_dict']
    assert all(key.startswith('module.') for key in saved) and 'module.out_proj' in saved
    register_config(f'golden-{golden_name}', dict(reference_config(golden_name), model_class='LlipModel'))
    model = open_clip.create_model(f'golden-{golden_name}', pretrained=str(REFERENCE / f'{golden_name}.release-layout.pt'))
    expected = reference_model(golden_name).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

"""Pretrained tags: the authors' releases, CLIP tags to start Llip from, and what a Hub export says it needs.

Offline: a registered tag points at a ``file://`` URL, which OpenCLIP's own download copies into its
cache as it would a web download.
"""
import importlib
import json
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import REFERENCE, reference_config, reference_model
from open_clip_train.main import main as open_clip_train_main
from test_bad_input import tiny_config

from open_clip_llip import LlipModel
from open_clip_llip.integration.adapters import registered_pretrained
from open_clip_llip.integration.plugin import register_pretrained_tags

pytestmark = pytest.mark.usefixtures('restore_logging')


@pytest.fixture
def register_tag():
    """``register_tag(model, tag, cfg)`` for one test (OpenCLIP's registry or our stand-in), undone afterwards."""
    from open_clip import pretrained
    register = registered_pretrained.install()
    added = []

    def add(model, tag, cfg):
        register(model, tag, cfg)
        added.append((model, pretrained._clean_tag(tag)))

    yield add
    for model, tag in added:
        pretrained._PRETRAINED.get(model, {}).pop(tag, None)


def test_the_authors_releases_are_tags_with_their_preprocessing():
    assert {('Llip-ViT-B-16', 'llip_b16_k32'), ('Llip-ViT-G-14', 'llip_g14_k64')} <= set(open_clip.list_pretrained())
    cfg = open_clip.get_pretrained_cfg('Llip-ViT-G-14', 'llip_G14_k64')
    assert cfg['url'] == 'https://dl.fbaipublicfiles.com/llip/llip_G14_k64.pt'
    assert cfg['mean'] == open_clip.OPENAI_DATASET_MEAN and cfg['interpolation'] == 'bicubic' and cfg['quick_gelu']
    assert open_clip.get_model_config('Llip-ViT-G-14')['quick_gelu']


def release_like_tag(register_config, register_tag, name, checkpoint, **preprocess):
    register_config(name, dict(reference_config('tiny'), model_class='LlipModel', quick_gelu=True))
    register_tag(name, 'release-test', dict(url=checkpoint.as_uri(), quick_gelu=True, **preprocess))


def test_a_release_tag_downloads_through_openclips_cache_and_loads(register_config, register_tag, tmp_path):
    checkpoint = REFERENCE / 'tiny.release-layout.pt'
    release_like_tag(register_config, register_tag, 'golden-tiny', checkpoint, mean=(0.5,) * 3, std=(0.25,) * 3,
                     interpolation='bilinear')
    model, _, preprocess = open_clip.create_model_and_transforms(
        'golden-tiny', pretrained='Release-Test', cache_dir=str(tmp_path / 'cache'))
    assert (tmp_path / 'cache' / checkpoint.name).read_bytes() == checkpoint.read_bytes()  # OpenCLIP's cache
    expected = reference_model('tiny').state_dict()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())
    assert model.visual.preprocess_cfg['mean'] == (0.5,) * 3 and model.visual.preprocess_cfg['interpolation'] == 'bilinear'



def test_the_stock_loop_and_the_eval_command_take_a_tag(register_config, register_tag, tmp_path, monkeypatch):
    """A Llip-Tiny in the released layout (the golden model's vocabulary is too small for the real tokenizer)."""
    from test_checkpoint import authors_layout_state
    torch.manual_seed(5)
    source = LlipModel(**tiny_config())
    torch.save(authors_layout_state(source), tmp_path / 'llip_tiny_release.pt')
    register_config('tiny-release', dict(tiny_config(), model_class='LlipModel'))
    register_tag('tiny-release', 'release-test', dict(url=(tmp_path / 'llip_tiny_release.pt').as_uri(), quick_gelu=True))
    open_clip_train_main(['--model', 'tiny-release', '--pretrained', 'release-test', '--cache-dir', str(tmp_path / 'cache'),
                          '--dataset-type', 'synthetic', '--train-num-samples', '4', '--batch-size', '4', '--epochs', '1',
                          '--lr', '0', '--workers', '0', '--precision', 'fp32', '--logs', str(tmp_path / 'logs'),
                          '--name', 'tag'])
    trained = torch.load(tmp_path / 'logs' / 'tag' / 'checkpoints' / 'epoch_1.pt', weights_only=True)['state_dict']
    assert torch.equal(trained['mixer.out_proj'], source.state_dict()['mixer.out_proj'])
    from open_clip_llip.evaluation.tasks import load_model
    monkeypatch.setenv('HOME', str(tmp_path))  # the command downloads into OpenCLIP's default cache, ~/.cache/clip
    evaluated, _, _ = load_model('tiny-release', 'release-test')
    assert torch.equal(evaluated.state_dict()['visual.k_proj'], source.state_dict()['visual.k_proj'])


def test_a_downloaded_checkpoint_of_another_architecture_is_refused_before_use(register_config, register_tag, tmp_path):
    other = tmp_path / 'k4.pt'
    torch.save(LlipModel(**tiny_config(llip_cfg__mixture_tokens=4)).state_dict(), other)
    register_config('tiny-k8', dict(tiny_config(), model_class='LlipModel'))
    register_tag('tiny-k8', 'wrong', dict(url=other.as_uri(), quick_gelu=True))
    with pytest.raises(ValueError, match=r'made for another architecture \(K = 4 mixture tokens'):
        open_clip.create_model('tiny-k8', pretrained='wrong', cache_dir=str(tmp_path / 'cache'))


def no_network(*args, **kwargs):
    raise urllib.error.URLError('no network (test)')


def test_a_failed_download_of_a_release_names_the_url_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    monkeypatch.setenv('HOME', str(tmp_path))  # OpenCLIP's default cache, ~/.cache/clip
    for cache_dir, cache in ((None, tmp_path / '.cache' / 'clip'), (str(tmp_path / 'cache'), tmp_path / 'cache')):
        with pytest.raises(RuntimeError) as error:
            open_clip.create_model('Llip-ViT-B-16', pretrained='llip_b16_k32', cache_dir=cache_dir)
        message = str(error.value)
        assert 'Could not download https://dl.fbaipublicfiles.com/llip/llip_b16_k32.pt (<urlopen error no network' in message
        assert f'Download llip_b16_k32.pt by hand and put it at {cache / "llip_b16_k32.pt"}, ' in message
        assert 'pass its path as pretrained= (--pretrained on the command line)' in message


def test_a_file_put_where_the_message_says_loads_without_a_download(register_config, register_tag, tmp_path, monkeypatch):
    release_like_tag(register_config, register_tag, 'golden-tiny', tmp_path / 'unreachable' / 'tiny.release-layout.pt')
    cache_dir = str(tmp_path / 'cache')
    with pytest.raises(RuntimeError, match=r'put it at (\S+), where it is looked for first') as error:
        open_clip.create_model('golden-tiny', pretrained='release-test', cache_dir=cache_dir)
    place = re.search(r'put it at (\S+), where', str(error.value)).group(1)
    shutil.copy(REFERENCE / 'tiny.release-layout.pt', place)
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    model = open_clip.create_model('golden-tiny', pretrained='release-test', cache_dir=cache_dir)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in reference_model('tiny').state_dict().items())


def test_a_failed_hub_download_names_the_repository_the_file_its_url_and_the_cache_command(
        register_config, register_tag, tmp_path, monkeypatch):
    from open_clip import pretrained
    register_config('hub-tiny', dict(tiny_config(), model_class='LlipModel'))
    register_tag('hub-tiny', 'hub-test', dict(hf_hub='someone/llip-tiny/weights.bin'))
    monkeypatch.setattr(pretrained, 'hf_hub_download', no_network)
    with pytest.raises(RuntimeError) as error:
        open_clip.create_model('hub-tiny', pretrained='hub-test', cache_dir=str(tmp_path / 'hub'))
    message = str(error.value)
    assert 'Could not download weights.bin from the Hugging Face Hub repository someone/llip-tiny (' in message
    assert 'Download https://huggingface.co/someone/llip-tiny/resolve/main/weights.bin by hand and pass its path as ' \
           'pretrained= (--pretrained on the command line)' in message
    assert f'`huggingface-cli download someone/llip-tiny weights.bin --cache-dir {tmp_path / "hub"}`' in message


def test_a_failed_download_of_another_models_tag_is_reported_as_before(register_tag, tmp_path, monkeypatch):
    register_tag('RN50', 'unreachable', dict(url=(tmp_path / 'unreachable.pt').as_uri()))
    with pytest.raises(RuntimeError) as error:
        open_clip.create_model('RN50', pretrained='unreachable', cache_dir=str(tmp_path / 'cache'))
    assert str(error.value).startswith("Failed to download weights for tag 'unreachable': <urlopen error")
    assert 'by hand' not in str(error.value)


def clip_config(quick_gelu=False):
    """An OpenCLIP CLIP config with Llip-Tiny's towers."""
    return dict({k: v for k, v in tiny_config().items() if k not in ('llip_cfg', 'init_logit_bias')},
                quick_gelu=quick_gelu)


def test_llip_starts_from_a_clip_tag_of_matching_towers(register_config, register_tag, tmp_path):
    torch.manual_seed(3)
    clip = open_clip.CLIP(**clip_config())
    torch.save(clip.state_dict(), tmp_path / 'clip.pt')
    for quick_gelu, name in ((True, 'Tiny-CLIP-quickgelu'), (False, 'Tiny-CLIP-gelu')):
        register_config(name, clip_config(quick_gelu))
        register_tag(name, 'test', dict(url=(tmp_path / 'clip.pt').as_uri(), quick_gelu=quick_gelu))
    register_pretrained_tags()  # as at import, now that these CLIP tags exist
    assert 'tiny_clip_gelu/test' in open_clip.list_pretrained_tags_by_model('Llip-Tiny')
    # Llip-Tiny uses GELU: weights trained with QuickGELU are not towers it can take.
    assert 'tiny_clip_quickgelu/test' not in open_clip.list_pretrained_tags_by_model('Llip-Tiny')

    torch.manual_seed(0)
    model = open_clip.create_model('Llip-Tiny', pretrained='Tiny-CLIP-gelu/test', cache_dir=str(tmp_path / 'cache'))
    ours, theirs = model.state_dict(), open_clip.model.convert_to_custom_text_state_dict(clip.state_dict())
    assert torch.equal(ours['text.text_projection'], theirs['text.text_projection'])
    assert torch.equal(ours['visual.conv1.weight'], theirs['visual.conv1.weight'])
    assert torch.equal(ours['visual.class_embedding'], theirs['visual.class_embedding'].expand(8, -1))
    torch.manual_seed(0)
    assert torch.equal(ours['mixer.out_proj'], open_clip.create_model('Llip-Tiny').state_dict()['mixer.out_proj'])

    open_clip_train_main(['--model', 'Llip-Tiny', '--pretrained', 'Tiny-CLIP-gelu/test',
                          '--cache-dir', str(tmp_path / 'cache'), '--dataset-type', 'synthetic', '--train-num-samples', '4',
                          '--batch-size', '4', '--epochs', '1', '--workers', '0', '--precision', 'fp32',
                          '--logs', str(tmp_path / 'logs'), '--name', 'from-clip'])
    assert 'training with LlipLoss' in (tmp_path / 'logs' / 'from-clip' / 'out.log').read_text()


class Tokenizer:
    def __init__(self, name=None):
        pass

    def save_pretrained(self, directory):
        pass


def test_a_llip_model_saved_or_pushed_for_the_hub_says_it_needs_open_clip_llip(tmp_path, monkeypatch, register_config):
    hub = importlib.import_module('open_clip.push_to_hf_hub')
    model = open_clip.create_model('Llip-Tiny')
    config = open_clip.get_model_config('Llip-Tiny')
    hub.save_for_hf(model, Tokenizer(), config, tmp_path / 'saved', safe_serialization=False)
    assert json.loads((tmp_path / 'saved' / 'open_clip_config.json').read_text())['requires'] == ['open_clip_llip']

    uploaded = {}

    def upload_folder(repo_id, folder_path, **kwargs):
        uploaded.update(readme=(Path(folder_path) / 'README.md').read_text(),
                        config=json.loads((Path(folder_path) / 'open_clip_config.json').read_text()))

    class EntryNotFoundError(Exception):
        pass

    def no_readme(*args, **kwargs):
        raise EntryNotFoundError('no README')

    # The Hub, offline (and whatever names this huggingface_hub lacks: OpenCLIP imports them all or none).
    hub_api = dict(create_repo=lambda repo_id, **kwargs: f'https://huggingface.co/{repo_id}',
                   repo_type_and_id_from_hf_id=lambda url: (None, *url.split('/')[-2:]),
                   list_repo_files=lambda repo_id: [], get_hf_file_metadata=no_readme,
                   hf_hub_url=lambda **kwargs: 'url', upload_folder=upload_folder, EntryNotFoundError=EntryNotFoundError,
                   HFTokenizer=Tokenizer, SigLipTokenizer=Tokenizer)
    for name, value in hub_api.items():
        monkeypatch.setattr(hub, name, value, raising=False)
    open_clip.push_to_hf_hub(model, open_clip.get_tokenizer('Llip-Tiny'), config, 'someone/llip-tiny',
                             model_card={'description': 'A tiny Llip.'})
    assert uploaded['config']['requires'] == ['open_clip_llip']
    assert '- open_clip_llip' in uploaded['readme'] and 'pip install open_clip_llip' in uploaded['readme']
    assert 'A tiny Llip.' in uploaded['readme']

    register_config('Tiny-CLIP', clip_config())
    hub.save_for_hf(open_clip.create_model('Tiny-CLIP'), Tokenizer(), clip_config(), tmp_path / 'clip',
                    safe_serialization=False)
    assert 'requires' not in json.loads((tmp_path / 'clip' / 'open_clip_config.json').read_text())

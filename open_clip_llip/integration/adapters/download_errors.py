"""Stand-in for patches 0008 and main/0007: a failed download of a pretrained tag says where to put the file by hand.

OpenCLIP reports a tag whose weights cannot be downloaded with the underlying error alone
(``Failed to download weights for tag 'llip_b16_k32': <urlopen error …>``). With the patch,
``download_pretrained`` raises ``PretrainedDownloadError`` naming the URL, the file and where OpenCLIP
looks for it. The stand-in says the same for the tags of Llip configs: it replaces
``open_clip.factory.download_pretrained`` (the name ``create_model`` calls), and a failed download of
any other tag raises what it raised before.
"""
import os

import open_clip

from . import Unexpected, expect_function, leave_alone

ADAPTER = 'download errors (patches/0008)'
URL_CACHE = '~/.cache/clip'  # where OpenCLIP keeps the file of a URL tag when no cache_dir is given
HF_WEIGHTS_NAME = 'open_clip_pytorch_model.bin'  # the file of an hf_hub tag that names none


def download_failure(cfg: dict, prefer_hf_hub: bool, cache_dir, has_hub: bool, error: Exception) -> str:
    """What failed (the source OpenCLIP downloads a tag's weights from) and where to put the file by hand."""
    url, hf_hub = cfg.get('url', ''), cfg.get('hf_hub', '')
    if url and not (hf_hub and prefer_hf_hub and has_hub):
        path = os.path.join(cache_dir or os.path.expanduser(URL_CACHE), os.path.basename(url))
        return (f'Could not download {url} ({error}). Download {os.path.basename(url)} by hand and put it at {path}, '
                'where it is looked for first, or pass its path as pretrained= (--pretrained on the command line).')
    repo, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    fetch = f'huggingface-cli download {repo} {filename}' + (f' --cache-dir {cache_dir}' if cache_dir else '')
    return (f'Could not download {filename} from the Hugging Face Hub repository {repo} ({error}). Download '
            f'https://huggingface.co/{repo}/resolve/main/{filename} by hand and pass its path as pretrained= '
            f'(--pretrained on the command line), or put it in the Hub cache with `{fetch}` where the Hub can be '
            'reached.')


def _is_llip_tag(cfg: dict) -> bool:
    from ...modeling.llip_model import llip_model_names
    return any(open_clip.get_pretrained_cfg(name, tag) == cfg
               for name in llip_model_names() for tag in open_clip.list_pretrained_tags_by_model(name))


def install():
    from open_clip import factory, pretrained
    if hasattr(pretrained, 'PretrainedDownloadError'):
        return  # the patch is in
    try:
        stock = expect_function(factory, 'download_pretrained', ('cfg', 'prefer_hf_hub', 'cache_dir'))
        has_hf_hub = expect_function(pretrained, 'has_hf_hub')
    except Unexpected as error:
        leave_alone(ADAPTER, error, 'a failed download of a Llip tag does not say where to put the file by hand')
        return

    def download_pretrained(cfg, prefer_hf_hub=True, cache_dir=None):
        try:
            return stock(cfg, prefer_hf_hub=prefer_hf_hub, cache_dir=cache_dir)
        except Exception as error:
            if not _is_llip_tag(cfg):
                raise
            raise OSError(download_failure(cfg, prefer_hf_hub, cache_dir, has_hf_hub(), error)) from error

    factory.download_pretrained = download_pretrained

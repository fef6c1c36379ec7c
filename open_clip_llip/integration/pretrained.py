"""Llip's pretrained tags: the authors' released weights, and every OpenCLIP CLIP tag that Llip can start from.

- ``Llip-ViT-B-16`` / ``llip_b16_k32`` and ``Llip-ViT-G-14`` / ``llip_g14_k64``: the checkpoints the
  authors published (docs/method.md, released checkpoints), in their layout, which ``LlipModel.load_checkpoint`` converts.
  OpenCLIP checks a download's SHA-256 only for its own two hosts, and these hashes are not known
  here, so nothing checks the bytes; the loader still refuses a file that is not a checkpoint of the
  config's architecture, before any weight is used.
- ``<CLIP config>/<tag>`` for every OpenCLIP tag whose towers match a Llip config's: the same
  vision and text transformers, embedding width and activation (QuickGELU or GELU, as the tag was
  trained); image size and context length may differ (positions are interpolated). For example
  ``open_clip_train --model Llip-ViT-B-16 --pretrained ViT-B-16-quickgelu/metaclip_fullcc``
  starts Llip from MetaCLIP's B/16: its towers copied, the mixture tokens from its class token,
  the new projections fresh (``open_clip_llip.modeling.checkpoint``). Such a tag downloads and caches the
  CLIP weights exactly as the CLIP tag does, with its preprocessing.
"""
from dataclasses import asdict
from typing import Dict, Tuple

# The authors' releases: OpenAI's normalisation and bicubic resizing (MetaCLIP's recipe), QuickGELU.
_RELEASE = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                interpolation='bicubic', resize_mode='shortest', quick_gelu=True)
RELEASED = {
    ('Llip-ViT-B-16', 'llip_b16_k32'): dict(url='https://dl.fbaipublicfiles.com/llip/llip_b16_k32.pt', **_RELEASE),
    ('Llip-ViT-G-14', 'llip_g14_k64'): dict(url='https://dl.fbaipublicfiles.com/llip/llip_G14_k64.pt', **_RELEASE),
}


def _towers(config: dict) -> Tuple:
    """What must be equal for a CLIP checkpoint's towers to load into a Llip model (sizes of positions aside)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    vision = asdict(CLIPVisionCfg(**config['vision_cfg']))
    text = asdict(CLIPTextCfg(**config['text_cfg']))
    vision.pop('image_size')
    text.pop('context_length')
    return config['embed_dim'], sorted(vision.items(), key=str), sorted(text.items(), key=str)


def clip_starting_points(llip_config: dict) -> Dict[str, dict]:
    """Tag ``'<CLIP config>/<tag>'`` -> that CLIP tag's cfg, for every OpenCLIP tag whose towers match ``llip_config``."""
    import open_clip
    towers = _towers(llip_config)
    quick_gelu = llip_config.get('quick_gelu', False)
    points = {}
    for model_name, tag in open_clip.list_pretrained():
        config = open_clip.get_model_config(model_name) or {}
        if 'model_class' in config or 'vision_cfg' not in config or 'text_cfg' not in config:
            continue
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        # The activation a tag was trained with: the tag's own word, else its config's.
        if cfg.get('quick_gelu', config.get('quick_gelu', False)) != quick_gelu:
            continue
        try:
            if _towers(config) != towers:
                continue
        except TypeError:  # a config with options these dataclasses do not know: another kind of model
            continue
        points[f'{model_name}/{tag}'] = dict(cfg, quick_gelu=quick_gelu)
    return points

"""Llip's text tower: OpenCLIP's ``TextTransformer``, built from a ``text_cfg`` as OpenCLIP builds it.

Llip reads two things from the pooled (EOT) token of the text transformer: the text embedding
t (through ``text_projection``) and, from the same token before the projection, the mixer query
(``mixer.TextQueryHead``). So the tower must be OpenCLIP's own transformer, pooled to one token
and projected; options that replace it (a Hugging Face model, the "modern" architecture, a CLS
token, no pooling or no projection) are refused.
"""
import inspect
from dataclasses import asdict
from typing import Optional

import torch
from open_clip.model import CLIPTextCfg
from open_clip.transformer import TextTransformer

from .vision import tower_layers

# CLIPTextCfg options that would replace OpenCLIP's pooled, projected text transformer, and the values Llip needs.
_REQUIRED_TEXT_OPTIONS = {
    'hf_model_name': None,
    'text_arch': 'clip',  # OpenCLIP 4: 'modern' is another tower
    'variable_text': False,  # OpenCLIP 4
    'embed_cls': False,
}
_REFUSED_TEXT_OPTIONS = {'proj_type': 'none', 'pool_type': 'none'}


def check_text_cfg(cfg: CLIPTextCfg):
    """ValueError naming every option of ``cfg`` that Llip's query head cannot work with."""
    bad = [f'text_cfg.{name} = {getattr(cfg, name)!r}' for name, needed in _REQUIRED_TEXT_OPTIONS.items()
           if hasattr(cfg, name) and getattr(cfg, name) != needed]
    bad += [f'text_cfg.{name} = {refused!r}' for name, refused in _REFUSED_TEXT_OPTIONS.items()
            if getattr(cfg, name) == refused]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} not supported: Llip needs OpenCLIP's own text transformer, pooled to one token "
            'and projected (text_projection), because its query comes from that pooled token.')


def build_text_tower(
        embed_dim: int,
        text_cfg: CLIPTextCfg,
        quick_gelu: bool = False,
        cast_dtype: Optional[torch.dtype] = None,
) -> TextTransformer:
    """OpenCLIP's ``TextTransformer`` for ``text_cfg``, returning its tokens too (for the query head).

    Every ``CLIPTextCfg`` field that ``TextTransformer`` takes is passed under its name, with
    OpenCLIP's choice of activation and norm (``vision.tower_layers``).
    """
    check_text_cfg(text_cfg)
    act_layer, norm_layer = tower_layers(text_cfg, quick_gelu, cast_dtype)
    accepted = inspect.signature(TextTransformer.__init__).parameters
    options = {name: value for name, value in asdict(text_cfg).items() if name in accepted}
    options.update(output_dim=embed_dim, output_tokens=True, act_layer=act_layer, norm_layer=norm_layer)
    text = TextTransformer(**options)
    text.variable_text = False  # OpenCLIP 4's loop reads it: fixed-length token ids
    return text

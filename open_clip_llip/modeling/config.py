"""Llip's model config: ``LlipCfg`` and the checks every config passes before a model is built.

A Llip config is an OpenCLIP model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, …) with
one more section, ``llip_cfg``. Configs come from JSON files that people edit by hand, so every
value is checked by type and range before anything is built, and a problem names the key's
path (``llip_cfg.mixture_tokens``), the value and what is expected: ``"norm": "no"`` must not
switch the norms on, and ``K = 8.0`` must not fail deep inside ``torch.randn``.
"""
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, List, Union


@dataclass
class LlipCfg:
    """What Llip adds to an OpenCLIP config, under the key ``llip_cfg``."""
    mixture_tokens: int = 32  # K
    heads: int = 8  # H, the mixer's heads
    temperature: float = 5.0  # τ, divides the mixer's attention logits
    norm: bool = False  # LayerNorm on keys, values and queries (the "-norm" configs)
    # False: every text mixes the K tokens with the same, uniform weights (no query head): the paper's control
    # for "more image tokens" against "caption-conditioned mixing".
    contextual: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# Values that count something: positive integers (a tuple of them for an image size).
_COUNTS = {
    'vision_cfg': ('layers', 'width', 'head_width', 'patch_size', 'image_size'),
    'text_cfg': ('context_length', 'vocab_size', 'width', 'heads', 'layers'),
    'llip_cfg': ('mixture_tokens', 'heads'),
}


# How the paper and docs/method.md name some values, shown beside their keys.
_SYMBOLS = {('llip_cfg', 'mixture_tokens'): ' (K)', ('llip_cfg', 'heads'): ' (H)'}


def _type_name(annotation) -> str:
    return getattr(annotation, '__name__', None) or str(annotation).replace('typing.', '')


def _has_type(value, annotation) -> bool:
    """Whether a JSON value fits a dataclass annotation (a list stands for a tuple; unknown forms pass)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is Union:
        return any(_has_type(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
        return all(_has_type(v, args[0]) for v in value) if args else True
    return True


def _annotations(cls) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: check what can be
        return {f.name: f.type for f in fields(cls) if not isinstance(f.type, str)}


def check_section(cls, values: dict, where: str) -> List[str]:
    """Problems with the keys and value types of one config section (a dict for dataclass ``cls``)."""
    if not isinstance(values, dict):
        return [f'{where} must be a JSON object (a dict), got {values!r}']
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        return [f'{where} has unknown key(s) {unknown}; valid keys are {sorted(known)}']
    annotations = _annotations(cls)
    problems = []
    for key, value in values.items():
        field = known[key]
        default = field.default if field.default is not MISSING else MISSING
        if key in annotations and value != default and not _has_type(value, annotations[key]):
            problems.append(f'{where}.{key} must be {_type_name(annotations[key])}, got {value!r}')
    return problems


def _positive_count(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def check_llip_config(top: dict, vision_cfg: dict, text_cfg: dict, llip_cfg: dict, vision_cls, text_cls) -> None:
    """Raise ValueError listing every problem of a Llip model config, each with its key's path.

    Args:
        top: the config's top-level values that Llip reads: ``embed_dim`` (D), ``quick_gelu``,
            ``init_logit_scale``, ``init_logit_bias``.
        vision_cfg, text_cfg, llip_cfg: the config's sections, as dicts (JSON values).
        vision_cls, text_cls: OpenCLIP's ``CLIPVisionCfg`` and ``CLIPTextCfg``.
    """
    problems = []
    sections = {'vision_cfg': (vision_cls, vision_cfg), 'text_cfg': (text_cls, text_cfg), 'llip_cfg': (LlipCfg, llip_cfg)}
    for name, (cls, values) in sections.items():
        problems += check_section(cls, values, name)
    embed_dim = top['embed_dim']
    if not _positive_count(embed_dim):
        problems.append(f'embed_dim (D) must be a positive integer, got {embed_dim!r}')
    if not isinstance(top['quick_gelu'], bool):
        problems.append(f"quick_gelu must be true or false, got {top['quick_gelu']!r}")
    for key in ('init_logit_scale', 'init_logit_bias'):
        value = top[key]
        if not (_has_type(value, float) and math.isfinite(value)):
            problems.append(f'{key} must be a finite number, got {value!r}')
    if problems:  # ranges only make sense once the types are right
        raise ValueError('Invalid Llip config: ' + '; '.join(problems) + '.')

    merged = {name: {**{f.name: getattr(cls(), f.name) for f in fields(cls)}, **values}
              for name, (cls, values) in sections.items()}
    for name, keys in _COUNTS.items():
        for key in keys:
            value = merged[name][key]
            if name == 'vision_cfg' and key == 'layers' and isinstance(value, (list, tuple)):
                continue  # a ResNet's layers: the image tower refuses it with its own message
            if not _positive_count(value):
                symbol = _SYMBOLS.get((name, key), '')
                problems.append(f'{name}.{key}{symbol} must be a positive integer, got {value!r}')
    llip, vision, text = merged['llip_cfg'], merged['vision_cfg'], merged['text_cfg']
    if not (math.isfinite(llip['temperature']) and llip['temperature'] > 0):
        problems.append(f"llip_cfg.temperature (τ) must be a finite positive number, got {llip['temperature']!r}")
    if _positive_count(llip['heads']) and embed_dim % llip['heads']:
        problems.append(f"embed_dim (D = {embed_dim}) must be divisible by llip_cfg.heads (H = {llip['heads']})")
    if _positive_count(vision['width']) and _positive_count(vision['head_width']) \
            and vision['width'] % vision['head_width']:
        problems.append(f"vision_cfg.width ({vision['width']}) must be divisible by vision_cfg.head_width "
                        f"({vision['head_width']})")
    if _positive_count(text['width']) and _positive_count(text['heads']) and text['width'] % text['heads']:
        problems.append(f"text_cfg.width ({text['width']}) must be divisible by text_cfg.heads ({text['heads']})")
    if not 0 <= vision['patch_dropout'] < 1:
        problems.append(f"vision_cfg.patch_dropout must be in [0, 1), got {vision['patch_dropout']!r}")
    if problems:
        raise ValueError('Invalid Llip config: ' + '; '.join(problems) + '.')


# The state-dict key under which a model records its ``LlipCfg``: K, H, τ and norm, of which H and
# τ show in no tensor's shape, so that a checkpoint cannot be loaded into a model of another config.
CONFIG_RECORD_KEY = 'llip_cfg_json'


def config_record(cfg: LlipCfg):
    """``cfg`` as a uint8 tensor of its JSON text: a buffer that no dtype cast changes, saved with the weights."""
    import torch
    # On the CPU even under a meta-device context: the record is data, not a weight to be initialised later.
    return torch.tensor(list(json.dumps(cfg.to_dict(), sort_keys=True).encode()), dtype=torch.uint8, device='cpu')


def read_config_record(record) -> dict:
    """The ``LlipCfg`` dict that ``config_record`` encoded; ValueError for a tensor that is not one."""
    try:
        cfg = json.loads(bytes(record.to('cpu', copy=True).tolist()).decode())
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f'{CONFIG_RECORD_KEY} does not hold a Llip config record ({error}).') from None
    if not isinstance(cfg, dict):
        raise ValueError(f'{CONFIG_RECORD_KEY} does not hold a Llip config record: {cfg!r}.')
    return cfg

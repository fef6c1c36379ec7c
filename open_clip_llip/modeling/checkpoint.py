"""Checkpoints for ``LlipModel``: ours, the authors' released ones, and OpenCLIP CLIP ViTs.

Three layouts are recognised (after dropping ``module.`` and ``_orig_mod.`` prefixes):

- **ours**, as ``open_clip_train`` saves ``LlipModel``: ``mixer.out_proj``, ``visual.k_proj``, ``text.*``;
- **the authors'** (docs/method.md, released checkpoints): early-OpenCLIP names with ``k_proj``/``v_proj``/``q_proj``,
  ``K_norm``/``V_norm``/``Q_norm`` and ``pred.out_proj`` (or ``out_proj``) at the top level,
  and the text tower unpacked at the top level;
- **OpenCLIP CLIP with a ViT image tower**: its towers are copied; the K mixture tokens and
  their positions start as copies of the class token and its position; ``visual.proj`` is
  dropped; the key, value and query projections, the mixer's W_O (and the K/V/Q norms) keep
  the model's fresh initialisation, as does ``logit_bias`` when the checkpoint has none.

Files are read with ``weights_only=True`` unless the caller says otherwise.

Integrity: ``save_checkpoint`` writes a file whole or not at all and records a SHA-256 digest of the
state dict's tensors under ``DIGEST_KEY`` beside ``state_dict``; reading checks it, so a file whose
tensor bytes changed after saving (a flipped bit) is refused by name instead of loading silently.
Files without a digest (released checkpoints, bare state dicts) load as before.
"""
import hashlib
import logging
import math
import pickle
import re
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from open_clip.model import convert_to_custom_text_state_dict
from safetensors.torch import load_file as load_safetensors

from ..written_files import whole_file
from .config import CONFIG_RECORD_KEY, read_config_record

_WRAPPER_PREFIX = re.compile(r'^(module\.|_orig_mod\.)+')
# The authors' names of the parts Llip adds, and ours.
_AUTHORS_NAMES = {
    'k_proj': 'visual.k_proj',
    'v_proj': 'visual.v_proj',
    'K_norm.weight': 'visual.k_norm.weight',
    'K_norm.bias': 'visual.k_norm.bias',
    'V_norm.weight': 'visual.v_norm.weight',
    'V_norm.bias': 'visual.v_norm.bias',
    'q_proj': 'query_head.q_proj',
    'Q_norm.weight': 'query_head.q_norm.weight',
    'Q_norm.bias': 'query_head.q_norm.bias',
    'pred.out_proj': 'mixer.out_proj',
    'out_proj': 'mixer.out_proj',
}

StateDict = Dict[str, torch.Tensor]


def strip_wrapper_prefixes(state_dict: StateDict) -> StateDict:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order."""
    return {_WRAPPER_PREFIX.sub('', key): value for key, value in state_dict.items()}


def checkpoint_layout(state_dict: StateDict) -> str:
    """'llip' (ours), 'authors' or 'clip'; ValueError for anything else."""
    if 'mixer.out_proj' in state_dict:
        return 'llip'
    if 'k_proj' in state_dict:
        return 'authors'
    class_embedding = state_dict.get('visual.class_embedding')
    if 'visual.proj' in state_dict and class_embedding is not None and class_embedding.ndim == 1:
        return 'clip'
    sample = sorted(state_dict)[:8]
    raise ValueError(
        'This is neither a Llip checkpoint (ours or the authors\') nor an OpenCLIP CLIP checkpoint with a ViT '
        f'image tower; its first keys are {sample}.')


def describe_architecture(state_dict: StateDict) -> str:
    """A one-line summary of the Llip or CLIP architecture that a state dict (our key names) implies."""
    def count(prefix):
        return len({k[len(prefix):].split('.')[0] for k in state_dict if k.startswith(prefix)})

    parts = []
    tokens = state_dict.get('visual.class_embedding')
    if tokens is not None:
        parts.append(f'K = {tokens.shape[0]} mixture tokens' if tokens.ndim == 2 else 'a CLIP class token')
        parts.append(f'vision width {tokens.shape[-1]}')
    conv = state_dict.get('visual.conv1.weight')
    if conv is not None:
        parts.append(f'patch {conv.shape[-1]}')
    parts.append(f'{count("visual.transformer.resblocks.")} vision layers')
    projection = state_dict.get('visual.k_proj', state_dict.get('visual.proj'))
    if projection is not None:
        parts.append(f'D = {projection.shape[-1]}')
    if 'text.text_projection' in state_dict:
        parts.append(f'text width {state_dict["text.text_projection"].shape[0]}')
    parts.append(f'{count("text.transformer.resblocks.")} text layers')
    if CONFIG_RECORD_KEY in state_dict:
        cfg = read_config_record(state_dict[CONFIG_RECORD_KEY])
        parts.append(f"H = {cfg.get('heads')}, τ = {cfg.get('temperature')}, norm = {cfg.get('norm')}"
                     + ('' if cfg.get('contextual', True) else ', non-contextual'))
    return ', '.join(parts)


def _from_authors(state_dict: StateDict) -> StateDict:
    renamed = {_AUTHORS_NAMES.get(key, key): value for key, value in state_dict.items()}
    return convert_to_custom_text_state_dict(renamed)


# Shapes that loading adapts rather than requires: position rows (image and context size) and, from a
# CLIP, the class token (copied to the K mixture tokens) and visual.proj (dropped).
_ADAPTED = {'visual.positional_embedding', 'text.positional_embedding'}
_ADAPTED_FROM_CLIP = _ADAPTED | {'visual.class_embedding', 'visual.proj'}


def _check_architecture(state_dict: StateDict, expected: StateDict, layout: str):
    """ValueError naming both architectures when a tensor's shape differs beyond what loading adapts."""
    adapted = _ADAPTED_FROM_CLIP if layout == 'clip' else _ADAPTED
    mismatched = [
        f'{key}: {list(value.shape)} in the checkpoint, {list(expected[key].shape)} in the model'
        for key, value in state_dict.items()
        if key in expected and key not in adapted and value.shape != expected[key].shape]
    for key in sorted(_ADAPTED):  # positions must at least have the model's width
        if key in state_dict and key in expected and state_dict[key].shape[-1] != expected[key].shape[-1]:
            mismatched.append(f'{key}: width {state_dict[key].shape[-1]} in the checkpoint, '
                              f'{expected[key].shape[-1]} in the model')
    tokens = state_dict.get('visual.class_embedding')
    if layout == 'clip' and tokens is not None and tokens.shape[-1] != expected['visual.class_embedding'].shape[-1]:
        mismatched.append(f'visual.class_embedding: width {tokens.shape[-1]} in the checkpoint, '
                          f'{expected["visual.class_embedding"].shape[-1]} in the model')
    if mismatched:
        raise ValueError(
            f'The checkpoint was made for another architecture ({describe_architecture(state_dict)}) than this '
            f'model ({describe_architecture(expected)}): ' + '; '.join(mismatched[:5])
            + ('; …' if len(mismatched) > 5 else '') + '. Create the model from the config that matches it.')


def _from_clip(state_dict: StateDict, model) -> StateDict:
    """A CLIP state dict (our key names) -> the model's: mixture tokens from the class token, fresh new parts."""
    num_tokens = model.visual.num_prefix_tokens
    class_token = state_dict.pop('visual.class_embedding')
    positions = state_dict['visual.positional_embedding']
    state_dict.pop('visual.proj')
    state_dict['visual.class_embedding'] = class_token.expand(num_tokens, -1).clone()
    state_dict['visual.positional_embedding'] = torch.cat([positions[:1].expand(num_tokens, -1), positions[1:]])
    initial = model.state_dict()
    fresh = [key for key in initial if key not in state_dict and key != CONFIG_RECORD_KEY]
    state_dict.update({key: initial[key] for key in fresh})
    logging.info(
        f'Llip from a CLIP checkpoint: towers copied; {num_tokens} mixture tokens and their positions copied from '
        f'the class token; visual.proj dropped; initialised fresh: {", ".join(fresh)}.')
    return state_dict


def _interpolate(rows: torch.Tensor, size, mode: str) -> torch.Tensor:
    """Rows [n, width] laid out as ``rows.shape[0]`` (1-D) or a square grid (2-D), resampled to ``size``, in fp32."""
    dtype, width = rows.dtype, rows.shape[-1]
    if mode == 'linear':
        grid = rows.float().T[None]  # [1, width, n]
    else:
        side = math.isqrt(rows.shape[0])
        if side * side != rows.shape[0]:
            raise ValueError(f'{rows.shape[0]} patch positions do not form a square grid; cannot resize them.')
        grid = rows.float().reshape(1, side, side, width).permute(0, 3, 1, 2)
    # fp32 whatever the checkpoint's dtype: CPU interpolation has no fp16 kernels, and it is more exact.
    resized = F.interpolate(grid, size=size, mode=mode, antialias=mode != 'linear', align_corners=False)
    return resized.flatten(2)[0].T.to(dtype)


def _resize_positions(state_dict: StateDict, model):
    """Resize patch positions to the model's grid (keeping the K mixture-token rows) and text positions to its
    context length (``force_image_size``, ``force_context_length``)."""
    positions = state_dict.get('visual.positional_embedding')
    num_tokens = model.visual.num_prefix_tokens
    grid = tuple(model.visual.grid_size)
    if positions is not None and positions.shape[0] != num_tokens + grid[0] * grid[1]:
        logging.info(f'Resizing the patch positions to a {grid[0]}×{grid[1]} grid.')
        patches = _interpolate(positions[num_tokens:], grid, 'bicubic')
        state_dict['visual.positional_embedding'] = torch.cat([positions[:num_tokens], patches])
    text_positions = state_dict.get('text.positional_embedding')
    context_length = model.text.positional_embedding.shape[0]
    if text_positions is not None and text_positions.shape[0] != context_length:
        logging.info(f'Resizing the text positions from {text_positions.shape[0]} to {context_length} tokens.')
        state_dict['text.positional_embedding'] = _interpolate(text_positions, context_length, 'linear')


def convert_state_dict(state_dict: StateDict, model) -> StateDict:
    """Any recognised layout -> ``model``'s keys and shapes; ValueError for another architecture."""
    state_dict = strip_wrapper_prefixes(state_dict)
    layout = checkpoint_layout(state_dict)
    if layout == 'authors':
        state_dict = _from_authors(state_dict)
    elif layout == 'clip':
        state_dict = convert_to_custom_text_state_dict(dict(state_dict))
    expected = model.state_dict()
    _check_architecture(state_dict, expected, layout)  # before anything is resized or copied
    if layout == 'clip':
        state_dict = _from_clip(state_dict, model)
    _resize_positions(state_dict, model)
    for name in ('logit_scale', 'logit_bias'):  # scalar vs [1], as OpenCLIP's loader allows
        if name in state_dict and name in expected and state_dict[name].numel() == 1:
            state_dict[name] = state_dict[name].reshape(expected[name].shape)
    return state_dict


# Top-level key of a checkpoint dict ({'epoch', 'name', 'state_dict', 'optimizer', ...}): a digest cannot be a
# buffer of the state dict it hashes.
DIGEST_KEY = 'state_dict_sha256'


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is cut short, unreadable, or whose tensors do not match their recorded digest."""


def state_dict_digest(state_dict: StateDict) -> str:
    """SHA-256 (hex) over each tensor's key, dtype, shape and bytes, in sorted key order.

    Sorted, so that the order a state dict was built in does not matter; dtype and shape, so that the same
    bytes read as another tensor do not match. Tensors are hashed from CPU copies, one at a time.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f'{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_digest(checkpoint, path) -> None:
    """DamagedCheckpoint naming ``path`` where a checkpoint dict's state dict does not match its digest.

    Checkpoints without a digest (released ones, bare state dicts) pass: there is nothing to check.
    """
    if not isinstance(checkpoint, dict) or DIGEST_KEY not in checkpoint:
        return
    if state_dict_digest(checkpoint['state_dict']) != checkpoint[DIGEST_KEY]:
        raise DamagedCheckpoint(
            f'{path} is damaged: its tensors do not match the SHA-256 digest recorded when it was saved '
            '(the file changed on disk after saving). Use an earlier checkpoint.')


def save_checkpoint(checkpoint, path) -> None:
    """``torch.save`` whole or not at all (``written_files.whole_file``), with a digest when ``checkpoint`` is a dict
    holding a ``state_dict``. The temporary file's name does not end in ``.pt``: no ``--resume latest`` finds it."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('state_dict'), dict):
        checkpoint = {**checkpoint, DIGEST_KEY: state_dict_digest(checkpoint['state_dict'])}
    with whole_file(path) as file:
        torch.save(checkpoint, file)


def checkpoint_problem(path) -> Optional[str]:
    """Why the checkpoint file ``path`` cannot be resumed from (cut short, unreadable, digest mismatch), or None.

    Reads the whole file (``weights_only=True``) as resuming would.
    """
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        check_digest(checkpoint, path)
    except DamagedCheckpoint as error:
        return str(error)
    except Exception as error:
        return f'{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}); ' \
               'it was probably cut short while being saved'
    return None


def read_state_dict(checkpoint_path: str, weights_only: bool = True, device='cpu') -> StateDict:
    """A checkpoint file's state dict (.safetensors, or torch.save of a state dict or of {'state_dict': ...}).

    Errors say what is wrong with the file: missing, unreadable, refused by ``weights_only``
    (naming the Python object it would have to rebuild), or not holding tensors.
    """
    path = str(checkpoint_path)
    try:
        if path.endswith('.safetensors'):
            checkpoint = load_safetensors(path, device=str(device))
        else:
            checkpoint = torch.load(path, map_location=device, weights_only=weights_only)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except pickle.UnpicklingError as error:
        needs = re.search(r'GLOBAL (\S+)', str(error))
        if needs is None:
            raise DamagedCheckpoint(f'Could not read {path} as a checkpoint: it is corrupt or not a PyTorch file.') from None
        raise ValueError(
            f'{path} holds a Python object ({needs.group(1)}) that only running code could rebuild, so '
            'weights_only=True refuses it. If you trust the file, load it yourself with '
            'torch.load(path, weights_only=False) and torch.save its state_dict alone.') from None
    except Exception as error:
        raise DamagedCheckpoint(
            f'Could not read {path} as a checkpoint ({type(error).__name__}: {error}): it is cut short or '
            'damaged, or not a PyTorch file.') from None
    if isinstance(checkpoint, dict) and 'state_dict' in checkpoint:
        check_digest(checkpoint, path)
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, dict) or not checkpoint \
            or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise ValueError(f'{path} does not hold a state dict (a non-empty dict of tensors).')
    return checkpoint


def load_checkpoint(model, checkpoint_path: str, strict: bool = True, weights_only: bool = True, device='cpu'):
    """Load a checkpoint of any recognised layout into ``model``; returns ``load_state_dict``'s result."""
    state_dict = read_state_dict(checkpoint_path, weights_only=weights_only, device=device)
    try:
        state_dict = convert_state_dict(state_dict, model)
    except ValueError as error:
        raise ValueError(f'{checkpoint_path}: {error}') from None
    if strict:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict) - {CONFIG_RECORD_KEY})  # no record: the model's
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f'{checkpoint_path} does not fit this model ({describe_architecture(expected)}): '
                f'missing {missing[:5]}{" …" if len(missing) > 5 else ""}, '
                f'unexpected {unexpected[:5]}{" …" if len(unexpected) > 5 else ""}.')
    return model.load_state_dict(state_dict, strict=strict)


def convert_authors_config(model_cfg: dict, weight_scale: float) -> dict:
    """The authors' model config (``num_heads``, ``vision_cfg.ncls``, ``use_norm``) and τ -> ours."""
    cfg = {key: value for key, value in model_cfg.items() if key not in ('num_heads', 'use_norm')}
    vision_cfg = dict(cfg['vision_cfg'])
    cfg.update(
        model_class='LlipModel',
        vision_cfg=vision_cfg,
        llip_cfg=dict(
            mixture_tokens=vision_cfg.pop('ncls'),
            heads=model_cfg['num_heads'],
            temperature=float(weight_scale),
            norm=bool(model_cfg.get('use_norm', False)),
        ),
    )
    return cfg

"""Llip's features, defined once: what ``LlipModel`` encodes, returns from ``forward`` and scores.

Notation: N images, M texts, K mixture tokens, H mixer heads, D = ``embed_dim``, d = D / H.

    image features  [N, 2, H, K, d]   index 0: the keys, 1: the values of each image's K mixture
                                       tokens, split into heads (``LlipModel.encode_image``)
    text features   [M, 2, H, d]      index 0: each text's raw mixer query q, 1: its target
                                       p = W_O t̂ (t̂ = t / |t|), split into heads (``LlipModel.encode_text``)

An image's Gram matrix G = Ṽ Ṽᵀ (``[N, H·K, H·K]``, ``LlipMixer.image_gram``) is derived from its
values and the mixer's W_O, once per image wherever scores are computed. The mixer temperature τ is
not part of any feature: like ``logit_scale``, it is applied when scoring, so that one set of
features is scored at any τ.

Both formats are batch-first, as OpenCLIP's ``--accum-freq`` needs, and both travel whole: across
ranks in the loss, to the CPU in OpenCLIP's evaluation, into a zero-shot classifier.
"""
from typing import Tuple

import torch

KEYS, VALUES = 0, 1
QUERIES, TARGETS = 0, 1


def pack_image(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Keys, values [N, H, K, d] -> image features [N, 2, H, K, d]."""
    return torch.stack([keys, values], dim=1)


def unpack_image(image_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image features [N, 2, H, K, d] -> keys, values [N, H, K, d] (views)."""
    return image_features[:, KEYS], image_features[:, VALUES]


def pack_text(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raw queries, targets [M, H, d] -> text features [M, 2, H, d]."""
    return torch.stack([queries, targets], dim=1)


def unpack_text(text_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text features [M, 2, H, d] -> raw queries, targets [M, H, d] (views)."""
    return text_features[:, QUERIES], text_features[:, TARGETS]


def check_features(image_features: torch.Tensor, text_features: torch.Tensor):
    """ValueError unless these are image and text features of one model (same H and d)."""
    if image_features.ndim != 5 or image_features.shape[1] != 2 or text_features.ndim != 4 \
            or text_features.shape[1] != 2 or image_features.shape[2] != text_features.shape[2] \
            or image_features.shape[4] != text_features.shape[3]:
        raise ValueError(
            f'Llip scores image features [N, 2, H, K, d] against text features [M, 2, H, d] (LlipModel.encode_image '
            f'and encode_text); got {list(image_features.shape)} and {list(text_features.shape)}.')

"""Image-text retrieval with Llip's conditioned scores (docs/method.md, zero-shot).

Every (image, text) pair gets its own mixture, so both directions rank ``cos(z[i|j], t[j])``.
Images and texts are each encoded once (``open_clip_llip.modeling.features``); ``LlipModel.similarity``
then computes the [N, M] scores in blocks of images and texts, so memory holds the scores and one
block's ``[n, m, H, K]`` intermediates, never N·M·D numbers.

Notation: N images, M texts (captions), K mixture tokens, H mixer heads, D embedding width,
d = D / H. A text's image is ``image_index[j]``; an image may have several captions. The
functions take an unwrapped ``LlipModel``, a ``device`` and an ``autocast`` context factory
such as ``open_clip_train.precision.get_autocast(precision)``.
"""
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..modeling.classifier import model_device
from ..modeling.scoring import Temperature

RECALL_AT = (1, 5, 10)
# Scores ranked at once by ``retrieval_metrics`` (16 MiB in fp32): its [n, M] temporaries stay this size whatever N·M.
_RANK_BLOCK_ELEMENTS = 1 << 22


def _expected_rows(batches) -> Optional[int]:
    """How many rows ``batches`` will give, where it says before it is read (a DataLoader's dataset, a sequence of
    tensors): a first guess at the size of ``_encode_all``'s buffer, which grows if it was wrong."""
    dataset = getattr(batches, 'dataset', None)
    if hasattr(dataset, '__len__'):
        return len(dataset)
    if isinstance(batches, Sequence):
        return sum(len(batch) for batch in batches)
    return None


def _encode_all(encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], what: str,
                use_tqdm: bool) -> torch.Tensor:
    """``encode(batch)`` of every batch, concatenated along dim 0.

    Each batch's features go straight into one buffer, allocated once (grown by doubling where the count was
    not known). Kept as one small tensor per batch until a final ``torch.cat``, they would sit between each
    batch's large temporaries and pin the allocator's heap, which then grows with the gallery to many times
    the features' size.
    """
    features, rows = None, 0
    with torch.inference_mode():
        for batch in tqdm(batches, desc=what.capitalize(), unit='batch', disable=not use_tqdm):
            encoded = encode(batch)
            if features is None or rows + len(encoded) > len(features):
                capacity = (_expected_rows(batches) or 0) if features is None else 2 * len(features)
                grown = encoded.new_empty((max(capacity, rows + len(encoded)), *encoded.shape[1:]))
                if features is not None:
                    grown[:rows] = features[:rows]
                features = grown
            features[rows:rows + len(encoded)] = encoded
            rows += len(encoded)
    if features is None:
        raise ValueError(f'No {what} to encode.')
    return features if rows == len(features) else features[:rows].clone()


def encode_images(
        model,
        batches: Iterable[torch.Tensor],
        device: Union[str, torch.device, None] = None,
        autocast: Callable = nullcontext,
        input_dtype: Optional[torch.dtype] = None,
        use_tqdm: bool = False,
) -> torch.Tensor:
    """Batches of images [n, 3, h, w] -> image features [N, 2, H, K, d], on ``device`` (default: the model's)."""
    device = model_device(model) if device is None else device

    def encode(images):
        with autocast():
            return model.encode_image(images.to(device=device, dtype=input_dtype))
    return _encode_all(encode, batches, 'images', use_tqdm)


def encode_texts(
        model,
        batches: Iterable[torch.Tensor],
        device: Union[str, torch.device, None] = None,
        autocast: Callable = nullcontext,
        use_tqdm: bool = False,
) -> torch.Tensor:
    """Batches of token ids [m, L] -> text features [M, 2, H, d], on ``device`` (default: the model's)."""
    device = model_device(model) if device is None else device

    def encode(texts):
        with autocast():
            return model.encode_text(texts.to(device))
    return _encode_all(encode, batches, 'texts', use_tqdm)


def _rank_metrics(name: str, ahead: torch.Tensor) -> Dict[str, float]:
    """OpenCLIP's ``get_clip_metrics`` names from the number of wrong items ranked ahead of the right one."""
    ahead = ahead.double().cpu()
    ordered = ahead.sort().values
    middle = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    metrics = {f'{name}_mean_rank': ahead.mean().item() + 1, f'{name}_median_rank': middle.floor().item() + 1}
    metrics.update({f'{name}_R@{k}': (ahead < k).double().mean().item() for k in RECALL_AT})
    return metrics


def retrieval_metrics(scores: torch.Tensor, image_index: torch.Tensor) -> Dict[str, float]:
    """Recall@{1,5,10} and mean/median rank, image→text and text→image, with OpenCLIP's names.

    Args:
        scores: [N, M], higher is better
        image_index: [M], the image each text describes; every image needs at least one text

    Image→text: an image's rank is that of its best-scoring caption among the other images'
    captions. Text→image: a text's rank is that of its image among all images. Ties count
    against: a wrong item scoring as high as the right one ranks ahead of it (so does a NaN).

    Memory: the items ranked ahead are counted as M or N minus those ranked below, one block of
    ``_RANK_BLOCK_ELEMENTS`` scores at a time, into one boolean buffer allocated once: nothing
    [N, M] and nothing allocated per block but [n] counts, so the working set does not grow with
    N·M (docs/benchmarks.md, evaluation memory).
    """
    num_images, num_texts = scores.shape
    image_index = image_index.to(scores.device)
    if image_index.shape != (num_texts,):
        raise ValueError(f'image_index must give one image per text: shape [{num_texts}], got {list(image_index.shape)}.')
    if num_texts and not (0 <= image_index.min() and image_index.max() < num_images):
        raise ValueError(f'image_index must hold image numbers in [0, {num_images}).')
    captions_per_image = torch.bincount(image_index, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = (captions_per_image == 0).nonzero()[:5, 0].tolist()
        raise ValueError(f'Every image needs at least one text; images {missing} have none.')
    with torch.inference_mode():  # counting needs no autograd records
        true_score = scores[image_index, torch.arange(num_texts, device=scores.device)].float()  # [M]
        best_caption = torch.full((num_images,), float('-inf'), device=scores.device)
        best_caption.scatter_reduce_(0, image_index, true_score, 'amax')  # [N]
        best_caption[torch.bincount(image_index[true_score.isnan()], minlength=num_images) > 0] = float('nan')
        # an image's own captions ranked level with its best one: 1, or more where they tie (all, with a NaN)
        own_level = torch.bincount(image_index, weights=(~(true_score < best_caption[image_index])).double(),
                                   minlength=num_images).long()
        image_below = torch.empty(num_images, dtype=torch.long, device=scores.device)
        text_below = torch.zeros(num_texts, dtype=torch.long, device=scores.device)
        rows = max(1, _RANK_BLOCK_ELEMENTS // max(1, num_texts))
        below = torch.empty(min(rows, num_images), num_texts, dtype=torch.bool, device=scores.device)
        below_per_text = torch.empty(num_texts, dtype=torch.long, device=scores.device)
        for start in range(0, num_images, rows):
            block = scores[start:start + rows]  # [n, M]; compared in float32, as the promotion to it is exact
            n = len(block)
            torch.lt(block, best_caption[start:start + n, None], out=below[:n])
            torch.sum(below[:n], dim=1, out=image_below[start:start + n])
            torch.lt(block, true_score[None, :], out=below[:n])
            text_below += torch.sum(below[:n], dim=0, out=below_per_text)
        image_ahead = num_texts - image_below - own_level
        text_ahead = num_images - 1 - text_below  # a text's own image is never below itself
    return {**_rank_metrics('image_to_text', image_ahead), **_rank_metrics('text_to_image', text_ahead)}


def evaluate_retrieval(
        model,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        image_index: Optional[torch.Tensor] = None,
        temperatures: Temperature = None,
        autocast: Callable = nullcontext,
) -> Dict[float, Dict[str, float]]:
    """``retrieval_metrics`` of the conditioned scores for each τ -> ``{τ: metrics}``.

    Image features [N, 2, H, K, d] and text features [M, 2, H, d] (``encode_images``,
    ``encode_texts``); ``image_index`` [M] defaults to text j describing image j (OpenCLIP's
    ``--val-data`` pairs); ``temperatures`` to the model's τ. All τ are scored in one pass.
    """
    if image_index is None:
        image_index = torch.arange(text_features.shape[0])
    temperatures = model.temperatures(temperatures)
    with torch.inference_mode(), autocast():
        scores = model.similarity(image_features, text_features, temperatures)
    return {tau: retrieval_metrics(tau_scores, image_index) for tau, tau_scores in zip(temperatures, scores)}

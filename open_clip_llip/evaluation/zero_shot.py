"""Zero-shot classification with Llip's conditioned scores (docs/method.md, zero-shot).

A class is described like a text, by text features (``open_clip_llip.modeling.features``): its mixer
query is the mean of its raw template queries, and its target comes from the normalised mean of
its normalised template embeddings. Each image is encoded once and mixed once per class (and
per τ); the class with the highest ``cos(z[i|c], t[c])`` wins.

Notation: N images, C classes, T temperatures, K mixture tokens, H mixer heads, D embedding
width, d = D / H. The functions take an unwrapped ``LlipModel`` (as OpenCLIP's evaluation
unwraps DDP before evaluating), a ``device`` and an ``autocast`` context factory such as
``open_clip_train.precision.get_autocast(precision)``.
"""
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from ..modeling.classifier import model_device
from ..modeling.scoring import Temperature


def zero_shot_cosine(
        model,
        classifier: torch.Tensor,
        images: torch.Tensor,
        temperatures: Temperature = None,
) -> torch.Tensor:
    """Images [N, 3, h, w] -> conditioned cosines ``cos(z[i|c], t[c])``: [T, N, C], one slice per τ.

    The images are encoded once and their Gram matrices computed once; τ changes only the
    attention. ``temperatures`` defaults to the model's τ (then T = 1).
    """
    return model.similarity(model.encode_image(images), classifier, model.temperatures(temperatures))


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Scores [N, C], true classes [N] -> how many of the N are among their top k, for each k: [len(topk)].

    Ties count against: an image is correct at k when fewer than k other classes score at
    least as high as its true class (a NaN score counts as higher).
    """
    true_scores = scores.gather(1, targets.view(-1, 1))
    ahead = (~(scores < true_scores)).sum(dim=1) - 1  # other classes scoring >= the true class
    return torch.stack([(ahead < k).sum() for k in topk])


def run_zero_shot(
        model,
        classifier: torch.Tensor,
        dataloader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        temperatures: Temperature = None,
        device: Union[str, torch.device, None] = None,
        autocast: Callable = nullcontext,
        input_dtype: Optional[torch.dtype] = None,
        use_tqdm: bool = False,
) -> Dict[float, Dict[str, float]]:
    """Top-1 and top-5 accuracy of ``classifier`` over batches of (images, targets), for each τ.

    One pass over the images for all ``temperatures`` (default: the model's τ). Returns
    ``{τ: {'top1': fraction, 'top5': fraction}}``, OpenCLIP's metric names.
    """
    temperatures = model.temperatures(temperatures)
    device = model_device(model) if device is None else torch.device(device)
    correct = torch.zeros(len(temperatures), 2, dtype=torch.long, device=device)
    count = 0
    with torch.inference_mode():
        for images, targets in tqdm(dataloader, desc='Zero-shot', unit='batch', disable=not use_tqdm):
            images = images.to(device=device, dtype=input_dtype)
            targets = targets.to(device)
            with autocast():
                scores = zero_shot_cosine(model, classifier, images, temperatures)
            correct += torch.stack([topk_correct(s.float(), targets, (1, 5)) for s in scores])
            count += images.shape[0]
    if count == 0:
        raise ValueError('The zero-shot dataloader yielded no images.')
    accuracy = (correct.double() / count).tolist()
    return {tau: {'top1': top1, 'top5': top5} for tau, (top1, top5) in zip(temperatures, accuracy)}

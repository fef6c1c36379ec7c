"""Zero-shot class features: a class described like a text, from its name in every template (docs/method.md, zero-shot).

Its mixer query is the mean of its raw template queries; its embedding is the normalised mean of its
normalised template embeddings, from which the target p = W_O t̂ is made as for any text.
"""
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import batched
from tqdm import tqdm


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def build_zero_shot_classifier(
        model,
        tokenizer,
        classnames: Sequence[str],
        templates: Sequence[Union[Callable[[str], str], str]],
        num_classes_per_batch: Optional[int] = 10,
        device: Union[str, torch.device, None] = None,
        use_tqdm: bool = False,
) -> torch.Tensor:
    """Encode every class name in every template -> class text features [C, 2, H, d].

    Arguments as for ``open_clip.build_zero_shot_classifier``: templates are ``str.format``
    strings with one ``{}`` or callables; ``num_classes_per_batch`` classes (all templates) are
    encoded per forward, all at once if None. ``device`` defaults to the model's.
    """
    if not classnames or not templates:
        raise ValueError(f'A zero-shot classifier needs class names and templates; got {len(classnames)} class '
                         f'name(s) and {len(templates)} template(s).')
    device = model_device(model) if device is None else device
    batches = list(batched(classnames, num_classes_per_batch or len(classnames)))
    classes = []
    with torch.inference_mode():
        for names in tqdm(batches, desc='Classifier', unit='batch', disable=not use_tqdm):
            texts = [template.format(name) if isinstance(template, str) else template(name)
                     for name in names for template in templates]
            embeddings, queries = model.embed_text(tokenizer(texts).to(device))
            per_class = (len(names), len(templates))
            embeddings = F.normalize(F.normalize(embeddings, dim=-1).unflatten(0, per_class).mean(1), dim=-1)
            classes.append(model.text_features(embeddings, queries.unflatten(0, per_class).mean(1)))
    return torch.cat(classes)

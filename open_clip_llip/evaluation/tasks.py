"""Evaluation as a library call: typed tasks in, OpenCLIP-named metrics out.

``open_clip_llip eval``, the main job (``scripts/demo.py``) and Python users describe what to
evaluate with ``ZeroShotTask`` and ``RetrievalTask``, load a model with ``load_model`` (exactly
the weights asked for, never random ones) and call ``evaluate``. A Llip model is scored with
conditioned cosines, every τ of ``temperatures`` in one pass over the images (each image encoded,
and its Gram matrix computed, once); any other OpenCLIP model (a baseline) by dot products of its
unit embeddings. Results are records (dicts) with OpenCLIP's metric names (``top1``, ``top5``,
``image_to_text_R@1``, …, ``text_to_image_mean_rank``) as fractions; ties count against the model.

Data formats: see ``open_clip_llip.evaluation.readers``.
"""
import copy
import functools
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import open_clip
import torch
from open_clip_train.precision import get_autocast
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..modeling.classifier import build_zero_shot_classifier
from ..modeling.llip_model import LlipModel, llip_model_names
from ..modeling.scoring import Temperature
from .readers import RetrievalImages, read_classnames, read_retrieval_set, read_templates, zero_shot_dataset
from .retrieval import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics
from .zero_shot import run_zero_shot, topk_correct

ZERO_SHOT, RETRIEVAL = 'zeroshot_classification', 'retrieval'


@dataclass(frozen=True)
class ZeroShotTask:
    """Zero-shot classification of an ImageFolder: ``classnames[i]`` names the i-th class folder in sorted order;
    each template has one ``{}`` for the class name."""
    images: Path
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]
    name: str = field(default='', compare=False)  # in the results; default: the folder
    skip_bad_samples: bool = False  # leave out (and count) the images that do not decode

    @classmethod
    def from_files(cls, images: Union[str, Path], classnames: Union[str, Path], templates: Union[str, Path],
                   name: str = '', skip_bad_samples: bool = False) -> 'ZeroShotTask':
        """Class names and templates read from text files (one a line); every file checked now."""
        task = cls(Path(images), tuple(read_classnames(classnames)), tuple(read_templates(templates)), name,
                   skip_bad_samples)
        task.dataset()
        return task

    @functools.cached_property
    def _dataset(self):
        """The ImageFolder, read (and with ``skip_bad_samples`` every image decoded) once."""
        return zero_shot_dataset(self.images, list(self.classnames), skip_bad_samples=self.skip_bad_samples)

    def dataset(self, transform=None):
        dataset = copy.copy(self._dataset)
        dataset.transform = transform
        return dataset

    @property
    def skipped(self) -> int:
        """Images left out by ``skip_bad_samples``."""
        return self._dataset.skipped

    @property
    def label(self) -> str:
        return self.name or str(self.images)


@dataclass(frozen=True)
class RetrievalTask:
    """Image-text retrieval over a tab-separated CSV (``filepath``, ``title``) or webdataset shards (``.tar``)."""
    path: str
    name: str = field(default='', compare=False)
    skip_bad_samples: bool = False  # leave out (and count) the samples at fault

    @functools.cached_property
    def retrieval_set(self):
        """The images and captions, read (and checked) once."""
        return read_retrieval_set(self.path, self.skip_bad_samples)

    @property
    def skipped(self) -> int:
        """Samples left out by ``skip_bad_samples``."""
        return self.retrieval_set.skipped

    @property
    def label(self) -> str:
        return self.name or self.path


Task = Union[ZeroShotTask, RetrievalTask]


def _json_config_as_local_dir(path: Path, folder: Path) -> str:
    """A model config file (bare, or ``open_clip_config.json``'s ``{"model_cfg": …}``) as a ``local-dir:`` model."""
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f'--model {path}: not a readable JSON model config ({error}).') from None
    if not isinstance(config, dict):
        raise ValueError(f'--model {path}: a model config must be a JSON object.')
    if 'model_cfg' not in config:
        config = {'model_cfg': config}
    (folder / 'open_clip_config.json').write_text(json.dumps(config), encoding='utf-8')
    return f'local-dir:{folder}'


def load_model(model: str, pretrained: Optional[str] = None, precision: str = 'fp32', device='cpu'):
    """(model in eval mode, evaluation transform, tokenizer), with exactly the weights asked for.

    ``model`` takes what ``open_clip_train --model`` takes: a config name (weights from ``pretrained``,
    a file or a pretrained tag), ``local-dir:DIR`` or ``hf-hub:REPO`` (their own weights, or the
    ``pretrained`` file instead), or a JSON config file (weights from ``pretrained``). Anything
    that would leave random weights is refused (ValueError, FileNotFoundError).
    """
    schema = next((s for s in ('local-dir:', 'hf-hub:') if model.startswith(s)), None)
    is_file = schema is None and model.endswith('.json')
    if schema is None and not is_file:
        try:
            config = open_clip.get_model_config(model)
        except RuntimeError as error:  # with Llip registered, a Llip-like unknown name says which configs exist
            raise ValueError(str(error)) from None
        if config is None:
            raise ValueError(f"Unknown model '{model}'. Llip configs: {', '.join(llip_model_names())}.")
        if pretrained is not None and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(model, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise FileNotFoundError(f'Checkpoint {pretrained} not found, and it is not a pretrained tag of {model} '
                                    f'(its tags: {", ".join(tags) or "none"}).')
    if is_file and not os.path.isfile(model):
        raise FileNotFoundError(f'Model config file {model} not found.')
    if pretrained is None and schema is None:
        raise ValueError(f'--model {model} has no weights of its own: give --pretrained (a checkpoint file or a '
                         'pretrained tag). Evaluating randomly initialised weights would report meaningless numbers.')
    with tempfile.TemporaryDirectory() as folder:
        model_name = _json_config_as_local_dir(Path(model), Path(folder)) if is_file else model
        # OpenCLIP ignores `pretrained` for local-dir:/hf-hub: models: such a file is loaded here instead.
        own_file = pretrained is not None and model_name.startswith(('local-dir:', 'hf-hub:'))
        if own_file and not os.path.isfile(pretrained):
            raise FileNotFoundError(f'Checkpoint {pretrained} not found.')
        try:
            built, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=None if own_file else pretrained, load_weights=not own_file,
                require_pretrained=not own_file, precision=precision, device=device)
        except RuntimeError as error:  # OpenCLIP's "could not be loaded" / "not a known tag or valid file path"
            raise ValueError(f'--model {model} --pretrained {pretrained}: {error}') from None
        if own_file:
            open_clip.load_checkpoint(built, pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
    return built.eval(), transform, tokenizer


def _dot_product_zero_shot(model, classifier, dataloader, device, autocast, input_dtype) -> Dict[str, float]:
    """Top-1/top-5 of an OpenCLIP model: unit image embeddings against OpenCLIP's ``[D, C]`` classifier."""
    correct, count = torch.zeros(2, dtype=torch.long, device=device), 0
    with torch.inference_mode():
        for images, targets in tqdm(dataloader, desc='Zero-shot', unit='batch'):
            with autocast():
                scores = model.encode_image(images.to(device=device, dtype=input_dtype), normalize=True) @ classifier
            correct += topk_correct(scores.float(), targets.to(device), (1, 5))
            count += len(images)
    top1, top5 = (correct.double() / count).tolist()
    return {'top1': top1, 'top5': top5}


def _dot_product_retrieval(model, images, texts, image_index, device, autocast, input_dtype) -> Dict[str, float]:
    """Retrieval metrics of an OpenCLIP model: dot products of unit image and text embeddings."""
    with torch.inference_mode(), autocast():
        image_features = torch.cat([model.encode_image(x.to(device=device, dtype=input_dtype), normalize=True)
                                    for x in tqdm(images, desc='Images', unit='batch')])
        text_features = torch.cat([model.encode_text(t.to(device), normalize=True) for t in texts])
    return retrieval_metrics((image_features @ text_features.T).float(), image_index)


def evaluate(
        model,
        tasks: Sequence[Task],
        transform,
        tokenizer,
        temperatures: Temperature = None,
        precision: str = 'fp32',
        batch_size: int = 64,
        workers: int = 4,
) -> List[dict]:
    """Every task, for every τ of ``temperatures`` (Llip; default: the model's τ) -> one record per task and τ.

    A record: ``task`` (its label), ``type`` (``zeroshot_classification`` or ``retrieval``),
    ``temperature`` (None for a model scored by dot products), counts, and ``metrics``.
    The model, ``transform`` and ``tokenizer`` are ``load_model``'s; images go to the model's device.
    """
    is_llip = isinstance(model, LlipModel)
    if temperatures is not None and not is_llip:
        raise ValueError('Temperatures apply to Llip models only; this model is scored by dot products.')
    temperatures = model.temperatures(temperatures) if is_llip else (None,)
    device = next(model.parameters()).device
    autocast = get_autocast(precision, device_type=device.type)
    input_dtype = open_clip.get_input_dtype(precision)
    loader_options = dict(batch_size=batch_size, num_workers=workers, pin_memory=device.type == 'cuda')
    records = []
    for task in tasks:
        if isinstance(task, ZeroShotTask):
            dataset = task.dataset(transform)
            logging.info(f'Zero-shot {task.label}: {len(dataset)} images, {len(task.classnames)} classes, '
                         f'{len(task.templates)} templates.')
            build = build_zero_shot_classifier if is_llip else open_clip.build_zero_shot_classifier
            with autocast():
                classifier = build(model, tokenizer, list(task.classnames), list(task.templates), device=device,
                                   use_tqdm=True)
            loader = DataLoader(dataset, **loader_options)
            if is_llip:
                results = run_zero_shot(model, classifier, loader, temperatures, device=device, autocast=autocast,
                                        input_dtype=input_dtype, use_tqdm=True)
            else:
                results = {None: _dot_product_zero_shot(model, classifier, loader, device, autocast, input_dtype)}
            records += [dict(task=task.label, type=ZERO_SHOT, temperature=tau, num_images=len(dataset),
                             num_classes=len(task.classnames), metrics=metrics) for tau, metrics in results.items()]
        else:
            retrieval_set = task.retrieval_set
            logging.info(f'Retrieval {task.label}: {len(retrieval_set.images)} images, '
                         f'{len(retrieval_set.captions)} captions.')
            images = DataLoader(RetrievalImages(retrieval_set.images, transform), **loader_options)
            # tokenised batch by batch as they are encoded: no [M, L] tensor of every caption's tokens is held
            texts = DataLoader(retrieval_set.captions, batch_size=batch_size, collate_fn=tokenizer)
            if is_llip:
                image_features = encode_images(model, images, device, autocast, input_dtype, use_tqdm=True)
                text_features = encode_texts(model, texts, device, autocast, use_tqdm=True)
                results = evaluate_retrieval(model, image_features, text_features, retrieval_set.image_index,
                                             temperatures, autocast)
            else:
                results = {None: _dot_product_retrieval(model, images, texts, retrieval_set.image_index, device,
                                                        autocast, input_dtype)}
            records += [dict(task=task.label, type=RETRIEVAL, temperature=tau, num_images=len(retrieval_set.images),
                             num_texts=len(retrieval_set.captions), metrics=metrics) for tau, metrics in results.items()]
    return records

"""Stand-in for patches 0004 and main/0003: OpenCLIP's evaluation scores with a model's own ``similarity``.

OpenCLIP scores an image against a text by a dot product of two vectors. A model that defines
``similarity(image_features, text_features) -> [N, M]`` and ``build_zero_shot_classifier(…)``
(Llip: conditioned cosines, class text features) is evaluated with them instead; every other
model exactly as before. Replaced names:

- ``open_clip.build_zero_shot_classifier`` (and in ``open_clip.zero_shot_classifier`` and
  ``open_clip_train.zero_shot``): delegates to the model's;
- ``open_clip_train.zero_shot.run`` (OpenCLIP 3) / ``run_zero_shot_classifier`` (OpenCLIP 4):
  sees the model through its similarity to the classes, with an identity classifier;
- ``open_clip_train.train.evaluate``: computes the validation pairs' metrics itself (the same
  names: ``clip_val_loss``, ``image_to_text_R@1``, …, with ``open_clip_llip.evaluation.retrieval``) and lets
  the stock ``evaluate`` report them with the zero-shot metrics (log, tensorboard, results.jsonl,
  wandb), through ``zero_shot_eval`` (OpenCLIP 3) or ``zero_shot_eval_all`` (OpenCLIP 4). The retrieval
  metrics are those of ``open_clip_llip eval``: rows of a CSV that name the same image file are
  captions of one image (OpenCLIP's ``get_clip_metrics`` takes row i's text to describe row i's image
  only, and the same image in other rows for other images; patch 0004 keeps that pairing).

The model is found behind DDP and, in OpenCLIP 4, behind its training task (its EMA weights when
the task keeps them, as the task's own evaluation does). ``open_clip_train`` modules are adapted
once they have loaded.
"""
import open_clip
import torch
import torch.nn.functional as F

from ...evaluation.readers import group_rows_by_image
from ...evaluation.retrieval import retrieval_metrics
from ..autoload import call_after_import
from . import Unexpected, expect_function, leave_alone

ADAPTER = 'similarity (patches/0004)'
CONSEQUENCE = "open_clip_train's {} cannot score Llip models (use open_clip_llip eval)"
_CLASSIFIER_PARAMETERS = ('model', 'tokenizer', 'classnames', 'templates', 'num_classes_per_batch', 'device', 'use_tqdm')


def scoring_model(model_or_task):
    """The model behind a DDP wrapper or an OpenCLIP 4 task (EMA weights if kept), if it defines ``similarity``."""
    if hasattr(model_or_task, 'get_trainable_module'):
        model = model_or_task.get_trainable_module(use_ema=True)
    else:
        model = getattr(model_or_task, 'module', model_or_task)
    return model if hasattr(model, 'similarity') else None


def install():
    """Adapt ``open_clip`` now and ``open_clip_train.zero_shot`` / ``.train`` once they load."""
    if hasattr(open_clip, 'pairwise_similarity'):
        return
    from open_clip import zero_shot_classifier
    try:
        stock_build = expect_function(zero_shot_classifier, 'build_zero_shot_classifier', _CLASSIFIER_PARAMETERS)
    except Unexpected as error:
        leave_alone(ADAPTER, error, CONSEQUENCE.format('zero-shot evaluation'))
        return

    def build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10, device='cpu',
                                   use_tqdm=False):
        scorer = scoring_model(model)
        if scorer is not None:
            return scorer.build_zero_shot_classifier(tokenizer, classnames, templates,
                                                     num_classes_per_batch=num_classes_per_batch, device=device,
                                                     use_tqdm=use_tqdm)
        return stock_build(model, tokenizer, classnames, templates, num_classes_per_batch, device, use_tqdm)

    zero_shot_classifier.build_zero_shot_classifier = open_clip.build_zero_shot_classifier = build_zero_shot_classifier
    call_after_import('open_clip_train.zero_shot', _adapt_zero_shot)
    call_after_import('open_clip_train.train', _adapt_evaluate)


class _ClassScores:
    """A model seen through its similarity to fixed class features: ``(image=x) -> {'image_features': [N, C]}``."""

    def __init__(self, model, class_features):
        self.model = model
        self.class_features = class_features

    def __call__(self, image):
        out = self.model(image=image)  # a dict, or CLIP's tuple (output_dict=False), as the stock loop takes either
        scores = self.model.similarity(out['image_features'] if isinstance(out, dict) else out[0], self.class_features)
        return {'image_features': scores.float()}  # against an fp32 identity "classifier", whatever the model's dtype


def _adapt_zero_shot(zero_shot):
    name = 'run_zero_shot_classifier' if hasattr(zero_shot, 'run_zero_shot_classifier') else 'run'  # OpenCLIP 4, 3
    try:
        stock_run = expect_function(zero_shot, name, ('model', 'classifier', 'dataloader', 'args'))
    except Unexpected as error:
        leave_alone(ADAPTER, error, CONSEQUENCE.format('zero-shot evaluation'))
        return

    def run(model, classifier, dataloader, args, *rest, **options):
        scorer = scoring_model(model)
        if scorer is not None:
            # The stock loop scores `model(image=x)['image_features'] @ classifier`: hand it the similarities to
            # the classes as image features, and an identity classifier.
            model, classifier = _ClassScores(scorer, classifier), torch.eye(len(classifier), device=args.device)
        return stock_run(model, classifier, dataloader, args, *rest, **options)

    zero_shot.build_zero_shot_classifier = open_clip.build_zero_shot_classifier
    setattr(zero_shot, name, run)


def _adapt_evaluate(train):
    """``evaluate``: a model with ``similarity`` has its validation pairs scored here (see the module docstring)."""
    hook = 'zero_shot_eval_all' if hasattr(train, 'zero_shot_eval_all') else 'zero_shot_eval'  # OpenCLIP 4, 3
    try:
        stock_evaluate = expect_function(train, 'evaluate', ('data', 'epoch', 'args', 'tb_writer', 'tokenizer'))
        expect_function(train, hook)
        from open_clip_train.data import CsvDataset
        from open_clip_train.distributed import is_master
        from open_clip_train.precision import get_autocast
    except (Unexpected, ImportError) as error:
        leave_alone(ADAPTER, Unexpected(str(error)), CONSEQUENCE.format('validation (--val-data)'))
        return

    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        scorer = scoring_model(model)
        due = 'val' in data and args.val_frequency and (epoch % args.val_frequency == 0 or epoch == args.epochs)
        if not (due and scorer is not None and is_master(args)):
            return stock_evaluate(model, data, epoch, args, tb_writer, tokenizer)
        device = torch.device(args.device)
        autocast = get_autocast(args.precision, device_type=device.type)
        input_dtype = open_clip.get_input_dtype(args.precision)
        if hasattr(model, 'prepare_batch'):  # OpenCLIP 4: a task, and batches are dicts
            def forward(batch):
                return model(model.prepare_batch(batch, device, input_dtype))
        else:
            def forward(batch):
                images, texts = batch
                return scorer(images.to(device=device, dtype=input_dtype), texts.to(device))
        model.eval()
        dataloader = data['val'].dataloader
        dataset = dataloader.dataset
        # OpenCLIP's CSV loader reads the rows in order (validation is neither shuffled nor sharded).
        image_files = [str(path) for path in dataset.images] if isinstance(dataset, CsvDataset) else None
        metrics = validation_metrics(scorer, forward, dataloader, autocast, epoch, image_files)
        stock_hook = getattr(train, hook)
        setattr(train, hook, lambda *args, **kwargs: {**stock_hook(*args, **kwargs), **metrics})
        try:
            return stock_evaluate(model, {k: v for k, v in data.items() if k != 'val'}, epoch, args, tb_writer,
                                  tokenizer)
        finally:
            setattr(train, hook, stock_hook)

    train.evaluate = evaluate


def validation_metrics(model, forward, batches, autocast, epoch, image_files=None) -> dict:
    """OpenCLIP's validation metrics of (image, text) pairs, scored with ``model.similarity``.

    ``forward(batch)`` gives the model's outputs for a batch of pairs. Per batch, the InfoNCE
    ``clip_val_loss`` of the conditioned logits, as OpenCLIP computes it; over the whole set, the
    retrieval metrics (``retrieval_metrics``) from features gathered on the CPU as OpenCLIP's
    evaluate gathers them. ``image_files`` names each pair's image file, in the order of the batches:
    pairs with the same file are captions of one image, scored as ``open_clip_llip eval`` scores a
    CSV (each image once; a text's hit is its own image, an image's its best caption). Without it,
    every pair's image is an image of its own.
    """
    image_features, text_features, total_loss = [], [], 0.
    with torch.inference_mode():
        for batch in batches:
            with autocast():
                out = forward(batch)
                logits = (out['logit_scale'] * model.similarity(out['image_features'], out['text_features'])).float()
            labels = torch.arange(len(logits), device=logits.device)
            total_loss += (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item() / 2 * len(labels)
            image_features.append(out['image_features'].cpu())
            text_features.append(out['text_features'].cpu())
        if not image_features:
            return {}
        image_features, text_features = torch.cat(image_features), torch.cat(text_features)
        count = len(text_features)
        if image_files is None:
            first_rows, image_index = torch.arange(count), torch.arange(count)
        elif len(image_files) != count:
            raise RuntimeError(f'Validation read {count} pairs from a CSV of {len(image_files)} rows.')
        else:
            first_rows, image_index = group_rows_by_image(image_files)
        scores = model.similarity(image_features[first_rows], text_features)
    return {**retrieval_metrics(scores, image_index), 'clip_val_loss': total_loss / count,
            'epoch': epoch, 'num_samples': count}

"""Registers Llip with OpenCLIP: its model configs and its model class.

This is the one module that touches OpenCLIP's internals. An OpenCLIP with the patch in
``patches/`` calls ``register`` itself (entry point group ``open_clip.plugins``) and offers
``open_clip.register_model_class``; on a stock OpenCLIP 3.3, ``register`` gives it the same
behaviour by replacing a few names in ``open_clip.factory`` (see ``_support_model_classes``).
"""
import sys
from pathlib import Path
from typing import Callable, Dict

MODEL_CLASS_NAME = 'LlipModel'
_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed from a wheel the configs sit inside the package; in a source checkout (and an
# editable install) they are the repository's top-level folder.
MODEL_CONFIG_DIR = next(
    (path for path in (_PACKAGE_DIR / 'model_configs', _PACKAGE_DIR.parent / 'model_configs') if path.is_dir()),
    _PACKAGE_DIR / 'model_configs')

_registered = False


def llip_model_names():
    """Names of the Llip configs that OpenCLIP knows (ours and any a user added)."""
    import open_clip
    return [name for name in open_clip.list_models()
            if open_clip.get_model_config(name).get('model_class') == MODEL_CLASS_NAME]


def register():
    """Make OpenCLIP list the Llip configs and build ``LlipModel`` for them. Idempotent."""
    global _registered
    if _registered:
        return
    import open_clip
    from .model import LlipModel

    if not MODEL_CONFIG_DIR.is_dir():
        raise FileNotFoundError(f'open_clip_llip is installed without its model configs ({MODEL_CONFIG_DIR}); reinstall it.')
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    if hasattr(open_clip, 'register_model_class'):  # an OpenCLIP with patches/ applied
        open_clip.register_model_class(MODEL_CLASS_NAME, LlipModel)
    else:
        _support_model_classes()(MODEL_CLASS_NAME, LlipModel)
        _support_similarity_in_evaluation()
    _suggest_llip_configs_for_unknown_names()
    _registered = True


def _support_model_classes() -> Callable[[str, type], None]:
    """Give a stock OpenCLIP 3.3 what the patch adds; returns its ``register_model_class``.

    - ``create_model`` instantiates ``factory.CLIP`` (or ``factory.CustomTextCLIP``, for
      ``custom_text`` and HF text towers): each becomes a function that builds the class a
      config names under ``model_class``;
    - ``factory.load_checkpoint`` (used by ``create_model``) lets a model that defines
      ``load_checkpoint`` load its own checkpoints;
    - ``create_loss`` (bound by ``open_clip_train.main`` when it is imported) returns the loss
      of a model class that defines ``create_loss(args)``.
    """
    import open_clip
    from open_clip import factory

    model_classes: Dict[str, type] = {}
    stock_load_checkpoint = factory.load_checkpoint
    stock_create_loss = factory.create_loss

    def class_dispatch(stock_class):
        """``stock_class`` for configs without ``model_class``, else the registered class it names."""
        def build_model_from_config(model_class: str = None, **model_cfg):
            if model_class is None:
                return stock_class(**model_cfg)
            if model_class not in model_classes:
                raise RuntimeError(
                    f'The model config names model_class {model_class!r}, which no installed plugin registers '
                    f'(registered: {sorted(model_classes)}).')
            return model_classes[model_class](**model_cfg)
        return build_model_from_config

    def load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device='cpu'):
        if hasattr(model, 'load_checkpoint'):
            return model.load_checkpoint(checkpoint_path, strict=strict, weights_only=weights_only, device=device)
        return stock_load_checkpoint(model, checkpoint_path, strict=strict, weights_only=weights_only, device=device)

    def create_loss(args):
        model_class = model_classes.get((factory.get_model_config(args.model) or {}).get('model_class'))
        if hasattr(model_class, 'create_loss'):
            return model_class.create_loss(args)
        return stock_create_loss(args)

    # create_model builds CustomTextCLIP instead of CLIP for a config with custom_text or an HF text tower.
    factory.CLIP, factory.CustomTextCLIP = class_dispatch(factory.CLIP), class_dispatch(factory.CustomTextCLIP)
    factory.load_checkpoint = open_clip.load_checkpoint = load_checkpoint
    factory.create_loss = open_clip.create_loss = create_loss
    return model_classes.__setitem__


def _support_similarity_in_evaluation():
    """Give a stock OpenCLIP 3.3 the evaluation hooks of patches 0003 and 0004.

    A model that defines ``similarity(image_features, text_features)`` and
    ``build_zero_shot_classifier(...)`` is evaluated with them: ``open_clip.build_zero_shot_classifier``
    delegates to the model's; ``open_clip_train.zero_shot`` and ``open_clip_train.train`` are
    adapted when they are imported (``_adapt_zero_shot``, ``_adapt_evaluate``).
    """
    import open_clip
    from open_clip import zero_shot_classifier
    from .autoload import call_after_import

    stock_build = zero_shot_classifier.build_zero_shot_classifier

    def build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10,
                                   device='cpu', use_tqdm=False):
        if hasattr(model, 'build_zero_shot_classifier'):
            return model.build_zero_shot_classifier(
                tokenizer, classnames, templates, num_classes_per_batch=num_classes_per_batch, device=device,
                use_tqdm=use_tqdm)
        return stock_build(model, tokenizer, classnames, templates, num_classes_per_batch, device, use_tqdm)

    zero_shot_classifier.build_zero_shot_classifier = open_clip.build_zero_shot_classifier = build_zero_shot_classifier
    call_after_import('open_clip_train.zero_shot', _adapt_zero_shot)
    call_after_import('open_clip_train.train', _adapt_evaluate)


def _adapt_zero_shot(zero_shot):
    """``open_clip_train.zero_shot``: the model's classifier and similarity, and an ``accuracy`` numpy ≥ 2.4 accepts."""
    import open_clip
    import torch
    stock_run = zero_shot.run

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() for k in topk]

    def run(model, classifier, dataloader, args):
        if hasattr(model, 'similarity'):
            # The stock run scores `model(image=x)['image_features'] @ classifier`: hand it the model's
            # similarities to the classes as image features, and an identity classifier.
            model, classifier = _ClassScores(model, classifier), torch.eye(len(classifier), device=args.device)
        return stock_run(model, classifier, dataloader, args)

    zero_shot.build_zero_shot_classifier = open_clip.build_zero_shot_classifier
    zero_shot.accuracy = accuracy
    zero_shot.run = run


class _ClassScores:
    """A model seen through its similarity to fixed class features: ``(image=x) -> {'image_features': [N, C]}``."""

    def __init__(self, model, class_features):
        self.model = model
        self.class_features = class_features

    def __call__(self, image):
        scores = self.model.similarity(self.model(image=image)['image_features'], self.class_features)
        return {'image_features': scores.float()}  # against an fp32 identity "classifier", whatever the model's dtype


def _adapt_evaluate(train):
    """``open_clip_train.train.evaluate``: validation pairs of a model with ``similarity`` ranked by it.

    The stock evaluate multiplies image and text features; for such a model this computes the
    validation metrics itself (``_validation_metrics``, OpenCLIP's names) and lets the stock
    evaluate do the rest — zero-shot, logging, tensorboard, results.jsonl, wandb — reporting
    them beside the zero-shot metrics.
    """
    from open_clip_train.distributed import is_master
    stock_evaluate = train.evaluate

    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        unwrapped = model.module if args.distributed and not args.horovod else model
        due = 'val' in data and args.val_frequency and (epoch % args.val_frequency == 0 or epoch == args.epochs)
        if not (due and hasattr(unwrapped, 'similarity') and is_master(args)):
            return stock_evaluate(model, data, epoch, args, tb_writer, tokenizer)
        val_metrics = _validation_metrics(unwrapped, data['val'].dataloader, epoch, args)
        stock_zero_shot_eval = train.zero_shot_eval
        train.zero_shot_eval = lambda *a, **kw: {**stock_zero_shot_eval(*a, **kw), **val_metrics}
        try:
            return stock_evaluate(model, {k: v for k, v in data.items() if k != 'val'}, epoch, args, tb_writer, tokenizer)
        finally:
            train.zero_shot_eval = stock_zero_shot_eval

    train.evaluate = evaluate


def _validation_metrics(model, dataloader, epoch, args):
    """OpenCLIP's validation metrics of (image, text) pairs, scored with the model's similarity.

    Per batch the InfoNCE ``clip_val_loss`` of the conditioned logits; over the whole set the
    retrieval metrics of each pair's text and image (``retrieval.retrieval_metrics``: OpenCLIP's
    names), from features accumulated on the CPU as OpenCLIP's evaluate accumulates them.
    """
    import torch
    import torch.nn.functional as F
    from open_clip import get_input_dtype
    from open_clip_train.precision import get_autocast
    from .retrieval import retrieval_metrics

    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    model.eval()
    image_features, text_features, total_loss = [], [], 0.
    with torch.inference_mode():
        for images, texts in dataloader:
            with autocast():
                out = model(images.to(device=device, dtype=input_dtype), texts.to(device))
                logits = (out['logit_scale'] * model.similarity(out['image_features'], out['text_features'])).float()
            labels = torch.arange(len(logits), device=device)
            total_loss += (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item() / 2 * len(labels)
            image_features.append(out['image_features'].cpu())
            text_features.append(out['text_features'].cpu())
        scores = model.similarity(torch.cat(image_features), torch.cat(text_features))
    count = len(scores)
    return {**retrieval_metrics(scores, torch.arange(count)), 'clip_val_loss': total_loss / count,
            'epoch': epoch, 'num_samples': count}


def _suggest_llip_configs_for_unknown_names():
    """Make ``get_model_config`` (and so ``create_model``) name the Llip configs for a near-miss.

    OpenCLIP's own error for an unknown name lists all ~150 configs; for a name that starts with
    "Llip" or is close to a Llip config, say which Llip configs exist and which one was meant.
    """
    import difflib
    import open_clip
    from open_clip import factory

    stock_get_model_config = factory.get_model_config

    def get_model_config(model_name):
        config = stock_get_model_config(model_name)
        if config is None:
            llip_names = llip_model_names()
            close = difflib.get_close_matches(model_name, llip_names, n=1, cutoff=0.75)
            if close or model_name.lower().startswith('llip'):
                hint = f" Did you mean '{close[0]}'?" if close else ''
                raise RuntimeError(
                    f"Unknown model '{model_name}'.{hint} Llip configs: {', '.join(llip_names)}.")
        return config

    factory.get_model_config = open_clip.get_model_config = get_model_config


def open_clip_train_position():
    """(epoch, step) of the ``open_clip_train`` loop that this call runs inside; None outside it.

    Read from the loop's frame (``train_one_epoch``'s ``epoch`` and ``step``), so that an error
    raised from the loss can say where training stopped, resumed runs included.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == 'train_one_epoch' and frame.f_globals.get('__name__') == 'open_clip_train.train':
            return frame.f_locals.get('epoch'), frame.f_locals.get('step')
        frame = frame.f_back
    return None

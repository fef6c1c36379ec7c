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
    register_model_class = getattr(open_clip, 'register_model_class', None) or _support_model_classes()
    register_model_class(MODEL_CLASS_NAME, LlipModel)
    _suggest_llip_configs_for_unknown_names()
    _registered = True


def _support_model_classes() -> Callable[[str, type], None]:
    """Give a stock OpenCLIP 3.3 what the patch adds; returns its ``register_model_class``.

    - ``create_model`` instantiates ``factory.CLIP`` for a config without ``custom_text``:
      it becomes a function that builds the class a config names under ``model_class``;
    - ``factory.load_checkpoint`` (used by ``create_model``) lets a model that defines
      ``load_checkpoint`` load its own checkpoints;
    - ``create_loss`` (bound by ``open_clip_train.main`` when it is imported) returns the loss
      of a model class that defines ``create_loss(args)``.
    """
    import open_clip
    from open_clip import factory

    model_classes: Dict[str, type] = {}
    clip_class = factory.CLIP
    stock_load_checkpoint = factory.load_checkpoint
    stock_create_loss = factory.create_loss

    def build_model_from_config(model_class: str = None, **model_cfg):
        if model_class is None:
            return clip_class(**model_cfg)
        if model_class not in model_classes:
            raise RuntimeError(
                f'The model config names model_class {model_class!r}, which no installed plugin registers '
                f'(registered: {sorted(model_classes)}).')
        return model_classes[model_class](**model_cfg)

    def load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device='cpu'):
        if hasattr(model, 'load_checkpoint'):
            return model.load_checkpoint(checkpoint_path, strict=strict, weights_only=weights_only, device=device)
        return stock_load_checkpoint(model, checkpoint_path, strict=strict, weights_only=weights_only, device=device)

    def create_loss(args):
        model_class = model_classes.get((factory.get_model_config(args.model) or {}).get('model_class'))
        if hasattr(model_class, 'create_loss'):
            return model_class.create_loss(args)
        return stock_create_loss(args)

    factory.CLIP = build_model_from_config
    factory.load_checkpoint = open_clip.load_checkpoint = load_checkpoint
    factory.create_loss = open_clip.create_loss = create_loss
    return model_classes.__setitem__


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

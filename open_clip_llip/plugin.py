"""Registers Llip with OpenCLIP: its model configs and its model class.

This is the one module that touches OpenCLIP's internals. An OpenCLIP with the patch in
``patches/`` calls ``register`` itself (entry point group ``open_clip.plugins``) and offers
``open_clip.register_model_class``; on a stock OpenCLIP 3.3, ``register`` gives it the same
behaviour by replacing two names in ``open_clip.factory`` (see ``_support_model_classes``).
"""
import logging
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
    _registered = True
    logging.debug('open_clip_llip registered %s with open_clip', MODEL_CLASS_NAME)


def _support_model_classes() -> Callable[[str, type], None]:
    """Give a stock OpenCLIP 3.3 what the patch adds; returns its ``register_model_class``.

    - ``create_model`` instantiates ``factory.CLIP`` for a config without ``custom_text``:
      it becomes a function that builds the class a config names under ``model_class``;
    - ``factory.load_checkpoint`` (used by ``create_model``) lets a model that defines
      ``load_checkpoint`` load its own checkpoints.
    """
    from open_clip import factory

    model_classes: Dict[str, type] = {}
    clip_class = factory.CLIP
    stock_load_checkpoint = factory.load_checkpoint

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

    factory.CLIP = build_model_from_config
    factory.load_checkpoint = load_checkpoint
    import open_clip
    open_clip.load_checkpoint = load_checkpoint
    return model_classes.__setitem__

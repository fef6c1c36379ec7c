"""Stand-in for patches 0001 and main/0001: configs choose a model class; models load their own checkpoints.

In ``open_clip.factory`` (and ``open_clip`` where it re-exports the name):

- ``CLIP`` and ``CustomTextCLIP``, which ``create_model`` instantiates for every config, become
  functions that build the class a config names under ``model_class`` (else themselves);
- ``load_checkpoint`` lets a model that defines ``load_checkpoint`` load its own checkpoints;
- ``get_model_config`` answers an unknown name close to a plugin's configs by naming them (the
  stock answer, None, makes ``create_model`` list all ~150 configs).
"""
import difflib
from typing import Callable, Dict, Optional

import open_clip

from . import Unexpected, expect_class, expect_function, leave_alone

ADAPTER = 'model classes (patches/0001)'


def install() -> Optional[Callable[[str, type], None]]:
    """OpenCLIP's ``register_model_class``, or this stand-in's; None where neither can be had (warned)."""
    if hasattr(open_clip, 'register_model_class'):
        return open_clip.register_model_class
    from open_clip import factory
    try:
        stock_classes = {name: expect_class(factory, name) for name in ('CLIP', 'CustomTextCLIP')}
        stock_load_checkpoint = expect_function(
            factory, 'load_checkpoint', ('model', 'checkpoint_path', 'strict', 'weights_only', 'device'))
        stock_get_model_config = expect_function(factory, 'get_model_config', ('model_name',))
        expect_function(factory, 'create_model')
    except Unexpected as error:
        leave_alone(ADAPTER, error, 'Llip configs cannot be built by open_clip.create_model')
        return None

    model_classes: Dict[str, type] = {}

    def class_dispatch(stock_class):
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

    def get_model_config(model_name):
        config = stock_get_model_config(model_name)
        if config is None:
            _suggest_plugin_configs(model_name, model_classes, stock_get_model_config)
        return config

    factory.CLIP, factory.CustomTextCLIP = (class_dispatch(cls) for cls in stock_classes.values())
    factory.load_checkpoint = open_clip.load_checkpoint = load_checkpoint
    factory.get_model_config = open_clip.get_model_config = get_model_config
    return model_classes.__setitem__


def _suggest_plugin_configs(model_name: str, model_classes: Dict[str, type], get_model_config):
    """RuntimeError naming a plugin's configs for a near-miss of one of them (say 'Llip-ViT-B16')."""
    for class_name, model_class in model_classes.items():
        family = model_class.__name__.removesuffix('Model')
        names = [name for name in open_clip.list_models()
                 if (get_model_config(name) or {}).get('model_class') == class_name]
        close = difflib.get_close_matches(model_name, names, n=1, cutoff=0.75)
        if close or model_name.lower().startswith(family.lower()):
            hint = f" Did you mean '{close[0]}'?" if close else ''
            raise RuntimeError(f"Unknown model '{model_name}'.{hint} {family} configs: {', '.join(names)}.")

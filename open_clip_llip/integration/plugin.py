"""Registers Llip with OpenCLIP: its model configs, model class, training loss and task, evaluation, and checkpoints;
and with CLIP_benchmark, once it loads.

Each piece goes through OpenCLIP's public API where it has one (``add_model_config``) and,
where it does not yet, through the API that a patch in ``patches/`` adds (``register_model_class``,
``register_loss``, ``register_task``, ``pairwise_similarity``, ``register_pretrained``,
``hub_requirements``), which an adapter of
``open_clip_llip.integration.adapters`` stands in for on a stock OpenCLIP. This module itself touches no
OpenCLIP internals. An OpenCLIP with the patches calls ``register`` itself (entry point group
``open_clip.plugins``); otherwise the package's import hook does (see ``autoload``).
"""
from pathlib import Path

from ..modeling.llip_model import MODEL_CLASS_NAME, llip_model_names

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Installed from a wheel the configs sit inside the package; in a source checkout (and an
# editable install) they are the repository's top-level folder.
MODEL_CONFIG_DIR = next(
    (path for path in (_PACKAGE_DIR / 'model_configs', _PACKAGE_DIR.parent / 'model_configs') if path.is_dir()),
    _PACKAGE_DIR / 'model_configs')

_registered = False


def register():
    """Make OpenCLIP list the Llip configs, build ``LlipModel`` for them, train and evaluate them. Idempotent."""
    global _registered
    if _registered:
        return
    import open_clip

    from ..modeling.llip_model import LlipModel
    from . import objective
    from .adapters import (
        accuracy,
        cpu_distributed,
        download_errors,
        hub,
        model_kwargs,
        registered_losses,
        registered_model_classes,
        registered_tasks,
        safe_checkpoints,
        similarity,
        validation_data,
    )
    from .autoload import call_after_import
    from .clip_benchmark import METRICS_MODULES, route_llip_models

    if not MODEL_CONFIG_DIR.is_dir():
        raise FileNotFoundError(f'open_clip_llip is installed without its model configs ({MODEL_CONFIG_DIR}); reinstall it.')
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    for install, hook in ((registered_model_classes.install, LlipModel), (registered_losses.install, objective.create_loss),
                          (registered_tasks.install, objective.create_task)):
        register_hook = install()
        if register_hook is not None:
            register_hook(MODEL_CLASS_NAME, hook)
    similarity.install()
    call_after_import('open_clip_train.zero_shot', accuracy.adapt)
    safe_checkpoints.install()
    call_after_import('open_clip_train.main', model_kwargs.adapt)  # after safe_checkpoints: it wraps its main
    call_after_import('open_clip_train.data', validation_data.adapt)
    for task in METRICS_MODULES:  # plain clip_benchmark eval evaluates Llip models as open_clip_llip benchmark does
        call_after_import(f'clip_benchmark.metrics.{task}', route_llip_models)
    call_after_import('open_clip_train.distributed', cpu_distributed.adapt)
    hub.install()
    register_pretrained_tags()
    download_errors.install()
    _registered = True


def register_pretrained_tags():
    """The authors' released weights, and every CLIP tag each Llip config can start from (``.pretrained``).

    Called once at registration; call it again after adding CLIP tags or Llip configs to OpenCLIP.
    """
    import open_clip

    from .adapters import registered_pretrained
    from .pretrained import RELEASED, clip_starting_points
    register_tag = registered_pretrained.install()
    if register_tag is None:
        return
    for (model_name, tag), cfg in RELEASED.items():
        register_tag(model_name, tag, cfg)
    for model_name in llip_model_names():
        for tag, cfg in clip_starting_points(open_clip.get_model_config(model_name)).items():
            register_tag(model_name, tag, cfg)

"""Stand-ins for the OpenCLIP patches in ``patches/`` until they land: one module per patch.

| module | patch (3.3) | patch (main) | what OpenCLIP gains |
|---|---|---|---|
| ``registered_model_classes`` | 0001 | 0001 | ``register_model_class``: configs pick a class, models load checkpoints |
| ``registered_losses`` | 0002 | 0002 | ``register_loss``: ``create_loss`` asks the model class's loss |
| ``registered_tasks`` | — | 0002 | ``register_task``: ``create_task`` asks the model class's training task |
| ``accuracy`` | 0003 | (fixed) | zero-shot accuracy that numpy ≥ 2.4 accepts |
| ``similarity`` | 0004 | 0003 | ``pairwise_similarity``: evaluation scores with a model's own ``similarity`` |
| ``registered_pretrained`` | 0005 | 0004 | ``register_pretrained``: a plugin's configs get pretrained tags |
| ``hub`` | 0006 | 0005 | a model's ``hub_requirements`` in its Hub config and card |
| ``safe_checkpoints`` | 0007 | 0006 | checkpoints saved whole with a digest; ``--resume latest`` skips damaged ones |
| ``download_errors`` | 0008 | 0007 | a failed download of a tag names the file and where to put it by hand |
| ``cpu_distributed`` | 0009 | 0008 | ``ddp_device_ids``: DDP wraps a model on the CPU (gloo) |
| ``validation_data`` | — | — | (a Llip run) ``--val-data`` read by its extension; a faulty validation CSV refused |
| ``model_kwargs`` | — | — | (a Llip run) ``--model-kwargs``; ``--siglip`` keeps the config's initialisation |

(patches/open_clip-3.3.0 and patches/open_clip-main; see patches/README.md.)

Each adapter is detected on its own: it does nothing where OpenCLIP already has what its patch
adds (the public name above; for ``accuracy``, an ``accuracy`` that works; for ``hub``, a
``generate_readme`` that takes ``requirements``; for ``safe_checkpoints``, ``open_clip_train.file_utils``'s
``checkpoint_problem``; for ``download_errors``, ``open_clip.pretrained.PretrainedDownloadError``; for
``cpu_distributed``, ``open_clip_train.distributed``'s ``ddp_device_ids``), and where something it would
adapt is missing or has another shape, it leaves OpenCLIP alone and warns once. These modules are the only
ones that replace names inside OpenCLIP (and, in ``cpu_distributed``, torch's DDP constructor); delete one
when its patch lands. ``validation_data`` and ``model_kwargs`` stand in for no patch (their docstrings say
why).
"""
import inspect
import json
import warnings
from pathlib import Path

import open_clip

from ...modeling.llip_model import MODEL_CLASS_NAME


class Unexpected(Exception):
    """What an adapter expected to find in OpenCLIP and did not."""


def expect_function(owner, name: str, parameters=()):
    """``owner.name``, a function taking ``parameters`` (by these names); Unexpected otherwise."""
    function = getattr(owner, name, None)
    where = f'{getattr(owner, "__name__", owner)}.{name}'
    if not callable(function):
        raise Unexpected(f'{where} is missing')
    try:
        names = inspect.signature(function).parameters
    except (TypeError, ValueError):
        raise Unexpected(f'{where} has no inspectable signature') from None
    missing = [parameter for parameter in parameters if parameter not in names]
    if missing:
        raise Unexpected(f'{where} takes no {", ".join(missing)} (it takes {", ".join(names)})')
    return function


def expect_class(owner, name: str) -> type:
    value = getattr(owner, name, None)
    if not isinstance(value, type):
        raise Unexpected(f'{getattr(owner, "__name__", owner)}.{name} is not a class')
    return value


def leave_alone(adapter: str, error: Unexpected, consequence: str):
    """Warn that an adapter does not apply to this OpenCLIP, and what Llip users lose."""
    warnings.warn(
        f'open_clip_llip: OpenCLIP {open_clip.__version__} is not what the {adapter} adapter expects ({error}), so it '
        f'leaves OpenCLIP alone: {consequence}. Please report this with your OpenCLIP version.', stacklevel=3)


def is_llip_model(model_name: str) -> bool:
    """Whether ``--model`` names a Llip config (a registered name, or ``local-dir:`` a folder holding one)."""
    try:
        if model_name.startswith('local-dir:'):
            config = Path(model_name[len('local-dir:'):]) / 'open_clip_config.json'
            model_cfg = json.loads(config.read_text()).get('model_cfg', {})
        else:
            model_cfg = open_clip.get_model_config(model_name) or {}
    except Exception:  # an unknown or unreadable name: OpenCLIP's main says what is wrong with it
        return False
    return model_cfg.get('model_class') == MODEL_CLASS_NAME

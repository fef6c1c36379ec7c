"""Stand-in for patch main/0002: ``create_task`` asks the training task registered for a config's ``model_class``.

OpenCLIP 4 trains through tasks (``open_clip.task``) that ``create_task(args, model, …)`` picks
from the arguments; for a config whose ``model_class`` has a registered task factory,
``create_task`` in ``open_clip.factory`` and ``open_clip`` returns that task instead.
(``open_clip_train.main`` binds ``create_task`` when it is imported, after this runs.)
OpenCLIP 3 has no tasks: there this adapter has nothing to do.
"""
from typing import Callable, Optional

import open_clip

from . import Unexpected, expect_function, leave_alone

ADAPTER = 'tasks (patches/main/0002)'


def install() -> Optional[Callable[[str, Callable], None]]:
    """OpenCLIP's ``register_task``, or this stand-in's; None on an OpenCLIP without tasks (or warned)."""
    if hasattr(open_clip, 'register_task'):
        return open_clip.register_task
    from open_clip import factory
    if not hasattr(factory, 'create_task'):
        return None  # OpenCLIP 3
    try:
        stock_create_task = expect_function(
            factory, 'create_task', ('args', 'model', 'dist_model', 'naflex_data_config'))
    except Unexpected as error:
        leave_alone(ADAPTER, error, "open_clip_train's create_task cannot give Llip its training task")
        return None
    tasks = {}

    def create_task(args, model, dist_model=None, naflex_data_config=None):
        model_class = (factory.get_model_config(args.model) or {}).get('model_class')
        create = tasks.get(model_class, stock_create_task)
        return create(args, model, dist_model=dist_model, naflex_data_config=naflex_data_config)

    factory.create_task = open_clip.create_task = create_task
    return tasks.__setitem__

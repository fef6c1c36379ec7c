"""Stand-in for patch 0002: ``create_loss`` asks the loss registered for a config's ``model_class``.

``open_clip_train`` (OpenCLIP 3, and OpenCLIP 4's ``legacy_main``) builds its loss with
``create_loss(args)``, which picks a CLIP or SigLIP loss from the arguments; for a config whose
``model_class`` has a registered loss, ``create_loss`` in ``open_clip.factory`` and ``open_clip``
returns that instead. (``open_clip_train.main`` binds ``create_loss`` when it is imported, after
this runs: Llip is activated by the first import of ``open_clip``.)
"""
from typing import Callable, Optional

import open_clip

from . import Unexpected, expect_function, leave_alone

ADAPTER = 'losses (patches/0002)'


def install() -> Optional[Callable[[str, Callable], None]]:
    """OpenCLIP's ``register_loss``, or this stand-in's; None where neither can be had (warned)."""
    if hasattr(open_clip, 'register_loss'):
        return open_clip.register_loss
    from open_clip import factory
    try:
        stock_create_loss = expect_function(factory, 'create_loss', ('args',))
    except Unexpected as error:
        leave_alone(ADAPTER, error, "open_clip_train's create_loss cannot give Llip its loss")
        return None
    losses = {}

    def create_loss(args):
        model_class = (factory.get_model_config(args.model) or {}).get('model_class')
        return losses[model_class](args) if model_class in losses else stock_create_loss(args)

    factory.create_loss = open_clip.create_loss = create_loss
    return losses.__setitem__

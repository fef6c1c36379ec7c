"""Llip's training objective in ``open_clip_train``: its loss and training task, built from the loop's arguments.

OpenCLIP 3 asks the model class for its loss (``create_loss(args)``, patches/0002 or the
``registered_losses`` adapter); OpenCLIP 4 trains through tasks and asks for one (``create_task(args,
model, …)``, patches/main or the ``registered_tasks`` adapter). Both give ``LlipLoss`` — SigLIP's sigmoid
loss on conditioned scores, distributed as ``--loss-dist-impl`` says — whatever ``--siglip``
says; OpenCLIP 4's task is its own ``SigLIPTask`` carrying that loss.

What the loop offers and Llip cannot do yet is refused here, with a message.
"""
import logging
import sys
from typing import Optional

import open_clip

from ..loss.sigmoid import LlipLoss


def refuse_unsupported(args, naflex_data_config=None):
    """ValueError for the options of ``open_clip_train`` that Llip does not support."""
    if getattr(args, 'distill', False):
        raise ValueError('Distillation (--distill-model) is not supported for Llip models.')
    if getattr(args, 'horovod', False):
        raise ValueError("Horovod is not supported for Llip models (nor by OpenCLIP's SigLipLoss); use torchrun or srun.")
    if getattr(args, 'fsdp', False):
        raise ValueError('FSDP (--fsdp) is not supported for Llip models yet: evaluation scores with the mixer '
                         'outside a sharded forward. Train with DDP (leave --fsdp out).')
    if naflex_data_config is not None or getattr(args, 'use_naflex', False):
        raise ValueError("NaFlex data (variable image sizes) is not supported for Llip models: the mixture tokens' "
                         'positions are learnt for one grid.')


def training_position() -> Optional[str]:
    """'epoch E, step S' of the ``open_clip_train`` loop that this call runs inside; None outside it.

    Read from the loop's frame (``train_one_epoch``'s ``epoch`` and ``step``), so that an error
    raised in the loss can say where training stopped, resumed runs included.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == 'train_one_epoch' and frame.f_globals.get('__name__') == 'open_clip_train.train':
            return f"epoch {frame.f_locals.get('epoch')}, step {frame.f_locals.get('step')}"
        frame = frame.f_back
    return None


def _llip_loss(args, temperature: float) -> LlipLoss:
    loss = LlipLoss(temperature, rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl,
                    position=training_position)
    logging.info(
        f'{args.model} is a Llip model: training with LlipLoss (sigmoid loss on conditioned scores, τ {temperature:g}, '
        f'distributed as {loss.dist_impl!r}){"; --siglip is implied" if args.siglip else ""}.')
    return loss


def create_loss(args) -> LlipLoss:
    """OpenCLIP 3's hook: the loss for ``args.model``, a Llip config (τ read from it)."""
    refuse_unsupported(args)
    return _llip_loss(args, float(open_clip.get_model_config(args.model)['llip_cfg']['temperature']))


def create_task(args, model, dist_model=None, naflex_data_config=None):
    """OpenCLIP 4's hook: a ``SigLIPTask`` that trains ``model`` (a ``LlipModel``) with ``LlipLoss``."""
    from open_clip.task import SigLIPTask
    refuse_unsupported(args, naflex_data_config)
    loss = _llip_loss(args, model.mixer.temperature)
    return SigLIPTask(model, loss=loss, rank=args.rank, world_size=args.world_size)

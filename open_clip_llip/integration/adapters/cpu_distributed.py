"""Stand-in for patch 0009 (3.3) / 0008 (main): distributed training on the CPU, over gloo.

``open_clip_train`` wraps the model in ``DistributedDataParallel(model, device_ids=[device])`` whatever
the device (3.3's ``main``; main's ``task.prepare_distributed`` and ``legacy_main``). DDP refuses
``device_ids`` for a module on the CPU, so ``torchrun --nproc_per_node 2 -m open_clip_train.main …
--dist-backend gloo`` on a machine without GPUs (or with ``--device cpu``) stops before the first
step, for every model. The patch passes ``device_ids=None`` there
(``open_clip_train.distributed.ddp_device_ids``).

Until it lands, this adapter wraps ``torch.nn.parallel.DistributedDataParallel.__init__``: given a
``LlipModel`` whose parameters are all on the CPU and ``device_ids`` that name only the CPU, it wraps
the model as with ``device_ids=None``; every other call goes to DDP unchanged (for any other model,
the stock failure stays). It adapts DDP rather than a name in OpenCLIP because 3.3 wraps the model in
``main`` and main in its training task: one hook covers both.
"""
import functools

import torch

from ...modeling.llip_model import LlipModel
from . import Unexpected, expect_function, leave_alone

ADAPTER = 'CPU distributed training (patches/0009)'


def names_only_the_cpu(device_ids) -> bool:
    return all(isinstance(device, (str, torch.device)) and torch.device(device).type == 'cpu' for device in device_ids)


def adapt(distributed):
    """Called once ``open_clip_train.distributed`` has loaded (does nothing where the patch landed)."""
    if hasattr(distributed, 'ddp_device_ids'):
        return
    ddp = torch.nn.parallel.DistributedDataParallel
    try:
        stock_init = expect_function(ddp, '__init__', ('module', 'device_ids'))
    except Unexpected as error:
        leave_alone(ADAPTER, error, 'a Llip model cannot train distributed on the CPU')
        return

    @functools.wraps(stock_init)
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if (device_ids and isinstance(module, LlipModel) and names_only_the_cpu(device_ids)
                and all(param.device.type == 'cpu' for param in module.parameters())):
            device_ids = None  # what DDP takes for a CPU module
        stock_init(self, module, device_ids, *args, **kwargs)

    __init__.__module__ = __name__  # wraps keeps DDP's signature and docstring; the function is ours
    ddp.__init__ = __init__

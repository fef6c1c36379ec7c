"""Stand-in for patch 0003: zero-shot accuracy that numpy ≥ 2.4 accepts (OpenCLIP 3.3).

``open_clip_train.zero_shot.accuracy`` of OpenCLIP 3.3 takes ``float()`` of a one-element numpy
array, which numpy 2.4 refuses: every zero-shot evaluation fails, for every model. OpenCLIP fixed
it after 3.3.0. This adapter tries the module's ``accuracy`` once and replaces it only if it fails
so.
"""
import torch

from . import Unexpected, expect_function, leave_alone

ADAPTER = 'zero-shot accuracy (patches/0003)'


def accuracy(output, target, topk=(1,)):
    """How many of the targets are among the top k of ``output`` [N, C], for each k: floats."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


def adapt(zero_shot):
    """Called once ``open_clip_train.zero_shot`` has loaded."""
    try:
        stock = expect_function(zero_shot, 'accuracy', ('output', 'target', 'topk'))
    except Unexpected as error:
        leave_alone(ADAPTER, error, 'open_clip_train may fail to count zero-shot hits with numpy >= 2.4')
        return
    try:
        stock(torch.tensor([[0., 1.]]), torch.tensor([1]), topk=(1,))
    except TypeError:  # "only 0-dimensional arrays can be converted to Python scalars"
        zero_shot.accuracy = accuracy

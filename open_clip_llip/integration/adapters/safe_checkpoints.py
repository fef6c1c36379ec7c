"""Stand-in for patch 0007 (3.3) / 0006 (main): checkpoints saved whole, with a digest; resuming skips damaged ones.

``open_clip_train.main`` saves ``epoch_N.pt`` with a plain ``torch.save``: a kill or a full disk during
the save leaves a cut file, which ``--resume latest`` then picks (the newest ``*.pt``) and dies on with
a traceback; a file whose bytes later flip loads silently. For a run whose ``--model`` is a Llip config
(and only then: other runs call OpenCLIP's ``main`` untouched), this adapter replaces, for the
duration of that run, three names in ``open_clip_train.main``:

- ``torch``, by a stand-in whose ``save`` is ``modeling.checkpoint.save_checkpoint``: a temporary file
  beside the target, fsynced, renamed over it, and a SHA-256 digest of the state dict under
  ``state_dict_sha256`` (every other attribute is ``torch``'s own);
- ``get_latest_checkpoint``: newest first, it skips checkpoints that cannot be read or whose digest
  does not match, and logs each it skips and the one it resumes from instead;
- the resume loader (``pt_load`` on 3.3, ``load_checkpoint`` on main): it checks the file first.

Where no intact checkpoint is left, or an explicit ``--resume`` file (or ``epoch_latest.pt`` of
``--save-most-recent``) is damaged, ``main`` logs an error naming the file and what to do and returns
-1, as OpenCLIP's ``main`` does when it refuses to run (the ``open_clip_train`` command exits with
status 1): no traceback. Remote (``--remote-sync``) and sharded (FSDP) checkpoints are left to OpenCLIP.

It covers the ``open_clip_train`` command, any call of ``open_clip_train.main.main`` and ``python -m
open_clip_train.main`` (torchrun's workers too), which runs the imported module's ``main`` as its own
``__main__`` block does (``autoload.run_as_import``).
"""
import functools
import glob
import logging
import os
import types

import torch

from ...modeling.checkpoint import DamagedCheckpoint, checkpoint_problem, save_checkpoint
from ..autoload import call_after_import, run_as_import
from . import Unexpected, expect_function, is_llip_model, leave_alone

ADAPTER = 'checkpoints (patches/0007)'


def _saving_whole():
    """A stand-in for the ``torch`` module whose ``save`` writes whole files with a digest."""
    module = types.ModuleType('torch', 'torch, with save writing whole files (open_clip_llip)')
    module.__getattr__ = lambda name: getattr(torch, name)
    module.save = save_checkpoint
    return module


def _latest_intact(stock_latest, natural_key):
    def get_latest_checkpoint(path: str, remote: bool):
        newest = stock_latest(path, remote)
        if remote or newest is None or os.path.isdir(newest):
            return newest
        damaged = []
        for candidate in sorted(glob.glob(path + '**/*.pt', recursive=True), key=natural_key, reverse=True):
            problem = checkpoint_problem(candidate)
            if problem is None:
                if damaged:
                    logging.warning(f'Resuming from {candidate}, the latest intact checkpoint, instead.')
                return candidate
            damaged.append(candidate)
            logging.warning(f'Skipping a damaged checkpoint: {problem}.')
        raise DamagedCheckpoint(
            f'No intact checkpoint to resume from in {path}: {", ".join(damaged)} cannot be used (see above). Move '
            'them out of the folder and run again to start afresh, or pass --resume with an intact checkpoint.')
    return get_latest_checkpoint


def _checked(stock_load, path_position: int):
    @functools.wraps(stock_load)
    def load(*args, **kwargs):
        path = args[path_position] if len(args) > path_position else kwargs.get('path', kwargs.get('file_path'))
        if isinstance(path, str) and os.path.isfile(path):
            problem = checkpoint_problem(path)
            if problem is not None:
                raise DamagedCheckpoint(
                    f'Cannot resume: {problem}. Pass --resume with an intact checkpoint, or move the damaged one out '
                    'of the run\'s checkpoints folder and use --resume latest.')
        return stock_load(*args, **kwargs)
    return load


def install():
    """Adapt ``open_clip_train.main`` once it has loaded, whether imported or run with ``python -m``."""
    call_after_import('open_clip_train.main', adapt)
    run_as_import('open_clip_train.main', 'import sys\nfrom open_clip_train.main import main\nmain(sys.argv[1:])\n')


def adapt(main_module):
    """Called once ``open_clip_train.main`` has loaded: wrap its ``main`` (does nothing where patch 0007 landed)."""
    from open_clip_train import file_utils
    if hasattr(file_utils, 'checkpoint_problem'):
        return
    try:
        stock_main = expect_function(main_module, 'main', ('args',))
        expect_function(main_module, 'parse_args', ('args',))
        natural_key = expect_function(main_module, 'natural_key')
        latest = _latest_intact(expect_function(main_module, 'get_latest_checkpoint', ('path', 'remote')), natural_key)
        if hasattr(main_module, 'load_checkpoint'):  # main: the training task loads the checkpoint
            loader = 'load_checkpoint', _checked(expect_function(main_module, 'load_checkpoint', ('task', 'path')), 1)
        else:
            loader = 'pt_load', _checked(expect_function(main_module, 'pt_load', ('file_path',)), 0)
        if main_module.torch is not torch:
            raise Unexpected('open_clip_train.main.torch is not the torch module')
    except Unexpected as error:
        leave_alone(ADAPTER, error, 'a Llip checkpoint cut short while saving makes --resume latest fail')
        return
    replacements = {'torch': _saving_whole(), 'get_latest_checkpoint': latest, loader[0]: loader[1]}

    def main(args):
        """OpenCLIP's ``main(args)``; for a Llip ``--model``, with checkpoints saved whole and checked on resume."""
        if not is_llip_model(main_module.parse_args(args).model):  # at call time: model_kwargs adapts it
            return stock_main(args)
        stock = {name: getattr(main_module, name) for name in replacements}
        vars(main_module).update(replacements)
        try:
            return stock_main(args)
        except DamagedCheckpoint as error:
            logging.error(f'Error. {error}')
            return -1
        finally:
            vars(main_module).update(stock)

    main.__wrapped__ = stock_main  # (not functools.wraps: the function is ours, not OpenCLIP's)
    main_module.main = main

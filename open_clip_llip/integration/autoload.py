"""Activate open_clip_llip whenever open_clip is imported: the code of the installed ``open_clip_llip.pth``.

Python runs the wheel's ``open_clip_llip.pth`` at every start; it executes this file's code
(embedded at build time by ``scripts/hatch_build.py``), which imports nothing beyond ``os``
and ``sys`` and only puts a finder on ``sys.meta_path``. The first ``import open_clip`` then
runs as usual, and right after it ``import open_clip_llip`` registers Llip (so does the first
``import open_clip_train``). Set
``OPEN_CLIP_LLIP_AUTOLOAD=0`` to switch this off; ``import open_clip_llip`` still activates Llip.

The package itself uses ``call_after_import`` to adapt ``open_clip_train`` modules when they load, and
``run_as_import`` so that ``python -m open_clip_train.main`` runs the adapted module.
"""
import os
import sys


class RunAfterLoading:
    """Loader wrapper: runs a module's own loader, then ``callback(module)``."""

    def __init__(self, loader, callback):
        self.loader = loader
        self.callback = callback

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.callback(module)


def step_aside(finder):
    """Take ``finder`` off ``sys.meta_path`` by binding a new list: an import may be iterating over the old one,
    and removing an entry from it would skip the finder after it for that import."""
    sys.meta_path = [other for other in sys.meta_path if other is not finder]


def spec_with_loader(name, wrap):
    """The spec the other finders give for module ``name``, with ``wrap(spec)`` as its loader."""
    from importlib.util import find_spec
    spec = find_spec(name)
    if spec is not None and spec.loader is not None:
        spec.loader = wrap(spec)
    return spec


class ImportHook:
    """Meta-path finder that waits for the import of one module, then steps aside."""

    def __init__(self, name, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name or located_to_run_as_main(name):  # see RunAsImport
            return None
        step_aside(self)
        return spec_with_loader(name, lambda spec: RunAfterLoading(spec.loader, self.callback))


class WhenLoaded:
    """Meta-path finder that waits until a module that is still loading has finished, then steps aside.

    It looks at every later import (and finds nothing itself): the first one after the module's
    own code has run calls ``callback(module)``.
    """

    def __init__(self, name, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, name, path=None, target=None):
        module = sys.modules.get(self.name)
        if module is None or not still_loading(module):
            step_aside(self)
            if module is not None:  # None: its import failed
                self.callback(module)
        return None


class CodeInstead:
    """Loader wrapper whose ``get_code`` (what runpy runs) gives other code."""

    def __init__(self, loader, code):
        self.loader = loader
        self.code = code

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def get_code(self, name):
        return self.code


class RunAsImport:
    """Meta-path finder for ``python -m NAME``: runpy gets ``source`` to run instead of NAME's code.

    runpy runs NAME's code in ``__main__``, a module no import hook sees, so ``call_after_import(NAME, …)``
    never adapts it; ``source`` imports NAME as usual (the callbacks run) and does what NAME's own
    ``if __name__ == '__main__':`` block does.
    """

    def __init__(self, name, source):
        self.name = name
        self.source = source

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        step_aside(self)
        if not located_to_run_as_main(name):
            return None
        return spec_with_loader(
            name, lambda spec: CodeInstead(spec.loader, compile(self.source, spec.origin or name, 'exec')))


def located_to_run_as_main(name) -> bool:
    """Whether runpy is locating module ``name`` for ``python -m name``: ``sys.argv[0]`` is ``'-m'`` while it does."""
    argv = getattr(sys, 'orig_argv', ())
    return sys.argv[:1] == ['-m'] and name in argv and argv[argv.index(name) - 1] == '-m'


def run_as_import(name, source):
    """Where this process is ``python -m name`` and has not run it yet, run ``source`` in its place."""
    if located_to_run_as_main(name) and name not in sys.modules:
        sys.meta_path.insert(0, RunAsImport(name, source))


def still_loading(module) -> bool:
    """Whether a module in ``sys.modules`` is still running its own code (an import cycle passes through it)."""
    return bool(getattr(getattr(module, '__spec__', None), '_initializing', False))


def call_after_import(name, callback):
    """Run ``callback(module)`` once module ``name`` has finished loading: at once if it has."""
    module = sys.modules.get(name)
    if module is None:
        sys.meta_path.insert(0, ImportHook(name, callback))
    elif still_loading(module):
        sys.meta_path.insert(0, WhenLoaded(name, callback))
    else:
        callback(module)


def activate_llip(open_clip_module):
    try:
        import open_clip_llip  # noqa: F401  (registers Llip with open_clip)
    except Exception as error:
        import warnings
        warnings.warn(
            f'open_clip_llip could not register Llip with open_clip ({error!r}); '
            'set OPEN_CLIP_LLIP_AUTOLOAD=0 to stop trying.', stacklevel=2)


# Run from the .pth file (not when the package imports this module for call_after_import). Llip is
# activated by whichever comes first: ``open_clip``, or the (empty) ``open_clip_train`` package, so that
# importing ``open_clip_train.train`` first adapts it after it has loaded, not while it loads.
if __name__ == 'open_clip_llip_autoload' and os.environ.get('OPEN_CLIP_LLIP_AUTOLOAD', '1') != '0':
    call_after_import('open_clip', activate_llip)
    call_after_import('open_clip_train', activate_llip)

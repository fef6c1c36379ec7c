"""Activate open_clip_llip whenever open_clip is imported: the code of the installed ``open_clip_llip.pth``.

Python runs the wheel's ``open_clip_llip.pth`` at every start; it executes this file's code
(embedded at build time by ``scripts/hatch_build.py``), which imports nothing beyond ``os``
and ``sys`` and only puts a finder on ``sys.meta_path``. The first ``import open_clip`` then
runs as usual, and right after it ``import open_clip_llip`` registers Llip. Set
``OPEN_CLIP_LLIP_AUTOLOAD=0`` to switch this off; ``import open_clip_llip`` still activates Llip.
"""
import os
import sys


class ActivateAfterLoading:
    """Loader wrapper: runs open_clip's own loader, then imports open_clip_llip."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            import open_clip_llip  # noqa: F401  (registers Llip with open_clip)
        except Exception as error:
            import warnings
            warnings.warn(
                f'open_clip_llip could not register Llip with open_clip ({error!r}); '
                'set OPEN_CLIP_LLIP_AUTOLOAD=0 to stop trying.')


class OpenClipImportHook:
    """Meta-path finder that waits for the first ``import open_clip``, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != 'open_clip':
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec
        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = ActivateAfterLoading(spec.loader)
        return spec


if os.environ.get('OPEN_CLIP_LLIP_AUTOLOAD', '1') != '0' and 'open_clip' not in sys.modules:
    sys.meta_path.insert(0, OpenClipImportHook())

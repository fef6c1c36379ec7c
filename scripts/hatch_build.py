"""Hatch build hook: ship ``open_clip_llip.pth``, the autoload hook, at the root of the wheel.

The .pth line embeds the source of ``open_clip_llip/integration/autoload.py``, so that starting Python
imports none of our modules. Editable installs get the .pth alone: their model configs are
read from the source tree.
"""
import shutil
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH_NAME = 'open_clip_llip.pth'


class AutoloadPthHook(BuildHookInterface):
    def initialize(self, version, build_data):
        source = (Path(self.root) / 'open_clip_llip' / 'integration' / 'autoload.py').read_text()
        line = (f'import sys; exec(compile({source!r}, "<{PTH_NAME}>", "exec"), '
                "{'__name__': 'open_clip_llip_autoload'})\n")
        self._tmp = tempfile.mkdtemp()
        pth = Path(self._tmp) / PTH_NAME
        pth.write_text(line)
        build_data['force_include'][str(pth)] = PTH_NAME
        if version == 'editable':
            build_data['force_include_editable'] = {str(pth): PTH_NAME}

    def finalize(self, version, build_data, artifact_path):
        shutil.rmtree(self._tmp, ignore_errors=True)

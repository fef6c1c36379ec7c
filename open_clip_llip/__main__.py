"""``python -m open_clip_llip``: the ``open_clip_llip`` command (``open_clip_llip.commands``)."""
from .commands import main

main()

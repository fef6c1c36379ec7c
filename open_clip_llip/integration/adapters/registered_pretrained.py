"""Stand-in for patches 0005 and main/0004: a plugin registers pretrained weights (tags) for its configs.

OpenCLIP keeps its tags in ``open_clip.pretrained._PRETRAINED`` (``{model: {tag: cfg}}``), which
``list_pretrained``, ``get_pretrained_cfg`` and so ``create_model(…, pretrained=tag)`` read at
call time; the stand-in adds entries to it as ``register_pretrained`` does, after checking that
``get_pretrained_cfg`` finds what it adds.
"""
from typing import Callable, Optional

import open_clip

from . import Unexpected, expect_function, leave_alone

ADAPTER = 'pretrained tags (patches/0005)'


def install() -> Optional[Callable[[str, str, dict], None]]:
    """OpenCLIP's ``register_pretrained``, or this stand-in's; None where neither can be had (warned)."""
    if hasattr(open_clip, 'register_pretrained'):
        return open_clip.register_pretrained
    from open_clip import pretrained
    try:
        tags = getattr(pretrained, '_PRETRAINED', None)
        if not isinstance(tags, dict):
            raise Unexpected('open_clip.pretrained._PRETRAINED is not a dict of tags')
        clean_tag = expect_function(pretrained, '_clean_tag', ('tag',))
        get_pretrained_cfg = expect_function(pretrained, 'get_pretrained_cfg', ('model', 'tag'))
        probe = ('open_clip_llip probe', 'Probe-Tag')
        tags.setdefault(probe[0], {})[clean_tag(probe[1])] = {'url': 'probe'}
        found = get_pretrained_cfg(*probe)
        del tags[probe[0]]
        if found != {'url': 'probe'}:
            raise Unexpected('open_clip.get_pretrained_cfg does not read open_clip.pretrained._PRETRAINED')
    except Unexpected as error:
        leave_alone(ADAPTER, error, "Llip's pretrained tags are not listed; give their files to pretrained= instead")
        return None

    def register_pretrained(model: str, tag: str, cfg: dict):
        tags.setdefault(model, {})[clean_tag(tag)] = cfg

    return register_pretrained

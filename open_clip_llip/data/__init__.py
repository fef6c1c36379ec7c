"""Built-in data: seeded scenes of coloured shapes, each image with several captions that describe part of it.

``write_dataset`` (or ``open_clip_llip data OUTPUT_DIR``) writes OpenCLIP-ready
training shards, an image-text retrieval set and zero-shot classification tasks; see
``writer.py`` for the layout, ``scenes.py`` for the held-out colour-shape pairs and
``tasks.py`` for the tasks.
"""
from .writer import write_dataset

__all__ = ['write_dataset']

"""Zero-shot classification tasks: for each class, a way to draw a scene of that class.

Every template, with any class name in it, is a caption the training grammar can produce
(``captions.py``), and it is true of exactly the images of that class. Except in
``unseen-pairs``, scenes use only the colour-shape pairs seen in training.

- ``shape``: the shape of a single object. A control: one object, nothing to choose between,
  so Llip has no edge over a single-vector model.
- ``left-colour``: the colour of the left object of two (columns 0 and 2, different colours).
  Half the colours in the image are the wrong answer, so the image must bind colour to place;
  a query that picks the left object should favour Llip.
- ``big-colour``, ``big-shape``: the colour (or shape) of the one large object among 2-3, the
  others small and of other colours (shapes). Most colours (shapes) in the image are wrong
  answers; these favour Llip for the same reason. A tiny model learns colour long before
  shape, so after a short run ``big-colour`` and ``left-colour`` are the ones to read.
- ``relation``: where a circle is relative to a square (same row or same column). Needs both
  objects' positions; favours Llip only if its query learns to pick the two objects.
- ``unseen-pairs``: the colour and shape of a single object, classes being the four held-out
  pairs (red/blue × circle/square): colour alone or shape alone gives 50%, chance 25%. Tests
  composition of attributes never seen together rather than memory; no edge for either model.
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np

from .scenes import COLOURS, GRID, HELD_OUT_PAIRS, SHAPES, Scene, sample_background, sample_cells, sample_object


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]  # each has one '{}' for the class name
    sample: Callable[[np.random.Generator, int], Scene]  # (rng, class index) -> a scene of that class


def _scene(rng: np.random.Generator, *objects) -> Scene:
    return Scene(tuple(objects), *sample_background(rng))


def _single_shape(rng, label):
    (row, column), = sample_cells(rng, 1)
    return _scene(rng, sample_object(rng, row, column, shape=SHAPES[label]))


def _left_colour(rng, label):
    colour = list(COLOURS)[label]
    other = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
    left, right = (sample_object(rng, int(rng.integers(GRID)), column, colour=c)
                   for column, c in ((0, colour), (GRID - 1, other)))
    return _scene(rng, left, right)


def _big_colour(rng, label):
    colour = list(COLOURS)[label]
    num_small = 1 + int(rng.integers(2))
    cells = sample_cells(rng, 1 + num_small)
    others = [c for c in COLOURS if c != colour]
    objects = [sample_object(rng, *cells[0], colour=colour, size='large')]
    objects += [sample_object(rng, *cell, colour=others[rng.integers(len(others))], size='small') for cell in cells[1:]]
    return _scene(rng, *objects)


def _big_shape(rng, label):
    shape = SHAPES[label]
    num_small = 1 + int(rng.integers(2))
    others = rng.choice([s for s in SHAPES if s != shape], size=num_small, replace=False)
    cells = sample_cells(rng, 1 + num_small)
    objects = [sample_object(rng, *cells[0], shape=shape, size='large')]
    objects += [sample_object(rng, *cell, shape=str(s), size='small') for cell, s in zip(cells[1:], others)]
    return _scene(rng, *objects)


RELATION_CLASSES = ('to the left of', 'to the right of', 'above', 'below')


def _relation(rng, label):
    """A circle and a square, in the same row (left/right) or the same column (above/below)."""
    line = int(rng.integers(GRID))
    near, far = sorted(int(i) for i in rng.choice(GRID, size=2, replace=False))
    # The circle is the nearer one (to the left or top) for 'to the left of' and 'above'.
    circle_at, square_at = (near, far) if RELATION_CLASSES[label] in ('to the left of', 'above') else (far, near)
    if label < 2:  # along a row
        circle_cell, square_cell = (line, circle_at), (line, square_at)
    else:  # along a column
        circle_cell, square_cell = (circle_at, line), (square_at, line)
    return _scene(rng, sample_object(rng, *circle_cell, shape='circle'), sample_object(rng, *square_cell, shape='square'))


UNSEEN_CLASSES = tuple(sorted(HELD_OUT_PAIRS, key=lambda pair: (SHAPES.index(pair[1]), list(COLOURS).index(pair[0]))))


def _unseen_pair(rng, label):
    colour, shape = UNSEEN_CLASSES[label]
    (row, column), = sample_cells(rng, 1)
    return _scene(rng, sample_object(rng, row, column, HELD_OUT_PAIRS, shape=shape, colour=colour))


ZERO_SHOT_TASKS = (
    ZeroShotTask('shape', SHAPES, ('a {}', 'one {}'), _single_shape),
    ZeroShotTask('left-colour', tuple(COLOURS), ('a {} shape on the left', 'a {} shape to the left of a shape'),
                 _left_colour),
    ZeroShotTask('big-colour', tuple(COLOURS), ('a large {} shape', 'a {} shape bigger than a shape'), _big_colour),
    ZeroShotTask('big-shape', SHAPES, ('a large {}', 'a {} bigger than a shape'), _big_shape),
    ZeroShotTask('relation', RELATION_CLASSES, ('a circle {} a square',), _relation),
    ZeroShotTask('unseen-pairs', tuple(f'{c} {s}' for c, s in UNSEEN_CLASSES), ('a {}', 'one {}'), _unseen_pair),
)

"""The scene model: a few coloured shapes on a coarse grid, and the relations between them.

A scene holds 1-4 objects, each in its own cell of a 3×3 grid. An object has a shape, a
colour, a size (small or large) and a cell (row 0 = top, column 0 = left); it also carries its
appearance (an offset inside its cell and a tint), so that rendering is a pure function of the
scene. Relations are read off the grid: ``a`` is to the left of ``b`` when its column is
smaller, above ``b`` when its row is smaller, bigger than ``b`` when it is large and ``b`` small.

Held out of training: the four shape-colour pairs of ``HELD_OUT_PAIRS`` (red and blue circles
and squares) appear in no training image. In training, red and blue are seen only on triangles
and crosses, and circles and squares only in the other four colours, so recognising a red
circle means composing a colour and a shape that were never seen together.
"""
from dataclasses import asdict, dataclass
from itertools import product
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'cross')
# Base RGB of each colour; each object gets a small random tint around it.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    'red': (215, 35, 35),
    'green': (35, 165, 55),
    'blue': (40, 75, 225),
    'yellow': (235, 210, 35),
    'purple': (145, 55, 190),
    'cyan': (35, 200, 215),
}
SIZES = ('small', 'large')
GRID = 3  # rows and columns
MAX_OBJECTS = 4

Pair = Tuple[str, str]  # (colour, shape)
ALL_PAIRS: FrozenSet[Pair] = frozenset(product(COLOURS, SHAPES))
HELD_OUT_PAIRS: FrozenSet[Pair] = frozenset(product(('red', 'blue'), ('circle', 'square')))
TRAIN_PAIRS: FrozenSet[Pair] = ALL_PAIRS - HELD_OUT_PAIRS

# Objects' extent as a fraction of a cell, and how far (in cells) one may move off the cell's centre.
EXTENT = {'small': 0.7, 'large': 0.95}
MAX_OFFSET = {size: 0.3 * (1 - extent) for size, extent in EXTENT.items()}
MAX_TINT = 15  # per RGB channel
BACKGROUND_GREYS = (95, 150)  # range of the background's mean grey level
MAX_GRADIENT = 10  # grey levels from the background's centre to its edge


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int  # 0 = top
    column: int  # 0 = left
    offset: Tuple[float, float] = (0., 0.)  # (x, y) from the cell's centre, in cells
    tint: Tuple[int, int, int] = (0, 0, 0)  # added to the colour's base RGB

    @property
    def pair(self) -> Pair:
        return self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    objects: Tuple[SceneObject, ...]
    background: int = 128  # mean grey level
    gradient: Tuple[float, float] = (0., 0.)  # grey levels from the centre to the right and bottom edges

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> 'Scene':
        objects = tuple(
            SceneObject(**{**obj, 'offset': tuple(obj['offset']), 'tint': tuple(obj['tint'])})
            for obj in data['objects'])
        return cls(objects, data['background'], tuple(data['gradient']))


def left_of(a: SceneObject, b: SceneObject) -> bool:
    return a.column < b.column


def above(a: SceneObject, b: SceneObject) -> bool:
    return a.row < b.row


def bigger(a: SceneObject, b: SceneObject) -> bool:
    return SIZES.index(a.size) > SIZES.index(b.size)


# Relation phrase -> whether it holds of (a, b): "a <phrase> b".
RELATIONS: Dict[str, Callable[[SceneObject, SceneObject], bool]] = {
    'to the left of': left_of,
    'to the right of': lambda a, b: left_of(b, a),
    'above': above,
    'below': lambda a, b: above(b, a),
    'bigger than': bigger,
    'smaller than': lambda a, b: bigger(b, a),
}

# Position phrase -> (row, column) it requires, None for either.
POSITIONS: Dict[str, Tuple[Optional[int], Optional[int]]] = {
    'at the top': (0, None),
    'at the bottom': (GRID - 1, None),
    'on the left': (None, 0),
    'on the right': (None, GRID - 1),
    'at the top left': (0, 0),
    'at the top right': (0, GRID - 1),
    'at the bottom left': (GRID - 1, 0),
    'at the bottom right': (GRID - 1, GRID - 1),
    'in the centre': (GRID // 2, GRID // 2),
}


def at_position(obj: SceneObject, phrase: str) -> bool:
    row, column = POSITIONS[phrase]
    return (row is None or obj.row == row) and (column is None or obj.column == column)


# Independent random streams: one per split, and within a split one per image.
STREAMS = ('train', 'shuffle', 'retrieval', 'zeroshot')


def rng_for(seed: int, stream: str, *index: int) -> np.random.Generator:
    """The generator of one image (or one shuffle) of a split: a pure function of its arguments.

    A stream must always be given the same number of indices: numpy's seeding treats a trailing 0
    as absent, so (seed, stream) and (seed, stream, 0) would draw the same numbers.
    """
    return np.random.default_rng([seed, STREAMS.index(stream), *index])


def _choice(rng: np.random.Generator, options: Sequence):
    return options[rng.integers(len(options))]


def sample_object(
        rng: np.random.Generator,
        row: int,
        column: int,
        pairs: FrozenSet[Pair] = TRAIN_PAIRS,
        shape: Optional[str] = None,
        colour: Optional[str] = None,
        size: Optional[str] = None,
) -> SceneObject:
    """An object in cell (row, column) whose (colour, shape) is in ``pairs``; unset attributes are drawn."""
    allowed = sorted(p for p in pairs if (colour is None or p[0] == colour) and (shape is None or p[1] == shape))
    if not allowed:
        raise ValueError(f'no allowed colour-shape pair has colour={colour!r}, shape={shape!r}')
    colour, shape = _choice(rng, allowed)
    size = size or _choice(rng, SIZES)
    offset = tuple(float(x) for x in rng.uniform(-MAX_OFFSET[size], MAX_OFFSET[size], size=2))
    tint = tuple(int(x) for x in rng.integers(-MAX_TINT, MAX_TINT + 1, size=3))
    return SceneObject(shape, colour, size, row, column, offset, tint)


def sample_background(rng: np.random.Generator) -> Tuple[int, Tuple[float, float]]:
    """A mean grey level and a light linear gradient (grey levels to the right and bottom edges)."""
    grey = int(rng.integers(BACKGROUND_GREYS[0], BACKGROUND_GREYS[1] + 1))
    gradient = tuple(float(x) for x in rng.uniform(-MAX_GRADIENT, MAX_GRADIENT, size=2))
    return grey, gradient


def sample_cells(rng: np.random.Generator, count: int) -> list:
    """``count`` distinct grid cells as (row, column), in random order."""
    return [divmod(int(cell), GRID) for cell in rng.choice(GRID * GRID, size=count, replace=False)]


def sample_scene(
        rng: np.random.Generator,
        num_objects: int,
        pairs: FrozenSet[Pair] = TRAIN_PAIRS,
        required: Optional[Pair] = None,
) -> Scene:
    """A scene of ``num_objects`` objects in distinct cells, all drawn from ``pairs``; one is ``required``."""
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f'a scene holds 1 to {MAX_OBJECTS} objects, not {num_objects}')
    cells = sample_cells(rng, num_objects)
    objects = []
    for index, (row, column) in enumerate(cells):
        colour, shape = required if index == 0 and required else (None, None)
        objects.append(sample_object(rng, row, column, pairs, shape=shape, colour=colour))
    return Scene(tuple(objects), *sample_background(rng))

"""Captions that each describe part of a scene, sampled so that one image gets several different ones.

Three kinds, all true of the scene they are sampled from (``Caption.holds``):

- object: one object with some of its attributes, e.g. "a red circle", "a large cross at the top
  left", "a yellow shape on the right"; true when some object matches;
- relation: two objects and a true relation, e.g. "a red triangle to the left of a square",
  "a circle bigger than a green shape"; true when some pair of distinct objects matches;
- count: how many objects match, e.g. "three shapes", "two cyan shapes", "one triangle"; true
  when exactly that many do.

The captions of one image focus on its objects in turn, so with several objects one image
vector must answer texts about different objects (what Llip's text-conditioned mixing is for).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Set, Union

import numpy as np

from .scenes import POSITIONS, RELATIONS, Pair, Scene, SceneObject, at_position

NUMBER_WORDS = ('one', 'two', 'three', 'four')
# How often each kind of caption is drawn (relations only in scenes of two objects or more).
KIND_WEIGHTS = {'object': 0.45, 'relation': 0.4, 'count': 0.15}


@dataclass(frozen=True)
class Description:
    """What a noun phrase says of one object; None where it says nothing."""
    shape: Optional[str] = None
    colour: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None  # a key of POSITIONS

    def matches(self, obj: SceneObject) -> bool:
        return ((self.shape is None or obj.shape == self.shape)
                and (self.colour is None or obj.colour == self.colour)
                and (self.size is None or obj.size == self.size)
                and (self.position is None or at_position(obj, self.position)))

    def phrase(self, plural: bool = False) -> str:
        noun = self.shape or 'shape'
        if plural:
            noun += 'es' if noun.endswith('s') else 's'  # crosses
        return ' '.join(w for w in (self.size, self.colour, noun, self.position) if w)

    @property
    def pair(self) -> Optional[Pair]:
        """The (colour, shape) this names together, if it names both."""
        return (self.colour, self.shape) if self.colour and self.shape else None


@dataclass(frozen=True)
class ObjectCaption:
    subject: Description
    kind = 'object'

    @property
    def text(self) -> str:
        return f'a {self.subject.phrase()}'

    @property
    def descriptions(self):
        return self.subject,

    def holds(self, scene: Scene) -> bool:
        return any(self.subject.matches(obj) for obj in scene.objects)


@dataclass(frozen=True)
class RelationCaption:
    subject: Description
    relation: str  # a key of RELATIONS
    other: Description
    kind = 'relation'

    @property
    def text(self) -> str:
        return f'a {self.subject.phrase()} {self.relation} a {self.other.phrase()}'

    @property
    def descriptions(self):
        return self.subject, self.other

    def holds(self, scene: Scene) -> bool:
        relation = RELATIONS[self.relation]
        subjects = [obj for obj in scene.objects if self.subject.matches(obj)]
        others = [obj for obj in scene.objects if subjects and self.other.matches(obj)]
        return any(a is not b and relation(a, b) for a in subjects for b in others)


@dataclass(frozen=True)
class CountCaption:
    number: int
    subject: Description
    kind = 'count'

    @property
    def text(self) -> str:
        return f'{NUMBER_WORDS[self.number - 1]} {self.subject.phrase(plural=self.number > 1)}'

    @property
    def descriptions(self):
        return self.subject,

    def holds(self, scene: Scene) -> bool:
        return sum(self.subject.matches(obj) for obj in scene.objects) == self.number


Caption = Union[ObjectCaption, RelationCaption, CountCaption]


def named_pairs(caption: Caption) -> Set[Pair]:
    """The (colour, shape) pairs the caption names together on one object."""
    return {d.pair for d in caption.descriptions if d.pair}


def _describe(rng: np.random.Generator, obj: SceneObject, p_shape: float, p_colour: float,
              p_size: float = 0., p_position: float = 0., bare: bool = False) -> Description:
    """Say each attribute of ``obj`` with its probability; unless ``bare``, say its shape or its colour."""
    shape = obj.shape if rng.random() < p_shape else None
    colour = obj.colour if rng.random() < p_colour or (shape is None and not bare) else None
    size = obj.size if rng.random() < p_size else None
    position = None
    if rng.random() < p_position:
        phrases = [phrase for phrase in POSITIONS if at_position(obj, phrase)]  # every cell has one
        position = phrases[rng.integers(len(phrases))]
    return Description(shape, colour, size, position)


def sample_caption(scene: Scene, focus: int, rng: np.random.Generator) -> Caption:
    """A random true caption about ``scene.objects[focus]`` (a count counts objects like it)."""
    obj = scene.objects[focus]
    kinds = [k for k in KIND_WEIGHTS if k != 'relation' or len(scene.objects) > 1]
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    if kind == 'object':
        return ObjectCaption(_describe(rng, obj, p_shape=0.8, p_colour=0.7, p_size=0.4, p_position=0.4))
    if kind == 'relation':
        others = [o for index, o in enumerate(scene.objects) if index != focus]
        other = others[rng.integers(len(others))]
        relations = [phrase for phrase, holds in RELATIONS.items() if holds(obj, other)]  # distinct cells: never empty
        relation = relations[rng.integers(len(relations))]
        return RelationCaption(_describe(rng, obj, p_shape=0.8, p_colour=0.6, p_size=0.3), relation,
                               _describe(rng, other, p_shape=0.7, p_colour=0.5, p_size=0.3, bare=True))
    subject = _describe(rng, obj, p_shape=0.5, p_colour=0.4, bare=True)
    return CountCaption(sum(subject.matches(o) for o in scene.objects), subject)


def sample_captions(
        scene: Scene,
        count: int,
        rng: np.random.Generator,
        accept: Optional[Callable[[Caption], bool]] = None,
        max_tries: int = 100,
) -> Optional[List[Caption]]:
    """``count`` captions of different texts, focusing on the scene's objects in a random order.

    ``accept`` rejects candidates (e.g. captions that are also true of another image). Returns
    None when some caption found no accepted candidate in ``max_tries`` draws.
    """
    order = rng.permutation(len(scene.objects))
    captions, texts = [], set()
    for index in range(count):
        for attempt in range(max_tries):
            # The next object in turn; should a draw be rejected, the one after it.
            caption = sample_caption(scene, int(order[(index + attempt) % len(order)]), rng)
            if caption.text not in texts and (accept is None or accept(caption)):
                break
        else:
            return None
        captions.append(caption)
        texts.add(caption.text)
    return captions

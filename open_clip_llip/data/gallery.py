"""The image-text retrieval set: scenes whose captions are each true of their own image only.

Scenes hold 3-4 objects drawn from all colour-shape pairs; every third one holds an object of a
held-out pair (``scenes.HELD_OUT_PAIRS``). Captions come from the training grammar, but a
candidate is kept only if it is false of every other scene of a pool somewhat larger than the
set, so recall@1 is well defined in both directions: each caption has one right image, and an
image's captions are right for it alone. Vague captions ("a circle", "three shapes") never pass
this test, so the set's captions are the specific ones: an object with most of its attributes,
or a relation between two well-described objects.
"""
from collections import defaultdict
from typing import List, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .captions import Caption, sample_captions
from .scenes import ALL_PAIRS, HELD_OUT_PAIRS, MAX_OBJECTS, Scene, rng_for, sample_scene

UNSEEN_EVERY = 3  # every third scene of the pool holds an object of a held-out pair
MAX_TRIES = 1000  # candidate captions per caption; most are true of other scenes too


def _pool_scene(seed: int, index: int) -> Tuple[Scene, np.random.Generator]:
    """A scene of the pool, and the generator that drew it (its captions are drawn next)."""
    rng = rng_for(seed, 'retrieval', index)
    required = sorted(HELD_OUT_PAIRS)[rng.integers(len(HELD_OUT_PAIRS))] if index % UNSEEN_EVERY == 0 else None
    return sample_scene(rng, int(rng.integers(3, MAX_OBJECTS + 1)), ALL_PAIRS, required), rng


class _Pool:
    """Scenes, indexed by the colours and shapes they contain, to find quickly where a caption is true."""

    def __init__(self, scenes: Sequence[Scene]):
        self.scenes = scenes
        self.containing = defaultdict(set)  # (colour or None, shape or None) -> indices of scenes with such an object
        for index, scene in enumerate(scenes):
            for obj in scene.objects:
                for key in ((obj.colour, obj.shape), (obj.colour, None), (None, obj.shape), (None, None)):
                    self.containing[key].add(index)

    def true_elsewhere(self, caption: Caption, index: int) -> bool:
        """Whether the caption is true of a scene other than ``scenes[index]``."""
        # Every kind of caption needs an object like each of its descriptions (counts are at least one).
        candidates = set.intersection(*(self.containing[d.colour, d.shape] for d in caption.descriptions))
        return any(caption.holds(self.scenes[other]) for other in candidates if other != index)


def sample_retrieval_set(seed: int, num_images: int, captions_per_image: int) -> List[Tuple[Scene, List[Caption]]]:
    """``num_images`` scenes, each with ``captions_per_image`` captions true of it and of no other scene."""
    scenes, generators = zip(*(_pool_scene(seed, index) for index in range(num_images + num_images // 4 + 4)))
    pool = _Pool(scenes)
    chosen = []
    with tqdm(total=num_images, desc='retrieval set', unit='image') as progress:
        for index, (scene, rng) in enumerate(zip(scenes, generators)):
            captions = sample_captions(scene, captions_per_image, rng, max_tries=MAX_TRIES,
                                       accept=lambda caption, index=index: not pool.true_elsewhere(caption, index))
            if captions is not None:
                chosen.append((scene, captions))
                progress.update()
            if len(chosen) == num_images:
                return chosen
    raise RuntimeError(
        f'found only {len(chosen)} of {num_images} retrieval images with {captions_per_image} captions true of '
        f'no other image; ask for fewer retrieval images or fewer captions per image')

"""A gallery split into shards: built by many processes at once, resumed after a kill, searched as one index.

A gallery folder holds its plan, ``gallery.json``, the first stage trained once for all its shards,
``first_stage.trained.faiss`` (``index.train_first_stage``: the prototypes and codebooks, no images), and one
folder per shard, ``shard-00000`` …, each a self-contained index (``index.write_index``: its own manifest, features,
first stage and names, openable alone with ``LlipIndex.open``) of a contiguous range of the gallery's images. The
plan records the model, the images (their count and a SHA-256 of their names), the shards' ranges and the trained
first stage's SHA-256; each shard's manifest records its range and the plan's SHA-256, so that a shard is finished
exactly when its folder holds a sealed manifest for this plan.

``build_sharded_index`` runs in every process of ``torchrun --nproc_per_node N -m open_clip_llip index build``
(or alone): process 0 writes the plan and trains the first stage on a sample of the images (``_SAMPLE_IMAGES``,
evenly spaced); then process r builds shards r, r + N, …, each with its own progress bar. With ``resume``, the
finished shards of a killed build are kept and the others built again.

``ShardedIndex`` searches the shards as one index: the first stage of every shard returns its best candidates,
which are merged by score (ties by id, as in ``LlipIndex.first_stage_search``) into the gallery's best C, and
those are re-scored in one pass, reading each from its shard: the results equal those of one index of the same
images with the same first stage (``tests/test_index_shards.py``). Image ids are the gallery's (a shard's row plus its
first id); results also say which shard each image is in.
"""
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..modeling.llip_model import LlipModel
from ..written_files import WrittenFiles, file_digest, prepare_folder
from .index import (
    _SAMPLE_IMAGES,
    DEFAULT_CODE_BYTES,
    FILES,
    GENERATOR,
    MANIFEST,
    LlipIndex,
    SearchResults,
    TwoStageSearch,
    _check_first_stage,
    _faiss,
    _model_record,
    encode_images,
    first_stage_lists,
    manifest_digest,
    read_manifest,
    text_prototypes,
    train_first_stage,
    verify_index,
    write_index,
)

PLAN, TRAINED_FIRST_STAGE = 'gallery.json', 'first_stage.trained.faiss'
# The files a gallery's plan lists (its shards keep their own manifests): all that ``overwrite`` may remove of it.
PLAN_FILES = re.compile(f"{re.escape(PLAN)}|{re.escape(TRAINED_FIRST_STAGE)}")
SHARD = re.compile(r'shard-\d{5}')


def shard_folder(number: int) -> str:
    return f'shard-{number:05d}'


def is_gallery(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` holds a gallery of shards (its plan) rather than one index."""
    return (Path(folder) / PLAN).is_file()


def _names_digest(names: Optional[Sequence[str]], count: int) -> str:
    """SHA-256 of the images' names (or of their count, without names): what tells a resumed build that its images
    are the killed build's."""
    return hashlib.sha256(json.dumps([str(name) for name in names] if names is not None else count,
                                     ensure_ascii=False).encode('utf-8')).hexdigest()


def plan_shards(count: int, shards: int) -> List[dict]:
    """``count`` images in ``shards`` contiguous ranges of sizes differing by at most one: [{folder, first_id, count}]."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= count:
        raise ValueError(f'shards must be an integer in [1, {count}] (the images); got {shards!r}.')
    bounds = [count * number // shards for number in range(shards + 1)]
    return [dict(folder=shard_folder(number), first_id=bounds[number], count=bounds[number + 1] - bounds[number])
            for number in range(shards)]


def read_plan(folder: Union[str, Path]) -> dict:
    """The plan of the gallery in ``folder``, its own SHA-256 checked; ValueError if it is damaged or names files that
    are not a gallery's own."""
    path = Path(folder) / PLAN
    try:
        plan = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise FileNotFoundError(f'{folder} holds no gallery of shards ({PLAN} not found).') from None
    except (OSError, ValueError) as error:
        raise ValueError(f'{path} is not a readable gallery plan ({error}).') from None
    if not isinstance(plan, dict) or plan.get('generator') != GENERATOR or plan.get('kind') != 'gallery':
        raise ValueError(f'{path} was not written by {GENERATOR} as a gallery plan.')
    if plan.get('sha256') != manifest_digest(plan):
        raise ValueError(f'{path}: its content does not match the SHA-256 it records: it was changed or damaged after '
                         'the gallery was planned. Build it again.')
    named = [entry.get('folder') for entry in plan.get('shards', []) if isinstance(entry, dict)]
    if not all(isinstance(name, str) and SHARD.fullmatch(name) for name in named) \
            or set(plan.get('files', {})) != {TRAINED_FIRST_STAGE}:
        raise ValueError(f'{path} names files that are not a gallery\'s own: it was edited or damaged; build the '
                         'gallery again.')
    return plan


def _shard_record(plan: dict, number: int) -> dict:
    """What shard ``number``'s manifest records of its place in the gallery planned by ``plan``."""
    return dict(number=number, shards=len(plan['shards']), first_id=plan['shards'][number]['first_id'],
                gallery_sha256=plan['sha256'])


def _finished(folder: Path, plan: dict, number: int) -> bool:
    """Whether the shard ``number`` of the gallery in ``folder`` is built: its folder holds a sealed manifest of this
    plan's shard (its files are checked when the gallery is opened)."""
    try:
        manifest = read_manifest(folder / plan['shards'][number]['folder'])
    except (OSError, ValueError):
        return False
    return manifest.get('shard') == _shard_record(plan, number)


def _remove_gallery(folder: Path):
    """Remove what a gallery build wrote in ``folder`` (each shard's files, if unchanged, then its plan and trained
    first stage; ``written_files.prepare_folder``), and nothing else, for ``overwrite``."""
    for shard in sorted(path for path in folder.iterdir() if SHARD.fullmatch(path.name) and not path.is_symlink()):
        prepare_folder(shard, MANIFEST, GENERATOR, True, FILES, what='index')
        if not any(shard.iterdir()):
            shard.rmdir()


def _train(folder: Path, model: LlipModel, images: torch.utils.data.Dataset, names: Optional[Sequence[str]],
           shards: int, batch_size: int, workers: int, precision: str, dtype: str, overwrite: bool,
           model_name: Optional[str], pretrained: Optional[str], tokenizer, prototype_texts, prototypes,
           code_bytes: int, skipped_samples: int) -> dict:
    """Plan a new gallery in ``folder`` and train its first stage (process 0): returns the plan."""
    count = len(images)
    planned = plan_shards(count, shards)
    if folder.is_dir() and is_gallery(folder) and overwrite:
        _remove_gallery(folder)
    prepare_folder(folder, PLAN, GENERATOR, overwrite, PLAN_FILES, what='gallery')
    centres = text_prototypes(model, tokenizer, prototype_texts, prototypes, precision)
    sample = np.unique(np.linspace(0, count - 1, min(count, _SAMPLE_IMAGES)).round().astype(np.int64)).tolist()
    logging.info(f'Training the first stage of {folder} on {len(sample)} of its {count} images.')
    features = torch.cat(list(encode_images(model, torch.utils.data.Subset(images, sample), batch_size, workers,
                                            precision, progress='Sample')))
    first_stage = train_first_stage(model, features.float().cpu(), centres, code_bytes)
    lists = first_stage_lists(first_stage)
    faiss = _faiss()
    with WrittenFiles(folder, PLAN_FILES, PLAN, GENERATOR) as written:
        faiss.write_index(first_stage, str(written.claim(TRAINED_FIRST_STAGE)))
        written.record(TRAINED_FIRST_STAGE)
        plan = dict(generator=GENERATOR, kind='gallery', model=model_name, pretrained=pretrained, precision=precision,
                    **_model_record(model), count=count, names_sha256=_names_digest(names, count), dtype=dtype,
                    skipped_samples=skipped_samples, shards=planned,
                    first_stage=dict(file=TRAINED_FIRST_STAGE, prototypes=lists.nlist, code_bytes=lists.pq.M),
                    files=dict(written.files))
        plan['sha256'] = manifest_digest(plan)
        written.write_text(PLAN, json.dumps(plan, indent=2, ensure_ascii=False) + '\n')
    return plan


def _resumable(folder: Path, model: LlipModel, names: Optional[Sequence[str]], count: int, shards: int,
               dtype: str) -> dict:
    """The plan of the killed build in ``folder``, checked to be this build's: ValueError naming what differs."""
    plan = read_plan(folder)
    ours = _model_record(model)
    differs = [what for what, same in (
        ('another model (config or weights)', all(plan.get(key) == value for key, value in ours.items())),
        (f'other images ({plan["count"]}; this build has {count}, or other names)',
         plan['count'] == count and plan['names_sha256'] == _names_digest(names, count)),
        (f'{len(plan["shards"])} shards (this build asks for {shards})', len(plan['shards']) == shards),
        (f'dtype {plan["dtype"]} (this build: {dtype})', plan['dtype'] == dtype)) if not same]
    if differs:
        raise ValueError(f'The gallery in {folder} was planned for {", ".join(differs)}; resume it with the same '
                         'images and options, or pass --overwrite to build it afresh.')
    path = folder / TRAINED_FIRST_STAGE
    if not path.is_file() or file_digest(path) != plan['files'][TRAINED_FIRST_STAGE]:
        raise ValueError(f'{path}: missing or changed since the gallery was planned; pass --overwrite to build it '
                         'afresh.')
    return plan


def build_sharded_index(
        folder: Union[str, Path],
        model: LlipModel,
        images: torch.utils.data.Dataset,
        names: Optional[Sequence[str]] = None,
        shards: int = 1,
        batch_size: int = 64,
        workers: int = 4,
        precision: str = 'fp32',
        dtype: str = 'float16',
        overwrite: bool = False,
        resume: bool = False,
        model_name: Optional[str] = None,
        pretrained: Optional[str] = None,
        tokenizer=None,
        prototype_texts: Optional[Sequence[str]] = None,
        prototypes: Optional[int] = None,
        code_bytes: int = DEFAULT_CODE_BYTES,
        skipped_samples: int = 0,
        rank: int = 0,
        world_size: int = 1,
        share: Optional[Callable[[object], object]] = None,
) -> Optional['ShardedIndex']:
    """Build a gallery of ``shards`` shards of ``images`` (as ``index.build_index`` takes them) in ``folder``, this
    process (``rank`` of ``world_size``) building shards rank, rank + world_size, …; returns the gallery opened, in
    process 0 (None in the others).

    ``share(value)``: process 0's ``value`` to every process (a collective: every process calls it, with its own
    value), e.g. ``torch.distributed.broadcast_object_list``; not needed alone. Process 0 plans and trains the first
    stage; the others wait for its plan. ``resume``: keep the finished shards of a killed build of the same
    images, model, shards and dtype in ``folder`` (its plan), and build the rest; ``overwrite``: replace a gallery
    (or index) this module wrote there. Otherwise ``folder`` must be new or empty. An error in any process is
    raised in every process, once all are done.
    """
    folder = Path(folder)
    if world_size > 1 and share is None:
        raise ValueError('A build spread over several processes needs share (a broadcast from process 0).')
    if resume and overwrite:
        raise ValueError('Give resume (keep the finished shards) or overwrite (build afresh), not both.')
    names = list(names) if names is not None else None
    if names is not None and len(names) != len(images):
        raise ValueError(f'{len(names)} names for {len(images)} images; give one name per image.')
    plan, error = None, None
    if rank == 0:
        try:
            plan = (_resumable(folder, model, names, len(images), shards, dtype) if resume
                    else _train(folder, model, images, names, shards, batch_size, workers, precision, dtype, overwrite,
                                model_name, pretrained, tokenizer, prototype_texts, prototypes, code_bytes,
                                skipped_samples))
        except (ValueError, OSError, TypeError) as caught:
            error = f'{type(caught).__name__}: {caught}'
    if world_size > 1:
        plan, error = share((plan, error))
    if error is not None:
        raise ValueError(f'Planning the gallery in {folder} failed: {error}')
    first_stage = _faiss().read_index(str(folder / TRAINED_FIRST_STAGE))
    _check_first_stage(first_stage, model.mixer.heads, model.mixer.out_proj.shape[0])
    failed = None
    for number in range(rank, len(plan['shards']), world_size):
        entry, shard = plan['shards'][number], folder / plan['shards'][number]['folder']
        if _finished(folder, plan, number):
            logging.info(f'Shard {number} of {folder} is built already: kept.')
            continue
        try:
            if shard.exists():  # what a killed build left of this shard
                prepare_folder(shard, MANIFEST, GENERATOR, True, FILES, what='index')
            part = torch.utils.data.Subset(images, range(entry['first_id'], entry['first_id'] + entry['count']))
            write_index(shard, model, encode_images(model, part, batch_size, workers, precision,
                                                    progress=f'Shard {number}', position=rank),
                        entry['count'], None if names is None else names[entry['first_id']:][:entry['count']], dtype,
                        False, model_name, pretrained, precision, skipped_samples=skipped_samples,
                        first_stage=first_stage, shard=_shard_record(plan, number))
        except (ValueError, OSError, TypeError) as caught:
            failed = f'shard {number}: {type(caught).__name__}: {caught}'
            break
    if world_size > 1:
        import torch.distributed as dist
        failures = [None] * world_size
        dist.all_gather_object(failures, failed)
        failed = '; '.join(failure for failure in failures if failure)
    if failed:
        raise ValueError(f'Building the gallery in {folder} failed ({failed}); fix the cause and resume the build '
                         '(--resume), which keeps the finished shards.')
    return ShardedIndex.open(folder, model, tokenizer, precision) if rank == 0 else None


def verify_gallery(folder: Union[str, Path]) -> List[str]:
    """Check the gallery in ``folder`` whole -> what is damaged or missing (empty if nothing): its plan, its trained
    first stage, and every shard (``index.verify_index``), each shard's manifest against the plan."""
    folder = Path(folder)
    plan = read_plan(folder)
    problems = []
    path = folder / TRAINED_FIRST_STAGE
    if not path.is_file():
        problems.append(f'{path}: missing.')
    elif file_digest(path) != plan['files'][TRAINED_FIRST_STAGE]:
        problems.append(f'{path}: does not match the SHA-256 the plan records: changed or damaged after the gallery '
                        'was planned.')
    for number, entry in enumerate(plan['shards']):
        if not _finished(folder, plan, number):
            problems.append(f'{folder / entry["folder"]}: not built (or not for this plan): resume the build.')
            continue
        problems += verify_index(folder / entry['folder'])
    return problems


class ShardedIndex(TwoStageSearch):
    """The shards of a gallery, opened for search as one index (``ShardedIndex.open``, or from opened shards)."""

    def __init__(self, shards: Sequence[LlipIndex], folder: Optional[Path] = None):
        if not shards:
            raise ValueError('A sharded index needs at least one shard.')
        first = shards[0]
        super().__init__(first.model, first.spec, first.tokenizer, first.precision)
        starts = [shard.manifest.get('shard', {}).get('first_id') for shard in shards]
        if starts != list(np.cumsum([0] + [len(shard) for shard in shards[:-1]])):
            raise ValueError(f'Shards must hold consecutive ranges of one gallery\'s images, in order; their first ids '
                             f'are {starts} for sizes {[len(shard) for shard in shards]}.')
        trained = {_first_stage_fingerprint(shard) for shard in shards}
        if len(trained) != 1 or len({shard.spec['dtype'] for shard in shards}) != 1:
            raise ValueError('Shards must share one trained first stage and one dtype (those of one gallery build).')
        self.shards, self.folder = list(shards), folder
        self.starts = np.array(starts + [starts[-1] + len(shards[-1])], dtype=np.int64)
        count = int(self.starts[-1])
        self.spec = dict(first.spec, shape=[count, *first.spec['shape'][1:]])

    @classmethod
    def open(cls, folder: Union[str, Path], model: LlipModel, tokenizer=None, precision: str = 'fp32'
             ) -> 'ShardedIndex':
        """Open the gallery of shards in ``folder`` for ``model`` (each shard as ``LlipIndex.open`` checks it);
        ValueError naming a shard that is not built."""
        folder = Path(folder)
        plan = read_plan(folder)
        missing = [entry['folder'] for number, entry in enumerate(plan['shards']) if not _finished(folder, plan, number)]
        if missing:
            raise ValueError(f'The gallery in {folder} is not fully built: {", ".join(missing[:5])}'
                             f'{f" and {len(missing) - 5} more" if len(missing) > 5 else ""} missing. Resume the build '
                             '(the same open_clip_llip index build command with --resume).')
        return cls([LlipIndex.open(folder / entry['folder'], model, tokenizer, precision) for entry in plan['shards']],
                   folder)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def prototypes(self) -> int:
        return self.shards[0].prototypes

    def locate(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Gallery ids -> (shard numbers, rows in those shards)."""
        ids = np.asarray(ids, dtype=np.int64)
        shards = np.searchsorted(self.starts, ids, side='right') - 1
        return shards, ids - self.starts[shards]

    def first_stage_search(self, text_features: torch.Tensor, count: int, probes: int = 1
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each shard's best ``count`` (``LlipIndex.first_stage_search``), in gallery ids, merged by score and then id:
        the gallery's ``count`` best, as one index of its images selects them."""
        self._check_probes(probes)
        scores, ids = [], []
        for start, shard in zip(self.starts, self.shards):
            found = shard.first_stage_search(text_features, min(count, len(shard)), probes)
            scores.append(found[0])
            ids.append(found[1] + int(start))
        scores, ids = torch.cat(scores, 1).numpy(), torch.cat(ids, 1).numpy()
        order = np.stack([np.lexsort((row_ids, -row_scores))[:count] for row_scores, row_ids in zip(scores, ids)])
        return (torch.from_numpy(np.take_along_axis(scores, order, 1)),
                torch.from_numpy(np.take_along_axis(ids, order, 1)))

    def read_rows(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows of the gallery images ``ids``, each read from its shard (``LlipIndex.read_rows``)."""
        shards, rows = self.locate(ids)
        out = np.empty((len(rows), *self.shards[0].features.shape[1:]), self.shards[0].features.dtype)
        for number in np.unique(shards):
            here = shards == number
            out[here] = self.shards[number].read_rows(rows[here])
        return out

    def read_block(self, start: int, stop: int) -> np.ndarray:
        return self.read_rows(np.arange(start, stop))

    def image_names(self, ids: Sequence[int]) -> Optional[List[Optional[str]]]:
        if self.shards[0].names is None:
            return None
        shards, rows = self.locate(np.maximum(np.asarray(ids, dtype=np.int64), 0))
        return [self.shards[shard].names[row] if image >= 0 else None for image, shard, row in zip(ids, shards, rows)]

    def _named_results(self, scores: torch.Tensor, ids: torch.Tensor) -> SearchResults:
        results = super()._named_results(scores, ids)
        shards = torch.from_numpy(self.locate(ids.clamp(min=0).numpy())[0]).masked_fill(ids < 0, -1)
        return results._replace(shards=shards)


def _first_stage_fingerprint(shard: LlipIndex) -> bytes:
    """The rotation, codebooks and prototypes of a shard's first stage, as bytes: equal for shards of one gallery
    build."""
    faiss = _faiss()
    rotation, lists = faiss.downcast_VectorTransform(shard.first_stage.chain.at(0)), shard.lists
    return (faiss.vector_to_array(rotation.A).tobytes() + faiss.vector_to_array(lists.pq.centroids).tobytes()
            + lists.quantizer.reconstruct_n(0, lists.nlist).tobytes())


def distributed_context() -> Tuple[int, int, Optional[Callable[[object], object]]]:
    """(rank, world size, share) of this process under ``torchrun`` (its environment), with a gloo process group
    for the build's little coordination; (0, 1, None) alone."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return 0, 1, None
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group('gloo')

    def share(value):
        carried = [value]
        dist.broadcast_object_list(carried, src=0)
        return carried[0]

    return dist.get_rank(), dist.get_world_size(), share

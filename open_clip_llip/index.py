"""Search over large galleries: a retrieval index for Llip, queried by text in two stages.

A Llip image is K keys and values whose embedding depends on the text, so no single vector per
image gives its score. The index answers a text in two stages:

1. **First stage** (FAISS, one vector per image): every image is ranked by the cosine of its
   *uniformly mixed* embedding z̄ = concat_h(mean_k value[h,k]) @ W_O with the text embedding t —
   the embedding the mixer gives when its attention is uniform (τ → ∞). With ū = concat_h(mean_k
   value[h,k]), the stored vector is x = ū / |ū W_O| (D numbers) and the query is the text's
   target p = W_O t̂ (``open_clip_llip.features``), so that <x, p> = cos(z̄, t) exactly: one inner
   product per image (``IndexFlatIP``). The conditioned z = Σ_{h,k} a·Ṽ is a convex mixture
   of the same K projected values per head that z̄ averages evenly, so images whose tokens agree
   with the text score high under both; ``scripts/bench_index.py`` measures how many of the exact
   top 10 the first stage's C best contain.
2. **Exact re-scoring** of those C candidates: the conditioned cosine cos(z[i|j], t[j]) of each
   (candidate, text) pair, equal to ``LlipModel.similarity`` on the stored features. Per pair,
   the logits and the mixture u = concat_h(Σ_k a·value) cost K·D multiply-adds each, then
   <z, t̂> = <u, p> (D) and |z| = |u @ W_O| (D²): 2·K·D + D² in all (B/16: 0.3 M), and nothing but the
   candidate's keys and values is read. The Gram route of ``scoring`` (2·K·D + (H·K)² per pair)
   would need G = Ṽ Ṽᵀ per candidate, either stored ((H·K)² numbers, 4× the keys and values at
   B/16) or recomputed ((H·K)²·D, ~100× the pair itself): for one text against a few
   candidates each, mixing is cheaper and reads the fewest bytes.

Stored per image (folder layout below): its image features [2, H, K, d] (keys and values, 2·K·D
numbers, fp16 by default: 64 KiB at B/16) in one memory-mapped ``.npy`` file, so that a gallery
larger than memory is searched by reading only the C candidates' rows; and its first-stage
vector (D float32 numbers: 2 KiB at B/16) in a FAISS flat index, held in memory.

    index.json            manifest: model, weights fingerprint, shapes, dtype, count, τ, files (SHA-256)
    image_features.npy    [N, 2, H, K, d], float16 or float32, opened memory-mapped
    first_stage.faiss     FAISS IndexFlatIP of the N first-stage vectors
    names.json            the N image names (paths), when given

Python::

    index = build_index('gallery-index', model, RetrievalImages(paths, transform), names=paths,
                        model_name='Llip-ViT-B-16', pretrained='llip_b16_k32.pt')
    index = LlipIndex.open('gallery-index', model, tokenizer)
    scores, ids = index.search(['a dog on a red sofa'], k=10, candidates=1000)   # [Q, k] each

Command: ``open_clip_llip_index build`` / ``open_clip_llip_index query`` (``python -m
open_clip_llip.index``; ``--help``).

Notation: N images, Q texts (queries), C candidates per query, K mixture tokens, H mixer heads,
D embedding width, d = D / H.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from .features import check_features, unpack_image, unpack_text
from .model import LlipModel
from .version import __version__
from .written_files import WrittenFiles, prepare_folder

GENERATOR = 'open_clip_llip.index'
MANIFEST, FEATURES, FIRST_STAGE, NAMES = 'index.json', 'image_features.npy', 'first_stage.faiss', 'names.json'
DTYPES = ('float16', 'float32')
DEFAULT_CANDIDATES = 1000
# |z| below this counts as zero, as in ``scoring``.
_EPS = 1e-12
# Elements of image features scored at once (64 MiB in fp32): bounds the memory of a block of pairs.
_BLOCK_ELEMENTS = 1 << 24
# Candidate rows read from disk at once: a queue deep enough for an SSD, which serves random reads in parallel.
_READ_THREADS = 16


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("The Llip index needs FAISS: pip install 'open_clip_llip[index]' (faiss-cpu).") from None
    return faiss


class SearchResults(NamedTuple):
    """The k best images of each query, best first: conditioned cosines and image ids (rows of the index)."""
    scores: torch.Tensor  # [Q, k], float32
    ids: torch.Tensor  # [Q, k], int64


def _scoring_dtype(model, *features: torch.Tensor) -> torch.dtype:
    """The widest of the features' dtypes and the mixer's, as ``LlipModel.similarity`` scores."""
    dtype = model.mixer.out_proj.dtype
    for tensor in features:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def first_stage_vectors(model: LlipModel, image_features: torch.Tensor) -> torch.Tensor:
    """Image features [N, 2, H, K, d] -> first-stage vectors x = ū / |ū W_O| [N, D] (float32, on the model's device).

    ū = concat_h(mean_k value[h,k]): <x, p> with a text's target p = W_O t̂ is cos(z̄, t), z̄ = ū W_O.
    """
    out_proj = model.mixer.out_proj
    values = unpack_image(image_features)[1].to(out_proj.device, torch.float32)
    mean = values.mean(dim=2).flatten(1)  # [N, D]
    return mean / (mean @ out_proj.float()).norm(dim=-1, keepdim=True).clamp_min(_EPS)


def first_stage_queries(text_features: torch.Tensor) -> torch.Tensor:
    """Text features [Q, 2, H, d] -> first-stage queries: the targets p = W_O t̂ [Q, D] (float32)."""
    return unpack_text(text_features)[1].flatten(1).float()


def _cosine_of_mixture(mixed: torch.Tensor, targets: torch.Tensor, out_proj: torch.Tensor) -> torch.Tensor:
    """Mixtures u [..., D] and targets p [..., D] -> cos(z, t) = <u, p> / |u W_O| [...]."""
    return (mixed * targets).sum(-1) / (mixed @ out_proj).norm(dim=-1).clamp_min(_EPS)


def paired_cosine(model: LlipModel, image_features: torch.Tensor, text_features: torch.Tensor,
                  temperature: Optional[float] = None) -> torch.Tensor:
    """Each text against its own images: image features [Q, C, 2, H, K, d], text features [Q, 2, H, d] -> [Q, C].

    Entry [j, c] is cos(z[i|j], t[j]) for the image ``image_features[j, c]``, as ``LlipModel.similarity``
    scores it (τ defaults to the model's), computed by mixing: 2·K·D + D² multiply-adds per pair.
    """
    if image_features.ndim != 6 or image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f'paired_cosine takes image features [Q, C, 2, H, K, d] and text features [Q, 2, H, d]; got '
                         f'{list(image_features.shape)} and {list(text_features.shape)}.')
    check_features(image_features[0], text_features)
    tau = model.temperatures(temperature)[0]
    out_proj = model.mixer.out_proj
    dtype = _scoring_dtype(model, image_features, text_features)
    image_features = image_features.to(out_proj.device, dtype)
    keys, values = image_features[:, :, 0], image_features[:, :, 1]  # [Q, C, H, K, d]
    queries, targets = unpack_text(text_features.to(out_proj.device, dtype))  # [Q, H, d]
    # One [K, d] × [d] product per (pair, head), broadcast over the candidates without copying the keys.
    attn = torch.matmul(keys, (queries / tau)[:, None, :, :, None]).softmax(dim=3)  # [Q, C, H, K, 1]
    mixed = torch.matmul(attn.transpose(-1, -2), values).flatten(2)  # [Q, C, D]
    return _cosine_of_mixture(mixed, targets.flatten(1)[:, None], out_proj.to(dtype))


def mixed_cosine(model: LlipModel, image_features: torch.Tensor, text_features: torch.Tensor,
                 temperature: Optional[float] = None) -> torch.Tensor:
    """Every image against every text by mixing: image features [N, 2, H, K, d], text features [M, 2, H, d] -> [N, M].

    The same cosines as ``LlipModel.similarity``, at 2·K·D + D² multiply-adds per pair and no Gram
    matrix ((H·K)²·D per image): the cheaper exhaustive scan for fewer than ~(H·K)²/D texts at once
    (B/16: 128). Memory: a few [N, M, D] tensors.
    """
    check_features(image_features, text_features)
    tau = model.temperatures(temperature)[0]
    out_proj = model.mixer.out_proj
    dtype = _scoring_dtype(model, image_features, text_features)
    keys, values = unpack_image(image_features.to(out_proj.device, dtype))  # [N, H, K, d]
    queries, targets = unpack_text(text_features.to(out_proj.device, dtype))  # [M, H, d]
    attn = torch.einsum('nhkd,mhd->nhmk', keys, queries / tau).softmax(dim=-1)  # one [N·K, d] × [d, M] per head
    mixed = torch.matmul(attn, values).permute(0, 2, 1, 3).flatten(2)  # [N, H, M, d] -> [N, M, D]
    return _cosine_of_mixture(mixed, targets.flatten(1), out_proj.to(dtype))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict, floating tensors rounded to bfloat16.

    The rounding makes one checkpoint give one fingerprint in fp32, under autocast and in bf16; a model
    cast to fp16 rounds differently and gets another.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _model_record(model: LlipModel) -> dict:
    return dict(llip_cfg=model.llip_cfg.to_dict(), embed_dim=model.mixer.out_proj.shape[0],
                weights_sha256=weights_fingerprint(model))


def write_index(
        folder: Union[str, Path],
        model: LlipModel,
        image_features: Iterable[torch.Tensor],
        count: int,
        names: Optional[Sequence[str]] = None,
        dtype: str = 'float16',
        overwrite: bool = False,
        model_name: Optional[str] = None,
        pretrained: Optional[str] = None,
        precision: str = 'fp32',
) -> Path:
    """Write an index of ``count`` images from batches of their image features [n, 2, H, K, d] into ``folder``.

    ``folder`` must be new or empty; with ``overwrite``, an index this module wrote there is replaced
    (its files, if unchanged, and nothing else). ``names``: one per image, kept for the results.
    ``model_name``, ``pretrained`` and ``precision`` are recorded so that ``open_clip_llip_index query``
    can load the model again. A failed write removes what it wrote. Returns the manifest's path.
    """
    faiss = _faiss()
    if not isinstance(model, LlipModel):
        raise TypeError(f'A Llip index is built with a LlipModel; got {type(model).__name__}.')
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {", ".join(DTYPES)}; got {dtype!r}.')
    if count < 1:
        raise ValueError(f'An index needs at least one image; got {count}.')
    if names is not None and len(names) != count:
        raise ValueError(f'{len(names)} names for {count} images; give one name per image.')
    heads, tokens, width = model.mixer.heads, model.llip_cfg.mixture_tokens, model.mixer.out_proj.shape[0]
    shape = (count, 2, heads, tokens, width // heads)
    folder = Path(folder)
    prepare_folder(folder, MANIFEST, GENERATOR, overwrite)
    with WrittenFiles(folder) as written:
        stored = np.lib.format.open_memmap(written.claim(FEATURES), mode='w+', dtype=dtype, shape=shape)
        first_stage = faiss.IndexFlatIP(width)
        done = 0
        for batch in image_features:
            if tuple(batch.shape[1:]) != shape[1:] or done + len(batch) > count:
                raise ValueError(f'Image features of shape {list(batch.shape)} after {done} images: expected batches '
                                 f'[n, {", ".join(map(str, shape[1:]))}] of {count} images in all.')
            rows = batch.detach().to('cpu', getattr(torch, dtype))
            if not torch.isfinite(rows).all():
                raise ValueError(f'Images {done} to {done + len(batch) - 1} have non-finite features in {dtype} '
                                 '(NaN, or too large for float16: use dtype float32).')
            stored[done:done + len(rows)] = rows.numpy()
            with torch.inference_mode():
                first_stage.add(first_stage_vectors(model, rows).cpu().numpy())
            done += len(rows)
        if done != count:
            raise ValueError(f'Got the features of {done} images; expected {count}.')
        stored.flush()
        del stored
        written.record(FEATURES)
        faiss.write_index(first_stage, str(written.claim(FIRST_STAGE)))
        written.record(FIRST_STAGE)
        if names is not None:
            written.write_text(NAMES, json.dumps([str(name) for name in names], ensure_ascii=False))
        manifest = dict(
            generator=GENERATOR, version=__version__, model=model_name, pretrained=pretrained, precision=precision,
            **_model_record(model), temperature=model.mixer.temperature, count=count,
            image_features=dict(file=FEATURES, shape=list(shape), dtype=dtype),
            first_stage=dict(file=FIRST_STAGE, faiss='IndexFlatIP', vector='concat_h(mean_k value) / |… @ W_O|',
                             query='W_O t̂'),
            names=NAMES if names is not None else None)
        manifest['files'] = dict(written.files)  # written last: a folder with a manifest holds a whole index
        return written.write_text(MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + '\n')


def build_index(
        folder: Union[str, Path],
        model: LlipModel,
        images: torch.utils.data.Dataset,
        names: Optional[Sequence[str]] = None,
        batch_size: int = 64,
        workers: int = 4,
        precision: str = 'fp32',
        dtype: str = 'float16',
        overwrite: bool = False,
        model_name: Optional[str] = None,
        pretrained: Optional[str] = None,
        tokenizer=None,
) -> 'LlipIndex':
    """Encode ``images`` (a dataset of transformed image tensors [3, h, w], such as ``eval_data.RetrievalImages``)
    with ``model`` on its device at ``precision`` (progress shown), write the index (``write_index``) and open it."""
    import open_clip
    from open_clip_train.precision import get_autocast
    from torch.utils.data import DataLoader

    device = model.mixer.out_proj.device
    autocast = get_autocast(precision, device_type=device.type)
    input_dtype = open_clip.get_input_dtype(precision)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=device.type == 'cuda')

    @torch.inference_mode()  # a decorated generator: the mode holds while it runs, not across its yields
    def encoded():
        for batch in tqdm(loader, desc='Images', unit='batch'):
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f'The dataset must give image tensors; it gave {type(batch).__name__} batches.')
            with autocast():
                features = model.encode_image(batch.to(device=device, dtype=input_dtype))
            yield features

    logging.info(f'Indexing {len(images)} images into {folder} ({dtype} features, {precision} on {device}).')
    write_index(folder, model, encoded(), len(images), names, dtype, overwrite, model_name, pretrained, precision)
    return LlipIndex.open(folder, model, tokenizer, precision)


def read_manifest(folder: Union[str, Path]) -> dict:
    """The manifest of the index in ``folder``; FileNotFoundError or ValueError if there is none."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise FileNotFoundError(f'Index folder {folder} not found.')
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise FileNotFoundError(f'{folder} holds no Llip index ({MANIFEST} not found): build one with '
                                'open_clip_llip_index build.') from None
    except (OSError, ValueError) as error:
        raise ValueError(f'{path} is not a readable index manifest ({error}).') from None
    if not isinstance(manifest, dict) or manifest.get('generator') != GENERATOR:
        raise ValueError(f'{path} was not written by {GENERATOR}.')
    return manifest


class LlipIndex:
    """A Llip index opened for search with the model it was built with (``LlipIndex.open``)."""

    def __init__(self, folder: Path, manifest: dict, features: np.ndarray, first_stage, names: Optional[List[str]],
                 model: LlipModel, tokenizer=None, precision: str = 'fp32'):
        from open_clip_train.precision import get_autocast
        self.folder, self.manifest, self.features, self.first_stage = folder, manifest, features, first_stage
        self.names, self.model, self.tokenizer, self.precision = names, model, tokenizer, precision
        self.autocast = get_autocast(precision, device_type=model.mixer.out_proj.device.type)

    @classmethod
    def open(cls, folder: Union[str, Path], model: LlipModel, tokenizer=None, precision: str = 'fp32') -> 'LlipIndex':
        """Open the index in ``folder`` for ``model``, which must be the model it was built with (config and weights).

        The image features are memory-mapped (read only where searched), the first stage loaded. ``tokenizer``
        is needed to search by strings; ``precision`` is the one texts are encoded at.
        """
        faiss = _faiss()
        folder = Path(folder)
        manifest = read_manifest(folder)
        if not isinstance(model, LlipModel):
            raise TypeError(f'A Llip index is searched with a LlipModel; got {type(model).__name__}.')
        ours, theirs = _model_record(model), {key: manifest.get(key) for key in ('llip_cfg', 'embed_dim', 'weights_sha256')}
        built_with = f"{manifest.get('model')} (pretrained {manifest.get('pretrained')})"
        if (ours['llip_cfg'], ours['embed_dim']) != (theirs['llip_cfg'], theirs['embed_dim']):
            raise ValueError(f"The index in {folder} was built with {built_with}: embed_dim {theirs['embed_dim']}, "
                             f"llip_cfg {theirs['llip_cfg']}; this model has embed_dim {ours['embed_dim']}, llip_cfg "
                             f"{ours['llip_cfg']}. Search it with the model it was built with.")
        if ours['weights_sha256'] != theirs['weights_sha256']:
            raise ValueError(f'The index in {folder} was built with other weights ({built_with}) than this model has: '
                             'its scores would be meaningless. Search it with the weights it was built with (loaded in '
                             'fp32, bf16 or under autocast), or build an index with these.')
        spec = manifest['image_features']
        try:
            features = np.load(folder / spec['file'], mmap_mode='r')
            first_stage = faiss.read_index(str(folder / manifest['first_stage']['file']))
            names = json.loads((folder / manifest['names']).read_text(encoding='utf-8')) if manifest['names'] else None
        except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: FAISS could not read its file
            raise ValueError(f'The index in {folder} is damaged or incomplete ({error}); build it again.') from None
        count = manifest['count']
        if list(features.shape) != spec['shape'] or features.dtype != spec['dtype'] or first_stage.ntotal != count \
                or (names is not None and len(names) != count):
            raise ValueError(f'The files of the index in {folder} do not match its manifest ({count} images of '
                             f'features {spec["shape"]} {spec["dtype"]}); build it again.')
        return cls(folder, manifest, features, first_stage, names, model, tokenizer, precision)

    def read_rows(self, ids: np.ndarray) -> np.ndarray:
        """Stored image features of the images ``ids`` [n, 2, H, K, d].

        One positioned read per row, ``_READ_THREADS`` at a time, rather than faulting the rows in through
        the memory map: from a cold page cache, page faults fetch a row's pages a few at a time, ~10× slower
        (this machine). Where ``os.preadv`` is missing, the map is read.
        """
        if not hasattr(os, 'preadv'):
            return np.array(self.features[ids])
        rows = np.empty((len(ids), *self.features.shape[1:]), self.features.dtype)
        row_bytes = self.features[0].nbytes
        buffers = rows.view(np.uint8).reshape(len(ids), row_bytes)
        with open(self.folder / self.manifest['image_features']['file'], 'rb') as file, \
                ThreadPoolExecutor(_READ_THREADS) as pool:
            read = sum(pool.map(lambda j: os.preadv(file.fileno(), [buffers[j]],
                                                    self.features.offset + int(ids[j]) * row_bytes), range(len(ids))))
        if read != len(ids) * row_bytes:
            raise ValueError(f'The features file of the index in {self.folder} is shorter than its manifest says; '
                             'build it again.')
        return rows

    def __len__(self) -> int:
        return self.manifest['count']

    def encode_texts(self, texts: Union[Sequence[str], torch.Tensor]) -> torch.Tensor:
        """Strings (with the tokenizer given to ``open``) or token ids [Q, L] -> text features [Q, 2, H, d]."""
        if not len(texts):
            raise ValueError('A search needs at least one text; got none.')
        if not isinstance(texts, torch.Tensor):
            if isinstance(texts, str):
                texts = [texts]
            if self.tokenizer is None:
                raise ValueError('Searching by strings needs a tokenizer: LlipIndex.open(folder, model, tokenizer), '
                                 'or pass token ids.')
            texts = self.tokenizer(list(texts))
        with torch.inference_mode(), self.autocast():
            return self.model.encode_text(texts.to(self.model.mixer.out_proj.device))

    def search(self, texts: Union[Sequence[str], torch.Tensor], k: int = 10,
               candidates: int = DEFAULT_CANDIDATES) -> SearchResults:
        """The k best images for each text (strings or token ids [Q, L]): the first stage's ``candidates`` best,
        re-scored exactly (``search_features``)."""
        return self.search_features(self.encode_texts(texts), k, candidates)

    def search_features(self, text_features: torch.Tensor, k: int = 10,
                        candidates: int = DEFAULT_CANDIDATES) -> SearchResults:
        """Text features [Q, 2, H, d] -> the k best images of each by conditioned cosine, among the first stage's
        ``candidates`` best (all images when ``candidates`` ≥ the index's size)."""
        self._check_query(text_features, k)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
            raise ValueError(f'candidates must be an integer of at least k = {k}; got {candidates!r}.')
        return self.rescore(text_features, self.first_stage_candidates(text_features, min(candidates, len(self))), k)

    def first_stage_candidates(self, text_features: torch.Tensor, candidates: int) -> torch.Tensor:
        """Text features [Q, 2, H, d] -> the ids of each text's ``candidates`` best images by first-stage score [Q, C]."""
        _, ids = self.first_stage.search(np.ascontiguousarray(first_stage_queries(text_features).cpu().numpy()),
                                         candidates)
        return torch.from_numpy(ids)

    def rescore(self, text_features: torch.Tensor, candidates: torch.Tensor, k: int) -> SearchResults:
        """Text features [Q, 2, H, d] and image ids [Q, C] -> the k best of each text's C images by exact conditioned
        cosine. Each text's images are read from the stored features in increasing order, in blocks (``read_rows``)."""
        self._check_query(text_features, k)
        if candidates.ndim != 2 or len(candidates) != len(text_features) or candidates.shape[1] < k:
            raise ValueError(f'candidates must be image ids [Q, C ≥ k] for the {len(text_features)} texts; got '
                             f'{list(candidates.shape)}.')
        if candidates.numel() and not (0 <= candidates.min() and candidates.max() < len(self)):
            raise ValueError(f'Image ids must lie in [0, {len(self)}).')
        block = max(1, _BLOCK_ELEMENTS // int(np.prod(self.features.shape[1:])))
        scores, ids = [], []
        with torch.inference_mode():  # no autocast: scores in the precision of the features and the mixer
            for query, rows in zip(text_features, candidates):
                rows = rows.sort().values
                cosines = torch.cat([
                    paired_cosine(self.model, torch.from_numpy(self.read_rows(chunk.numpy()))[None], query[None])[0]
                    for chunk in rows.split(block)]).float().cpu()
                best = cosines.topk(k)
                scores.append(best.values)
                ids.append(rows[best.indices])
        return SearchResults(torch.stack(scores), torch.stack(ids))

    def exhaustive_search(self, text_features: torch.Tensor, k: int = 10) -> SearchResults:
        """The exact k best images of each text, every stored image scored (``mixed_cosine``, in blocks): what the
        two stages approximate, at the cost of reading and scoring the whole gallery."""
        self._check_query(text_features, k)
        count, block = len(self), max(1, _BLOCK_ELEMENTS // (int(np.prod(self.features.shape[1:])) * len(text_features)))
        best = SearchResults(torch.empty(len(text_features), 0), torch.empty(len(text_features), 0, dtype=torch.long))
        with torch.inference_mode():
            for start in tqdm(range(0, count, block), desc='Exhaustive', unit='block', disable=count <= block):
                features = torch.from_numpy(np.array(self.features[start:start + block]))  # a copy: the map is read-only
                scores = torch.cat([best.scores, mixed_cosine(self.model, features, text_features).T.float().cpu()], 1)
                ids = torch.cat([best.ids, torch.arange(start, start + len(features)).expand(len(text_features), -1)], 1)
                top = scores.topk(min(k, scores.shape[1]))
                best = SearchResults(top.values, ids.gather(1, top.indices))
        return best

    def _check_query(self, text_features: torch.Tensor, k: int):
        heads, width = self.features.shape[2], self.features.shape[2] * self.features.shape[4]
        if text_features.ndim != 4 or tuple(text_features.shape[1:]) != (2, heads, width // heads) \
                or not len(text_features):
            raise ValueError(f'Text features must be [Q ≥ 1, 2, {heads}, {width // heads}] (LlipModel.encode_text); '
                             f'got {list(text_features.shape)}.')
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f'k must be an integer in [1, {len(self)}] (the images in the index); got {k!r}.')


def list_images(path: Union[str, Path]) -> Tuple[List[str], list]:
    """The images to index, as (names, sources for ``eval_data.RetrievalImages``): every image file under a folder
    (sorted), or the images of a retrieval CSV or webdataset shards (``eval_data.read_retrieval_set``)."""
    from .eval_data import SHARD_IMAGE_EXTENSIONS, ShardMember, read_retrieval_set

    if Path(path).is_dir():
        images = sorted(str(file) for file in Path(path).rglob('*')
                        if file.is_file() and file.suffix[1:].lower() in SHARD_IMAGE_EXTENSIONS)
        if not images:
            raise ValueError(f'{path} holds no image files ({", ".join(SHARD_IMAGE_EXTENSIONS)}).')
        return images, images
    images = read_retrieval_set(str(path)).images
    return [f'{image.shard}:{image.name}' if isinstance(image, ShardMember) else image for image in images], images


def _absolute(spec: Optional[str]) -> Optional[str]:
    """A model or checkpoint given as a path, made absolute so that the index finds it from any folder."""
    if spec is None:
        return None
    schema = 'local-dir:' if spec.startswith('local-dir:') else ''
    path = Path(spec[len(schema):])
    return f'{schema}{path.resolve()}' if schema or path.is_file() else spec


def _load(args):
    """Model, transform and tokenizer of ``--model``/``--pretrained``; ValueError unless a Llip model."""
    from .evaluation import load_model
    model, transform, tokenizer = load_model(args.model, args.pretrained, args.precision, args.device)
    if not isinstance(model, LlipModel):
        raise ValueError(f"--model {args.model} is not a Llip model; a Llip index needs one.")
    return model, transform, tokenizer


def _build(args):
    from .eval_data import RetrievalImages
    names, images = list_images(args.images)
    model, transform, tokenizer = _load(args)
    index = build_index(args.output, model, RetrievalImages(images, transform), names, args.batch_size, args.workers,
                        args.precision, args.dtype, args.overwrite, model_name=_absolute(args.model),
                        pretrained=_absolute(args.pretrained), tokenizer=tokenizer)
    print(f'Indexed {len(index)} images into {args.output}.')


def _query(args):
    manifest = read_manifest(args.index)
    args.model = args.model or manifest['model']
    args.pretrained = args.pretrained or manifest['pretrained']
    if args.model is None:
        raise ValueError(f'The index in {args.index} does not record its model: give --model (and --pretrained).')
    model, _, tokenizer = _load(args)
    index = LlipIndex.open(args.index, model, tokenizer, args.precision)
    results = index.search(args.texts, args.k, args.candidates)
    for text, scores, ids in zip(args.texts, results.scores.tolist(), results.ids.tolist()):
        print(f'{text}')
        for rank, (score, image) in enumerate(zip(scores, ids), 1):
            name = f'\t{index.names[image]}' if index.names is not None else ''
            print(f'{rank:4d}\t{score:.4f}\t{image}{name}')


def parse_args(argv: List[str]) -> argparse.Namespace:
    from .eval import PRECISIONS
    parser = argparse.ArgumentParser(prog='open_clip_llip_index', description='Build a Llip retrieval index of images, '
                                     'or search one by text.')
    commands = parser.add_subparsers(dest='command', required=True)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'

    build = commands.add_parser('build', help='encode images into a new index folder',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument('output', type=Path, help='the index folder to create (new or empty; see --overwrite)')
    build.add_argument('--images', required=True,
                       help='a folder of images (searched recursively), a retrieval CSV (filepath column) or '
                            'webdataset shards (.tar, or a brace pattern)')
    build.add_argument('--model', required=True, help='what open_clip_llip_eval takes: a Llip config name, '
                                                       'local-dir:DIR, hf-hub:REPO or a JSON config file')
    build.add_argument('--pretrained', help='weights: a checkpoint file or a pretrained tag')
    build.add_argument('--batch-size', type=int, default=64)
    build.add_argument('--workers', type=int, default=4, help='data loader workers')
    build.add_argument('--dtype', choices=DTYPES, default='float16', help='how the image features are stored')
    build.add_argument('--overwrite', action='store_true', help='replace an index this command wrote in OUTPUT')

    query = commands.add_parser('query', help='the best images of an index for each text',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    query.add_argument('index', type=Path, help='an index folder written by open_clip_llip_index build')
    query.add_argument('texts', nargs='+', metavar='TEXT')
    query.add_argument('--k', type=int, default=10, help='images per text')
    query.add_argument('--candidates', type=int, default=DEFAULT_CANDIDATES,
                       help='first-stage candidates per text, re-scored exactly')
    query.add_argument('--model', help="default: the index's (another path to the same model)")
    query.add_argument('--pretrained', help="default: the index's")
    for sub in (build, query):
        sub.add_argument('--device', default=device)
        sub.add_argument('--precision', choices=PRECISIONS, default='fp32')
    args = parser.parse_args(argv)
    if args.command == 'build' and (args.batch_size < 1 or args.workers < 0):
        build.error('--batch-size must be at least 1 and --workers at least 0')
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    try:
        _build(args) if args.command == 'build' else _query(args)
    except (ValueError, OSError, ImportError) as error:  # bad input: say what is wrong, without a traceback
        sys.exit(f'open_clip_llip_index {args.command}: error: {error}')


if __name__ == '__main__':
    main()

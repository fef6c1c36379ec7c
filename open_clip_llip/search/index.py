"""Search over large galleries: a retrieval index for Llip, queried by text in two stages.

A Llip image is K keys and values whose embedding depends on the text, so no single vector per
image gives its score. The index answers a text in two stages:

1. **First stage** (FAISS): every image is ranked by the cosine with the text of its mixture for a
   *prototype query* near the text's own. Llip's attention — and so an image's embedding — depends
   on the text's raw query q, so a single vector per image ranks by an embedding the model never
   scores with: the uniformly mixed one, which is what the zero query gives (a = 1/K), is far from the
   conditioned mixtures of a trained model (``scripts/bench_index.py``). The index therefore holds P prototype
   queries c (k-means centres of the queries of a sample of texts: ``prototype_queries``; by default the zero
   query alone) and, per image and prototype, its unit embedding y[c] = z / |z|, z = u[c] W_O with
   u[c] = concat_h(Σ_k softmax_k(<key[h,k], c_h>/τ) value[h,k]), so that <y[c], t̂> = cos(z, t) for a text's unit
   embedding t̂ (``text_directions``). In FAISS this is an ``IndexIVFPQ`` behind an ``OPQMatrix`` rotation: its
   coarse quantizer holds the prototypes, and list c holds every image's y[c], rotated, as a product-quantizer code
   of ``code_bytes`` bytes (and an 8-byte id); the rotation and codebooks are trained once on a sample
   (``train_first_stage``), the lists filled with ``add_preassigned``. A text is routed to the ``probes``
   prototypes nearest its raw query q (L2) and only their lists are scanned: one table look-up per code byte,
   image and probe.
2. **Exact re-scoring** of those C candidates: the conditioned cosine cos(z[i|j], t[j]) of each
   (candidate, text) pair, equal to ``LlipModel.similarity`` on the stored features. Per pair,
   the logits and the mixture u = concat_h(Σ_k a·value) cost K·D multiply-adds each, then
   <z, t̂> = <u, p> (D) and |z| = |u @ W_O| (D²): 2·K·D + D² in all (B/16: 0.3 M), and nothing but the
   candidate's keys and values is read. The Gram route of ``scoring`` (2·K·D + (H·K)² per pair)
   would need G = Ṽ Ṽᵀ per candidate, either stored ((H·K)² numbers, 4× the keys and values at
   B/16) or recomputed ((H·K)²·D, ~100× the pair itself): for one text against a few
   candidates each, mixing is cheaper and reads the fewest bytes.

Stored per image (folder layout below): its image features [2, H, K, d] (keys and values, 2·K·D
numbers, fp16 by default: 64 KiB at B/16; int8 with a float16 scale per vector: 33 KiB) in one memory-mapped
``.npy`` file, so that a gallery larger than memory is searched by reading only the C candidates' rows; and its
first-stage codes (P · (code_bytes + 8) bytes: 6 KiB at the default P = 256 and 16 bytes) in a FAISS file,
memory-mapped too.

    index.json            manifest: model, weights fingerprint, shapes, dtype, count, τ, files (SHA-256), the
                          SHA-256 of each block of feature rows, and its own SHA-256
    image_features.npy    [N, 2, H, K, d], float16 or float32 (int8: [N] records of codes and scales), memory-mapped
    first_stage.faiss     FAISS OPQMatrix + IndexIVFPQ: the P prototype queries (its quantizer), list c the N codes
                          of y[c]
    names.json            the N image names (paths), when given

Python::

    index = build_index('gallery-index', model, RetrievalImages(paths, transform), names=paths,
                        model_name='Llip-ViT-B-16', pretrained='llip_b16_k32.pt', tokenizer=tokenizer,
                        prototype_texts=captions)   # captions: a sample of texts like the queries
    index = LlipIndex.open('gallery-index', model, tokenizer)
    results = index.search(['a dog on a red sofa'], k=10)   # .scores, .ids [Q, k]; .names
    results.records(texts)   # per query: rank, id, name, score (JSON-ready)

Command: ``open_clip_llip index build|query|verify`` (``commands/index.py``; ``--help``). A gallery split into
shards, built by many processes: ``shards.py``.

Integrity: ``LlipIndex.open`` checks the manifest's own SHA-256 and every file's but the features' (small:
the first stage and the names) before reading them, and the features file's size and header; a search
checks each block of ``feature_blocks.rows`` feature rows against its SHA-256 the first time it reads a row
of it (so a row's first read costs its block's, ``_HASH_BLOCK_BYTES``). ``verify_index`` (``open_clip_llip
index verify``) checks everything and names each damaged file and block. An index written before block
hashes checks its features file whole on open. Images whose features or scores are not finite are never
ranked: refused at build, left out of results (with a warning) at search.

Notation: N images, Q texts (queries), C candidates per query, P prototype queries, K mixture tokens,
H mixer heads, D embedding width, d = D / H.
"""
import hashlib
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..evaluation.retrieval import encode_texts
from ..modeling.features import check_features, unpack_image, unpack_text
from ..modeling.llip_model import LlipModel
from ..modeling.scoring import Temperature, attention, mixture_cosine, scoring_dtype, single_temperature
from ..version import __version__
from ..written_files import WrittenFiles, file_digest, prepare_folder

# What an index's manifest records as its writer, and ``--overwrite`` looks for: kept as it was when the index
# module was ``open_clip_llip.index``, so that index folders written before keep being recognised.
GENERATOR = 'open_clip_llip.index'
MANIFEST, FEATURES, FIRST_STAGE, NAMES = 'index.json', 'image_features.npy', 'first_stage.faiss', 'names.json'
# What the manifest calls the first stage FAISS holds (``new_first_stage``).
FIRST_STAGE_KIND = 'IndexPreTransform(OPQMatrix, IndexIVFPQ)'
# Every file an index is: all that ``overwrite`` may remove.
FILES = re.compile('|'.join(re.escape(name) for name in (MANIFEST, FEATURES, FIRST_STAGE, NAMES)))
DTYPES = ('float16', 'float32', 'int8')
DEFAULT_CANDIDATES = 1500
DEFAULT_PROTOTYPES = 256
# Bytes of a first-stage code (product-quantizer sub-vectors of 8 bits): with an id (8 bytes) per prototype and
# image, P = 256 prototypes cost 6 KiB per image.
DEFAULT_CODE_BYTES = 16
# First-stage vectors the codebooks are trained on: 256 per centroid of an 8-bit sub-quantizer.
_TRAINING_VECTORS = 1 << 16
# Images whose first-stage vectors the codebooks are trained on, at most.
_SAMPLE_IMAGES = 4096
# Elements of image features scored at once (64 MiB in fp32): bounds the memory of a block of pairs.
_BLOCK_ELEMENTS = 1 << 24
# Elements of candidates' features re-scored at once (16 MiB in fp32; 128 rows at B/16): few enough that their
# float32 copy is still in cache when it is scored (~40% faster than 512 rows at a time here).
_RESCORE_ELEMENTS = 1 << 22
# Texts encoded at once.
_TEXT_BATCH = 1024
# Candidate rows read from disk at once: a queue deep enough for an SSD, which serves random reads in parallel.
_READ_THREADS = 16
# Bytes of feature rows hashed together (SHA-256 per block in the manifest): large enough that a gallery's manifest
# stays small (~70 bytes per MiB of features), small enough that verifying a candidate's block on its first read
# costs little more than reading the row.
_HASH_BLOCK_BYTES = 1 << 20


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("The Llip index needs FAISS: pip install 'open_clip_llip[index]' (faiss-cpu).") from None
    return faiss


class SearchResults(NamedTuple):
    """The k best images of each query, best first: conditioned cosines, image ids (rows of the index) and the
    images' names (where the index has them); where fewer than k images have finite features and scores, the rest
    are id −1 with score −inf and no name."""
    scores: torch.Tensor  # [Q, k], float32
    ids: torch.Tensor  # [Q, k], int64
    names: Optional[List[List[Optional[str]]]] = None  # [Q][k]; None where the index has no names
    shards: Optional[torch.Tensor] = None  # [Q, k], int64: the shard each image is in (a gallery of shards), else None

    def records(self, texts: Optional[Sequence[str]] = None) -> List[dict]:
        """The results as plain data (``json.dumps`` writes them): per query ``{'query': text, 'results': [{'rank':
        1, 'id': …, 'name': …, 'score': …, 'shard': …}, …]}``, best first, rank from 1, ``'query'`` only with
        ``texts``, ``'shard'`` only for a gallery of shards; places with id −1 (fewer than k rankable images) left
        out."""
        records = []
        for query, (scores, ids) in enumerate(zip(self.scores.tolist(), self.ids.tolist())):
            results = [dict(rank=rank, id=image, name=None if self.names is None else self.names[query][rank - 1],
                            score=score, **({} if self.shards is None else dict(shard=int(self.shards[query, rank - 1])))
                            ) for rank, (score, image) in enumerate(zip(scores, ids), 1) if image >= 0]
            records.append(dict(query=texts[query], results=results) if texts is not None else dict(results=results))
        return records


def first_stage_vectors(model: LlipModel, image_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Image features [N, 2, H, K, d] and prototype queries [P, H, d] -> first-stage vectors [N, P, D] (float32,
    on the model's device).

    Entry [i, c] is the unit embedding z / |z|, z = u W_O, of image i mixed for the prototype query c:
    u = concat_h(Σ_k softmax_k(<key[h,k], c_h>/τ) value[h,k]) (τ: the model's), so that <z / |z|, t̂> is the cosine
    of that embedding and a text's (``text_directions``). The zero query gives uniform attention:
    u = concat_h(mean_k value).
    """
    out_proj = model.mixer.out_proj.float()
    keys, values = (part.to(out_proj.device, torch.float32) for part in unpack_image(image_features))
    weights = model.mixer.attention(keys, prototypes.to(keys))  # [N, P, H, K]
    return F.normalize(torch.einsum('nphk,nhkd->nphd', weights, values).flatten(2) @ out_proj, dim=-1)  # [N, P, D]


def text_directions(model: LlipModel, text_features: torch.Tensor) -> torch.Tensor:
    """Text features [Q, 2, H, d] -> the texts' unit embeddings t̂ [Q, D] (float32): their targets p = W_O t̂
    (``modeling.features``) solved for t̂, W_O being invertible (ValueError if it is not)."""
    out_proj = model.mixer.out_proj.detach().float().cpu()
    targets = unpack_text(text_features)[1].flatten(1).float().cpu()
    try:
        return torch.linalg.solve(out_proj, targets.T).T
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        raise ValueError("The mixer's output projection W_O is singular: a text's unit embedding cannot be recovered "
                         'from its features, which the first stage scores with. Check the model.') from None


def prototype_queries(text_features: torch.Tensor, count: int) -> torch.Tensor:
    """Text features [M, 2, H, d] of a sample of texts -> ``count`` prototype queries [count, H, d] (float32): the
    k-means centres (FAISS, seeded) of their raw mixer queries q."""
    faiss = _faiss()
    queries = np.ascontiguousarray(unpack_text(text_features)[0].flatten(1).float().cpu().numpy())
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(queries):
        raise ValueError(f'{len(queries)} texts give at most {len(queries)} prototypes; got {count!r}. Give more '
                         'texts (a sample like the queries to come, ideally 40 or more per prototype) or fewer '
                         'prototypes.')
    kmeans = faiss.Kmeans(queries.shape[1], count, niter=25, seed=0)
    kmeans.train(queries)
    return torch.from_numpy(kmeans.centroids).view(count, *text_features.shape[2:])


def new_first_stage(prototypes: torch.Tensor, code_bytes: int):
    """An empty, untrained first stage for prototype queries [P, H, d]: FAISS's ``IndexPreTransform`` of an
    ``OPQMatrix`` (a learnt rotation, so that the code's sub-vectors carry equal parts of a vector) and an
    ``IndexIVFPQ`` (inner product) whose quantizer holds the prototypes, flattened, and routes a text by its raw
    query q, and whose list c is to hold every image's z / |z| for prototype c, rotated, as a product-quantizer
    code of ``code_bytes`` sub-vectors of 8 bits each. ``train_first_stage`` trains the rotation and codebooks."""
    faiss = _faiss()
    width = prototypes[0].numel()
    quantizer = faiss.IndexFlatL2(width)
    quantizer.add(np.ascontiguousarray(prototypes.detach().flatten(1).float().cpu().numpy()))
    lists = faiss.IndexIVFPQ(quantizer, width, len(prototypes), code_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    # The lists hold vectors of another space than the quantizer's queries q: codes of the vectors, not of residuals.
    lists.by_residual = False
    lists.pq.cp.min_points_per_centroid = 1  # small galleries train on what they have, silently
    return faiss.IndexPreTransform(faiss.OPQMatrix(width, code_bytes), lists)


def first_stage_lists(first_stage):
    """The ``IndexIVFPQ`` inside a first stage (``new_first_stage``): its quantizer, codebooks and lists; None where
    ``first_stage`` wraps no index (it is not a first stage)."""
    faiss = _faiss()
    return faiss.downcast_index(first_stage.index) if isinstance(first_stage, faiss.IndexPreTransform) else None


def rotate(first_stage, vectors: np.ndarray) -> np.ndarray:
    """Vectors [n, D] -> as the first stage's rotation turns them (what its lists code and are searched with)."""
    faiss = _faiss()
    return faiss.downcast_VectorTransform(first_stage.chain.at(0)).apply(np.ascontiguousarray(vectors, np.float32))


def train_first_stage(model: LlipModel, image_features: torch.Tensor, prototypes: Optional[torch.Tensor] = None,
                      code_bytes: int = DEFAULT_CODE_BYTES):
    """A sample of image features [n, 2, H, K, d] -> a trained, empty first stage (``new_first_stage``) for the
    prototype queries [P, H, d] (``prototype_queries``; default the zero query alone: uniform attention).

    Its rotation and product quantizer are trained (seeded) on the sample's first-stage vectors for every
    prototype c (about ``_TRAINING_VECTORS`` of them, drawn seeded; fewer than 256, or than D, are repeated: a small
    sample's vectors are then coded nearly exactly): ``code_bytes`` sub-vectors (a divisor of D) of 8 bits each. What is
    trained from one sample serves any number of indexes (the shards of a gallery), whose codes it makes
    comparable.
    """
    heads, width = model.mixer.heads, model.mixer.out_proj.shape[0]
    if prototypes is None:
        prototypes = torch.zeros(1, heads, width // heads)
    if prototypes.ndim != 3 or tuple(prototypes.shape[1:]) != (heads, width // heads) or not len(prototypes) \
            or not torch.isfinite(prototypes).all():
        raise ValueError(f'Prototype queries must be finite raw mixer queries [P ≥ 1, {heads}, {width // heads}] '
                         f'(prototype_queries); got {list(prototypes.shape)}.')
    if isinstance(code_bytes, bool) or not isinstance(code_bytes, int) or code_bytes < 1 or width % code_bytes:
        raise ValueError(f'code_bytes must be a divisor of the embedding width D = {width} (the first stage codes '
                         f'each vector as code_bytes sub-vectors of D / code_bytes numbers); got {code_bytes!r}.')
    if image_features.ndim != 5 or not len(image_features):
        raise ValueError(f'The first stage is trained on a sample of image features [n ≥ 1, 2, H, K, d]; got '
                         f'{list(image_features.shape)}.')
    rng, keep = np.random.default_rng(0), min(1.0, _TRAINING_VECTORS / (len(image_features) * len(prototypes)))
    chunk, vectors = max(1, _TRAINING_VECTORS // len(prototypes)), []
    with torch.inference_mode():
        for start in range(0, len(image_features), chunk):
            mixed = first_stage_vectors(model, image_features[start:start + chunk].float(), prototypes)
            mixed = mixed.flatten(0, 1).cpu().numpy()
            vectors.append(mixed[rng.random(len(mixed)) < keep] if keep < 1 else mixed)
    vectors = np.concatenate(vectors)
    # 256 centroids per sub-quantizer need 256 vectors, and the rotation D of them (FAISS 1.15's OPQMatrix corrupts
    # memory with fewer): fewer are repeated.
    vectors = np.ascontiguousarray(np.tile(vectors, (math.ceil(max(256, width) / len(vectors)), 1)))
    first_stage = new_first_stage(prototypes, code_bytes)
    first_stage.train(vectors)  # the rotation, then the codebooks; the quantizer holds its prototypes already
    return first_stage


def add_first_stage(first_stage, vectors: np.ndarray, first_id: int):
    """Add the first-stage vectors [n, P, D] of images ``first_id`` … ``first_id + n − 1``: vector c of each, rotated,
    to list c, coded by FAISS (``add_preassigned``), each list in order of id."""
    from faiss.contrib.ivf_tools import add_preassigned

    count, prototypes, width = vectors.shape
    # Named here: add_preassigned drops its own reference to the ids before FAISS reads them.
    ids = np.repeat(np.arange(first_id, first_id + count, dtype=np.int64), prototypes)
    lists = np.tile(np.arange(prototypes, dtype=np.int64), count)
    rows = rotate(first_stage, vectors.reshape(count * prototypes, width))
    coded = first_stage_lists(first_stage)
    add_preassigned(coded, rows, lists, ids)
    first_stage.ntotal = coded.ntotal


def paired_cosine(model: LlipModel, image_features: torch.Tensor, text_features: torch.Tensor,
                  temperature: Temperature = None) -> torch.Tensor:
    """Each text against its own images: image features [Q, C, 2, H, K, d], text features [Q, 2, H, d] -> [Q, C].

    Entry [j, c] is cos(z[i|j], t[j]) for the image ``image_features[j, c]``, as ``LlipModel.similarity``
    scores it (τ defaults to the model's), computed by mixing (``scoring.mixture_cosine``): 2·K·D + D²
    multiply-adds per pair. An image with a stored number that is not finite scores NaN, even where the
    attention would give it no weight (a key of −inf).
    """
    if image_features.ndim != 6 or image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f'paired_cosine takes image features [Q, C, 2, H, K, d] and text features [Q, 2, H, d]; got '
                         f'{list(image_features.shape)} and {list(text_features.shape)}.')
    check_features(image_features[0], text_features)
    tau = single_temperature(temperature, model.mixer.temperature)
    out_proj = model.mixer.out_proj
    dtype = scoring_dtype(out_proj, image_features, text_features)
    queries, targets = unpack_text(text_features.to(out_proj.device, dtype))  # [Q, H, d]
    count, _, heads, tokens, width = image_features.shape[1:]
    scores = []
    for features, query, target in zip(image_features, queries, targets):
        # Keys and values laid out per head, [2, H, C, K, d], in the one copy that casts them: each head's keys are
        # then one [C·K, d] matrix against its query (not C products of [K, d]), read once.
        laid = torch.empty((2, heads, count, tokens, width), dtype=dtype, device=out_proj.device)
        laid.copy_(features.permute(1, 2, 0, 3, 4))
        attn = attention(laid[0], query, tau, 'hckd,hd->hck')  # [H, C, K]
        mixed = torch.einsum('hck,hckd->hcd', attn, laid[1]).transpose(0, 1).reshape(count, heads * width)  # [C, D]
        cosine = mixture_cosine(mixed, target.flatten(), out_proj.to(dtype))
        # A non-finite value makes its mixture and score so (0 · inf is NaN too); a key of −inf may get no weight
        # and leave the score finite: a sum of the keys finds it.
        bad_keys = ~torch.isfinite(laid[0].reshape(heads, count, tokens * width).sum(2)).all(0)
        scores.append(cosine.masked_fill(bad_keys, float('nan')))
    return torch.stack(scores)


def mixed_cosine(model: LlipModel, image_features: torch.Tensor, text_features: torch.Tensor,
                 temperature: Temperature = None) -> torch.Tensor:
    """Every image against every text by mixing: image features [N, 2, H, K, d], text features [M, 2, H, d] -> [N, M].

    The same cosines as ``LlipModel.similarity``, at 2·K·D + D² multiply-adds per pair and no Gram
    matrix ((H·K)²·D per image): the cheaper exhaustive scan for fewer than ~(H·K)²/D texts at once
    (B/16: 128). Memory: a few [N, M, D] tensors.
    """
    check_features(image_features, text_features)
    tau = single_temperature(temperature, model.mixer.temperature)
    out_proj = model.mixer.out_proj
    dtype = scoring_dtype(out_proj, image_features, text_features)
    keys, values = unpack_image(image_features.to(out_proj.device, dtype))  # [N, H, K, d]
    queries, targets = unpack_text(text_features.to(out_proj.device, dtype))  # [M, H, d]
    attn = attention(keys, queries, tau, 'nhkd,mhd->nhmk')  # one [N·K, d] × [d, M] per head
    mixed = torch.matmul(attn, values).permute(0, 2, 1, 3).flatten(2)  # [N, H, M, d] -> [N, M, D]
    return mixture_cosine(mixed, targets.flatten(1), out_proj.to(dtype))


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
        prototypes: Optional[torch.Tensor] = None,
        skipped_samples: int = 0,
        first_stage=None,
        code_bytes: int = DEFAULT_CODE_BYTES,
        shard: Optional[dict] = None,
) -> Path:
    """Write an index of ``count`` images from batches of their image features [n, 2, H, K, d] into ``folder``.

    ``folder`` must be new or empty; with ``overwrite``, an index this module wrote there is replaced
    (its files, if unchanged, and nothing else). ``names``: one per image, kept for the results.
    ``dtype``: how the features are stored for re-scoring: float16, float32, or int8 (each key and value vector
    scaled by its largest magnitude / 127, the scale kept in float16: half of float16's bytes).
    The first stage: ``first_stage``, trained already (``train_first_stage``: the shards of a gallery share one),
    or else trained here (``train_first_stage``) on up to ``_SAMPLE_IMAGES`` stored images, evenly spaced, with
    the prototype queries ``prototypes`` [P, H, d] (``prototype_queries``; default the zero query alone) and
    ``code_bytes``; either way its lists are filled from the features as stored.
    ``model_name``, ``pretrained`` and ``precision`` are recorded so that ``open_clip_llip index query``
    can load the model again; ``skipped_samples``, the bad samples the reader left out (``--skip-bad-samples``),
    too, and ``shard`` (where this index lies in a gallery of shards). A failed write removes what it wrote.
    Returns the manifest's path.
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
    if first_stage is not None and prototypes is not None:
        raise ValueError('Give prototypes (the first stage is then trained here) or a trained first_stage, not both.')
    heads, tokens, width = model.mixer.heads, model.llip_cfg.mixture_tokens, model.mixer.out_proj.shape[0]
    spec = dict(file=FEATURES, shape=[count, 2, heads, tokens, width // heads], dtype=dtype)
    if first_stage is not None:
        _check_first_stage(first_stage, heads, width)
    folder = Path(folder)
    prepare_folder(folder, MANIFEST, GENERATOR, overwrite, FILES, what='index')
    with WrittenFiles(folder, FILES, MANIFEST, GENERATOR) as written:
        row = np.empty(0, _row_dtype(spec))  # [0, 2, H, K, d] of floats, or [0] of int8 codes and scales
        stored = np.lib.format.open_memmap(written.claim(FEATURES), mode='w+', dtype=row.dtype,
                                           shape=(count, *row.shape[1:]))
        done = 0
        for batch in image_features:
            if tuple(batch.shape[1:]) != tuple(spec['shape'][1:]) or done + len(batch) > count:
                raise ValueError(f'Image features of shape {list(batch.shape)} after {done} images: expected batches '
                                 f'[n, {", ".join(map(str, spec["shape"][1:]))}] of {count} images in all.')
            rows = _encode_rows(batch.detach().cpu(), spec)
            bad = _non_finite_rows(_decode_rows(rows, spec), done)
            if len(bad):
                raise ValueError(f'Image {_named(bad, names)} has non-finite features in {dtype} (NaN, or too large '
                                 'for float16: use dtype float32); an index ranks only finite scores. Leave the image '
                                 'out, or check the model and the image.')
            stored[done:done + len(rows)] = rows
            done += len(rows)
        if done != count:
            raise ValueError(f'Got the features of {done} images; expected {count}.')
        stored.flush()
        if first_stage is None:
            sample = np.unique(np.linspace(0, count - 1, min(count, _SAMPLE_IMAGES)).round().astype(np.int64))
            first_stage = train_first_stage(model, torch.from_numpy(_decode_rows(stored[sample], spec)), prototypes,
                                            code_bytes)
        else:
            first_stage = faiss.clone_index(first_stage)
        # The lists, from the features as stored (what re-scoring reads), in blocks of rows.
        lists = first_stage_lists(first_stage)
        prototypes = torch.from_numpy(lists.quantizer.reconstruct_n(0, lists.nlist)).view(lists.nlist, heads,
                                                                                            width // heads)
        block = max(1, _BLOCK_ELEMENTS // (len(prototypes) * width))
        with torch.inference_mode():
            for start in range(0, count, block):
                rows = torch.from_numpy(_decode_rows(stored[start:start + block], spec))
                add_first_stage(first_stage, first_stage_vectors(model, rows, prototypes).cpu().numpy(), start)
        del stored
        written.record(FEATURES)
        faiss.write_index(first_stage, str(written.claim(FIRST_STAGE)))
        written.record(FIRST_STAGE)
        if names is not None:
            written.write_text(NAMES, json.dumps([str(name) for name in names], ensure_ascii=False))
        manifest = dict(
            generator=GENERATOR, version=__version__, model=model_name, pretrained=pretrained, precision=precision,
            **_model_record(model), temperature=model.mixer.temperature, count=count, image_features=spec,
            first_stage=dict(file=FIRST_STAGE, faiss=FIRST_STAGE_KIND, prototypes=lists.nlist, code_bytes=lists.pq.M,
                             lists='prototype c: z / |z|, z = u W_O, u = concat_h(Σ_k softmax_k(<key, c>/τ) value)',
                             routing='nearest prototypes of the raw query q (L2)', query='t̂'),
            names=NAMES if names is not None else None, skipped_samples=skipped_samples)
        if shard is not None:
            manifest['shard'] = shard
        manifest['files'] = dict(written.files)  # written last: a folder with a manifest holds a whole index
        seal_manifest(manifest, folder)
        return written.write_text(MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + '\n')


def _check_first_stage(first_stage, heads: int, width: int):
    """ValueError unless ``first_stage`` is a trained first stage (``train_first_stage``) for a model of ``heads``
    mixer heads and embedding width ``width``."""
    faiss = _faiss()
    lists = first_stage_lists(first_stage)
    if not isinstance(lists, faiss.IndexIVFPQ) or first_stage.d != width or not first_stage.is_trained \
            or lists.by_residual or lists.quantizer.ntotal != lists.nlist:
        raise ValueError(f'first_stage must be a trained first stage (train_first_stage) for D = {width}; got '
                         f'{type(first_stage).__name__}.')


def _row_dtype(spec: dict) -> np.dtype:
    """The numpy dtype of one stored image (features ``spec`` of a manifest): [2, H, K, d] numbers of float16 or
    float32 (a sub-array type: an array of it has shape [n, 2, H, K, d]), or for int8 a record of those as
    ``codes`` and a float16 ``scales`` per vector [2, H, K]."""
    shape = tuple(spec['shape'][1:])
    if spec['dtype'] == 'int8':
        return np.dtype([('codes', np.int8, shape), ('scales', np.float16, shape[:-1])])
    return np.dtype((spec['dtype'], shape))


def _encode_rows(features: torch.Tensor, spec: dict) -> np.ndarray:
    """Image features [n, 2, H, K, d] -> the rows stored for them (``_row_dtype``): rounded to float16 or float32, or
    for int8 each vector v as round(v / s) with s = max|v| / 127 (in float16)."""
    if spec['dtype'] != 'int8':
        return features.to(getattr(torch, spec['dtype'])).numpy()
    features = features.float()
    scales = (features.abs().amax(-1) / 127).half()
    divisor = scales.float().masked_fill(scales == 0, 1)[..., None]
    rows = np.empty(len(features), _row_dtype(spec))
    rows['codes'] = (features / divisor).round().clamp(-127, 127).to(torch.int8).numpy()
    rows['scales'] = scales.numpy()
    return rows


def _decode_rows(rows: np.ndarray, spec: dict) -> np.ndarray:
    """Stored rows (``_row_dtype``) -> image features [n, 2, H, K, d]: as stored for float16 and float32, codes ×
    scales in float32 for int8."""
    if spec['dtype'] != 'int8':
        return np.asarray(rows)
    return rows['codes'].astype(np.float32) * rows['scales'].astype(np.float32)[..., None]


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
        prototype_texts: Optional[Sequence[str]] = None,
        prototypes: Optional[int] = None,
        skipped_samples: int = 0,
        code_bytes: int = DEFAULT_CODE_BYTES,
) -> 'LlipIndex':
    """Encode ``images`` (a dataset of transformed image tensors [3, h, w], such as ``eval_data.RetrievalImages``)
    with ``model`` on its device at ``precision`` (progress shown), write the index (``write_index``) and open it.

    ``prototype_texts``: a sample of texts like the queries to come (captions of the gallery's kind), whose
    queries give the first stage's ``prototypes`` (default ``DEFAULT_PROTOTYPES``) prototype queries
    (``prototype_queries``; needs ``tokenizer``), its codes ``code_bytes`` (``train_first_stage``).
    Without them the first stage ranks by the uniform mixture, which recovers far fewer of the exact best
    images of a trained model (module docstring). ``skipped_samples`` is recorded in the manifest."""
    centres = text_prototypes(model, tokenizer, prototype_texts, prototypes, precision)
    logging.info(f'Indexing {len(images)} images into {folder} ({dtype} features, {precision} on '
                 f'{model.mixer.out_proj.device}; {1 if centres is None else len(centres)} prototype queries).')
    write_index(folder, model, encode_images(model, images, batch_size, workers, precision), len(images), names,
                dtype, overwrite, model_name, pretrained, precision, centres, skipped_samples, code_bytes=code_bytes)
    return LlipIndex.open(folder, model, tokenizer, precision)


def encode_images(model: LlipModel, images: torch.utils.data.Dataset, batch_size: int = 64, workers: int = 4,
                  precision: str = 'fp32', progress: str = 'Images', position: int = 0) -> Iterable[torch.Tensor]:
    """Batches of the image features [n, 2, H, K, d] of ``images`` (a dataset of transformed image tensors [3, h, w],
    such as ``readers.RetrievalImages``), in order, encoded on the model's device at ``precision``; a progress bar
    named ``progress`` at line ``position`` (one per process of a spread build)."""
    import open_clip
    from open_clip_train.precision import get_autocast
    from torch.utils.data import DataLoader

    device = model.mixer.out_proj.device
    autocast = get_autocast(precision, device_type=device.type)
    input_dtype = open_clip.get_input_dtype(precision)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=device.type == 'cuda')

    @torch.inference_mode()  # a decorated generator: the mode holds while it runs, not across its yields
    def encoded():
        for batch in tqdm(loader, desc=progress, unit='batch', position=position):
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f'The dataset must give image tensors; it gave {type(batch).__name__} batches.')
            with autocast():
                features = model.encode_image(batch.to(device=device, dtype=input_dtype))
            yield features

    return encoded()


def text_prototypes(model: LlipModel, tokenizer, texts: Optional[Sequence[str]], count: Optional[int] = None,
                    precision: str = 'fp32') -> Optional[torch.Tensor]:
    """The first stage's prototype queries [P, H, d] made of a sample of ``texts`` like the queries to come
    (``prototype_queries``; ``count`` default ``DEFAULT_PROTOTYPES``), or None (the zero query) without texts."""
    if texts is None:
        if count is not None:
            raise ValueError(f'{count} prototypes asked for without prototype texts to make them of: give '
                             'prototype_texts, a sample of texts like the queries to come.')
        return None
    if tokenizer is None:
        raise ValueError('Prototype texts need the tokenizer: build_index(..., tokenizer=tokenizer).')
    return prototype_queries(_text_features(model, tokenizer, texts, precision),
                             DEFAULT_PROTOTYPES if count is None else count)


def _text_features(model: LlipModel, tokenizer, texts: Union[str, Sequence[str], torch.Tensor],
                   precision: str = 'fp32') -> torch.Tensor:
    """Strings (tokenized with ``tokenizer``) or token ids [M, L] -> text features [M, 2, H, d]
    (``retrieval.encode_texts``, in batches of ``_TEXT_BATCH``)."""
    from open_clip_train.precision import get_autocast
    if isinstance(texts, str):
        texts = [texts]
    if not len(texts):
        raise ValueError('Got no texts; give at least one text.')
    tokens = texts if isinstance(texts, torch.Tensor) else tokenizer(list(texts))
    autocast = get_autocast(precision, device_type=model.mixer.out_proj.device.type)
    return encode_texts(model, tokens.split(_TEXT_BATCH), autocast=autocast)


def feature_blocks(path: Union[str, Path]) -> dict:
    """SHA-256 of the header of the features file at ``path`` (``.npy``) and of each block of its rows.

    Returns ``dict(rows=R, header_sha256=…, sha256=[…])``: block b holds rows b·R … (b+1)·R − 1, R rows of at
    most ``_HASH_BLOCK_BYTES`` (at least one). ``LlipIndex`` checks a block the first time it reads a row of it.
    """
    features = np.load(path, mmap_mode='r')
    row_bytes = features[0].nbytes
    rows = max(1, _HASH_BLOCK_BYTES // row_bytes)
    with open(path, 'rb') as file:
        header = _header_sha256(file, features)
        blocks = [hashlib.sha256(file.read(rows * row_bytes)).hexdigest() for _ in range(math.ceil(len(features) / rows))]
    return dict(rows=rows, header_sha256=header, sha256=blocks)


def _header_sha256(file, features: np.ndarray) -> str:
    """SHA-256 of the ``.npy`` header of ``features`` (memory-mapped), read from the start of its ``file``."""
    file.seek(0)
    return hashlib.sha256(file.read(features.offset)).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's content (canonical JSON, its own ``sha256`` left out): what it records of itself."""
    content = {key: value for key, value in manifest.items() if key != 'sha256'}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode('utf-8')).hexdigest()


def seal_manifest(manifest: dict, folder: Path):
    """Add what ``LlipIndex`` checks beyond each file's SHA-256: per-block hashes of the features written in
    ``folder`` (``feature_blocks``), then the manifest's own SHA-256 (``manifest_digest``)."""
    manifest['feature_blocks'] = feature_blocks(folder / manifest['image_features']['file'])
    manifest['sha256'] = manifest_digest(manifest)


def _load_manifest(folder: Union[str, Path]) -> dict:
    """The manifest of the index in ``folder``, parsed, its own SHA-256 not checked."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise FileNotFoundError(f'Index folder {folder} not found.')
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise FileNotFoundError(f'{folder} holds no Llip index ({MANIFEST} not found): build one with '
                                'open_clip_llip index build.') from None
    except (OSError, ValueError) as error:
        raise ValueError(f'{path} is not a readable index manifest ({error}).') from None
    if not isinstance(manifest, dict) or manifest.get('generator') != GENERATOR:
        raise ValueError(f'{path} was not written by {GENERATOR}.')
    strangers = [name for name in _named_files(manifest) if not (isinstance(name, str) and FILES.fullmatch(name))]
    if strangers:  # never read a path the manifest names outside the index's own files (``..``, absolute, others)
        raise ValueError(f'{path} names files that are not an index\'s own ({", ".join(map(repr, strangers))}): it '
                         'was edited or damaged; build the index again.')
    return manifest


def _named_files(manifest: dict) -> list:
    """Every file name a manifest gives: its ``files``, and the features, first stage and names it points to."""
    files = manifest.get('files')
    named = list(files) if isinstance(files, dict) else []
    for key in ('image_features', 'first_stage'):
        if isinstance(manifest.get(key), dict) and 'file' in manifest[key]:
            named.append(manifest[key]['file'])
    return named + ([manifest['names']] if manifest.get('names') is not None else [])


def _manifest_damage(folder: Union[str, Path], manifest: dict) -> Optional[str]:
    """What is wrong with a parsed manifest's own record of itself (its SHA-256), or None."""
    if 'sha256' in manifest and manifest['sha256'] != manifest_digest(manifest):
        return (f'{Path(folder) / MANIFEST}: its content does not match the SHA-256 it records: it was changed or '
                'damaged after the index was written.')
    return None


def read_manifest(folder: Union[str, Path]) -> dict:
    """The manifest of the index in ``folder``, its own SHA-256 checked (where it records one, as every index
    written since block hashes does); FileNotFoundError or ValueError if there is none or it is damaged."""
    manifest = _load_manifest(folder)
    damage = _manifest_damage(folder, manifest)
    if damage:
        raise ValueError(f'{damage} Build the index again.')
    return manifest


def _legacy_gaps(manifest: dict) -> List[str]:
    """What an index written before block hashes lacks of the records ``seal_manifest`` adds."""
    return [what for key, what in (('sha256', 'SHA-256 of its manifest'),
                                   ('feature_blocks', 'per-block SHA-256 of its features')) if key not in manifest]


def _file_damage(folder: Path, relative: str, digest: str) -> Optional[str]:
    """What is wrong with file ``relative`` of an index against its recorded SHA-256 ``digest``, or None."""
    path = folder / relative
    if not path.is_file():
        return f'{path}: missing.'
    if file_digest(path) != digest:
        return f'{path}: does not match the SHA-256 the manifest records: changed or damaged after the index was written.'
    return None


def _features_layout_damage(folder: Path, manifest: dict) -> Optional[str]:
    """Whether the features file has the size and header that its block hashes were recorded for (None if so)."""
    spec, blocks = manifest['image_features'], manifest['feature_blocks']
    path = folder / spec['file']
    if not path.is_file():
        return f'{path}: missing.'
    try:
        features = np.load(path, mmap_mode='r')
        with open(path, 'rb') as file:
            header = _header_sha256(file, features)
    except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
        return f'{path}: not a readable .npy file ({error or "empty"}).'
    if header != blocks['header_sha256']:
        return f'{path}: its header does not match the SHA-256 the manifest records.'
    expected = features.offset + int(spec['shape'][0]) * _row_dtype(spec).itemsize
    if path.stat().st_size != expected:
        return f'{path}: {path.stat().st_size:,} bytes; the manifest records {expected:,} (cut short, or extended).'
    return None


_READERS: Optional[ThreadPoolExecutor] = None


def _readers() -> ThreadPoolExecutor:
    """The threads that read feature rows, ``_READ_THREADS`` of them (one where the system has no positioned read),
    started once per process and shared by every open index."""
    global _READERS
    if _READERS is None:
        _READERS = ThreadPoolExecutor(_READ_THREADS if hasattr(os, 'pread') else 1, thread_name_prefix='llip-index')
    return _READERS


def _read_at(file, size: int, offset: int) -> bytes:
    """``size`` bytes of ``file`` from ``offset``: a positioned read where the system has one (safe across threads)."""
    if hasattr(os, 'pread'):
        return os.pread(file.fileno(), size, offset)
    file.seek(offset)
    return file.read(size)


def _read_block(file, folder: Path, manifest: dict, features: np.ndarray, block: int) -> Optional[str]:
    """Read block ``block`` of the features file (open as ``file``) and say what is wrong with it, or None."""
    rows, row_bytes = manifest['feature_blocks']['rows'], features[0].nbytes
    start, stop = block * rows, min(len(features), (block + 1) * rows)
    size, offset = (stop - start) * row_bytes, features.offset + start * row_bytes
    if hashlib.sha256(_read_at(file, size, offset)).hexdigest() != manifest['feature_blocks']['sha256'][block]:
        return (f'{folder / manifest["image_features"]["file"]}: rows {start} to {stop - 1} (block {block}) do not '
                'match the SHA-256 the manifest records: changed or damaged after the index was written.')
    return None


def _non_finite_rows(features: np.ndarray, first: int = 0) -> np.ndarray:
    """Ids (``first`` + row) of the rows [n, …] of ``features`` that hold NaN or infinity."""
    return np.flatnonzero(~np.isfinite(features.reshape(len(features), -1)).all(1)) + first


def _named(ids: Sequence[int], names: Optional[Sequence[str]], most: int = 5) -> str:
    """'3 (cat.png), 17 (dog.png) and 4 more': image ids with their names, where known."""
    shown = ', '.join(f'{i} ({names[i]})' if names is not None else str(i) for i in list(ids)[:most])
    return shown + (f' and {len(ids) - most} more' if len(ids) > most else '')


def verify_index(folder: Union[str, Path]) -> List[str]:
    """Check the index in ``folder`` whole -> what is damaged (empty if nothing): the manifest against its own
    SHA-256, each file it lists against its SHA-256, the features file's size and header, and each block of
    feature rows against its SHA-256 (each damaged block named by its rows); and which rows hold non-finite
    features. Reads every file once. ValueError or FileNotFoundError if there is no readable manifest at all.
    An index written before block hashes is checked by whole-file hashes (what it lacks is logged)."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    problems = [damage for damage in [_manifest_damage(folder, manifest)] if damage]
    gaps = _legacy_gaps(manifest)
    if gaps:
        logging.warning(f'The index in {folder} was written before block hashes: it has no {" and no ".join(gaps)}; '
                        'its files are checked whole. Build it again to have damage located per block.')
    try:
        files, spec = dict(manifest['files']), manifest['image_features']
    except (KeyError, TypeError):
        return problems + [f'{folder / MANIFEST}: lists no files or image features; it is damaged.']
    for relative, digest in files.items():
        if relative == spec['file'] and 'feature_blocks' in manifest:
            continue  # per block, below
        problems += [damage for damage in [_file_damage(folder, relative, digest)] if damage]
    path = folder / spec['file']
    if 'feature_blocks' in manifest:
        layout = _features_layout_damage(folder, manifest)
        if layout:
            return problems + [layout]
        features = np.load(path, mmap_mode='r')
        with open(path, 'rb') as file:
            problems += [damage for block in range(len(manifest['feature_blocks']['sha256']))
                         for damage in [_read_block(file, folder, manifest, features, block)] if damage]
    try:
        features = np.load(path, mmap_mode='r')
    except (OSError, ValueError, EOFError):
        return problems  # named above: missing, or not matching its hash
    chunk = max(1, _HASH_BLOCK_BYTES // features[0].nbytes)
    bad = np.concatenate([_non_finite_rows(_decode_rows(features[start:start + chunk], spec), start)
                          for start in range(0, len(features), chunk)] or [np.zeros(0, int)])
    if len(bad):
        problems.append(f'{path}: non-finite features (NaN or infinity) in the rows of images {_named(bad, None)}.')
    return problems


class TwoStageSearch:
    """The two-stage search of a gallery of stored image features: ``LlipIndex`` (one index folder) and
    ``shards.ShardedIndex`` (the shards of a gallery, as one) provide the first stage (``first_stage_search``),
    the stored rows (``read_rows``, ``read_block``) and the images' names; the re-scoring is the same."""

    def __init__(self, model: LlipModel, spec: dict, tokenizer=None, precision: str = 'fp32'):
        self.model, self.spec, self.tokenizer, self.precision = model, spec, tokenizer, precision

    def decode_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows -> image features [n, 2, H, K, d] (float16 or float32 as stored; int8 codes × scales)."""
        return _decode_rows(rows, self.spec)

    def encode_texts(self, texts: Union[Sequence[str], torch.Tensor]) -> torch.Tensor:
        """Strings (with the tokenizer given to ``open``) or token ids [Q, L] -> text features [Q, 2, H, d]."""
        if not isinstance(texts, torch.Tensor) and self.tokenizer is None:
            raise ValueError('Searching by strings needs a tokenizer: LlipIndex.open(folder, model, tokenizer), '
                             'or pass token ids.')
        return _text_features(self.model, self.tokenizer, texts, self.precision)

    def search(self, texts: Union[Sequence[str], torch.Tensor], k: int = 10, candidates: int = DEFAULT_CANDIDATES,
               probes: int = 1) -> SearchResults:
        """The k best images for each text (strings or token ids [Q, L]): the first stage's ``candidates`` best,
        re-scored exactly (``search_features``)."""
        return self.search_features(self.encode_texts(texts), k, candidates, probes)

    def search_features(self, text_features: torch.Tensor, k: int = 10, candidates: int = DEFAULT_CANDIDATES,
                        probes: int = 1) -> SearchResults:
        """Text features [Q, 2, H, d] -> the k best images of each by conditioned cosine, among the first stage's
        ``candidates`` best (all images when ``candidates`` ≥ the gallery's size) in the lists of the text's
        ``probes`` nearest prototypes."""
        self._check_query(text_features, k)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
            raise ValueError(f'candidates must be an integer of at least k = {k}; got {candidates!r}.')
        candidates = min(candidates, len(self))
        return self.rescore(text_features, self.first_stage_candidates(text_features, candidates, probes), k)

    def first_stage_candidates(self, text_features: torch.Tensor, candidates: int, probes: int = 1) -> torch.Tensor:
        """Text features [Q, 2, H, d] -> the ids of each text's ``candidates`` best images by first-stage score
        [Q, C], best first (``first_stage_search``)."""
        return self.first_stage_search(text_features, candidates, probes)[1]

    def rescore(self, text_features: torch.Tensor, candidates: torch.Tensor, k: int) -> SearchResults:
        """Text features [Q, 2, H, d] and image ids [Q, C] -> the k best of each text's C images by exact conditioned
        cosine. Each text's images are read from the stored features in increasing order, in blocks (``read_rows``)."""
        self._check_query(text_features, k)
        if candidates.ndim != 2 or len(candidates) != len(text_features) or candidates.shape[1] < k:
            raise ValueError(f'candidates must be image ids [Q, C ≥ k] for the {len(text_features)} texts; got '
                             f'{list(candidates.shape)}.')
        if candidates.numel() and not (0 <= candidates.min() and candidates.max() < len(self)):
            raise ValueError(f'Image ids must lie in [0, {len(self)}).')
        block = max(1, _RESCORE_ELEMENTS // int(np.prod(self.spec['shape'][1:])))
        scores, ids, left_out = [], [], set()
        with torch.inference_mode():  # no autocast: scores in the precision of the features and the mixer
            for query, rows in zip(text_features, candidates):
                rows = rows.sort().values
                cosines = []
                for chunk in rows.split(block):
                    features = torch.from_numpy(self.decode_rows(self.read_rows(chunk.numpy())))
                    cosine = paired_cosine(self.model, features[None], query[None])[0].float().cpu()
                    cosines.append(self._finite(cosine, chunk, left_out))  # NaN for non-finite features
                best = torch.cat(cosines).topk(k)
                scores.append(best.values)
                ids.append(rows[best.indices].masked_fill(best.values == float('-inf'), -1))
        self._warn_left_out(left_out)
        return self._named_results(torch.stack(scores), torch.stack(ids))

    def _finite(self, scores: torch.Tensor, ids: torch.Tensor, left_out: set,
                features: Optional[np.ndarray] = None) -> torch.Tensor:
        """Scores [..., n] of the images ``ids`` [n] (with stored ``features`` [n, …], where their scores may be finite
        when they are not), −inf where a score or feature is not finite (never ranked); those images' ids added to
        ``left_out``."""
        bad = ~torch.isfinite(scores)
        if features is not None:
            bad |= torch.from_numpy(~np.isfinite(features.reshape(len(features), -1)).all(1))
        left_out.update(ids[bad.reshape(-1, len(ids)).any(0)].tolist())
        return scores.masked_fill(bad, float('-inf'))

    def _warn_left_out(self, left_out: set):
        if left_out:
            ids = sorted(left_out)
            named = ', '.join(f'{image} ({name})' if name is not None else str(image)
                              for image, name in zip(ids[:5], self.image_names(ids[:5]) or [None] * 5))
            logging.warning(f'Images {named}{f" and {len(ids) - 5} more" if len(ids) > 5 else ""} of the index in '
                            f'{self.folder} have non-finite features or scores: left out of the results (an id −1 '
                            'with score −inf where fewer than k images remain). Check the index: open_clip_llip index '
                            f'verify {self.folder}.')

    def exhaustive_search(self, text_features: torch.Tensor, k: int = 10) -> SearchResults:
        """The exact k best images of each text, every stored image scored (``mixed_cosine``, in blocks): what the
        two stages approximate, at the cost of reading and scoring the whole gallery."""
        self._check_query(text_features, k)
        count = len(self)
        block = max(1, _BLOCK_ELEMENTS // (int(np.prod(self.spec['shape'][1:])) * len(text_features)))
        best = SearchResults(torch.empty(len(text_features), 0), torch.empty(len(text_features), 0, dtype=torch.long))
        left_out = set()
        with torch.inference_mode():
            for start in tqdm(range(0, count, block), desc='Exhaustive', unit='block', disable=count <= block):
                rows = torch.arange(start, min(count, start + block))
                features = self.decode_rows(self.read_block(start, start + len(rows)))
                cosines = mixed_cosine(self.model, torch.from_numpy(features), text_features).T.float().cpu()
                scores = torch.cat([best.scores, self._finite(cosines, rows, left_out, features)], 1)
                ids = torch.cat([best.ids, rows.expand(len(text_features), -1)], 1)
                top = scores.topk(min(k, scores.shape[1]))
                best = SearchResults(top.values, ids.gather(1, top.indices))
        self._warn_left_out(left_out)
        return self._named_results(best.scores, best.ids.masked_fill(best.scores == float('-inf'), -1))

    def _named_results(self, scores: torch.Tensor, ids: torch.Tensor) -> SearchResults:
        names = [self.image_names(row) for row in ids.tolist()]
        return SearchResults(scores, ids, None if names and names[0] is None else names)

    def _check_probes(self, probes: int):
        if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= self.prototypes:
            raise ValueError(f'probes must be an integer in [1, {self.prototypes}] (the prototypes of this index); '
                             f'got {probes!r}.')

    def _check_query(self, text_features: torch.Tensor, k: int):
        heads, width = self.spec['shape'][2], self.spec['shape'][2] * self.spec['shape'][4]
        if text_features.ndim != 4 or tuple(text_features.shape[1:]) != (2, heads, width // heads) \
                or not len(text_features):
            raise ValueError(f'Text features must be [Q ≥ 1, 2, {heads}, {width // heads}] (LlipModel.encode_text); '
                             f'got {list(text_features.shape)}.')
        if not torch.isfinite(text_features).all():
            bad = (~torch.isfinite(text_features.flatten(1))).any(1).nonzero()[:, 0].tolist()
            raise ValueError(f'Text features of queries {bad} are not finite (NaN or infinity): nothing can be ranked '
                             'for them. Check the model and the texts.')
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f'k must be an integer in [1, {len(self)}] (the images in the index); got {k!r}.')


def _best_per_image(scores: np.ndarray, ids: np.ndarray, count: int) -> Tuple[np.ndarray, np.ndarray]:
    """First-stage entries (scores and image ids, −1 for none; an image may recur, from several lists) -> the
    ``count`` best images (or all there are), each at its best score, by score and then id: (scores, ids)."""
    valid = ids >= 0
    scores, ids = scores[valid], ids[valid]
    order = np.lexsort((ids, -scores))
    scores, ids = scores[order], ids[order]
    first = np.sort(np.unique(ids, return_index=True)[1])[:count]
    return scores[first], ids[first]


class LlipIndex(TwoStageSearch):
    """A Llip index opened for search with the model it was built with (``LlipIndex.open``)."""

    def __init__(self, folder: Path, manifest: dict, features: np.ndarray, first_stage, names: Optional[List[str]],
                 model: LlipModel, tokenizer=None, precision: str = 'fp32'):
        super().__init__(model, manifest['image_features'], tokenizer, precision)
        self.folder, self.manifest, self.features, self.first_stage, self.names = (folder, manifest, features,
                                                                                   first_stage, names)
        self.lists = first_stage_lists(first_stage)  # its quantizer (the prototypes), codebooks and lists
        # Blocks of feature rows checked against their SHA-256 so far (none recorded: checked whole on open).
        self._verified = np.zeros(len(manifest.get('feature_blocks', {}).get('sha256', [])), dtype=bool)

    @classmethod
    def open(cls, folder: Union[str, Path], model: LlipModel, tokenizer=None, precision: str = 'fp32') -> 'LlipIndex':
        """Open the index in ``folder`` for ``model``, which must be the model it was built with (config and weights).

        The image features and the first stage's lists are memory-mapped (read only where searched). ``tokenizer``
        is needed to search by strings; ``precision`` is the one texts are encoded at.

        Checked first (ValueError naming the file): the manifest against its own SHA-256, the first stage and the
        names against theirs, the features file's size and header; each block of feature rows is checked on its
        first read. An index written before block hashes has its features file checked whole (a warning says so).
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
        try:
            spec, files = manifest['image_features'], dict(manifest['files'])
        except (KeyError, TypeError):
            raise ValueError(f'{folder / MANIFEST} lists no files or image features; build the index again.') from None
        gaps = _legacy_gaps(manifest)
        if gaps:
            logging.warning(f'The index in {folder} was written before block hashes: it has no {" and no ".join(gaps)}, '
                            'so its features file is checked whole on every open. Build it again to have it checked '
                            'per block, on first read.')
        damage = [_features_layout_damage(folder, manifest)] if 'feature_blocks' in manifest else []
        damage += [_file_damage(folder, relative, digest) for relative, digest in files.items()
                   if relative != spec['file'] or 'feature_blocks' not in manifest]
        damage = [problem for problem in damage if problem]
        if damage:
            raise ValueError(f'The index in {folder} is damaged: {" ".join(damage)} Build it again '
                             f'(open_clip_llip index verify {folder} lists all damage).')
        try:
            features = np.load(folder / spec['file'], mmap_mode='r')
            first_stage = faiss.read_index(str(folder / manifest['first_stage']['file']), faiss.IO_FLAG_MMAP)
            names = json.loads((folder / manifest['names']).read_text(encoding='utf-8')) if manifest['names'] else None
        except (OSError, ValueError, EOFError, RuntimeError) as error:  # RuntimeError: FAISS could not read its file
            raise ValueError(f'The index in {folder} is damaged or incomplete ({error}); build it again.') from None
        count, expected = manifest['count'], np.empty(0, _row_dtype(spec))  # [0, 2, H, K, d], or [0] for int8
        prototypes = manifest['first_stage']['prototypes']
        if manifest['first_stage'].get('faiss') != FIRST_STAGE_KIND:  # IndexIVFFlat: full vectors, before codes
            raise ValueError(f'The index in {folder} was written by an earlier version of {GENERATOR}, whose first '
                             f'stage ({manifest["first_stage"].get("faiss")}) this one does not read: build it again.')
        lists = first_stage_lists(first_stage)
        if len(features) != count or features.shape[1:] != expected.shape[1:] or features.dtype != expected.dtype \
                or not isinstance(lists, faiss.IndexIVFPQ) or lists.nlist != prototypes \
                or lists.ntotal != count * prototypes or (names is not None and len(names) != count):
            raise ValueError(f'The files of the index in {folder} do not match its manifest ({count} images of '
                             f'features {spec["shape"]} {spec["dtype"]}); build it again.')
        return cls(folder, manifest, features, first_stage, names, model, tokenizer, precision)

    def check_rows(self, ids: np.ndarray):
        """Check the blocks of feature rows that hold the images ``ids`` against their SHA-256, each block once per
        opened index (``_READ_THREADS`` at a time); ValueError naming the first damaged block."""
        if not len(self._verified):
            return  # an index written before block hashes: its features file was checked whole on open
        blocks = np.unique(np.asarray(ids) // self.manifest['feature_blocks']['rows'])
        blocks = blocks[~self._verified[blocks]]
        if not len(blocks):
            return
        with open(self.folder / self.manifest['image_features']['file'], 'rb') as file:
            damage = [problem for problem in _readers().map(
                lambda block: _read_block(file, self.folder, self.manifest, self.features, block), blocks) if problem]
        if damage:
            raise ValueError(f'The index in {self.folder} is damaged: {damage[0]} Build it again (open_clip_llip '
                             f'index verify {self.folder} lists all damage).')
        self._verified[blocks] = True

    def read_rows(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows of the images ``ids`` (their features [n, 2, H, K, d], or their codes and scales for int8:
        ``decode_rows``), their blocks checked first (``check_rows``).

        One positioned read per row, ``_READ_THREADS`` at a time, rather than faulting the rows in through
        the memory map: from a cold page cache, page faults fetch a row's pages a few at a time, ~10× slower
        (this machine). Where ``os.preadv`` is missing, the map is read.
        """
        self.check_rows(ids)
        if not hasattr(os, 'preadv'):
            return np.array(self.features[ids])
        rows = np.empty((len(ids), *self.features.shape[1:]), self.features.dtype)  # [n] for int8's records
        row_bytes = self.features[0].nbytes
        buffers = rows.view(np.uint8).reshape(len(ids), row_bytes)

        def read(part):  # the rows of one thread, one after the other
            return sum(os.preadv(file.fileno(), [buffers[j]], self.features.offset + int(ids[j]) * row_bytes)
                       for j in part)

        with open(self.folder / self.manifest['image_features']['file'], 'rb') as file:
            done = sum(_readers().map(read, np.array_split(np.arange(len(ids)), min(_READ_THREADS, max(1, len(ids))))))
        if done != len(ids) * row_bytes:
            raise ValueError(f'The features file of the index in {self.folder} is shorter than its manifest says; '
                             'build it again.')
        return rows

    def __len__(self) -> int:
        return self.manifest['count']

    @property
    def prototypes(self) -> int:
        """P, the first stage's prototype queries (its lists)."""
        return self.lists.nlist

    def first_stage_search(self, text_features: torch.Tensor, count: int, probes: int = 1
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text features [Q, 2, H, d] -> each text's ``count`` (≤ the index's size) best images by first-stage score,
        best first: scores [Q, count] (float32) and ids [Q, count].

        An image's score is its best <x̂[c], p> over the text's ``probes`` nearest prototypes c (x̂: x as its code
        holds it); images of equal scores are taken in order of id, whatever order FAISS scans them in, so that
        the shards of a gallery select together what one index of their images selects.
        """
        self._check_probes(probes)
        queries = np.ascontiguousarray(unpack_text(text_features)[0].flatten(1).float().cpu().numpy())
        targets = rotate(self.first_stage, text_directions(self.model, text_features).numpy())
        _, lists = self.lists.quantizer.search(queries, probes)
        self.lists.nprobe = probes
        # The lists are scanned by <x[c], p> alone (zero coarse distances: the routing's L2 distances in query space
        # do not add to inner products). An image is in every list: among the best count·probes entries are at least
        # count images. One entry more shows whether a tie crosses the last place.
        coarse = np.zeros(lists.shape, np.float32)
        entries, ids = self.lists.search_preassigned(targets, count * probes + 1, lists, coarse)
        scores, chosen = np.empty((len(targets), count), np.float32), np.empty((len(targets), count), np.int64)
        for query in range(len(targets)):
            found, images = entries[query], ids[query]
            best = _best_per_image(found, images, count)
            if (images >= 0).all() and found[-1] == best[0][-1]:  # entries tied with the last place may be left out:
                radius = np.nextafter(found[-1], np.float32(-np.inf))  # all of them score above this
                _, found, images = self.lists.range_search_preassigned(
                    targets[query:query + 1], float(radius), lists[query:query + 1], coarse[query:query + 1])
                best = _best_per_image(found, images, count)
            scores[query], chosen[query] = best
        return torch.from_numpy(scores), torch.from_numpy(chosen)

    def read_block(self, start: int, stop: int) -> np.ndarray:
        self.check_rows(np.arange(start, stop))
        return np.array(self.features[start:stop])  # a copy: the map is read-only

    def image_names(self, ids: Sequence[int]) -> Optional[List[Optional[str]]]:
        return None if self.names is None else [self.names[image] if image >= 0 else None for image in ids]

def list_images(path: Union[str, Path], skip_bad_samples: bool = False) -> Tuple[List[str], list, int]:
    """The images to index, as (names, sources for ``readers.RetrievalImages``, bad samples skipped): every image
    file under a folder (sorted), or the images of a retrieval CSV or webdataset shards
    (``readers.read_retrieval_set``). With ``skip_bad_samples`` the samples at fault (and images that do not
    decode) are left out and counted; otherwise a fault is an error naming the file and place."""
    from ..evaluation.readers import SHARD_IMAGE_EXTENSIONS, BadSamples, ShardMember, read_retrieval_set, readable_images

    if Path(path).is_dir():
        images = sorted(str(file) for file in Path(path).rglob('*')
                        if file.is_file() and file.suffix[1:].lower() in SHARD_IMAGE_EXTENSIONS)
        bad = BadSamples(skip_bad_samples)
        if skip_bad_samples:
            images = [images[i] for i in readable_images(images, bad)]
        if not images:
            raise ValueError(f'{path} holds no image files ({", ".join(SHARD_IMAGE_EXTENSIONS)})'
                             + (' that could be read.' if bad.count else '.'))
        return images, images, bad.count
    retrieval_set = read_retrieval_set(str(path), skip_bad_samples)
    images = retrieval_set.images
    names = [f'{image.shard}:{image.name}' if isinstance(image, ShardMember) else image for image in images]
    return names, images, retrieval_set.skipped

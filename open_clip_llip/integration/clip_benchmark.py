"""CLIP_benchmark on Llip models: zero-shot classification and retrieval with conditioned scores, and the linear probe.

With open_clip_llip active (as it is whenever ``open_clip`` is imported), plain ``clip_benchmark eval``
evaluates a Llip model this way: when a task's module of ``clip_benchmark.metrics`` loads,
``route_llip_models`` makes its ``evaluate`` run a Llip model's evaluation inside ``llip_support()`` and
hand every other model to CLIP_benchmark's function, untouched. ``open_clip_llip benchmark`` is
CLIP_benchmark's own command line (the same subcommands and arguments, its datasets, metrics and
output files) run inside ``llip_support()`` as a whole::

    pip install 'open_clip_llip[benchmark]'
    open_clip_llip benchmark eval --model Llip-ViT-B-16 --pretrained llip_b16_k32.pt \\
        --dataset wds/imagenet1k --dataset_root DIR --task zeroshot_classification

From Python, CLIP_benchmark's functions called inside the block score Llip the same way::

    from clip_benchmark.metrics import zeroshot_classification
    with llip_support():
        metrics = zeroshot_classification.evaluate(model, dataloader, tokenizer, classnames, templates, 'cuda')

CLIP_benchmark (1.6) scores an image against a text by the dot product of their normalised
embeddings; a Llip image is a set of K tokens whose embedding depends on the text. Inside
``llip_support()``, for Llip models only, these names of ``clip_benchmark.metrics`` hand the work to
``open_clip_llip`` (what ``open_clip_llip eval`` runs), and every other model goes to the function
they replace:

- ``zeroshot_classification.zero_shot_classifier``: the class text features [C, 2, H, d] of
  ``build_zero_shot_classifier`` (CLIP_benchmark's ``{c}`` templates, or its class-specific prompts);
- ``zeroshot_classification.run_classification``: the logits are the conditioned cosines
  ``cos(z[i|c], t[c])`` (``zero_shot_cosine``), from which CLIP_benchmark's ``evaluate`` computes its metrics;
- ``zeroshot_retrieval.evaluate``: images and texts encoded by ``encode_images`` and ``encode_texts``, every
  pair scored by ``LlipModel.similarity``, and CLIP_benchmark's recall@k (its ``recall_at_k``) of those scores;
- ``linear_probe.evaluate``: CLIP_benchmark's linear probe of the model as ``UniformMixture`` shows it, one
  vector per image: the mixture of its K tokens at a query that weighs them equally (``LlipMixer.uniform_mixture``);
- ``image_caption_selection.evaluate`` and ``captioning.evaluate`` refuse Llip models (they compare
  images and captions by dot products, or need a text decoder).

Scores are at the model's τ: CLIP_benchmark reports one set of metrics per model and dataset
(``open_clip_llip eval --temperatures`` scores several τ in one pass). With ``amp`` (CLIP_benchmark's
default), Llip runs under autocast on the evaluation device, as CLIP_benchmark 1.6.2 runs other models.

numpy ≥ 2.4: CLIP_benchmark's ``accuracy`` (``zeroshot_classification``'s, also imported by
``linear_probe``) takes ``float()`` of a one-element array, which numpy 2.4 refuses, so zero-shot
classification fails for every model. Inside the block, where it fails so, it is replaced by the same
count taken with ``.item()``.

The rules of ``open_clip_llip.integration.adapters`` hold: every name is checked (a function taking these
arguments) before it is replaced, and where one is missing or has another shape, that part is left
alone with a warning, given once. When the block exits, every name it replaced is restored. Where
CLIP_benchmark lets a model score images against texts itself (``patches/clip_benchmark-*/0001`` adds
``clip_benchmark.metrics.similarity.has_own_similarity``), it scores Llip with the model's own
``similarity`` and ``build_zero_shot_classifier``: the three scoring replacements are not made, and
zero-shot classification and retrieval are not routed; patch 0002 fixes ``accuracy``.
"""
import contextlib
import functools
import importlib
import warnings

import torch
from torch import nn
from tqdm import tqdm

from ..evaluation.retrieval import encode_images, encode_texts
from ..evaluation.zero_shot import zero_shot_cosine
from ..modeling.classifier import build_zero_shot_classifier
from ..modeling.features import unpack_image
from ..modeling.llip_model import LlipModel
from .adapters import Unexpected, expect_function
from .adapters.accuracy import accuracy as count_top_k

INSTALL = "pip install 'open_clip_llip[benchmark]'"
# CLIP_benchmark's tasks that Llip scores with conditioned cosines (or CLIP_benchmark itself, where patched).
SCORED_TASKS = ('zeroshot_classification', 'zeroshot_retrieval')
# CLIP_benchmark's tasks that cannot evaluate a Llip model, and why.
REFUSED_TASKS = {
    'image_caption_selection': 'it compares images and captions by dot products of normalised vectors',
    'captioning': 'it needs a text decoder',
}
METRICS_MODULES = (*SCORED_TASKS, 'linear_probe', *REFUSED_TASKS)
_warned = set()


def _metrics_modules():
    """CLIP_benchmark's metrics modules by name; ImportError with what to install."""
    try:
        return {name: importlib.import_module(f'clip_benchmark.metrics.{name}') for name in METRICS_MODULES}
    except ImportError as error:
        raise ImportError(f'{__name__} needs CLIP_benchmark 1.6 and its dependencies ({error}): '
                          f'{INSTALL}') from error


def _scores_models_itself() -> bool:
    """Whether CLIP_benchmark lets a model score images against texts itself (patches/clip_benchmark-*/0001)."""
    try:
        from clip_benchmark.metrics.similarity import has_own_similarity  # noqa: F401
    except ImportError:
        return False
    return True


def _leave_alone(part: str, error: Unexpected, consequence: str):
    """Warn, once per process and message, that a part of CLIP_benchmark is not what this module expects."""
    message = (f'{__name__}: CLIP_benchmark is not what it expects ({error}), so it leaves {part} alone: '
               f'{consequence}. Please report this with your CLIP_benchmark version.')
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


def _autocast(device, amp: bool):
    """The precision of a CLIP_benchmark run: autocast on the evaluation device when ``amp``."""
    return functools.partial(torch.autocast, torch.device(device).type, enabled=amp)


def _prompts(templates):
    """CLIP_benchmark's templates (``{c}`` marks the class name) as the callables our classifier takes."""
    return [lambda classname, template=template: template.format(c=classname) for template in templates]


def _zero_shot_classifier(stock):
    def zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=True):
        if not isinstance(model, LlipModel):
            return stock(model, tokenizer, classnames, templates, device, amp=amp)
        if not isinstance(templates, (list, dict)):
            raise ValueError('templates must be a list or a dict')  # CLIP_benchmark's own check
        with _autocast(device, amp)():
            if isinstance(templates, list):
                return build_zero_shot_classifier(model, tokenizer, classnames, _prompts(templates), device=device,
                                                  use_tqdm=True)
            # Class-specific prompts (such as CuPL's): each class from its own prompts, as they are.
            return torch.cat([build_zero_shot_classifier(model, tokenizer, [name], [lambda _, p=prompt: p for prompt
                                                                                   in templates[name]], device=device)
                              for name in tqdm(classnames)])
    return zero_shot_classifier


def _run_classification(stock):
    def run_classification(model, classifier, dataloader, device, amp=True):
        if not isinstance(model, LlipModel):
            return stock(model, classifier, dataloader, device, amp=amp)
        autocast = _autocast(device, amp)
        scores, targets = [], []
        with torch.inference_mode():
            for images, target in tqdm(dataloader):
                with autocast():
                    scores.append(zero_shot_cosine(model, classifier, images.to(device))[0].float().cpu())
                targets.append(target.cpu())
        return torch.cat(scores), torch.cat(targets)  # CLIP_benchmark's (logits [N, C], targets)
    return run_classification


def _retrieval_evaluate(stock, retrieval):
    def evaluate(model, dataloader, tokenizer, device, amp=True, recall_k_list=(5,)):
        if not isinstance(model, LlipModel):
            return stock(model, dataloader, tokenizer, device, amp=amp, recall_k_list=recall_k_list)
        autocast = _autocast(device, amp)
        captions, image_index, batch_sizes = [], [], []

        def images():
            """CLIP_benchmark's batches of (images, captions of each image): the images, the captions kept."""
            for batch_images, batch_captions, indices in retrieval.dataloader_with_indices(dataloader):
                captions.extend(caption for image_captions in batch_captions for caption in image_captions)
                image_index.extend(i for i, image_captions in zip(indices.tolist(), batch_captions) for _ in image_captions)
                batch_sizes.append(len(batch_images))
                yield batch_images

        image_features = encode_images(model, images(), device, autocast, use_tqdm=True)
        batch_size = batch_sizes[0]
        text_features = encode_texts(model, tokenizer(captions).split(batch_size), device, autocast)
        with torch.inference_mode(), autocast():
            scores = model.similarity(image_features, text_features).T.float()  # [texts, images], as CLIP_benchmark's
        # CLIP_benchmark's metric (its evaluate, from here on): an item is retrieved at k when one of its positives
        # is among its top k.
        positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
        positive_pairs[torch.arange(len(scores)), image_index] = True
        metrics = {}
        for k in recall_k_list:
            for name, item_scores, positives in (('image', scores, positive_pairs), ('text', scores.T, positive_pairs.T)):
                retrieved = retrieval.batchify(retrieval.recall_at_k, item_scores, positives, batch_size, device, k=k) > 0
                metrics[f'{name}_retrieval_recall@{k}'] = retrieved.float().mean().item()
        return metrics
    return evaluate


def _model(args, kwargs):
    """The model a CLIP_benchmark ``evaluate`` was called with (its first parameter)."""
    return kwargs['model'] if 'model' in kwargs else args[0]


class UniformMixture(nn.Module):
    """A Llip model as CLIP_benchmark's linear probe takes it: ``encode_image`` gives one vector per image [N, D].

    The vector is the mixture of the image's K tokens at a query that weighs them equally
    (``LlipMixer.uniform_mixture``); CLIP_benchmark normalises it (its ``--normalize``) and trains on it.
    """

    def __init__(self, model: LlipModel):
        super().__init__()
        self.model = model

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.mixer.uniform_mixture(unpack_image(self.model.encode_image(image))[1])


def _linear_probe(stock):
    @functools.wraps(stock)
    def evaluate(model, *args, **kwargs):
        return stock(UniformMixture(model) if isinstance(model, LlipModel) else model, *args, **kwargs)
    return evaluate


def _refuse_llip(stock, task: str):
    @functools.wraps(stock)
    def evaluate(*args, **kwargs):
        if isinstance(_model(args, kwargs), LlipModel):
            raise ValueError(
                f"CLIP_benchmark's {task} cannot evaluate a Llip model: {REFUSED_TASKS[task]}, and a Llip image is a set "
                'of K tokens whose embedding depends on the text. Llip runs zeroshot_classification and '
                'zeroshot_retrieval, scored with conditioned cosines, and linear_probe.')
        return stock(*args, **kwargs)
    return evaluate


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's top-k accuracies (fractions), counted with ``.item()`` as numpy 2.4 requires."""
    return [hits / len(target) for hits in count_top_k(output, target, topk)]


def _fails_with_current_numpy(accuracy) -> bool:
    try:
        accuracy(torch.tensor([[0., 1.]]), torch.tensor([1]), topk=(1,))
    except TypeError:  # "only 0-dimensional arrays can be converted to Python scalars"
        return True
    return False


def _replacements(modules):
    """[(module, name, replacement)] for this CLIP_benchmark; what is not as expected is left alone with a warning."""
    zero_shot, retrieval = modules['zeroshot_classification'], modules['zeroshot_retrieval']
    replacements = []
    if not _scores_models_itself():
        try:
            classifier = expect_function(zero_shot, 'zero_shot_classifier',
                                         ('model', 'tokenizer', 'classnames', 'templates', 'device', 'amp'))
            run = expect_function(zero_shot, 'run_classification', ('model', 'classifier', 'dataloader', 'device', 'amp'))
            replacements += [(zero_shot, 'zero_shot_classifier', _zero_shot_classifier(classifier)),
                             (zero_shot, 'run_classification', _run_classification(run))]
        except Unexpected as error:
            _leave_alone('zero-shot classification', error, 'it cannot score Llip models (use open_clip_llip eval)')
        try:
            stock = expect_function(retrieval, 'evaluate', ('model', 'dataloader', 'tokenizer', 'device', 'amp',
                                                            'recall_k_list'))
            expect_function(retrieval, 'dataloader_with_indices', ('dataloader',))
            expect_function(retrieval, 'recall_at_k', ('scores', 'positive_pairs', 'k'))
            expect_function(retrieval, 'batchify', ('func', 'X', 'Y', 'batch_size', 'device'))
            replacements.append((retrieval, 'evaluate', _retrieval_evaluate(stock, retrieval)))
        except Unexpected as error:
            _leave_alone('retrieval', error, 'it cannot score Llip models (use open_clip_llip eval)')
    try:
        replacements.append((modules['linear_probe'], 'evaluate',
                             _linear_probe(expect_function(modules['linear_probe'], 'evaluate', ('model',)))))
    except Unexpected as error:
        _leave_alone('the linear probe', error, 'it fails on Llip models with an unclear error')
    for task in REFUSED_TASKS:
        try:
            replacements.append((modules[task], 'evaluate',
                                 _refuse_llip(expect_function(modules[task], 'evaluate', ('model',)), task)))
        except Unexpected as error:
            _leave_alone(task, error, 'it may fail on Llip models with an unclear error')
    for task in ('zeroshot_classification', 'linear_probe'):
        try:
            accuracy = expect_function(modules[task], 'accuracy', ('output', 'target', 'topk'))
        except Unexpected as error:
            _leave_alone(f'the accuracy of {task}', error, 'it may fail with numpy >= 2.4')
            continue
        if _fails_with_current_numpy(accuracy):
            replacements.append((modules[task], 'accuracy', _accuracy))
    return replacements


@contextlib.contextmanager
def llip_support():
    """Inside this block, CLIP_benchmark scores Llip models with conditioned cosines (see the module docstring).

    Nothing changes for other models, except that zero-shot accuracy works with numpy ≥ 2.4; on
    exit, CLIP_benchmark is as it was. ImportError if CLIP_benchmark is not installed.
    """
    replacements = _replacements(_metrics_modules())
    stock = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    try:
        for module, name, replacement in replacements:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, function in reversed(stock):
            setattr(module, name, function)


def route_llip_models(module):
    """Make ``module.evaluate`` (one task of ``clip_benchmark.metrics``) evaluate Llip models inside ``llip_support()``.

    ``register()`` calls it for each task's module once it has loaded, so that plain ``clip_benchmark eval``
    gives a Llip model ``open_clip_llip benchmark eval``'s numbers. Every other model goes to CLIP_benchmark's
    own ``evaluate`` as it is (without the numpy fix of ``llip_support()``). Zero-shot classification and
    retrieval are left to a CLIP_benchmark that scores models itself.
    """
    task = module.__name__.rpartition('.')[2]
    if task in SCORED_TASKS and _scores_models_itself():
        return
    try:
        stock = expect_function(module, 'evaluate', ('model',))
    except Unexpected as error:
        _leave_alone(f'the {task} of clip_benchmark eval', error, 'it may fail on Llip models with an unclear error')
        return

    @functools.wraps(stock)
    def evaluate(*args, **kwargs):
        if not isinstance(_model(args, kwargs), LlipModel):
            return stock(*args, **kwargs)
        with llip_support():
            # The block's own evaluate of this task where it has one (retrieval, the linear probe, the refusals);
            # zero-shot classification keeps CLIP_benchmark's, which calls the functions the block replaces.
            inside = module.evaluate
            return (stock if inside is evaluate else inside)(*args, **kwargs)

    module.evaluate = evaluate

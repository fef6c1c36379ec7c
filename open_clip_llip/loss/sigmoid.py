"""Llip's loss: SigLIP's sigmoid loss on the text-conditioned scores (docs/method.md, loss and cost).

    s[i,j] = exp(logit_scale) · cos(z[i|j], t[j]) + logit_bias
    L      = −(1/b) Σ_{i,j} log σ(y[i,j] · s[i,j]),   y = +1 if i == j else −1

b local images, B texts in all. Images (keys, values, Gram) stay on their rank; each text's
features (``open_clip_llip.modeling.features``: its raw query and target in one ``[M, 2, H, d]`` tensor)
travel exactly as text features do in OpenCLIP's ``SigLipLoss`` (its four distributed
implementations, ``bidir``, ``shift``, ``reduce``, ``gather``, with its own exchange helpers);
then one loss call takes all the texts a rank has seen, rather than one call per chunk. The mixer
temperature τ, a constant of the model, is given to the loss when it is built.

Memory: the scores are computed in blocks of images (all texts at once: on the CPU, products with
many texts run near matmul speed), each recomputed in the backward pass (activation
checkpointing), so between the forward and the backward pass only the inputs are kept, and at
any time at most one block's ``[n, H·K, B]`` intermediates — never ``[b, B, D]``.
On CUDA with Triton installed, the fused kernels of ``open_clip_llip.loss.fused`` compute the
same loss keeping two scalars per pair; ``impl`` (or ``OPEN_CLIP_LLIP_LOSS_IMPL=triton|torch``,
read when the loss is built) forces either.
"""
import functools
import importlib.util
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss, neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad
from torch.utils.checkpoint import checkpoint

from ..modeling.scoring import Temperature, pair_block_size, pair_cosine, single_temperature


def block_loss(keys, values, gram, queries, targets, logit_scale, logit_bias, first_text: int, negative_only: bool,
               temperature: float = 1.):
    """Σ −log σ(y·s) over n images × m texts, text j paired with image ``j + first_text`` (which may be < 0).

    Keys, values [n, H, K, d], Gram matrices [n, H·K, H·K], raw queries and targets [m, H, d]; the queries are
    divided by ``temperature`` in ``scoring.attention`` (τ = 1 for queries already divided, as
    ``fused_sigmoid_loss`` takes them with its default).
    """
    logits = logit_scale * pair_cosine(keys, values, gram, queries, targets, temperature) + logit_bias  # [n, m]
    images = torch.arange(logits.shape[0], device=logits.device)[:, None]
    texts = torch.arange(logits.shape[1], device=logits.device)[None, :] + first_text
    positive = (images == texts) & (not negative_only)  # a comparison, not nonzero(): no host sync per block
    return -F.logsigmoid(torch.where(positive, logits, -logits)).sum()


def _packed_block_loss(image_features, gram, text_features, logit_scale, logit_bias, first_text, negative_only,
                       temperature):
    """``block_loss`` on the model's features as they come: images [n, 2, H, K, d] (keys, values), texts
    [m, 2, H, d] (raw q, p), unbound into views."""
    return block_loss(*image_features.unbind(dim=1), gram, *text_features.unbind(dim=1), logit_scale, logit_bias,
                       first_text, negative_only, temperature)


class _ImageBlocksLoss(torch.autograd.Function):
    """Σ of ``block_loss`` over blocks of images against all texts, each block recomputed in the backward pass.

    Activation checkpointing by hand: ``torch.utils.checkpoint`` over slices of the inputs would
    have autograd allocate a full-size zero gradient for every block (``[b, H·K, H·K]`` for the
    Gram matrices) and add them up; here each block's gradients go straight into one buffer.
    """

    @staticmethod
    def forward(ctx, image_features, gram, text_features, logit_scale, logit_bias, block_size, negative_only,
                temperature):
        device_type = image_features.device.type
        ctx.autocast = dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                            dtype=torch.get_autocast_dtype(device_type))
        ctx.block_size, ctx.negative_only, ctx.temperature = block_size, negative_only, temperature
        ctx.save_for_backward(image_features, gram, text_features, logit_scale, logit_bias)
        total = 0.
        for start in range(0, image_features.shape[0], block_size):
            stop = start + block_size
            total = total + _packed_block_loss(image_features[start:stop], gram[start:stop], text_features,
                                               logit_scale, logit_bias, -start, negative_only, temperature)
        return total

    @staticmethod
    def backward(ctx, grad):
        image_features, gram, text_features, logit_scale, logit_bias = ctx.saved_tensors
        image_grads = torch.empty_like(image_features), torch.empty_like(gram)  # every block writes its rows
        shared = [x.detach().requires_grad_() for x in (text_features, logit_scale, logit_bias)]
        shared_grads = [torch.zeros_like(x) for x in shared]  # every block adds to these
        for start in range(0, image_features.shape[0], ctx.block_size):
            stop = start + ctx.block_size
            block = [x[start:stop].detach().requires_grad_() for x in (image_features, gram)]
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                loss = _packed_block_loss(*block, *shared, -start, ctx.negative_only, ctx.temperature)
            grads = torch.autograd.grad(loss, block + shared, grad)
            for full, part in zip(image_grads, grads[:2]):
                full[start:stop] = part
            for total, part in zip(shared_grads, grads[2:]):
                total += part
        return (*image_grads, *shared_grads, None, None, None)


LOSS_IMPLS = ('auto', 'torch', 'triton')


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec('triton') is not None


def loss_impl_from_environment() -> str:
    """``OPEN_CLIP_LLIP_LOSS_IMPL`` (``torch`` or ``triton``; unset: ``auto``), checked."""
    impl = os.environ.get('OPEN_CLIP_LLIP_LOSS_IMPL', '') or 'auto'
    if impl not in LOSS_IMPLS:
        raise ValueError(f'OPEN_CLIP_LLIP_LOSS_IMPL is {impl!r}; set it to "triton" or "torch", or unset it.')
    return impl


def _check_batch(image_features, image_gram, text_features):
    """ValueError unless the local batch is b ≥ 1 images and their b texts, in ``LlipModel.forward``'s shapes."""
    if image_features.ndim != 5 or text_features.ndim != 4 or image_gram.ndim != 3 \
            or image_features.shape[1] != 2 or text_features.shape[1] != 2:
        raise ValueError(
            'LlipLoss takes LlipModel.forward\'s outputs: image_features [b, 2, H, K, d], image_gram [b, H·K, H·K] and '
            f'text_features [b, 2, H, d]; got {list(image_features.shape)}, {list(image_gram.shape)} and '
            f'{list(text_features.shape)}.')
    images, texts, grams = image_features.shape[0], text_features.shape[0], image_gram.shape[0]
    if not images or images != texts or grams != images:
        raise ValueError(
            f'LlipLoss needs a non-empty batch of image-text pairs: {images} image(s), {grams} Gram matrices and '
            f'{texts} text(s) given. Text j is the caption of image j, so the counts must be equal and at least 1.')


class LlipLoss(SigLipLoss):
    """Sigmoid loss on Llip's conditioned scores; takes ``LlipModel.forward``'s outputs as keywords.

    Args:
        temperature: the mixer temperature τ of the model (``model.mixer.temperature``), applied to
            the raw queries of the text features.
        rank, world_size, dist_impl: as for OpenCLIP's ``SigLipLoss``.
        impl: ``'torch'`` (the PyTorch path), ``'triton'`` (the fused kernels) or ``'auto'`` (the
            kernels for CUDA tensors when Triton is installed); default: ``OPEN_CLIP_LLIP_LOSS_IMPL``,
            else ``'auto'``. Chosen here, once.
        block_size: images per block of the PyTorch path (default: about 4M elements per
            ``[n, H·K, B]`` intermediate).
        position: called (no arguments) when the loss is not finite, for where training stopped
            (say, ``'epoch 3, step 120'``); the count of (uncompiled) calls of this loss when not given.
    """

    def __init__(self, temperature: Temperature, rank: int = 0, world_size: int = 1, dist_impl: Optional[str] = None,
                 impl: Optional[str] = None, block_size: Optional[int] = None,
                 position: Optional[Callable[[], Optional[str]]] = None):
        super().__init__(rank=rank, world_size=world_size, dist_impl=dist_impl)
        self.temperature = single_temperature(temperature)
        self.impl = loss_impl_from_environment() if impl is None else impl
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f'LlipLoss impl must be one of {LOSS_IMPLS}, got {self.impl!r}.')
        if self.impl == 'triton' and not triton_installed():
            raise ImportError('The fused Llip loss needs Triton (pip install triton), which is not installed.')
        self.block_size = block_size
        self.position = position
        self.calls = 0

    def uses_kernels(self, tensor: torch.Tensor) -> bool:
        return self.impl == 'triton' or (self.impl == 'auto' and tensor.is_cuda and triton_installed())

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        features, gram = image_features
        keys, values = features.unbind(dim=1)
        queries, targets = text_features.unbind(dim=1)
        num_images, heads, tokens, _ = keys.shape
        if self.uses_kernels(keys):
            from .fused import fused_sigmoid_loss  # imports Triton only when used
            loss = fused_sigmoid_loss(keys, values, gram, queries, targets, logit_scale, logit_bias,
                                      temperature=self.temperature, negative_only=negative_only)
            return loss / num_images
        block_size = self.block_size or pair_block_size(queries.shape[0], heads, tokens)
        if torch.compiler.is_compiling():
            # torch.compile cannot trace _ImageBlocksLoss's backward (it calls autograd.grad): checkpointing each
            # block recomputes the same blocks in the backward pass, in a graph it traces whole.
            loss = sum(checkpoint(_packed_block_loss, features[start:start + block_size], gram[start:start + block_size],
                                  text_features, logit_scale, logit_bias, -start, negative_only, self.temperature,
                                  use_reentrant=False)
                       for start in range(0, num_images, block_size))
        else:
            loss = _ImageBlocksLoss.apply(features, gram, text_features, logit_scale, logit_bias, block_size,
                                          negative_only, self.temperature)
        return loss / num_images

    def _all_texts(self, text_features):
        """This rank's texts, then every other rank's, [W·b, 2, H, d], gathered with gradients through the exchange
        of ``dist_impl`` (OpenCLIP's own helpers, as ``SigLipLoss.forward`` uses them).

        The loss is then one call over all the texts a rank sees, its positives the first b, instead of one call
        per chunk of b texts: one launch per step whose grid has W times the texts to spread over the GPU.
        """
        if self.world_size == 1:
            return text_features
        chunks = [text_features]
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        if self.dist_impl == 'bidir':
            to_right = to_left = text_features
            num_bidir, remainder = divmod(self.world_size - 1, 2)
            for _ in range(num_bidir):
                from_right, from_left = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                chunks += [from_right, from_left]
                to_left, to_right = from_right, from_left
            if remainder:
                chunks.append(neighbour_exchange_with_grad(left, right, to_right))
        elif self.dist_impl == 'shift':
            to_right = text_features
            for _ in range(self.world_size - 1):
                to_right = neighbour_exchange_with_grad(left, right, to_right)
                chunks.append(to_right)
        elif self.dist_impl == 'reduce':
            # This rank's own chunk comes back through its all_reduce too, and is used from there: every
            # all_reduce then has a gradient on every rank, so that their backward all_reduces pair up.
            received = [torch.distributed.nn.all_reduce(text_features * (self.rank == other),
                                                        torch.distributed.ReduceOp.SUM)
                        for other in range(self.world_size)]
            chunks = [received[self.rank]] + [x for other, x in enumerate(received) if other != self.rank]
        else:  # 'gather'
            gathered = torch.distributed.nn.all_gather(text_features)
            chunks += [x for other, x in enumerate(gathered) if other != self.rank]
        return torch.cat(chunks)

    def forward(self, image_features, text_features, logit_scale, logit_bias, image_gram=None,
                output_dict: bool = False):
        """``LlipModel.forward``'s outputs (its dict, ``output_dict=True``) -> the loss of b local images against all texts.

        Image features [b, 2, H, K, d] and their Gram matrices [b, H·K, H·K] stay on this rank;
        text features [b, 2, H, d] (``open_clip_llip.modeling.features``) travel as SigLipLoss's text features
        do, and the loss is one call over all of them (``_all_texts``): the same sum as SigLipLoss's
        one call per chunk.
        """
        if image_gram is None:
            raise ValueError(
                "LlipLoss needs the images' Gram matrices (image_gram), which LlipModel.forward returns only in its "
                'dict: CLIP\'s tuple (output_dict=False) has no place for them. Create the model with output_dict=True, '
                'as open_clip_train does, and call loss(**model(images, texts)).')
        _check_batch(image_features, image_gram, text_features)
        texts = self._all_texts(text_features)
        loss = self._loss((image_features, image_gram), texts, logit_scale, logit_bias)
        self._check_finite(loss)
        return {'contrastive_loss': loss} if output_dict else loss

    def _check_finite(self, loss):
        """Stop rather than train on NaNs: eagerly with one host sync per step, saying where; compiled, on the device."""
        hint = ('Try a lower learning rate (--lr), or --precision amp_bf16 instead of amp: bfloat16 has the range of '
                'float32, float16 overflows.')
        if torch.compiler.is_compiling():  # a host sync would break the graph
            torch._assert_async(torch.isfinite(loss), f'The Llip loss is not finite; stopping rather than training on '
                                                      f'NaNs. {hint}')
            return
        self.calls += 1
        if not torch.isfinite(loss).item():
            where = (self.position() if self.position else None) or f'call {self.calls} of this loss'
            raise FloatingPointError(f'The Llip loss is {loss.item()} at {where}; stopping rather than training on '
                                     f'NaNs. {hint}')

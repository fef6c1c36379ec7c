"""Llip model: OpenCLIP's towers with mixture tokens, a text query and a mixer (docs/method.md, image tower to loss).

Notation: N images, M texts, K mixture tokens, H mixer heads, D = ``embed_dim``, d = D / H.
"""
import inspect
import logging
import math
from dataclasses import asdict, is_dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import LayerNorm, LayerNormFp32, text_global_pool
from torch import nn

from .classifier import build_zero_shot_classifier
from .config import CONFIG_RECORD_KEY, LlipCfg, check_llip_config, config_record, read_config_record
from .features import check_features, pack_image, pack_text, unpack_image, unpack_text
from .mixer import LlipMixer, TextQueryHead, split_heads
from .scoring import Temperature, pair_block_size, pair_cosine, parse_temperatures, scoring_dtype, temperatures
from .text import build_text_tower
from .vision import build_mixture_token_vit

MODEL_CLASS_NAME = 'LlipModel'  # the ``model_class`` of Llip configs


def llip_model_names():
    """Names of the Llip configs that OpenCLIP knows (ours and any a user added)."""
    import open_clip
    return [name for name in open_clip.list_models()
            if open_clip.get_model_config(name).get('model_class') == MODEL_CLASS_NAME]


# Elements of the Gram matrices scored at once by ``LlipModel.similarity`` (16 MiB in fp32).
_GRAM_BLOCK_ELEMENTS = 1 << 22


def _describe_llip_cfg(cfg: dict) -> str:
    described = (f"K = {cfg['mixture_tokens']}, H = {cfg['heads']}, τ = {cfg['temperature']}, "
                 f"norm = {cfg['norm']}")
    return described if cfg['contextual'] else described + ', non-contextual'


def _recorded_llip_cfg(record) -> dict:
    """The ``LlipCfg`` a state dict records, fields added since it was saved taking their defaults."""
    recorded = read_config_record(record)
    try:
        return asdict(LlipCfg(**recorded))
    except TypeError:
        raise ValueError(f'{CONFIG_RECORD_KEY} records a Llip config this version does not know: {recorded}.') from None


def _check_state_dict(model, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook: refuse weights recorded for another Llip config, or non-finite ones.

    Runs on every path that loads weights (``create_model``, ``--resume``, EMA, a user's own
    ``load_state_dict``). A state dict that records no config (the authors' checkpoints, converted
    CLIP checkpoints, ours from before the record) takes the model's record.
    """
    key = prefix + CONFIG_RECORD_KEY
    if key in state_dict:
        recorded, expected = _recorded_llip_cfg(state_dict[key]), model.llip_cfg.to_dict()
        if recorded != expected:
            raise ValueError(
                f'These weights were made for a Llip model with {_describe_llip_cfg(recorded)}, but this model has '
                f'{_describe_llip_cfg(expected)}. Create the model from a config with llip_cfg {recorded} to load them.')
    else:
        state_dict[key] = config_record(model.llip_cfg)
    non_finite = [name[len(prefix):] for name, value in state_dict.items()
                  if name.startswith(prefix) and isinstance(value, torch.Tensor) and value.is_floating_point()
                  and not torch.isfinite(value).all()]
    if non_finite:
        raise ValueError(
            f'{len(non_finite)} tensor(s) of these weights hold NaN or infinite values: '
            f'{", ".join(non_finite[:8])}{", …" if len(non_finite) > 8 else ""}. Load a checkpoint saved before '
            'training diverged.')


class LlipModel(nn.Module):
    """Llip: CLIP whose image embedding depends on the text it is compared with.

    Towers: ``visual`` (``MixtureTokenViT``) gives K keys and values per image; ``text``
    (OpenCLIP's ``TextTransformer``) gives the text embedding t, and ``query_head``
    (``TextQueryHead``) the mixer query q from the same pooled token; ``mixer`` (``LlipMixer``)
    turns them into conditioned scores ``s[i,j] = exp(logit_scale)·cos(z[i|j], t[j]) + logit_bias``.

    The constructor takes an OpenCLIP model config with one more key, ``llip_cfg`` (``LlipCfg``).
    ``forward`` returns what the loss needs as a dict with ``output_dict`` (as ``open_clip_train`` builds
    its models), else CLIP's tuple.
    """
    # What loading a saved LlipModel needs besides open_clip_torch (written to its Hub config and card).
    hub_requirements = ('open_clip_llip',)

    def __init__(
            self,
            embed_dim: int,
            vision_cfg: Union[dict, CLIPVisionCfg],
            text_cfg: Union[dict, CLIPTextCfg],
            llip_cfg: Union[dict, LlipCfg],
            quick_gelu: bool = False,
            init_logit_scale: float = np.log(1 / 0.07),
            init_logit_bias: Optional[float] = -10.,
            nonscalar_logit_scale: bool = False,
            cast_dtype: Optional[torch.dtype] = None,
            output_dict: bool = False,
    ):
        super().__init__()
        if init_logit_bias is None:
            raise ValueError('Llip needs a logit bias (its loss is sigmoid); init_logit_bias must not be None.')
        sections = [asdict(cfg) if is_dataclass(cfg) else cfg for cfg in (vision_cfg, text_cfg, llip_cfg)]
        top = dict(embed_dim=embed_dim, quick_gelu=quick_gelu, init_logit_scale=init_logit_scale,
                   init_logit_bias=init_logit_bias)
        check_llip_config(top, *sections, CLIPVisionCfg, CLIPTextCfg)
        vision_cfg, text_cfg, llip_cfg = (cls(**cfg) for cls, cfg in zip((CLIPVisionCfg, CLIPTextCfg, LlipCfg), sections))
        self.llip_cfg = llip_cfg
        self.output_dict = output_dict
        norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm

        self.visual = build_mixture_token_vit(
            embed_dim, vision_cfg, llip_cfg.mixture_tokens, llip_cfg.norm, quick_gelu, cast_dtype)
        self.text = build_text_tower(embed_dim, text_cfg, quick_gelu, cast_dtype)
        self.context_length = self.text.context_length
        self.vocab_size = self.text.vocab_size
        self.query_head = (TextQueryHead(text_cfg.width, embed_dim, llip_cfg.heads, llip_cfg.norm, norm_layer)
                           if llip_cfg.contextual else None)
        self.mixer = LlipMixer(embed_dim, llip_cfg.heads, llip_cfg.temperature)

        lshape = [1] if nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.ones(lshape) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones(lshape) * init_logit_bias)
        # In a training log, the initialisation the run starts from (unless weights are loaded next).
        logging.info(f'LlipModel initialised with init_logit_scale {init_logit_scale:.6g} (scores scaled by '
                     f'{math.exp(init_logit_scale):.4g}) and init_logit_bias {init_logit_bias:.6g}.')
        self.register_buffer(CONFIG_RECORD_KEY, config_record(llip_cfg))
        self.register_load_state_dict_pre_hook(_check_state_dict)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True, pooler_in_head: bool = True):
        """Lock the text tower as OpenCLIP does; the query head is locked with ``text_projection``.

        ``freeze_layer_norm=False`` (``open_clip_train``'s default) leaves the tower's LayerNorms
        trainable, which is what the flag means; OpenCLIP 3.3's own towers refuse it.
        ``pooler_in_head`` (OpenCLIP 4) is passed on to a text tower that takes it.
        """
        if 'pooler_in_head' in inspect.signature(self.text.lock).parameters:
            self.text.lock(unlocked_layers, freeze_layer_norm=True, pooler_in_head=pooler_in_head)
        else:
            self.text.lock(unlocked_layers, freeze_layer_norm=True)
        if self.query_head is not None:
            self.query_head.requires_grad_(unlocked_layers > 0)
        if not freeze_layer_norm:
            for module in self.text.modules():
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(True)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, impl: str = 'inline'):
        """Checkpoint the towers' blocks; ``impl`` (OpenCLIP 4: 'inline' or 'composable') goes to towers that take it."""
        for tower in (self.visual, self.text):
            if impl == 'inline':
                tower.set_grad_checkpointing(enable)
            else:
                tower.set_grad_checkpointing(enable, impl=impl)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'visual.{n}' for n in self.visual.no_weight_decay()} | {f'text.{n}' for n in self.text.no_weight_decay()}

    def load_checkpoint(self, checkpoint_path: str, strict: bool = True, weights_only: bool = True, device='cpu'):
        """Load our checkpoints, the authors' released ones, or an OpenCLIP CLIP ViT's (see ``checkpoint``)."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, checkpoint_path, strict=strict, weights_only=weights_only, device=device)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images [N, 3, H_img, W_img] -> image features [N, 2, H, K, d] (``open_clip_llip.modeling.features``).

        A Llip image is K keys and values whose score depends on the text; it has no single unit
        vector, so ``normalize=True`` is refused rather than answered with something else.
        """
        if normalize:
            raise ValueError(
                'A Llip image is a set of K mixture tokens whose embedding depends on the text it is compared with: '
                'there is no single image vector to normalise. Score images against texts with '
                'model.get_logits(images, texts) or model.similarity(model.encode_image(images), '
                'model.encode_text(texts)); to search a large gallery, use an index (open_clip_llip.search, the '
                'open_clip_llip index command).')
        keys, values = self.visual(image)
        heads = self.mixer.heads
        return pack_image(split_heads(keys, heads).transpose(1, 2), split_heads(values, heads).transpose(1, 2))

    def check_text(self, text: torch.Tensor):
        """Raise a ValueError unless ``text`` is a batch of token ids [M, context_length] in the vocabulary.

        The vocabulary check reads the ids: done on CPU tensors and outside training, not for a
        training batch on a GPU (a host sync every step), where the embedding asserts on the device.
        A compiled or exported forward, whose graph a host sync would break, checks them on the device
        (a RuntimeError on the CPU, a device-side assert on a GPU).
        """
        if text.ndim != 2 or text.shape[1] != self.context_length or text.is_floating_point() or text.is_complex():
            raise ValueError(
                f'{type(self).__name__} expects integer token ids of shape [M, {self.context_length}]; got a '
                f'{text.dtype} tensor of shape {list(text.shape)}. Tokenize with open_clip.get_tokenizer(model_name).')
        advice = 'Tokenize with open_clip.get_tokenizer(model_name), whose vocabulary this model was built for.'
        if torch.compiler.is_compiling():
            torch._assert_async(((text >= 0) & (text < self.vocab_size)).all(),
                                f'Token ids must lie in [0, {self.vocab_size}) (text_cfg.vocab_size). {advice}')
        elif text.numel() and (text.device.type == 'cpu' or not self.training):
            low, high = text.min().item(), text.max().item()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f'Token ids must lie in [0, {self.vocab_size}) (text_cfg.vocab_size); these range '
                                 f'from {low} to {high}. {advice}')

    def embed_text(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids [M, L] -> the text tower's two outputs: embeddings t [M, D] and raw queries q [M, H, d]."""
        self.check_text(text)
        embeddings, tokens = self.text(text)
        if self.query_head is None:  # non-contextual: zero queries, so every text attends uniformly
            heads = self.mixer.heads
            return embeddings, embeddings.new_zeros(len(embeddings), heads, embeddings.shape[-1] // heads)
        pooled = text_global_pool(tokens, text, self.text.pool_type, eos_token_id=self.text.eos_id)
        return embeddings, self.query_head(pooled)

    def text_features(self, embeddings: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Text embeddings t [M, D] (any length) and raw queries [M, H, d] -> text features [M, 2, H, d]: (q, W_O t̂)."""
        return pack_text(queries.to(self.mixer.out_proj.dtype), self.mixer.text_targets(embeddings))

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [M, L] -> text features [M, 2, H, d] (``open_clip_llip.modeling.features``).

        The target p = W_O t̂ is built from the unit embedding, so there is nothing left to
        normalise; ``normalize=True`` is refused, as for images (``encode_image``).
        """
        if normalize:
            raise ValueError(
                'Llip text features are a mixer query and a target built from the unit text embedding: nothing to '
                'normalise, and they are not compared with a dot product. Use model.similarity(image_features, '
                'model.encode_text(texts)) or model.get_logits(images, texts).')
        return self.text_features(*self.embed_text(text))

    def similarity(self, image_features: torch.Tensor, text_features: torch.Tensor,
                   temperature: Temperature = None) -> torch.Tensor:
        """cos(z[i|j], t[j]) of every image and text -> [N, M] at one τ, or [T, N, M] at a sequence of T.

        Image features ``[N, 2, H, K, d]`` and text features ``[M, 2, H, d]`` (``open_clip_llip.modeling.features``),
        on any device (say, as OpenCLIP's evaluation accumulates them on the CPU) and in any precision:
        they are scored on the model's device in the widest of their dtypes and the mixer's, in blocks
        of images, each image's Gram matrix computed once for all texts and temperatures. τ defaults
        to the model's; one τ is a number or a 0-d tensor or array, several a list, tuple, 1-d tensor or
        array (``scoring.parse_temperatures``).

        Memory: the scores, allocated once and filled block by block ([n images, m texts], the blocks of
        ``scoring.conditioned_cosine``), and one block's intermediates (a few [n, H·K, m] tensors of
        ``scoring.pair_block_size`` elements): a working set that does not grow with N or M. Nothing small
        outlives a block between its large buffers, so that the allocator can reuse them (docs/benchmarks.md,
        evaluation memory).
        """
        check_features(image_features, text_features)
        taus, several = parse_temperatures(temperature, self.mixer.temperature)
        device = self.mixer.out_proj.device
        dtype = scoring_dtype(image_features, text_features, self.mixer.out_proj)
        num_images, num_texts = len(image_features), len(text_features)
        heads, tokens = image_features.shape[2:4]
        block = max(1, _GRAM_BLOCK_ELEMENTS // (heads * tokens) ** 2)
        queries, targets = unpack_text(text_features.to(device, dtype))
        scores = None
        for start in range(0, num_images, block):
            keys, values = unpack_image(image_features[start:start + block].to(device, dtype))
            gram = self.mixer.image_gram(values).to(dtype)
            texts = pair_block_size(len(keys), heads, tokens)
            for first in range(0, num_texts, texts):
                for t, tau in enumerate(taus):
                    cosine = pair_cosine(keys, values, gram, queries[first:first + texts], targets[first:first + texts],
                                         tau)
                    if scores is None:  # the dtype pair_cosine gives (under autocast, the autocast's)
                        scores = torch.empty(len(taus), num_images, num_texts, dtype=cosine.dtype,
                                             device=image_features.device)
                    scores[t, start:start + len(keys), first:first + texts] = cosine
        if scores is None:
            scores = image_features.new_zeros(len(taus), num_images, num_texts)
        return scores if several else scores[0]

    def temperatures(self, temperature: Temperature = None) -> Tuple[float, ...]:
        """The τ values to score at: the given one(s), or the model's; ValueError unless finite and positive."""
        return temperatures(temperature, self.mixer.temperature)

    def build_zero_shot_classifier(self, tokenizer, classnames, templates, num_classes_per_batch=10, device=None,
                                   use_tqdm=False) -> torch.Tensor:
        """Class names x templates -> class text features [C, 2, H, d], as ``similarity`` takes them.

        Each class's embedding is the normalised mean of its normalised template embeddings and its
        query the mean of the raw template queries (docs/method.md, zero-shot; ``classifier.build_zero_shot_classifier``).
        OpenCLIP's zero-shot evaluation calls this.
        """
        return build_zero_shot_classifier(self, tokenizer, classnames, templates,
                                          num_classes_per_batch=num_classes_per_batch, device=device, use_tqdm=use_tqdm)

    def get_logits(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images [N, ...], texts [M, L] -> (image_logits [N, M], text_logits [M, N]) of the conditioned scores."""
        if not (len(image) and len(text)):
            raise ValueError(f'get_logits needs at least one image and one text; got {len(image)} image(s) and '
                             f'{len(text)} text(s).')
        scores = self.similarity(self.encode_image(image), self.encode_text(text))
        image_logits = self.logit_scale.exp() * scores + self.logit_bias
        return image_logits, image_logits.T

    def forward(
            self,
            image: Optional[torch.Tensor] = None,
            text: Optional[torch.Tensor] = None,
    ) -> Union[Dict[str, torch.Tensor], Tuple[Optional[torch.Tensor], ...]]:
        """Images and/or texts -> CLIP's tuple, or with ``output_dict`` what the loss needs.

        With ``output_dict`` (as ``open_clip_train`` makes its models), a dict, batch first so that
        OpenCLIP's ``--accum-freq`` can concatenate it, of what the inputs given yield:
            ``image_features``: [N, 2, H, K, d] (``encode_image``)
            ``image_gram``: [N, H·K, H·K], their Gram matrices (``LlipMixer.image_gram``)
            ``text_features``: [M, 2, H, d] (``encode_text``)
            ``logit_scale`` (exponentiated), ``logit_bias``
        Without: CLIP's tuple ``(image_features, text_features, logit_scale.exp(), logit_bias)``, the
        features in the same shapes (None for an input not given), no Gram matrices.
        """
        image_features = self.encode_image(image) if image is not None else None
        text_features = self.encode_text(text) if text is not None else None
        if not self.output_dict:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        out = {}
        if image_features is not None:
            out.update(image_features=image_features, image_gram=self.mixer.image_gram(unpack_image(image_features)[1]))
        if text_features is not None:
            out.update(text_features=text_features)
        out.update(logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias)
        return out

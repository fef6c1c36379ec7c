"""Llip model: OpenCLIP's towers with mixture tokens, a text query and a mixer (METHOD §1–4).

Notation: N images, M texts, K mixture tokens, H mixer heads, D = ``embed_dim``, d = D / H.
"""
import logging
from dataclasses import asdict, is_dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower
from open_clip.transformer import LayerNorm, LayerNormFp32, text_global_pool

from .config import CONFIG_RECORD_KEY, LlipCfg, check_llip_config, config_record, read_config_record
from .loss import LlipLoss
from .mixer import LlipMixer, TextQueryHead, split_heads
from .scoring import conditioned_cosine
from .vision import build_mixture_token_vit
from .zero_shot import build_zero_shot_classifier

# Elements of the Gram matrices scored at once by ``LlipModel.similarity`` (16 MiB in fp32).
_GRAM_BLOCK_ELEMENTS = 1 << 22


def _check_text_cfg(cfg: CLIPTextCfg):
    unsupported = {
        'hf_model_name': cfg.hf_model_name is not None,
        'embed_cls': cfg.embed_cls,
        'proj_type': cfg.proj_type == 'none',
        'pool_type': cfg.pool_type == 'none',
    }
    bad = [f'text_cfg.{name} = {getattr(cfg, name)!r}' for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} not supported: Llip needs OpenCLIP's own text transformer, pooled to one token "
            'and projected (text_projection), because its query comes from that pooled token.')


def _describe_llip_cfg(cfg: dict) -> str:
    return (f"K = {cfg.get('mixture_tokens')}, H = {cfg.get('heads')}, τ = {cfg.get('temperature')}, "
            f"norm = {cfg.get('norm')}")


def _check_state_dict(model, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook: refuse weights recorded for another Llip config, or non-finite ones.

    Runs on every path that loads weights (``create_model``, ``--resume``, EMA, a user's own
    ``load_state_dict``). A state dict that records no config (the authors' checkpoints, converted
    CLIP checkpoints, ours from before the record) takes the model's record.
    """
    key = prefix + CONFIG_RECORD_KEY
    if key in state_dict:
        recorded, expected = read_config_record(state_dict[key]), model.llip_cfg.to_dict()
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
    ``forward`` always returns a dict (``output_dict`` is accepted for OpenCLIP's factory).
    """
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
            output_dict: bool = True,
    ):
        super().__init__()
        if init_logit_bias is None:
            raise ValueError('Llip needs a logit bias (its loss is sigmoid); init_logit_bias must not be None.')
        sections = [asdict(cfg) if is_dataclass(cfg) else cfg for cfg in (vision_cfg, text_cfg, llip_cfg)]
        top = dict(embed_dim=embed_dim, quick_gelu=quick_gelu, init_logit_scale=init_logit_scale,
                   init_logit_bias=init_logit_bias)
        check_llip_config(top, *sections, CLIPVisionCfg, CLIPTextCfg)
        vision_cfg, text_cfg, llip_cfg = (cls(**cfg) for cls, cfg in zip((CLIPVisionCfg, CLIPTextCfg, LlipCfg), sections))
        _check_text_cfg(text_cfg)
        self.llip_cfg = llip_cfg
        norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm

        self.visual = build_mixture_token_vit(
            embed_dim, vision_cfg, llip_cfg.mixture_tokens, llip_cfg.norm, quick_gelu, cast_dtype)
        text_cfg.output_tokens = True  # the query head reads the pooled token before text_projection
        self.text = _build_text_tower(embed_dim, text_cfg, quick_gelu, cast_dtype)
        self.context_length = self.text.context_length
        self.vocab_size = self.text.vocab_size
        self.query_head = TextQueryHead(text_cfg.width, embed_dim, llip_cfg.heads, llip_cfg.norm, norm_layer)
        self.mixer = LlipMixer(embed_dim, llip_cfg.heads, llip_cfg.temperature)

        lshape = [1] if nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.ones(lshape) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones(lshape) * init_logit_bias)
        self.register_buffer(CONFIG_RECORD_KEY, config_record(llip_cfg))
        self.register_load_state_dict_pre_hook(_check_state_dict)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        """Lock the text tower as OpenCLIP does; the query head is locked with ``text_projection``.

        ``freeze_layer_norm=False`` (``open_clip_train``'s default) leaves the tower's LayerNorms
        trainable, which is what the flag means; OpenCLIP 3.3's own towers refuse it.
        """
        self.text.lock(unlocked_layers, freeze_layer_norm=True)
        self.query_head.requires_grad_(unlocked_layers > 0)
        if not freeze_layer_norm:
            for module in self.text.modules():
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(True)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'visual.{n}' for n in self.visual.no_weight_decay()} | {f'text.{n}' for n in self.text.no_weight_decay()}

    @classmethod
    def create_loss(cls, args) -> LlipLoss:
        """The training loss for ``open_clip_train``'s ``args``: always ``LlipLoss``, whatever ``--siglip`` says."""
        if args.distill:
            raise ValueError('Distillation (--distill-model) is not supported for Llip models.')
        if args.horovod:
            raise ValueError('Horovod is not supported for Llip models (nor by OpenCLIP\'s SigLipLoss); use torchrun or srun.')
        loss = LlipLoss(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl)
        logging.info(
            f'{args.model} is a Llip model: training with LlipLoss (sigmoid loss on conditioned scores, '
            f'distributed as {loss.dist_impl!r}){"; --siglip is implied" if args.siglip else ""}.')
        return loss

    def load_checkpoint(self, checkpoint_path: str, strict: bool = True, weights_only: bool = True, device='cpu'):
        """Load our checkpoints, the authors' released ones, or an OpenCLIP CLIP ViT's (see ``checkpoint``)."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, checkpoint_path, strict=strict, weights_only=weights_only, device=device)

    def encode_image(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images [N, 3, H_img, W_img] -> keys, values: each [N, H, K, d]."""
        keys, values = self.visual(image)
        heads = self.mixer.heads
        return split_heads(keys, heads).transpose(1, 2), split_heads(values, heads).transpose(1, 2)

    def check_text(self, text: torch.Tensor):
        """Raise a ValueError unless ``text`` is a batch of token ids [M, context_length] in the vocabulary.

        The vocabulary check reads the ids: done on CPU tensors and outside training, not for a
        training batch on a GPU (a host sync every step), where the embedding asserts on the device.
        """
        if text.ndim != 2 or text.shape[1] != self.context_length or text.is_floating_point() or text.is_complex():
            raise ValueError(
                f'{type(self).__name__} expects integer token ids of shape [M, {self.context_length}]; got a '
                f'{text.dtype} tensor of shape {list(text.shape)}. Tokenize with open_clip.get_tokenizer(model_name).')
        if text.numel() and (text.device.type == 'cpu' or not self.training):
            low, high = text.min().item(), text.max().item()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f'Token ids must lie in [0, {self.vocab_size}) (text_cfg.vocab_size); these range from {low} to '
                    f'{high}. Tokenize with open_clip.get_tokenizer(model_name), whose vocabulary this model was built for.')

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids [M, L] -> text embeddings t [M, D] (unit length if ``normalize``), raw queries q [M, H, d]."""
        self.check_text(text)
        features, tokens = self.text(text)
        pooled = text_global_pool(tokens, text, self.text.pool_type, eos_token_id=self.text.eos_id)
        queries = self.query_head(pooled)
        return (F.normalize(features, dim=-1) if normalize else features), queries

    def similarity(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """cos(z[i|j], t[j]) for every pair of ``forward``'s features -> [N, M], on the features' device.

        Image features ``[N, 2, H, K, d]`` (keys, values), text features ``[M, 2, H, d]`` (q / τ, p),
        e.g. as OpenCLIP's evaluation accumulates them (on the CPU); computed on the model's
        device in blocks of images (whose Gram matrices are recomputed here) and of texts.
        """
        device = self.mixer.out_proj.device
        # Features of several precisions (say bf16 images and fp32 texts, as autocast leaves them) meet in
        # the widest of theirs and the mixer's.
        dtype = torch.promote_types(torch.promote_types(image_features.dtype, text_features.dtype),
                                    self.mixer.out_proj.dtype)
        heads, tokens = image_features.shape[2:4]
        block = max(1, _GRAM_BLOCK_ELEMENTS // (heads * tokens) ** 2)
        queries, targets = text_features.to(device, dtype).unbind(dim=1)
        rows = []
        for start in range(0, image_features.shape[0], block):
            keys, values = image_features[start:start + block].to(device, dtype).unbind(dim=1)
            gram = self.mixer.image_gram(values).to(dtype)
            rows.append(conditioned_cosine(keys, values, gram, queries, targets).to(image_features.device))
        return torch.cat(rows)

    def build_zero_shot_classifier(self, tokenizer, classnames, templates, num_classes_per_batch=10, device=None,
                                   use_tqdm=False, temperature: Optional[float] = None) -> torch.Tensor:
        """Class names x templates -> class text features [C, 2, H, d], as ``similarity`` takes them.

        Each class's embedding is the normalised mean of its normalised template embeddings and its
        query the mean of the raw template queries (METHOD §6; ``zero_shot.build_zero_shot_classifier``),
        divided by τ (default: the model's). OpenCLIP's zero-shot evaluation calls this.
        """
        classifier = build_zero_shot_classifier(
            self, tokenizer, classnames, templates, num_classes_per_batch=num_classes_per_batch, device=device,
            use_tqdm=use_tqdm)
        return self.mixer.text_side(classifier.features, classifier.queries, temperature)

    def get_logits(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images [N, ...], texts [M, L] -> (image_logits [N, M], text_logits [M, N]) of the conditioned scores."""
        if not (len(image) and len(text)):
            raise ValueError(f'get_logits needs at least one image and one text; got {len(image)} image(s) and '
                             f'{len(text)} text(s).')
        out = self(image, text)
        image_logits = out['logit_scale'] * self.similarity(out['image_features'], out['text_features']) + out['logit_bias']
        return image_logits, image_logits.T

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """What the loss needs, batch first so that OpenCLIP's ``--accum-freq`` can concatenate it.

        Returns, for the inputs given:
            ``image_features``: [N, 2, H, K, d], the keys and the values of each image's mixture tokens
            ``image_gram``: [N, H·K, H·K], their Gram matrices (``LlipMixer.image_gram``)
            ``text_features``: [M, 2, H, d], each text's query / τ and target p = W_O t̂ (``LlipMixer.text_side``)
            ``logit_scale`` (exponentiated), ``logit_bias``
        """
        out = {}
        if image is not None:
            keys, values = self.encode_image(image)
            out.update(image_features=torch.stack([keys, values], dim=1), image_gram=self.mixer.image_gram(values))
        if text is not None:
            out.update(text_features=self.mixer.text_side(*self.encode_text(text)))
        out.update(logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias)
        return out

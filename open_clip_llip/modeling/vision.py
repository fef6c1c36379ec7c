"""Llip's image tower: OpenCLIP's ViT with K mixture tokens instead of one class token.

docs/method.md, image tower. The K learnable mixture tokens sit before the patch tokens, each with its own
positional embedding; after the transformer, ``ln_post`` is applied to the K mixture outputs
and the patch outputs are dropped. Each mixture token k then has its own bias-free key and
value projection (``W_K[k]``, ``W_V[k]``: ``[width, D]``), optionally followed by a LayerNorm
over D (the "-norm" configs).
"""
import inspect
from dataclasses import asdict
from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import LayerNorm, LayerNormFp32, PatchDropout, QuickGELU, VisionTransformer
from torch import nn

# CLIPVisionCfg options that change what the ViT outputs; Llip fixes them (see MixtureTokenViT).
_FIXED_VISION_OPTIONS = {
    'timm_model_name': None,
    'attentional_pool': False,
    'pool_type': 'tok',
    'final_ln_after_pool': False,
    'output_tokens': False,
    'pos_embed_type': 'learnable',
}


class MixtureTokenViT(VisionTransformer):
    """OpenCLIP's ``VisionTransformer`` with K mixture tokens and per-token key/value projections.

    Shapes (N images, K mixture tokens, D = ``output_dim``):
        input   ``[N, 3, image_size, image_size]``
        tokens  ``class_embedding``: ``[K, width]``; ``positional_embedding``: ``[K + grid², width]``
        output  keys, values: each ``[N, K, D]``

    Everything else — blocks, ``ln_pre``/``ln_post``, patch dropout (which drops patches only,
    never mixture tokens), gradient checkpointing, ``lock`` — is OpenCLIP's. The pooled
    projection ``proj`` of OpenCLIP's ViT is not used and is ``None``.
    """

    def __init__(
            self,
            mixture_tokens: int,
            output_dim: int,
            kv_norm: bool = False,
            norm_layer=LayerNorm,
            **vit_kwargs,
    ):
        super().__init__(output_dim=output_dim, norm_layer=norm_layer, **vit_kwargs)
        width = self.conv1.out_channels
        scale = width ** -0.5
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = mixture_tokens
        self.class_embedding = nn.Parameter(scale * torch.randn(mixture_tokens, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(mixture_tokens + num_patches, width))
        self.proj = None
        self.k_proj = nn.Parameter(scale * torch.randn(mixture_tokens, width, output_dim))
        self.v_proj = nn.Parameter(scale * torch.randn(mixture_tokens, width, output_dim))
        self.k_norm = norm_layer(output_dim) if kv_norm else nn.Identity()
        self.v_norm = norm_layer(output_dim) if kv_norm else nn.Identity()
        if isinstance(self.patch_dropout, PatchDropout):
            # embed drops patches before the mixture tokens are prepended.
            self.patch_dropout.exclude_first_token = False

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        """Freeze the tower, leaving the last ``unlocked_groups`` groups trainable.

        Groups as in OpenCLIP's ViT: embeddings, each block, last block with ``ln_post``, and
        last the key/value projections (with their norms) in place of ``proj``.
        """
        for param in self.parameters():
            param.requires_grad = False
        groups = [
            [self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre],
            *[[block] for block in self.transformer.resblocks[:-1]],
            [self.transformer.resblocks[-1], self.ln_post],
            [self.k_proj, self.v_proj, self.k_norm, self.v_norm],
        ]
        for group in groups[-unlocked_groups:] if unlocked_groups else []:
            for item in group:
                for param in [item] if isinstance(item, nn.Parameter) else item.parameters():
                    param.requires_grad = True

    def check_images(self, x: torch.Tensor):
        """Raise a ValueError unless ``x`` is a float batch ``[N, 3, H, W]`` of this tower's size (any float dtype)."""
        expected = (3, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
            raise ValueError(
                f'{type(self).__name__} expects float images of shape [N, {", ".join(map(str, expected))}]; '
                f'got a {x.dtype} tensor of shape {list(x.shape)}. Use the transforms from '
                f'open_clip.create_model_and_transforms for this model.')

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images -> [N, K + kept patches, width] tokens, after ``ln_pre``."""
        num_tokens = self.num_prefix_tokens
        # Float images of another precision than the tower's (fp32 into a bf16 model) are cast to it.
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, grid², width]
        pos = self.positional_embedding.to(x.dtype)
        x = self.patch_dropout(x + pos[num_tokens:])
        tokens = (self.class_embedding.to(x.dtype) + pos[:num_tokens]).expand(x.shape[0], -1, -1)
        return self.ln_pre(torch.cat([tokens, x], dim=1))

    def split_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[N, K + P, width] -> (``ln_post`` of the K mixture outputs [N, K, width], patch outputs [N, P, width])."""
        return self.ln_post(x[:, :self.num_prefix_tokens]), x[:, self.num_prefix_tokens:]

    def project(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mixture outputs [N, K, width] -> keys, values [N, K, D], each token through its own W_K[k], W_V[k]."""
        tokens = tokens.to(self.k_proj.dtype)  # the projections may stay fp32 when the blocks are cast down
        keys = self.k_norm(torch.einsum('nkw,kwd->nkd', tokens, self.k_proj))
        values = self.v_norm(torch.einsum('nkw,kwd->nkd', tokens, self.v_proj))
        return keys, values

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[N, 3, H, W] images -> keys, values: each [N, K, D]."""
        self.check_images(x)
        x = self.transformer(self.embed(x))
        tokens, _ = self.split_outputs(x)
        return self.project(tokens)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            stop_early: bool = False,
            normalize_intermediates: bool = False,
            intermediates_only: bool = False,
            output_fmt: str = 'NCHW',
            output_extra_tokens: bool = False,
    ) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
        """OpenCLIP's ``forward_intermediates`` with the K mixture tokens as prefix tokens.

        Returns ``image_intermediates`` (patch tokens, ``[N, width, gh, gw]`` or ``[N, P, width]``),
        ``image_intermediates_prefix`` (``[N, K, width]`` each, if ``output_extra_tokens``) and,
        unless ``intermediates_only``, ``image_keys`` and ``image_values`` (``[N, K, D]``).
        Patch dropout must be off (eval mode) for the ``NCHW`` format.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self.check_images(x)
        batch = x.shape[0]
        x, intermediates = self.transformer.forward_intermediates(
            self.embed(x), indices=indices, stop_early=stop_early)
        if normalize_intermediates:
            intermediates = [self.ln_post(y) for y in intermediates]
        num_tokens = self.num_prefix_tokens
        prefix = [y[:, :num_tokens] for y in intermediates]
        intermediates = [y[:, num_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [
                y.reshape(batch, *self.grid_size, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        output = {'image_intermediates': intermediates}
        if output_extra_tokens:
            output['image_intermediates_prefix'] = prefix
        if not intermediates_only:
            output['image_keys'], output['image_values'] = self.project(self.split_outputs(x)[0])
        return output


def tower_layers(cfg, quick_gelu: bool, cast_dtype: Optional[torch.dtype]):
    """(activation, norm) classes for a tower of ``cfg`` (a ``CLIPVisionCfg`` or ``CLIPTextCfg``), as OpenCLIP's
    builders choose them: QuickGELU or GELU, and fp32 LayerNorm under fp16/bf16 casts; with the config's kwargs."""
    norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm
    if cfg.norm_kwargs:
        norm_layer = partial(norm_layer, **cfg.norm_kwargs)
    act_layer = QuickGELU if quick_gelu else nn.GELU
    if cfg.act_kwargs is not None:
        act_layer = partial(act_layer, **cfg.act_kwargs)
    return act_layer, norm_layer


def build_mixture_token_vit(
        embed_dim: int,
        vision_cfg: Union[dict, CLIPVisionCfg],
        mixture_tokens: int,
        kv_norm: bool = False,
        quick_gelu: bool = False,
        cast_dtype: Optional[torch.dtype] = None,
) -> MixtureTokenViT:
    """Build the tower from an OpenCLIP ``vision_cfg``, with OpenCLIP's choice of norm and activation.

    Raises ValueError for options that replace or remove the ViT this tower extends (a timm or
    ResNet trunk, attentional pooling, another pooling, sin-cos position embeddings).
    """
    cfg = vision_cfg if isinstance(vision_cfg, CLIPVisionCfg) else CLIPVisionCfg(**vision_cfg)
    for option, fixed in _FIXED_VISION_OPTIONS.items():
        if getattr(cfg, option) != fixed:
            raise ValueError(
                f'vision_cfg.{option} = {getattr(cfg, option)!r} is not supported by Llip, whose image tower is '
                f"OpenCLIP's ViT with mixture tokens; remove it (Llip needs {fixed!r}).")
    if not isinstance(cfg.layers, int):
        raise ValueError(f'vision_cfg.layers = {cfg.layers!r} describes a ResNet; Llip needs a ViT (an int).')

    act_layer, norm_layer = tower_layers(cfg, quick_gelu, cast_dtype)
    # Pass every CLIPVisionCfg field that VisionTransformer takes under the same name.
    vit_args = inspect.signature(VisionTransformer.__init__).parameters
    vit_kwargs = {name: value for name, value in asdict(cfg).items() if name in vit_args}
    return MixtureTokenViT(
        mixture_tokens=mixture_tokens,
        output_dim=embed_dim,
        kv_norm=kv_norm,
        heads=cfg.width // cfg.head_width,
        act_layer=act_layer,
        norm_layer=norm_layer,
        **vit_kwargs,
    )

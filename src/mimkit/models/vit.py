"""timm Vision Transformers driven by mimkit's masked forward.

The encoder *is* a `timm.models.vision_transformer.VisionTransformer`; the functions here run its parts in the
order masked image modeling needs (embed all patches, keep some, run the blocks). Nothing is added to the timm
module, so its state dict is a plain timm checkpoint.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..config import ConfigError
from .pos_embed import sincos_2d


def create_vit(
    name: str, img_size: int, patch_size: int, drop_path: float = 0.0, sincos_pos: bool = True, **sizes
) -> VisionTransformer:
    """A headless timm ViT at `img_size` with `patch_size`; fixed sin-cos position embeddings when asked.
    `sizes` (depth, embed_dim, num_heads; None = the architecture's own) go to timm's factory."""
    if not name.startswith(("vit_", "deit_")) or not timm.is_model(name):
        raise ConfigError(f"model.name '{name}' is not a timm ViT (try e.g. vit_tiny_patch16_224)")
    if img_size % patch_size:
        raise ConfigError(f"data.image_size {img_size} is not divisible by model.patch_size {patch_size}")
    vit = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path,
        **{k: v for k, v in sizes.items() if v is not None},
    )
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        raise ConfigError(f"model.name '{name}' must be a timm VisionTransformer with a class token")
    if sincos_pos:
        set_sincos_pos_embed(vit)
    return vit


def create_encoder(model_cfg, img_size: int, sincos_pos: bool = True) -> VisionTransformer:
    """`create_vit` from a ModelConfig."""
    return create_vit(
        model_cfg.name,
        img_size,
        model_cfg.patch_size,
        model_cfg.drop_path,
        sincos_pos,
        depth=model_cfg.depth,
        embed_dim=model_cfg.embed_dim,
        num_heads=model_cfg.num_heads,
    )


def set_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Replace the learned position embedding by MAE's fixed sin-cos table (kept as a frozen parameter)."""
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    table = sincos_2d(vit.embed_dim, grid_size(vit), num_prefix=prefix)
    vit.pos_embed.data.copy_(table.unsqueeze(0))
    vit.pos_embed.requires_grad_(False)


def grid_size(vit: VisionTransformer) -> tuple[int, int]:
    return tuple(vit.patch_embed.grid_size)


def patch_size(vit: VisionTransformer) -> int:
    return vit.patch_embed.patch_size[0]


def embed_patches(vit: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, D) patch embeddings with their position embedding added (before any masking)."""
    x = vit.patch_embed(imgs)
    pos = vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, vit.num_prefix_tokens :]
    return x + pos


def prefix_tokens(vit: VisionTransformer, batch_size: int) -> torch.Tensor:
    """(B, P, D): the class token (+ register tokens), with their position embedding where timm adds one."""
    tokens = [vit.cls_token]
    if vit.reg_token is not None:
        tokens.append(vit.reg_token)
    prefix = torch.cat(tokens, dim=1)
    if not vit.no_embed_class:
        prefix = prefix + vit.pos_embed[:, : vit.num_prefix_tokens]
    return prefix.expand(batch_size, -1, -1)


def run_blocks(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, P + K, D) prefix + patch tokens -> (B, P + K, D) after the blocks and final norm."""
    x = vit.pos_drop(tokens)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def encode_visible(vit: VisionTransformer, patches: torch.Tensor) -> torch.Tensor:
    """(B, K, D) position-embedded visible patches -> (B, P + K, D) encoded, prefix tokens first."""
    x = torch.cat([prefix_tokens(vit, patches.shape[0]), patches], dim=1)
    return run_blocks(vit, x)


def encode_with_mask_token(
    vit: VisionTransformer, imgs: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """SimMIM/BEiT-style encoding of all patches: imgs (B, C, H, W), mask (B, N) bool with 1 = masked,
    mask_token (1, 1, D) -> (B, P + N, D). Masked patch embeddings are replaced by the mask token *before* the
    position embedding is added, so the token carries its position."""
    x = vit.patch_embed(imgs)
    w = mask.unsqueeze(-1).to(x.dtype)
    x = x * (1 - w) + mask_token.to(x.dtype) * w
    pos = vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, vit.num_prefix_tokens :]
    x = torch.cat([prefix_tokens(vit, x.shape[0]), x + pos], dim=1)
    return run_blocks(vit, x)


def pool_features(vit: VisionTransformer, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, P + N, D) -> (B, D): the class token ('cls') or the mean of the patch tokens ('avg')."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, vit.num_prefix_tokens :].mean(dim=1)
    raise ConfigError(f"eval.pool must be 'avg' or 'cls', got '{pool}'")

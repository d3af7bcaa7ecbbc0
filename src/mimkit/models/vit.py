"""timm Vision Transformers driven by mimkit's masked forward.

The encoder *is* a timm `VisionTransformer` (vit_*, deit_*) or, for BEiT-style encoders with relative position
bias and LayerScale, a timm `Beit` (beit_*); the functions here run its parts in the order masked image modeling
needs (embed all patches, keep some or swap in a mask token, run the blocks). Nothing is added to the timm module,
so its state dict is a plain timm checkpoint.
"""

from __future__ import annotations

import math
import re

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def resolve_patch_size(name: str, patch_size: int | None) -> int:
    """The patch size of the encoder `name`: `patch_size` when given; else the one timm's name carries
    (vit_small_patch16_224 -> 16, vit_small_patch14_dinov2 -> 14); else, for names without one (hybrids such as
    vit_base_r50_s16_224), the `patch_size` timm's factory builds the architecture with (on the meta device: no
    memory, no weights)."""
    if patch_size is not None:
        return patch_size
    named = re.search(r"_patch(\d+)", name)
    if named:
        return int(named.group(1))
    if not timm.is_model(name):
        raise ConfigError(f"model.name '{name}' is not a timm model, so it has no patch size; set model.patch_size")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if size is None:
        raise ConfigError(f"model.name '{name}' has no patch embedding (not a ViT); set model.patch_size")
    return int(size[0] if isinstance(size, tuple | list) else size)


def create_encoder(
    model_cfg, img_size: int, sincos_pos: bool = True, allow_beit: bool = False, layer_scale: float | None = None
):
    """A headless encoder from a ModelConfig: `create_vit` for vit_*/deit_* names; with `allow_beit`, a timm
    Beit for beit_* names (methods whose encoder sees every patch: BEiT, SimMIM, ConMIM, CIM). The patch size is
    `model.patch_size`, or when that is None the one the name says (`resolve_patch_size`). LayerScale's initial
    value is `model.layer_scale`, or when that is None the method's own default `layer_scale` (BEiT, SimMIM and
    ConMIM: 0.1, their ViT-B value); None or 0 = no LayerScale."""
    sizes = {"depth": model_cfg.depth, "embed_dim": model_cfg.embed_dim, "num_heads": model_cfg.num_heads}
    init_values = model_cfg.layer_scale if model_cfg.layer_scale is not None else layer_scale
    if model_cfg.name.startswith("beit_"):
        if not allow_beit:
            raise ConfigError(
                f"model.name '{model_cfg.name}': this method drops masked tokens, which relative position bias "
                "does not allow; use a vit_* encoder"
            )
        return create_beit(model_cfg, img_size, init_values, **sizes)
    if init_values is not None:
        sizes["init_values"] = init_values
    patch = resolve_patch_size(model_cfg.name, model_cfg.patch_size)
    return create_vit(model_cfg.name, img_size, patch, model_cfg.drop_path, sincos_pos, **sizes)


def create_beit(model_cfg, img_size: int, init_values: float | None = None, **sizes) -> Beit:
    """A headless timm Beit with BEiT's pre-training choices: shared relative position bias, no absolute
    position embedding (`model.rel_pos_bias`, `model.abs_pos_embed`), LayerScale initialised at `init_values`."""
    if model_cfg.rel_pos_bias not in ("shared", "per_layer", "none"):
        raise ConfigError(f"model.rel_pos_bias must be shared, per_layer or none, got '{model_cfg.rel_pos_bias}'")
    if not timm.is_model(model_cfg.name):
        raise ConfigError(f"model.name '{model_cfg.name}' is not a timm model")
    patch = resolve_patch_size(model_cfg.name, model_cfg.patch_size)
    if img_size % patch:
        raise ConfigError(f"data.image_size {img_size} is not divisible by model.patch_size {patch}")
    return timm.create_model(
        model_cfg.name,
        pretrained=False,
        num_classes=0,
        global_pool="token",  # keeps the final LayerNorm on every token (timm moves it after pooling for 'avg')
        img_size=img_size,
        patch_size=patch,
        drop_path_rate=model_cfg.drop_path,
        init_values=init_values,
        use_abs_pos_emb=model_cfg.abs_pos_embed,
        use_rel_pos_bias=model_cfg.rel_pos_bias == "per_layer",
        use_shared_rel_pos_bias=model_cfg.rel_pos_bias == "shared",
        **{k: v for k, v in sizes.items() if v is not None},
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


def patch_pos_embed(vit: VisionTransformer) -> torch.Tensor:
    """(1, N, D): the position embeddings of the patches (timm keeps the prefix tokens' first, when it has them)."""
    return vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, vit.num_prefix_tokens :]


def embed_patches(vit: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, D) patch embeddings with their position embedding added (before any masking)."""
    return vit.patch_embed(imgs) + patch_pos_embed(vit)


def embed_patches_any_size(vit: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w), sides divisible by the patch size -> (B, n, D) patch embeddings plus the position table
    resampled (bicubic) to the h/p x w/p grid, as DINO's `interpolate_pos_encoding`: a smaller crop's tokens span
    the whole table (multi-crop). At the encoder's own size: `embed_patches`."""
    if tuple(imgs.shape[-2:]) == tuple(vit.patch_embed.img_size):
        return embed_patches(vit, imgs)
    p = patch_size(vit)
    x = vit.patch_embed.norm(vit.patch_embed.proj(imgs).flatten(2).transpose(1, 2))
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    return x + resample_abs_pos_embed(patch_pos_embed(vit), list(grid), list(grid_size(vit)), num_prefix_tokens=0)


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
    if vit.grad_checkpointing and torch.is_grad_enabled():  # model.grad_checkpointing: recompute in backward
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


def encode_visible(vit: VisionTransformer, patches: torch.Tensor) -> torch.Tensor:
    """(B, K, D) position-embedded visible patches -> (B, P + K, D) encoded, prefix tokens first."""
    x = torch.cat([prefix_tokens(vit, patches.shape[0]), patches], dim=1)
    return run_blocks(vit, x)


def beit_trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """BEiT's truncated normal: N(0, std) cut at +-1 std (its `trunc_normal_` passes a=-std, b=std), so the
    values' standard deviation is about 0.54 std. timm's default cuts at +-2 absolute, i.e. not at all for 0.02."""
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def init_layers(module: nn.Module, kinds, init_weight) -> None:
    """Every submodule of the types `kinds`: `init_weight(weight)`, bias 0; every LayerNorm: weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, kinds):
            init_weight(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def init_beit_weights(module: nn.Module, std: float = 0.02) -> None:
    """BEiT's `_init_weights` on every submodule: Linear and Conv2d weights `beit_trunc_normal_`, biases 0,
    LayerNorm weight 1 and bias 0 (BEiT's, SimMIM's and ConMIM's pre-training models; their heads included)."""
    init_layers(module, nn.Linear | nn.Conv2d, lambda w: beit_trunc_normal_(w, std))


@torch.no_grad()
def init_beit_encoder(vit: nn.Module, std: float = 0.02) -> None:
    """A timm ViT or Beit initialised as BEiT's pre-training model (unilm beit/modeling_pretrain.py): every
    Linear/Conv2d as `init_beit_weights`, class token and a learned absolute position embedding trunc-normal,
    attention q/v biases 0, then `fix_init_weight`: block l's (1-based) attn.proj and mlp.fc2 weights divided by
    sqrt(2 l). LayerScale keeps its initial value, relative position tables stay 0, a fixed sin-cos table stays."""
    init_beit_weights(vit, std)
    beit_trunc_normal_(vit.cls_token, std)
    pos = getattr(vit, "pos_embed", None)
    if isinstance(pos, nn.Parameter) and pos.requires_grad:
        beit_trunc_normal_(pos, std)
    for layer_id, block in enumerate(vit.blocks, start=1):
        for name in ("q_bias", "v_bias"):
            bias = getattr(block.attn, name, None)
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


@torch.no_grad()
def init_mae_weights(module: nn.Module) -> None:
    """MAE's `_init_weights` on every submodule: xavier-uniform Linear weights, biases 0, LayerNorm weight 1 and
    bias 0 (MAE's and CMAE's encoders, decoders and heads)."""
    init_layers(module, nn.Linear, nn.init.xavier_uniform_)


@torch.no_grad()
def init_mae_encoder(vit: nn.Module) -> None:
    """A timm ViT initialised as MAE's encoder (facebookresearch/mae `initialize_weights`): `init_mae_weights`,
    the patch projection xavier-uniform as a Linear, the class token N(0, 0.02); a fixed sin-cos table is kept.
    timm's own initialisation (trunc-normal 0.02) starts the same architecture with much weaker random features
    (the demo's k-NN at step 0: 0.36-0.38 against 0.56-0.63 with MAE's, docs/methods.md, CIM)."""
    init_mae_weights(vit)
    init_mae_patch_embed(vit)


@torch.no_grad()
def init_mae_patch_embed(vit: nn.Module) -> None:
    """MAE's patch projection (`xavier_as_linear`) and class token (N(0, 0.02))."""
    xavier_as_linear(vit.patch_embed.proj.weight)
    nn.init.normal_(vit.cls_token, std=0.02)


def xavier_as_linear(conv_weight: torch.Tensor) -> None:
    """Xavier-uniform on a patch convolution's (C_out, C_in, p, p) weight viewed as a (C_out, C_in*p*p) Linear, as
    MAE initialises its patch projection."""
    nn.init.xavier_uniform_(conv_weight.view(conv_weight.shape[0], -1))


def init_sincos_patch_embed(vit: nn.Module) -> bool:
    """On mimkit's sin-cos variant (a vit_* encoder with a fixed absolute position table), the patch projection as
    MAE initialises its sin-cos ViT: xavier-uniform on the weight as a Linear, bias 0. -> whether it applied.
    After BEiT's initialisation (trunc-normal 0.02 cut at +-1 std) patch embeddings have RMS ~0.04 on normalised
    pixels; BEiT, SimMIM and ConMIM add no absolute position, so there the scale does not matter (every block starts
    with a LayerNorm), but beside a fixed sin-cos table of RMS 0.71 the content is 1/16 of each token and every
    image's tokens start nearly alike (docs/methods.md, "ConMIM: the diagnosis"). Xavier gives RMS ~0.44."""
    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, nn.Parameter) or pos.requires_grad:
        return False
    xavier_as_linear(vit.patch_embed.proj.weight)
    if vit.patch_embed.proj.bias is not None:
        nn.init.zeros_(vit.patch_embed.proj.bias)
    return True


def new_mask_token(dim: int, std: float = 0.02) -> nn.Parameter:
    """(1, 1, dim) learned [MASK] embedding, trunc-normal std 0.02 cut at +-1 std (BEiT, SimMIM, ConMIM)."""
    token = nn.Parameter(torch.zeros(1, 1, dim))
    beit_trunc_normal_(token, std)
    return token


def encode_with_mask_token(
    vit: VisionTransformer, imgs: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """SimMIM/BEiT-style encoding of all patches: imgs (B, C, H, W), mask (B, N) bool with 1 = masked,
    mask_token (1, 1, D) -> (B, P + N, D). Masked patch embeddings are replaced by the mask token *before* the
    position embedding is added, so the token carries its position."""
    x = vit.patch_embed(imgs)
    w = mask.unsqueeze(-1).to(x.dtype)
    x = x * (1 - w) + mask_token.to(x.dtype) * w
    if isinstance(vit, Beit):
        return _beit_blocks(vit, x)
    x = torch.cat([prefix_tokens(vit, x.shape[0]), x + patch_pos_embed(vit)], dim=1)
    return run_blocks(vit, x)


def _beit_blocks(model: Beit, patches: torch.Tensor) -> torch.Tensor:
    """Beit's forward_features from the patch embeddings on: class token, optional absolute position,
    (shared) relative position bias, blocks, norm."""
    x = torch.cat([model.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    x = model.pos_drop(x)
    rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for blk in model.blocks:
        if model.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
        else:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
    return model.norm(x)


def pool_features(vit: VisionTransformer, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, P + N, D) -> (B, D): the class token ('cls') or the mean of the patch tokens ('avg')."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, vit.num_prefix_tokens :].mean(dim=1)
    raise ConfigError(f"eval.pool must be 'avg' or 'cls', got '{pool}'")

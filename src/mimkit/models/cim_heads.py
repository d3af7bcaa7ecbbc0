"""CIM's model parts (mimkit.methods.cim): the generator's encoder settings and the enhancer heads (token logits
for RevDet, pixel shuffle for a CNN's ResPix); ResPix's sliding-window targets are in mimkit.targets."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


def generator_model(model_cfg, o, patch: int):
    """The ModelConfig of CIM's generator: a copy of the enhancer's `model_cfg` with the generator's fields from
    the CIM options `o` (generator, generator_dim/depth/heads, generator_layer_scale) and `patch` pixels per token.
    'beit': timm's Beit (the named size overridden) with shared relative position bias, no absolute position and
    LayerScale, BEiT's pre-training choices; 'vit': a plain timm ViT (fixed sin-cos positions, no LayerScale).
    No stochastic depth in either. LayerScale 0 means none (None would let BEiT apply its own default)."""
    sizes = {"patch_size": patch, "embed_dim": o.generator_dim, "depth": o.generator_depth,
             "num_heads": o.generator_heads, "drop_path": 0.0}  # fmt: skip
    if o.generator == "beit":
        return dataclasses.replace(model_cfg, name="beit_base_patch16_224", layer_scale=o.generator_layer_scale,
                                   rel_pos_bias="shared", abs_pos_embed=False, **sizes)  # fmt: skip
    return dataclasses.replace(model_cfg, name="vit_small_patch16_224", layer_scale=0.0, **sizes)


class TokenLogitHead(nn.Module):
    """RevDet on a CNN: feature map (B, C, h, w) -> one logit per visual token (B, N). A map smaller than the token
    grid (e.g. 7x7 at stride 32 for 14x14 tokens) is resized bilinearly to it first."""

    def __init__(self, channels: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if tuple(fmap.shape[-2:]) != self.grid:
            fmap = F.interpolate(fmap, size=self.grid, mode="bilinear", align_corners=False)
        return self.proj(fmap).flatten(1)


class PixelShuffleHead(nn.Module):
    """ResPix on a CNN, SimMIM's light decoder: feature map (B, C, H/s, W/s) -> 1x1 conv to s*s*3 channels ->
    PixelShuffle -> (B, 3, H, W)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(channels, stride**2 * 3, kernel_size=1), nn.PixelShuffle(stride))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.proj(fmap)

"""Semantic segmentation on a timm encoder: four feature levels, a decode head, an optional auxiliary head.

Levels: four maps at strides 4, 8, 16, 32 of the input, the layout both heads expect.
- CNN (timm, e.g. ResNet): the last four entries of its `feature_info` (a dilated ResNet's deep stages stay at
  stride 8; the heads only assume that level 0 is the finest).
- ViT: four blocks evenly spaced through the depth (the last of each quarter; BEiT/MAE take blocks 4, 6, 8, 12 of
  ViT-B: `feature_indices` [3, 5, 7, 11]), each on its token grid (stride = patch), brought to the target stride
  as in BEiT/MAE's backbone: 2x2 transposed convolutions to go finer, identity, max-pooling to go coarser. With
  16 px patches that is BEiT's deconv-deconv / deconv / identity / max-pool; with the 4 px patches of small
  images the grid already is stride 4, so the levels are identity / pool 2 / pool 4 / pool 8.

Heads (logits at the level-0 resolution; `SegmentationModel` upsamples them to the input size):
- `light`, the default: SegFormer's all-MLP decoder. A 1x1 projection of each level to `width` channels,
  upsampled to stride 4, concatenated and fused by one 1x1 conv. Its cost is a few 1x1 convs, so it trains in
  minutes on a CPU and has little to overfit on a few hundred images; UperNet's 3x3 convs over wide stride-4 maps
  cost more than a small encoder.
- `upernet`, BEiT/MAE's ADE20K head: pyramid pooling (bins 1, 2, 3, 6) on the coarsest level, an FPN top-down
  path with 3x3 smoothing, all levels fused by a 3x3 conv. Optionally an FCN auxiliary head on level 2 (stride 16,
  BEiT/MAE: 256 channels, loss weight 0.4), used for training only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("light", "upernet")
STRIDES = (4, 8, 16, 32)


def conv_bn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size, mode="bilinear", align_corners=False)


def vit_feature_indices(depth: int) -> list[int]:
    """The last block of each quarter of the depth: 12 -> [2, 5, 8, 11]; 2 -> [0, 0, 1, 1]."""
    return [-(-depth * (i + 1) // 4) - 1 for i in range(4)]  # ceil(depth * (i + 1) / 4) - 1


class ViTLevels(nn.Module):
    """Token maps (B, D, H/p, W/p) from four blocks -> (B, D, H/s, W/s) for s in 4, 8, 16, 32."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.ops = nn.ModuleList(self._op(dim, patch, s) for s in STRIDES)

    @staticmethod
    def _op(dim: int, patch: int, stride: int) -> nn.Module:
        if stride == patch:
            return nn.Identity()
        if stride > patch:
            if stride % patch:
                raise ValueError(f"a {patch} px patch cannot reach stride {stride} by pooling")
            return nn.MaxPool2d(stride // patch, ceil_mode=True)  # small inputs keep a 1x1 map
        ups = math.log2(patch / stride)
        if ups != int(ups):
            raise ValueError(f"a {patch} px patch cannot reach stride {stride} by 2x upsampling: use a power of two")
        layers: list[nn.Module] = []
        for i in range(int(ups)):  # BEiT: ConvT, BN, GELU, ConvT
            layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
            if i < ups - 1:
                layers += [nn.BatchNorm2d(dim), nn.GELU()]
        return nn.Sequential(*layers)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip(self.ops, feats)]


class LightHead(nn.Module):
    """SegFormer's all-MLP decoder: levels -> (B, num_classes, H0, W0) at the finest level's size."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 128, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = conv_bn_relu(width * len(in_channels), width, 1)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([resize(p(f), size) for p, f in zip(self.proj, feats)], dim=1)
        return self.cls(self.drop(self.fuse(x)))


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: (B, C, H, W) -> [(B, width, H, W)] * len(bins), each pooled to a bin grid."""

    def __init__(self, cin: int, width: int, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins = bins
        self.convs = nn.ModuleList(conv_bn_relu(cin, width, 1) for _ in bins)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(conv(F.adaptive_avg_pool2d(x, b)), x.shape[-2:]) for b, conv in zip(self.bins, self.convs)]


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) as in mmsegmentation's UPerHead: PPM on the last level + FPN, fused by a 3x3
    conv. Levels -> (B, num_classes, H0, W0)."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 512, dropout: float = 0.1,
                 bins=(1, 2, 3, 6)):  # fmt: skip
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], width, bins)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(bins) * width, width, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, width, 1) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * width, width, 3)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        lat.append(self.bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse context added into each finer level
            lat[i - 1] = lat[i - 1] + resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.smooth, lat)] + [lat[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([resize(o, size) for o in outs], dim=1))
        return self.cls(self.drop(x))


class FCNHead(nn.Module):
    """The auxiliary head of BEiT/MAE's UperNet: 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(cin, width, 3)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.drop(self.conv(x)))


def is_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "blocks") and hasattr(encoder, "patch_embed")


class SegmentationModel(nn.Module):
    """A headless timm encoder + a decode head (+ an optional auxiliary head). (B, 3, H, W) -> (B, K, H, W)."""

    def __init__(self, encoder: nn.Module, num_classes: int, head: str = "light", width: int = 128,
                 feature_indices=None, aux: bool = False, dropout: float = 0.1):  # fmt: skip
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"segment.head must be one of {', '.join(HEADS)}, got '{head}'")
        self.encoder = encoder
        if is_vit(encoder):
            depth = len(encoder.blocks)
            idx = list(feature_indices) if feature_indices is not None else vit_feature_indices(depth)
            if len(idx) != 4 or not all(0 <= i < depth for i in idx):
                raise ValueError(f"segment.feature_indices {idx} must be four block indices in 0..{depth - 1}")
            patch = encoder.patch_embed.patch_size[0]
            self.neck = ViTLevels(encoder.embed_dim, patch)
            channels = [encoder.embed_dim] * 4
            self.divisor = patch
        else:
            info = list(encoder.feature_info)
            if len(info) < 4:
                raise ValueError(f"{type(encoder).__name__} exposes {len(info)} feature levels; four are needed")
            idx = list(range(len(info) - 4, len(info)))
            self.neck = None
            channels = [info[i]["num_chs"] for i in idx]
            self.divisor = 32
        self.take = sorted(set(idx))  # forward_intermediates returns each block once
        self.pick = [self.take.index(i) for i in idx]
        head_cls = LightHead if head == "light" else UperNetHead
        self.head = head_cls(channels, num_classes, width, dropout)
        self.aux_head = FCNHead(channels[2], num_classes, 256, dropout) if aux else None

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> four (B, C_l, H/s, W/s) maps, s = 4, 8, 16, 32."""
        feats = self.encoder.forward_intermediates(x, indices=self.take, output_fmt="NCHW", intermediates_only=True)
        feats = [feats[i] for i in self.pick]
        return self.neck(feats) if self.neck is not None else feats

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        """-> logits (B, K, H, W); with `with_aux` (training), (logits, auxiliary logits or None)."""
        feats = self.levels(x)
        logits = resize(self.head(feats), x.shape[-2:])
        if not with_aux:
            return logits
        aux = resize(self.aux_head(feats[2]), x.shape[-2:]) if self.aux_head is not None else None
        return logits, aux

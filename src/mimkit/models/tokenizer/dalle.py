"""DALL-E's discrete VAE (Ramesh et al. 2021, `openai/DALL-E`) as a mimkit tokenizer: same architecture and
arithmetic, so the official weights (converted by `mimkit tokenizer import-dalle`) give the official outputs.

Encoder: 7x7 stem, four groups of residual blocks at widths n, 2n, 4n, 8n with a 2x max-pool after the first three
(downsampling 8), ReLU + 1x1 conv to `vocab_size` logits. Decoder: 1x1 conv from the one-hot token map to `n_init`
channels, groups at 8n, 4n, 2n, n with nearest 2x upsampling after the first three, ReLU + 1x1 conv to 6 channels
(logit-Laplace location of R, G, B, then log-scales). Residual branches are scaled by 1 / (number of blocks)^2.
Pixels go in through `map_pixels` (into [eps, 1 - eps], eps = 0.1) and come out through `unmap_pixels`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageTokenizer, fp32

LOGIT_LAPLACE_EPS = 0.1
GROUPS = 4


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the range the logit-Laplace likelihood is defined on."""
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)


def _conv(c_in: int, c_out: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2)
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(c_in * k * k))  # the dVAE's initialisation
    nn.init.zeros_(conv.bias)
    return conv


class DalleBlock(nn.Module):
    """skip(x) + gain * path(x); skip is a 1x1 conv when the width changes; path is four convs, each after a ReLU,
    through out/4 hidden channels (kernels 3,3,3,1 in the encoder, 1,3,3,3 in the decoder)."""

    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, int, int, int], gain: float):
        super().__init__()
        hid = c_out // 4
        self.skip = _conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        chans = (c_in, hid, hid, hid, c_out)
        self.path = nn.ModuleList(_conv(a, b, k) for a, b, k in zip(chans, chans[1:], kernels))
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.path:
            h = conv(F.relu(h))
        return self.skip(x) + self.gain * h


def _groups(c_first: int, widths: list[int], blocks: int, kernels) -> nn.ModuleList:
    gain = 1.0 / (GROUPS * blocks) ** 2
    groups, c = nn.ModuleList(), c_first
    for w in widths:
        group = []
        for _ in range(blocks):
            group.append(DalleBlock(c, w, kernels, gain))
            c = w
        groups.append(nn.Sequential(*group))
    return groups


class DalleEncoder(nn.Module):
    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, input_channels: int = 3):
        super().__init__()
        self.stem = _conv(input_channels, n_hid, 7)
        self.groups = _groups(n_hid, [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid], n_blk_per_group, (3, 3, 3, 1))
        self.head = _conv(8 * n_hid, vocab_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) mapped pixels -> (B, V, H/8, W/8) logits."""
        h = self.stem(x)
        for i, group in enumerate(self.groups):
            h = group(h)
            if i < GROUPS - 1:
                h = F.max_pool2d(h, 2)
        return self.head(F.relu(h))


class DalleDecoder(nn.Module):
    def __init__(
        self,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ):
        super().__init__()
        self.stem = _conv(vocab_size, n_init, 1)
        self.groups = _groups(n_init, [8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid], n_blk_per_group, (1, 3, 3, 3))
        self.head = _conv(n_hid, 2 * output_channels, 1)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> (B, n_init, h, w): the stem (a 1x1 conv) applied to the one-hot map, as a lookup."""
        w = self.stem.weight[:, :, 0, 0]
        return (F.embedding(ids, w.t()) + self.stem.bias).permute(0, 3, 1, 2)

    def forward(self, h: torch.Tensor, from_ids: bool = False) -> torch.Tensor:
        """(B, V, h, w) one-hot (or relaxed) token map, or ids (B, h, w) with from_ids -> (B, 6, 8h, 8w)."""
        h = self.embed_ids(h) if from_ids else self.stem(h)
        for i, group in enumerate(self.groups):
            h = group(h)
            if i < GROUPS - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.head(F.relu(h))


class DalleTokenizer(ImageTokenizer):
    """DALL-E's dVAE behind the tokenizer contract. `image_size` is the input it is used at (BEiT and CIM: 112 px,
    14x14 tokens for a ViT-*/16 at 224); the network itself takes any multiple of 8."""

    kind = "dalle"

    def __init__(
        self,
        vocab_size: int = 8192,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        n_init: int = 128,
        image_size: int = 112,
    ):
        super().__init__()
        self._args = dict(
            vocab_size=vocab_size, n_hid=n_hid, n_blk_per_group=n_blk_per_group, n_init=n_init, image_size=image_size
        )
        self.vocab_size, self.downsample, self.image_size = vocab_size, 2 ** (GROUPS - 1), image_size
        self.encoder = DalleEncoder(n_hid, n_blk_per_group, vocab_size)
        self.decoder = DalleDecoder(n_init, n_hid, n_blk_per_group, 3, vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, V, H/8, W/8): the encoder's logits on map_pixels(x)."""
        with fp32(x.device):
            return self.encoder(map_pixels(self._check_images(x)))

    def decode_stats(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> (B, 6, 8h, 8w) raw decoder output: logit-Laplace locations (RGB), then log-scales."""
        with fp32(ids.device):
            return self.decoder(self._check_ids(ids), from_ids=True)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> (B, 3, 8h, 8w) in [0, 1]: unmap_pixels(sigmoid(location))."""
        with fp32(ids.device):
            return unmap_pixels(torch.sigmoid(self.decode_stats(ids)[:, :3]))

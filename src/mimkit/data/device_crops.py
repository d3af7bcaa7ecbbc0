"""Crop boxes and flips for a whole batch drawn at once with torch on the device (`data.device_crops=fast`), for
the device cache (mimkit.data.device_cache), whose exact mode draws them on the host one numpy generator per
image (~25 us each), which caps it at a few 10^4 images/s per process.

Same distributions as `pipeline.random_resized_crop_box` and `pipeline.contrastive_crop_box`: RandomResizedCrop's
area fraction uniform in `data.crop_scale` (or the `scale` of the crop group's views: multi-crop) and log-uniform
aspect in `data.crop_ratio`, 10 tries (vectorised over the batch, the first fitting one kept), then
`_fallback_box`'s centred crop; integer pixel boxes inside the image, top/left uniform over the valid range; or,
for ContrastiveCrop, the top-left corner at a Beta(alpha, alpha) fraction between the corners that put the crop's
centre on the box edges (clamped into the image). Flips with probability `data.hflip`. Each crop group draws its
own crops.

Randomness: one torch.Generator on the device, re-seeded for every batch from (data seed, epoch, position of
the batch's first image in the epoch's order), so a run resumed mid-epoch gets exactly the batches of an
uninterrupted one, and the global RNG (masks, dropout) is left alone. The worker loader's per-image crops are
NOT reproduced: fast mode is its own (equally distributed) random stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..config import DataConfig
from .pipeline import _fallback_box

TRIES = 10  # torchvision's RandomResizedCrop


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one batch; SeedSequence mixes the three so neighbouring batches are unrelated."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0]) >> 1


def rrc_sizes(g: torch.Generator, n: int, width: int, height: int, scale: Sequence[float], ratio: Sequence[float]):
    """`_rrc_size` for n crops: -> (w, h) (n,) float64 integer sizes of the first fitting try, and ok (n,) bool
    (False: no try fitted, use the fallback box)."""
    u = torch.rand(n, TRIES, 2, generator=g, device=g.device, dtype=torch.float64)
    area = width * height * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, TRIES)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first fitting try (argmax keeps the first max)
    return w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(1)


def uniform_corners(g: torch.Generator, w: torch.Tensor, h: torch.Tensor, width: int, height: int):
    """(n,) sizes -> (left, top) (n,) float64, each uniform over the integer positions keeping the crop inside."""
    u = torch.rand(2, w.shape[0], generator=g, device=g.device, dtype=torch.float64)
    top = torch.minimum(torch.floor(u[0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[1] * (width - w + 1)), width - w)
    return left, top


def _corner(lo: torch.Tensor, hi: torch.Tensor, extent: int, length: torch.Tensor, frac: torch.Tensor):
    """contrastive_crop_box's `corner` on (n,) tensors: the first position between those centring the crop on lo
    and on hi (each clamped into [0, extent - length]) plus a `frac` share of the gap, truncated."""
    half = torch.floor(length / 2)
    first = torch.minimum((torch.floor(extent * lo) - half).clamp(min=0), extent - length)
    last = torch.minimum((torch.floor(extent * hi) - half).clamp(min=0), extent - length)
    return first + torch.floor((last - first) * frac)


def contrastive_corners(g, w, h, width: int, height: int, boxes: torch.Tensor, alpha: float):
    """(n,) sizes, boxes (n, 4) relative (x0, y0, x1, y1) -> (left, top) (n,) float64. Beta(alpha, alpha) is
    drawn by the kernel torch.distributions.Beta samples with (a 2-way Dirichlet), since Beta takes no generator."""
    conc = torch.full((w.shape[0], 2, 2), float(alpha), dtype=torch.float64, device=g.device)
    frac = torch._sample_dirichlet(conc, generator=g)[..., 0]  # (n, 2): top's, then left's
    boxes = boxes.to(torch.float64)
    top = _corner(boxes[:, 1], boxes[:, 3], height, h, frac[:, 0])
    left = _corner(boxes[:, 0], boxes[:, 2], width, w, frac[:, 1])
    return left, top


class FastCrops:
    """Draws {crop group: (boxes (B, 4) float64 (left, top, right, bottom) pixels, flips (B,) bool)} for a batch
    on `device` (module docstring); the device cache feeds them to `resize_crops`."""

    def __init__(self, cfg: DataConfig, seed: int, width: int, height: int, groups: Sequence[int], device, scales=None):
        self.cfg, self.seed, self.width, self.height, self.groups = cfg, seed, width, height, list(groups)
        self.scales = scales or {}  # {group: crop area range} where it is not data.crop_scale (multi-crop)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        fallback = _fallback_box(width, height, cfg.crop_ratio)
        self.fallback = torch.tensor(fallback, dtype=torch.float64, device=self.device)  # once: no copy per batch

    def _one_group(self, n: int, boxes: torch.Tensor | None, scale):
        c, g = self.cfg, self.generator
        w, h, ok = rrc_sizes(g, n, self.width, self.height, scale, c.crop_ratio)
        if boxes is None:
            left, top = uniform_corners(g, w, h, self.width, self.height)
        else:
            left, top = contrastive_corners(g, w, h, self.width, self.height, boxes, c.ccrop_alpha)
        crops = torch.where(ok[:, None], torch.stack([left, top, left + w, top + h], 1), self.fallback)
        flips = torch.rand(n, generator=g, device=self.device) < c.hflip  # drawn even at 0: one stream for all
        return crops, flips

    def draw(self, n: int, epoch: int, position: int, boxes: torch.Tensor | None = None) -> dict:
        """n crops per group for the batch starting at `position` of `epoch`; `boxes` (n, 4) relative
        ContrastiveCrop boxes on the device, or None for RandomResizedCrop."""
        self.generator.manual_seed(batch_seed(self.seed, epoch, position))
        scales = {grp: self.scales.get(grp, self.cfg.crop_scale) for grp in self.groups}
        return {grp: self._one_group(n, boxes, scales[grp]) for grp in self.groups}  # group 0 draws first

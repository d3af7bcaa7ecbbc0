"""Pillow's `Image.resize(size, filter, box=box)` replayed on tensors, many crops at once: its kernels (bicubic
a = -0.5, bilinear, lanczos, nearest), antialiased when shrinking, taps in 22-bit fixed point, two separable passes
each rounded and clipped to uint8 in Pillow's order. Used by the device cache and GPU decoding (mimkit.data.
device_cache explains why it is exact)."""

from __future__ import annotations

import math

import PIL
import torch

from ..errors import ConfigError
from .pipeline import RESAMPLE

PRECISION_BITS = 22  # Pillow's fixed-point taps for 8-bit images: 32 - 8 - 2
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()  # Pillow's a = -0.5 (torch's bicubic uses -0.75)
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    px = x * math.pi
    return torch.where(x == 0, torch.ones_like(x), torch.sin(px) / torch.where(x == 0, torch.ones_like(px), px))


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    inside = (x >= -3) & (x < 3)
    return torch.where(inside, _sinc(x) * _sinc(x / 3), torch.zeros_like(x))


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "lanczos": (_lanczos, 3.0)}


def filter_weights(lo: torch.Tensor, hi: torch.Tensor, in_size: int, out_size: int, interpolation: str):
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for crops [lo, hi) of an axis of `in_size` pixels,
    lo and hi (B,) float64 -> (B, out_size, in_size) float64 taps, multiples of 2^-22 (zero outside each window).
    Taps are evaluated on a band of the most a box inside the axis can need, then scattered."""
    fn, support0 = FILTERS[interpolation]
    scale = (hi - lo) / out_size
    filterscale = scale.clamp(min=1.0)[:, None, None]
    support = support0 * filterscale
    width = 2 * math.ceil(support0 * max(1.0, in_size / out_size)) + 1
    center = lo[:, None] + (torch.arange(out_size, dtype=lo.dtype, device=lo.device) + 0.5) * scale[:, None]
    center = center[..., None]  # (B, out, 1)
    first = torch.floor(center - support + 0.5).clamp(min=0)  # (int)(v + 0.5) in C; negatives clamp to 0 anyway
    last = torch.floor(center + support + 0.5).clamp(max=in_size)
    j = first + torch.arange(width, dtype=lo.dtype, device=lo.device)  # (B, out, width) input pixels
    w = fn((j - center + 0.5) * (1.0 / filterscale)) * (j < last)
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    one = float(1 << PRECISION_BITS)
    w = torch.sign(w) * torch.floor(w.abs() * one + 0.5) / one  # (int)(0.5 + v), rounding away from zero
    dense = torch.zeros(*w.shape[:2], in_size, dtype=w.dtype, device=w.device)
    return dense.scatter_add_(2, j.clamp(max=in_size - 1).long(), w)  # clamped taps past the edge are zeros


def nearest_weights(lo: torch.Tensor, hi: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Pillow's NEAREST resize (ImagingScaleAffine: the source coordinate is accumulated step by step, then
    truncated) as one-hot rows: (B,) float64 -> (B, out_size, in_size). On CUDA the scan may sum in another
    order, which can move a coordinate lying exactly on a pixel edge."""
    step = (hi - lo) / out_size
    seq = step[:, None].expand(-1, out_size).clone()
    seq[:, 0] = lo + step * 0.5
    src = torch.cumsum(seq, dim=1).floor().clamp(0, in_size - 1)  # (B, out)
    return (src[..., None] == torch.arange(in_size, dtype=lo.dtype, device=lo.device)).to(lo.dtype)


def axis_weights(lo, hi, in_size: int, out_size: int, interpolation: str) -> torch.Tensor:
    if interpolation == "nearest":
        return nearest_weights(lo, hi, in_size, out_size)
    if interpolation not in FILTERS:
        raise ConfigError(f"view interpolation must be one of {sorted(RESAMPLE)}, got '{interpolation}'")
    return filter_weights(lo, hi, in_size, out_size, interpolation)


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 after the +0.5 rounding bias: floor(x + 0.5) clipped to [0, 255] (still float)."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def _horizontal(x: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float64 levels, (B, S, W) taps -> (B, C, H, S) levels, rounded and clipped as Pillow's pass."""
    b, c, h, w = x.shape
    return _round_uint8(torch.bmm(x.reshape(b, c * h, w), wx.transpose(1, 2))).view(b, c, h, -1)


def _vertical(x: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float64 levels, (B, S, H) taps -> (B, C, S, W) levels, rounded and clipped."""
    b, c, h, w = x.shape
    y = torch.bmm(wy, x.transpose(1, 2).reshape(b, h, c * w))  # (B, S, C*W)
    return _round_uint8(y).view(b, -1, c, w).transpose(1, 2)


def vertical_first(height: int, width: int, size: int) -> bool:
    """Pillow >= 13 runs the vertical pass first when an image's height shrinks more than twice as much as its
    width (ImagingResampleInner); the order shows through the uint8 rounding between the passes."""
    return PILLOW_MAJOR >= 13 and height - size > 0 and height - size > (width - size) * 2


def resize_crops(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, interpolation: str
) -> torch.Tensor:
    """`Image.resize((size, size), filter, box=box)` (+ a left-right flip where `flips`) of every image, batched.
    images (B, C, H, W) uint8, boxes (B, 4) (left, top, right, bottom) pixels, flips (B,) bool
    -> (B, C, size, size) uint8. float64 sums hold Pillow's 30-bit fixed-point ones exactly."""
    _, _, h, w = images.shape
    boxes = boxes.to(torch.float64)
    wx = axis_weights(boxes[:, 0], boxes[:, 2], w, size, interpolation)  # (B, size, W)
    wx = torch.where(flips[:, None, None], wx.flip(1), wx)  # flipping after the resize = reversed output columns
    wy = axis_weights(boxes[:, 1], boxes[:, 3], h, size, interpolation)  # (B, size, H)
    x = images.to(torch.float64)  # a no-op for callers that convert once for several views
    out = _horizontal(_vertical(x, wy), wx) if vertical_first(h, w, size) else _vertical(_horizontal(x, wx), wy)
    return out.to(torch.uint8).contiguous()

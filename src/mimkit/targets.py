"""Pixel targets shared by the reconstruction methods: patchify / unpatchify and per-patch normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels ordered (row, col, channel) as MAE."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
    b = x.shape[0]
    gh, gw = grid
    p = patch_size
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each patch by its own mean and unbiased variance over all its values (MAE's norm_pix_loss)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def sliding_window_targets(imgs: torch.Tensor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): each pixel standardised by the mean and (biased) variance of the
    `window` x `window` neighbourhood centred on it, per channel; borders use the pixels inside the image."""
    mean, var = window_stats(imgs, window)
    return (imgs - mean) / (var + eps).sqrt()


def window_stats(imgs: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and biased variance over a centred window (stride 1, zero padding not counted)."""
    pad = window // 2
    x = imgs.float()
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    return mean, (sq - mean * mean).clamp_min(0)

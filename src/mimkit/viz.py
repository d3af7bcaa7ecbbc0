"""Picture grids: what a person should look at to judge a method (e.g. original | masked | reconstruction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) mean/std-normalised -> [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


def save_grid(rows: torch.Tensor, path: str | Path, scale: int = 1, pad: int = 2) -> Path:
    """rows (B, 3, H, W') in [0, 1] -> a PNG with one row per sample, white padding between rows,
    enlarged `scale` times with nearest-neighbour so small images (32 px) stay readable."""
    rows = rows.detach().cpu().clamp(0, 1)
    b, _, h, w = rows.shape
    canvas = torch.ones(3, b * (h + pad) + pad, w + 2 * pad)
    for i in range(b):
        top = pad + i * (h + pad)
        canvas[:, top : top + h, pad : pad + w] = rows[i]
    img = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path

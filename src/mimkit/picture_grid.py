"""Picture grids: what a person should look at to judge a method (e.g. original | masked | reconstruction)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) mean/std-normalised -> [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


def save_grid(
    rows: torch.Tensor, path: str | Path, scale: int = 1, pad: int = 2, titles: Sequence[str] | None = None
) -> Path:
    """rows (B, 3, H, W') in [0, 1] -> a PNG with one row per sample, white padding between rows,
    enlarged `scale` times with nearest-neighbour so small images (32 px) stay readable. `titles`: one heading
    per column (the row is that many equal-width panels side by side), drawn in a band above the grid."""
    rows = rows.detach().cpu().clamp(0, 1)
    b, _, h, w = rows.shape
    canvas = torch.ones(3, b * (h + pad) + pad, w + 2 * pad)
    for i in range(b):
        top = pad + i * (h + pad)
        canvas[:, top : top + h, pad : pad + w] = rows[i]
    img = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    if titles:
        img = add_headings(img, titles, left=pad * scale, panel_width=_panel_width(w, len(titles)) * scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _panel_width(row_width: int, columns: int) -> int:
    if row_width % columns:
        raise ValueError(f"{columns} column titles for rows {row_width} px wide: panels must share the width evenly")
    return row_width // columns


def add_headings(img: Image.Image, titles: Sequence[str], left: int, panel_width: int) -> Image.Image:
    """`img` with a white band on top holding `titles[j]` centred over the panel at x = left + j * panel_width
    (Pillow's default font; a title wider than its panel is cut short with '..')."""
    font = ImageFont.load_default()
    text_height = max(_text_size(font, t)[1] for t in titles)
    margin = 3
    out = Image.new("RGB", (img.width, img.height + text_height + 2 * margin), "white")
    out.paste(img, (0, text_height + 2 * margin))
    draw = ImageDraw.Draw(out)
    for j, title in enumerate(titles):
        text = _fit(font, str(title), panel_width - 2)
        x = left + j * panel_width + (panel_width - _text_size(font, text)[0]) // 2
        draw.text((x, margin), text, fill="black", font=font)
    return out


def _text_size(font, text: str) -> tuple[int, int]:
    """(width, height) of `text` drawn from the origin, ascent included (what a line of it needs)."""
    _, _, right, bottom = font.getbbox(text or " ")
    return right, bottom


def _fit(font, text: str, width: int) -> str:
    """`text`, or its longest prefix + '..' that fits `width` pixels."""
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "..")[0] > width:
        text = text[:-1]
    return text + ".." if text else ""

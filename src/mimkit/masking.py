"""Masks shared by every method. Convention: in a boolean/float mask, 1 (True) means *masked* (hidden).

- `random_masking`: MAE's per-sample random subset (by argsort of noise), fixed count.
- `blockwise_masking`: BEiT's rectangles of patches, up to a target count (variable per image).
- `coarse_random_masking`: SimMIM's random cells of `cell` x `cell` patches (e.g. 32 px cells over 16 px patches).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, device=None, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ids_keep (B, K) of the visible patches in shuffled order, mask (B, N) float with 1 = masked,
    and ids_restore (B, N) that un-shuffles [visible, masked] back to the patch order. `noise` (B, N) makes the
    mask deterministic (the same hook transformers' ViTMAE offers, which the parity test relies on).
    """
    num_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D): the tokens at `ids`, per sample."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def blockwise_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    num_masked: int,
    min_patches: int = 16,
    max_patches: int | None = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """BEiT's blockwise masking of one image -> bool (gh, gw) with at most `num_masked` True.

    Rectangles are added until the target is reached: area ~ U(min_patches, cap), log-aspect ~ U(log r, -log r),
    up to 10 tries per rectangle; a rectangle counts only the patches it newly covers, which must be in (0, cap].
    When 10 tries fail the loop stops, so a mask can hold fewer than `num_masked` patches (as in BEiT).
    """
    gh, gw = grid
    mask = np.zeros((gh, gw), dtype=bool)
    max_patches = max_patches or num_masked
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        cap = min(num_masked - count, max_patches)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, cap) if cap >= min_patches else rng.uniform(cap, min_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh and h > 0 and w > 0:
                top = int(rng.integers(0, gh - h + 1))
                left = int(rng.integers(0, gw - w + 1))
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= cap:
                    mask[top : top + h, left : left + w] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def blockwise_masking(
    batch_size: int,
    grid: tuple[int, int],
    mask_ratio: float,
    min_patches: int = 16,
    min_aspect: float = 0.3,
    max_patches: int | None = None,
    generator: np.random.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(B, gh*gw) bool, 1 = masked; BEiT's blockwise masks for a batch (target count = round(ratio * N))."""
    rng = generator if generator is not None else np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    n = grid[0] * grid[1]
    target = int(round(mask_ratio * n))
    min_patches = min(min_patches, max(1, target))
    masks = [blockwise_mask(rng, grid, target, min_patches, max_patches, min_aspect) for _ in range(batch_size)]
    return torch.from_numpy(np.stack(masks).reshape(batch_size, n)).to(device)


def coarse_random_masking(
    batch_size: int, grid: tuple[int, int], mask_ratio: float, cell: int = 2, device=None
) -> torch.Tensor:
    """(B, gh*gw) bool, 1 = masked: SimMIM's masking. ceil(ratio * cells) random cells of `cell` x `cell` patches
    are masked, then upsampled to the patch grid (e.g. 32 px cells over 16 px patches: cell=2)."""
    gh, gw = grid
    if gh % cell or gw % cell:
        raise ValueError(f"patch grid {gh}x{gw} is not divisible by the mask cell {cell}")
    ch, cw = gh // cell, gw // cell
    cells = ch * cw
    count = math.ceil(mask_ratio * cells)
    noise = torch.rand(batch_size, cells, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    coarse = (ranks < count).view(batch_size, ch, cw)
    fine = coarse.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    return fine.reshape(batch_size, gh * gw)

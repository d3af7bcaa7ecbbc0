"""Masks shared by every method. Convention: in a boolean/float mask, 1 (True) means *masked* (hidden).

- `random_masking`: MAE's per-sample random subset (by argsort of noise), fixed count; `cell_masking`: the same
  over cells of patches, visible cells whole (Huang et al.'s CMAE).
- `blockwise_masking`: BEiT's rectangles of patches, up to a target *count* (variable per image); the count is
  BEiT's `num_masking_patches` (75 of 14 x 14), `beit_mask_count` scales it to other grids.
- `coarse_random_masking`: SimMIM's random cells of `cell` x `cell` patches (e.g. 32 px cells over 16 px patches).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConfigError


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device=None,
    noise: torch.Tensor | None = None,
    num_keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ids_keep (B, K) of the visible patches in shuffled order, mask (B, N) float with 1 = masked,
    and ids_restore (B, N) that un-shuffles [visible, masked] back to the patch order. `noise` (B, N) makes the
    mask deterministic (the same hook transformers' ViTMAE offers, which the parity test relies on). `num_keep`:
    K itself (default int(N * (1 - mask_ratio))).
    """
    if num_keep is None:
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


def cell_masking(
    batch_size: int, grid: tuple[int, int], cell: int, mask_ratio: float, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`random_masking` over cells of cell x cell patches (Huang et al.'s CMAE: 2 x 2): int(cells * (1 -
    mask_ratio)) whole cells stay visible. -> ids_keep (B, K * cell^2), mask (B, N), ids_restore (B, N)."""
    if grid[0] % cell or grid[1] % cell:
        raise ValueError(f"patch grid {grid[0]}x{grid[1]} is not divisible by the mask cell {cell}")
    gh, gw = grid[0] // cell, grid[1] // cell
    noise = torch.rand(batch_size, gh, gw, device=device)
    patch_noise = noise.repeat_interleave(cell, 1).repeat_interleave(cell, 2).flatten(1)  # one value per cell
    num_keep = int(gh * gw * (1 - mask_ratio)) * cell * cell
    return random_masking(batch_size, grid[0] * grid[1], mask_ratio, noise=patch_noise, num_keep=num_keep)


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
    num_masked: int,
    min_patches: int = 16,
    min_aspect: float = 0.3,
    max_patches: int | None = None,
    generator: np.random.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(B, gh*gw) bool, 1 = masked; BEiT's blockwise masks for a batch, at most `num_masked` patches each (BEiT's
    `num_masking_patches`). The smallest block is capped at the target, so small grids can still be masked."""
    rng = generator if generator is not None else np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    n = grid[0] * grid[1]
    min_patches = min(min_patches, max(1, num_masked))
    masks = [blockwise_mask(rng, grid, num_masked, min_patches, max_patches, min_aspect) for _ in range(batch_size)]
    return torch.from_numpy(np.stack(masks).reshape(batch_size, n)).to(device)


BEIT_MASKED, BEIT_PATCHES = 75, 196  # BEiT's and ConMIM's --num_mask_patches on their 14 x 14 grid


def beit_mask_count(num_patches: int) -> int:
    """BEiT's 75 masked patches of 196, scaled to a grid of `num_patches`: round(75 * N / 196), so exactly 75 at
    14 x 14 (BEiT's own fraction, 0.383, not 0.4: round(0.4 * 196) would be 78), 24 at 8 x 8, 6 at 4 x 4."""
    return round(BEIT_MASKED * num_patches / BEIT_PATCHES)


def block_mask_count(num_patches: int, num_masking_patches: int | None, mask_ratio: float | None, section: str) -> int:
    """The target count of a blockwise mask from a method's options: `num_masking_patches` when set, else
    round(`mask_ratio` * N) when set, else BEiT's rule (`beit_mask_count`). ConfigError naming the key when both
    are set or when the count masks no patch or leaves none visible."""
    if num_masking_patches is not None and mask_ratio is not None:
        raise ConfigError(f"{section}.num_masking_patches and {section}.mask_ratio are both set; set one of them")
    if num_masking_patches is not None:
        what, count = f"{section}.num_masking_patches {num_masking_patches}", num_masking_patches
    elif mask_ratio is not None:
        what, count = f"{section}.mask_ratio {mask_ratio:g}", round(mask_ratio * num_patches)
    else:
        what, count = f"{section}.num_masking_patches (None: BEiT's 75 of 196 scaled)", beit_mask_count(num_patches)
    if count < 1:
        raise ConfigError(f"{what} masks no patch of {num_patches} patches")
    if count >= num_patches:
        raise ConfigError(f"{what} leaves no visible patch of {num_patches} patches")
    return count


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


def mask_cell(mask_patch_size: int | None, patch: int, key: str) -> int:
    """A mask cell's side in patches from its side in pixels (None: 2 patches, SimMIM's and ConMIM's 32 over 16)."""
    px = mask_patch_size or 2 * patch
    if px % patch:
        raise ConfigError(f"{key} {px} is not a multiple of the patch {patch}")
    return px // patch

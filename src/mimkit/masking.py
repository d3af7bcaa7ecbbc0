"""Masks shared by every method. Convention: in a boolean/float mask, 1 (True) means *masked* (hidden)."""

from __future__ import annotations

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

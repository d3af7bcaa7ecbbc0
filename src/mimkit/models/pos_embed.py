"""Fixed 2-D sine-cosine position embeddings (MAE's layout)."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """(num_prefix + gh*gw, dim) float32; prefix rows (class token) are zero.

    Half of the channels encode the column index and half the row index; the column half comes first, as in
    MAE's reference code (a consequence of its meshgrid order), so weights move between the two unchanged.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if num_prefix:
        emb = torch.cat([torch.zeros(num_prefix, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()

"""DINO's centring of the teacher's outputs (facebookresearch/dino main_dino.py `DINOLoss.update_center`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class TeacherCentre(nn.Module):
    """A running mean c (1, K) of the teacher's outputs over every process's batch, subtracted from the teacher's
    logits before its sharpened softmax; with sharpening it keeps the outputs from collapsing to one dimension
    (centring alone would make them uniform). c <- momentum * c + (1 - momentum) * batch mean."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(1, dim))

    def forward(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """(N, K) -> (N, K) centred logits (the centre as it stands, before this batch's update)."""
        return teacher_logits - self.centre

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Fold (N, K) teacher logits, summed over every process, into the running centre."""
        total = teacher_logits.float().sum(dim=0, keepdim=True)
        count = teacher_logits.shape[0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            count *= dist.get_world_size()
        self.centre.mul_(self.momentum).add_(total / count, alpha=1.0 - self.momentum)

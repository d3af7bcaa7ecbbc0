"""Optimizer and learning-rate schedule: AdamW with decoupled weight decay, linear warm-up, half-cycle cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict]:
    """Two groups: weight decay on matrices/convs, none on biases, norms and the named tokens/embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """Absolute `optim.lr` when set, else MAE's rule blr * effective_batch / lr_batch_divisor."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / cfg.lr_batch_divisor


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, no_decay: set[str], device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, no_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr`, times its `lr_scale` where it has one (timm's layer-wise decay groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

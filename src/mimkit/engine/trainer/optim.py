"""Optimizer and learning-rate schedule: AdamW with decoupled weight decay, linear warm-up, half-cycle cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import OptimConfig
from ...runtime import fused_adamw


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str], lr_scale=None) -> list[dict]:
    """Weight decay on matrices/convs, none on biases, norms and the named tokens/embeddings; parameters for which
    `lr_scale(name)` differs from 1 get groups of their own with that `lr_scale` (set_lr multiplies it in)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in no_decay_names)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        groups.setdefault((decay, scale), []).append(p)
    out = []
    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, not kv[0][0], kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "decays": decay}
        if scale != 1.0:
            group["lr_scale"] = scale
        out.append(group)
    return out


def peak_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """Absolute `optim.lr` when set, else MAE's rule blr * effective_batch / lr_batch_divisor."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / cfg.lr_batch_divisor


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, no_decay: set[str], device,
                    lr_scale=None) -> torch.optim.Optimizer:  # fmt: skip
    groups = param_groups(model, cfg.weight_decay, no_decay, lr_scale)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=fused_adamw(device))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr`, times its `lr_scale` where it has one (timm's layer-wise decay groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def decaying_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The groups that decay: those `param_groups` marked so, or (groups built elsewhere: timm's layer-decay ones)
    those whose weight decay is > 0 the first time they are seen here (then marked)."""
    return [g for g in optimizer.param_groups if g.setdefault("decays", g["weight_decay"] > 0)]


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Every group that decays (`decaying_groups`) at `weight_decay`; the others stay at 0."""
    for group in decaying_groups(optimizer):
        group["weight_decay"] = weight_decay


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """DINO's weight-decay schedule: a half-cycle cosine from `start` at step 0 to `end` at `total_steps`, no
    warm-up (its utils.cosine_scheduler, read per iteration)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

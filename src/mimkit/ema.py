"""Exponential moving average of a module (momentum teachers), with the cosine momentum schedule of BYOL/ConMIM."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """m_t = final - (final - base) * (1 + cos(pi * t / T)) / 2: `base` at step 0, `final` at the last step."""
    if not 0.0 <= base <= 1.0 or not 0.0 <= final <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got base={base}, final={final}")
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of `student` that never receives gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (matched by name).
    Buffers (BatchNorm running statistics) are not averaged: each network keeps its own."""
    s_params = dict(student.named_parameters())
    t_params = [(p, s_params[name]) for name, p in teacher.named_parameters()]
    teacher_ps = [t for t, _ in t_params]
    student_ps = [s.detach() for _, s in t_params]
    torch._foreach_mul_(teacher_ps, momentum)
    torch._foreach_add_(teacher_ps, student_ps, alpha=1.0 - momentum)

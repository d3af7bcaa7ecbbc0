"""A momentum teacher: a copy of a module that gets no gradient and follows it as an exponential moving average.

Its momentum comes from `mimkit.ema` (one schedule for every teacher, so a change of rule lands in one place); the
update is here, one for every method's teacher (`train.ema`'s average of the whole model is timm's)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...ema import BUDGET_HALF_LIFE, teacher_momentum


class MomentumTeacher(nn.Module):
    """`module`: a deep copy of `student` without gradients. `update(student, step, total)` moves it towards the
    student with momentum `mimkit.ema.teacher_momentum(step, total, base, final, rule, half_life)` (rule 'budget':
    the base lowered where the run is too short for it). eval_mode: the copy stays in eval mode whatever the
    method's mode (no drop-path or dropout on the targets); False: it follows the method's mode (a BatchNorm in it
    then normalises with its batch's statistics).

    Its weights are saved under `<name>.module.*`. A state dict that holds them directly under `<name>.*` (a
    method's teacher before it was a MomentumTeacher: ConMIM's, CMAE-Mao's, MoCo v3's) loads as well."""

    def __init__(self, student: nn.Module, base: float, final: float = 1.0, eval_mode: bool = True,
                 rule: str = "fixed", half_life: float = BUDGET_HALF_LIFE):  # fmt: skip
        super().__init__()
        self.module = copy.deepcopy(student).requires_grad_(False)
        self.base, self.final, self.eval_mode = base, final, eval_mode
        self.rule, self.half_life = rule, half_life

    def train(self, mode: bool = True):
        super().train(mode and not self.eval_mode)
        return self

    def momentum(self, step: int, total_steps: int) -> float:
        return teacher_momentum(step, total_steps, self.base, self.final, self.rule, self.half_life)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """teacher <- m * teacher + (1 - m) * student for every parameter (matched by name); -> the m used.
        Buffers (BatchNorm running statistics) are not averaged: each network keeps its own."""
        m = self.momentum(step, total_steps)
        s_params = dict(student.named_parameters())
        pairs = [(t, s_params[name].detach()) for name, t in self.module.named_parameters()]
        teacher_ps, student_ps = [t for t, _ in pairs], [s for _, s in pairs]
        torch._foreach_mul_(teacher_ps, m)
        torch._foreach_add_(teacher_ps, student_ps, alpha=1.0 - m)
        return m

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Old layout -> this one, before anything is loaded: every key under `prefix` that is not under
        `prefix + 'module.'` was the copy's own (this module has no weights of its own), so it moves there."""
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
            state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""A momentum teacher: a copy of a module that gets no gradient and follows it as an exponential moving average.

Its momentum comes from `mimkit.ema` (one schedule for every teacher, so a change of rule lands in one place)."""

from __future__ import annotations

from torch import nn

from ...ema import BUDGET_HALF_LIFE, ema_update, make_teacher, teacher_momentum


class MomentumTeacher(nn.Module):
    """`module`: a deep copy of `student` without gradients. `update(student, step, total)` moves it towards the
    student with momentum `mimkit.ema.teacher_momentum(step, total, base, final, rule, half_life)` (rule 'budget':
    the base lowered where the run is too short for it). eval_mode: the copy stays in eval mode whatever the
    method's mode (no drop-path or dropout on the targets)."""

    def __init__(self, student: nn.Module, base: float, final: float = 1.0, eval_mode: bool = True,
                 rule: str = "fixed", half_life: float = BUDGET_HALF_LIFE):  # fmt: skip
        super().__init__()
        self.module = make_teacher(student)
        self.base, self.final, self.eval_mode = base, final, eval_mode
        self.rule, self.half_life = rule, half_life

    def train(self, mode: bool = True):
        super().train(mode and not self.eval_mode)
        return self

    def momentum(self, step: int, total_steps: int) -> float:
        return teacher_momentum(step, total_steps, self.base, self.final, self.rule, self.half_life)

    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """teacher <- m * teacher + (1 - m) * student (parameters matched by name); -> the m used."""
        m = self.momentum(step, total_steps)
        ema_update(self.module, student, m)
        return m

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

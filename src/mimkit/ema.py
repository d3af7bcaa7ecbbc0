"""The momentum schedule of every EMA teacher (`mimkit.methods.parts.MomentumTeacher`, which holds the update): the
cosine of BYOL/ConMIM, and the one rule that sizes every teacher's momentum to the run it is in (`budget_momentum`).

Why a budget rule. BYOL, DINO, MoCo v3 and ConMIM raise the momentum from a base m0 (0.99-0.996) to 1 by a cosine
over the run, and picked m0 for runs of 100k-500k steps: BYOL 0.996 over 1000 epochs of 312 steps (312k), DINO
0.996 over 100-300 epochs of 1251 steps (125k-375k), MoCo v3 0.99 over 300 epochs of 313 steps (94k), ConMIM 0.996
over 800 epochs of 625 steps (500k). The teacher's half-life at the start, ln 0.5 / ln m0, is then 69-173 steps:
0.035%-0.14% of the run. Kept at 0.996 in a run of a few hundred steps, the same teacher's half-life is a third of
the run and, because the cosine also raises m to 1, the teacher ends up holding about exp(-(1 - m0) T / 2) of its
*initial* weights (46% at T = 390). A half-life that is the same tiny fraction of every run fails the other way:
at 2% of a 640-step run (13 steps) ConMIM's loss rose above chance (docs/methods.md): a teacher must also average
over enough optimizer steps. The budget rule keeps both: the paper's base momentum, lowered only where needed so
that the half-life at the start is at most `half_life` x T steps, m0 = min(base, 0.5 ** (1 / (half_life T))); the
cosine to `final` is unchanged. At the papers' lengths it *is* the paper's value; in short runs the teacher forgets
its initialisation at the same fraction of the run whatever the length (at most exp(-ln 2 / (2 half_life)): 3%).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from .config import Range

MomentumRule = Literal["fixed", "budget"]
HalfLife = Annotated[float, Range(0, 1, min_open=True)]  # a method option: the budget rule's fraction of the run
# the default cap of the budget rule: the teacher's half-life at step 0 is at most 10% of the run's steps (64 steps
# of the 640-step digits demo: 0.989; 39 of a 390-step ladder run: 0.982; from 1,730 steps on ConMIM's 0.996 holds).
# Measured on the digits demo and the CPU ladder (docs/methods.md, "Teachers that fit the budget")
BUDGET_HALF_LIFE = 0.1


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """m_t = final - (final - base) * (1 + cos(pi * t / T)) / 2: `base` at step 0, `final` at the last step."""
    if not 0.0 <= base <= 1.0 or not 0.0 <= final <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got base={base}, final={final}")
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def budget_momentum(total_steps: int, base: float, half_life: float = BUDGET_HALF_LIFE) -> float:
    """`base`, lowered where needed so that the teacher's half-life at step 0 is at most `half_life` x
    `total_steps` steps: min(base, 0.5 ** (1 / (half_life T))). Never above `base`; rises with the run's length
    until it reaches `base`."""
    if not 0.0 < half_life <= 1.0:
        raise ValueError(f"the teacher's half-life fraction must lie in (0, 1], got {half_life}")
    return min(base, 0.5 ** (1.0 / (half_life * max(1, total_steps))))


def teacher_momentum(step: int, total_steps: int, base: float, final: float = 1.0, rule: MomentumRule = "fixed",
                     half_life: float = BUDGET_HALF_LIFE) -> float:  # fmt: skip
    """The EMA momentum at `step` of `total_steps`: a cosine from the base to `final`, where the base is `base`
    (rule 'fixed': the paper's value) or `budget_momentum(total_steps, base, half_life)` (rule 'budget')."""
    if rule == "budget":
        base = budget_momentum(total_steps, base, half_life)
    elif rule != "fixed":
        raise ValueError(f"momentum rule must be 'fixed' or 'budget', got {rule!r}")
    return cosine_momentum(step, total_steps, base, final)


def initial_weight_left(total_steps: int, base: float, final: float = 1.0, rule: MomentumRule = "fixed",
                        half_life: float = BUDGET_HALF_LIFE) -> float:  # fmt: skip
    """The share of its initial weights an EMA teacher still holds after the run: the product of (the loop's)
    momenta at steps 1..T (the update after step t uses step t's momentum)."""
    log = sum(math.log(max(teacher_momentum(t, total_steps, base, final, rule, half_life), 1e-300))
              for t in range(1, total_steps + 1))  # fmt: skip
    return math.exp(log)

"""The shared method parts: MoCo v3's and CMAE's losses unchanged by their move onto the parts, and each part
against its definition (InfoNCE, the momentum teacher's schedule, DINO's centring and head, view colour)."""

import copy
import math

import pytest
import torch
from helpers import TINY

from mimkit.data.augment import ColorSpec
from mimkit.data.views import View
from mimkit.ema import cosine_momentum
from mimkit.methods import build_method
from mimkit.methods.parts import DINOHead, MomentumTeacher, TeacherCentre, ViewColour, info_nce
from mimkit.run_config import build_config

MOCO = ["method=mocov3", "mocov3.proj_hidden=32", "mocov3.proj_dim=16", "mocov3.pred_hidden=32"]
FIXED = ["mocov3.momentum_rule=fixed", "cmae.momentum_rule=fixed"]  # the schedule the values below were made with

# Losses of two SGD steps on fixed images, fixed init and fixed RNG (masks, colours), computed with the code of
# commit 61ca9f3, before InfoNCE, the heads and the colour perturbation moved onto the parts. The second step
# moves by float rounding only (InfoNCE now normalises CMAE's already normalised embeddings; MoCo v3's views
# arrive normalised and are un-normalised for colour, where they came in [0, 1]).
BEFORE_PARTS = {
    "mocov3": ([*MOCO, "mocov3.blur_p=[1.0,0.5]"], (1.6185405254364014, 2.242180824279785)),
    "cmae": (["method=cmae"], (3.002978563308716, 3.933093547821045)),
    "cmae-target": (
        ["method=cmae", "cmae.color_views=target", "cmae.pos_hiding=permute", "cmae.color_blur_p=0.5"],
        (2.974273443222046, 4.059564113616943),
    ),
}


def two_steps(extra) -> list[float]:
    """Loss of two plain SGD steps (lr 0.1, momentum update between them) on 8 fixed images per view."""
    torch.manual_seed(0)
    cfg = build_config([], None, [*TINY, *FIXED, *extra])
    m = build_method(cfg)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    batch = {}
    for v in m.views:
        x = torch.rand(8, 3, v.size, v.size, generator=g)
        batch[v.name] = (x - mean) / std if v.normalize == "mean_std" else x
    m.train()
    torch.manual_seed(2)
    out = []
    for step in range(2):
        loss, _ = m(batch)
        loss.backward()
        out.append(loss.item())
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
        m.after_step(step, 10)
    return out


@pytest.mark.parametrize("case", sorted(BEFORE_PARTS))
def test_losses_unchanged_by_the_move_onto_the_parts(case):
    extra, before = BEFORE_PARTS[case]
    assert two_steps(extra) == pytest.approx(before, rel=1e-5)


def test_info_nce_is_cross_entropy_of_cosine_logits():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss, acc = info_nce(q, k, 0.3)
    total = 0.0
    for i in range(5):
        logits = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / 0.3 for j in range(5)]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[i]
    assert loss.item() == pytest.approx(total / 5, rel=1e-5)
    assert info_nce(q, 3 * q, 0.3)[1].item() == 1.0  # every query's own direction is its key


def test_momentum_teacher_follows_the_ema_schedule_without_gradients():
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    teacher = MomentumTeacher(student, base=0.9)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.module.training  # eval_mode: no dropout on the targets
    before = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    m = teacher.update(student, 3, 10)
    assert m == cosine_momentum(3, 10, 0.9, 1.0)
    assert torch.allclose(teacher.module[0].weight, m * before + (1 - m) * student[0].weight)


def test_momentum_teacher_loads_the_layout_of_a_bare_copy():
    """A method's teacher saved before it was a MomentumTeacher (its weights right under its name, no `module.`)
    loads strictly, as does the current layout; nothing else moves."""
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    method = torch.nn.ModuleDict({"student": student, "teacher": MomentumTeacher(student, base=0.9)})
    saved = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in method.state_dict().items()}
    old = {k.replace("teacher.module.", "teacher."): v for k, v in saved.items()}
    assert "teacher.0.weight" in old and "teacher.1.running_mean" in old
    for state in (old, saved):
        method.load_state_dict(state)  # strict
        assert all(torch.equal(method.state_dict()[k], v) for k, v in saved.items())


def test_centre_is_a_running_mean_of_teacher_outputs():
    centre = TeacherCentre(4, momentum=0.9)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    centre.update(a)
    centre.update(b)
    expected = 0.9 * (0.1 * a.mean(0)) + 0.1 * b.mean(0)
    assert torch.allclose(centre.centre[0], expected, atol=1e-6)
    assert torch.allclose(centre(a), a - expected, atol=1e-6)


def test_dino_head_normalises_the_bottleneck_and_fixes_the_last_layers_norm():
    torch.manual_seed(0)
    head = DINOHead(8, 32, hidden=16, bottleneck=4)
    x = torch.randn(3, 8)
    w = head.last_layer.weight  # the weight-normalised matrix: rows of unit norm
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ w.t(), atol=1e-6)
    frozen = [n for n, p in head.named_parameters() if not p.requires_grad]
    assert frozen == ["last_layer.parametrizations.weight.original0"]
    assert copy.deepcopy(head)(x).shape == (3, 32)


def test_view_colour_perturbs_only_views_with_a_spec_and_keeps_normalisation():
    spec = ColorSpec(jitter_p=1.0, grayscale_p=1.0)  # always grey
    views = (View("a", 8, color=spec), View("b", 8), View("c", 8, normalize="unit", color=spec))
    colour = ViewColour(views, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = torch.rand(2, 3, 8, 8)
    batch = {"a": (x - colour.mean.view(1, 3, 1, 1)) / colour.std.view(1, 3, 1, 1), "b": x, "c": x}
    out = colour(batch)
    assert out["b"] is x
    unit = out["a"] * colour.std.view(1, 3, 1, 1) + colour.mean.view(1, 3, 1, 1)
    assert torch.allclose(unit[:, 0], unit[:, 1], atol=1e-5) and torch.allclose(out["c"][:, 0], out["c"][:, 2])


def test_dino_head_with_batchnorm_normalises_each_hidden_layer():
    head = DINOHead(8, 32, hidden=16, bottleneck=4, use_bn=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]

"""DINO: the loss and centre against the official rule (facebookresearch/dino main_dino.py DINOLoss, written out
here from its forward and update_center), the teacher-temperature schedule, the frozen last layer of the first
epoch, multi-crop views, and one CLI run whose export is the teacher's backbone."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TINY

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.methods import build_method
from mimkit.methods.dino import DINO
from mimkit.models import vit as V
from mimkit.run_config import build_config

SMALL = ["dino.out_dim=64", "dino.head_hidden=32", "dino.head_bottleneck=16", "dino.local_crops=2", "dino.local_size=8"]


def build(*extra) -> DINO:
    torch.manual_seed(0)
    return build_method(build_config([], None, [*TINY, "method=dino", *SMALL, *extra]))


def official_dino_loss(student_output, teacher_output, center, ncrops, temp, student_temp=0.1, center_momentum=0.9):
    """DINOLoss.forward + update_center of main_dino.py (one process), in their own terms."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the same view: skipped
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss, center * center_momentum + batch_center * (1 - center_momentum)


def test_loss_and_centre_follow_the_official_rule():
    m = build()
    g = torch.Generator().manual_seed(0)
    b, k = 5, 64
    student, teacher = 3 * torch.randn(4 * b, k, generator=g), 3 * torch.randn(2 * b, k, generator=g)
    m.centre.centre.copy_(torch.randn(1, k, generator=g))  # a centre already under way
    want, want_centre = official_dino_loss(student, teacher, m.centre.centre.clone(), ncrops=4, temp=0.04)
    got = m.loss(student, teacher, 0.04)
    m.centre.update(teacher)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(m.centre.centre, want_centre, atol=1e-6)


def test_teacher_temperature_warms_up_as_the_official_schedule():
    m = build("dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.07", "dino.warmup_teacher_temp_epochs=5")
    m.epochs = 20
    schedule = np.concatenate((np.linspace(0.04, 0.07, 5), np.ones(20 - 5) * 0.07))
    got = []
    for epoch in range(20):
        m.after_step(epoch * 10, 200)  # 10 steps an epoch: step 10 e opens epoch e
        got.append(m.teacher_temp())
    assert got == pytest.approx(schedule.tolist())


def test_student_learns_from_every_crop_with_the_last_layer_frozen_in_epoch_one():
    m = build()
    assert [v.size for v in m.views] == [16, 16, 8, 8] and len({v.crop_group for v in m.views}) == 4
    assert m.views[0].scale == (0.4, 1.0) and m.views[2].scale == (0.05, 0.4)
    batch = {v.name: torch.randn(4, 3, v.size, v.size) for v in m.views}
    m(batch)[0].backward()
    last = m.student["head"].last_layer.parametrizations.weight.original1
    assert last.grad is None  # epoch 0 < freeze_last_layer_epochs
    assert m.student["vit"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in m.teacher.parameters())
    m.zero_grad()
    m.epoch.fill_(1)
    m(batch)[0].backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert m.encoder is m.teacher.module["vit"]  # the teacher is what is evaluated and exported


def test_local_crops_see_the_position_table_resampled():
    m = build()
    vit = m.student["vit"]
    small = m.encode(vit, [torch.randn(3, 3, 8, 8)])
    assert small.shape == (3, vit.embed_dim)


@pytest.mark.parametrize(
    "override, message",
    [("dino.local_size=6", "dino.local_size 6 must be a multiple"), ("dino.local_scale=[0.5,0.1]", "dino.local_scale")],
)
def test_bad_options_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build(override)


def test_cli_pretrain_exports_the_teacher_backbone(tmp_path, labeled_folder):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "dino", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1"]
    assert main([*argv, *TINY, *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dino" and summary["steps"] == 3
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)  # strict
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    teacher = {k[len("teacher.module.vit.") :]: v for k, v in state.items() if k.startswith("teacher.module.vit.")}
    assert teacher.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())
    student = state["student.vit.blocks.0.attn.qkv.weight"]
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], student)  # the teacher lags


def test_pool_avg_feeds_the_head_the_mean_of_the_patch_tokens():
    m = build("dino.pool=avg")
    vit, x = m.student["vit"], torch.randn(2, 3, 16, 16)
    tokens = V.encode_visible(vit, V.embed_patches(vit, x))
    assert torch.allclose(m.encode(vit, [x]), tokens[:, 1:].mean(dim=1), atol=1e-6)
    assert torch.allclose(build().encode(vit, [x]), tokens[:, 0], atol=1e-6)

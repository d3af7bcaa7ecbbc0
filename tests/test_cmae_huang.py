"""Huang et al.'s CMAE (`cmae-huang`): the loss against the official rule (ZhichengHuang/CMAE
cmae/models/heads/cmae_head.py CMAEPretrainHead.forward, written out here), masks of whole 2 x 2 cells, the
pixel-shifted target window, the constant momentum, one CLI run exporting the online encoder, and the old
`--method cmae` name."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TINY

from mimkit import methods
from mimkit.cli import main
from mimkit.methods import CMAE, build_method, method_class
from mimkit.methods.cmae_huang import CMAEHuang
from mimkit.run_config import build_config

SMALL = [
    "cmae-huang.decoder_dim=32",
    "cmae-huang.decoder_depth=1",
    "cmae-huang.decoder_heads=2",
    "cmae-huang.proj_hidden=32",
    "cmae-huang.proj_dim=16",
]


def build(*extra) -> CMAEHuang:
    torch.manual_seed(0)
    return build_method(build_config([], None, [*TINY, "method=cmae-huang", *SMALL, *extra]))


def official_head(img, pred_pixel, mask_s, proj_s, proj_t, predictor, patch, t=0.07, ct_weight=1.0, rc_weight=1.0):
    """CMAEPretrainHead.forward on one process: norm-pix MSE on the masked patches, and 2t x cross-entropy of the
    normalised predictor output against the normalised target projections, the positive being the same image."""
    n = img.shape[0]
    target = img.reshape(n, 3, img.shape[2] // patch, patch, img.shape[3] // patch, patch)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, -1, patch**2 * 3)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss_rc = (((pred_pixel - target) ** 2).mean(dim=-1) * mask_s).sum() / mask_s.sum()
    pred_s = F.normalize(predictor(proj_s), dim=1, p=2)
    proj_t = F.normalize(proj_t, dim=1, p=2)
    score = pred_s @ proj_t.t() / t
    loss_ct = ct_weight * 2 * t * F.cross_entropy(score, torch.arange(n))
    return loss_ct + rc_weight * loss_rc


def test_loss_is_the_official_heads():
    m = build()
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 3, 16, 16, generator=g)
    pred = torch.randn(6, 16, 48, generator=g)
    _, mask, _ = m.mask(6, "cpu")
    proj_s, proj_t = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    want = official_head(img, pred, mask, proj_s, proj_t, m.predictor, patch=4)
    got = m.loss(pred, m.targets(img), mask) + m.contrast_loss(m.predictor(proj_s), proj_t)[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_masks_are_whole_two_by_two_cells_at_65_percent():
    m = build("data.image_size=32")  # 8 x 8 patches, 16 cells: int(16 * 0.35) = 5 visible cells
    ids_keep, mask, ids_restore = m.mask(3, "cpu")
    assert ids_keep.shape == (3, 20) and mask.sum(1).tolist() == [44.0] * 3
    cells = mask.view(3, 4, 2, 4, 2)
    assert torch.equal(cells.amin(dim=(2, 4)), cells.amax(dim=(2, 4)))  # each cell all masked or all visible
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(3, 20))


def test_target_is_a_shifted_window_of_the_same_crop():
    m = build()
    assert m.views[0].size == 16 + 2 and m.target_view.color is not None  # round(16 * 32 / 224) = 2
    crop = torch.arange(18 * 18, dtype=torch.float).view(1, 1, 18, 18).expand(4, 3, 18, 18).contiguous()
    online, target = m.shift_views(crop)
    assert torch.equal(online, crop[..., :16, :16])
    for b in range(4):
        dy, dx = divmod(int(target[b, 0, 0, 0]), 18)
        assert 0 <= dy < 2 and 0 <= dx < 2 and torch.equal(target[b], crop[b, :, dy : dy + 16, dx : dx + 16])


def test_step_trains_online_parts_and_momentum_stays_constant():
    """The official momentum is constant (0.996 -> 0.996): so under the published rule; the budget rule (default)
    lowers the start for a run too short for it, as for every teacher (mimkit.ema)."""
    assert build().target_encoder.momentum(0, 100) < 0.996
    m = build("cmae-huang.momentum_rule=fixed")
    batch = {"image": torch.randn(8, 3, 18, 18)}
    loss, metrics = m(batch)
    loss.backward()
    assert {"loss_rec", "loss_contrast", "contrast_acc"} <= set(metrics)
    for part in (m.encoder, m.feature_decoder, m.projector, m.predictor, m.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert not any(p.requires_grad for p in m.target_encoder.parameters())
    assert m.target_encoder.momentum(0, 100) == m.target_encoder.momentum(99, 100) == pytest.approx(0.996)


def test_cli_pretrain_exports_the_online_encoder(tmp_path, labeled_folder):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "cmae-huang", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1"]
    assert main([*argv, *TINY, *SMALL]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)  # strict
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    online = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    assert online.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in online.items())


def test_old_cmae_name_is_the_seed_with_a_one_line_notice(capsys, monkeypatch):
    monkeypatch.setattr(methods, "_noticed", set())
    assert method_class("cmae") is CMAE and method_class("cmae") is CMAE and method_class("cmae-mao") is CMAE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cmae-mao" in err[0] and "cmae-huang" in err[0]  # once per process


def test_mimkit_methods_lists_both_cmaes_and_dino(capsys):
    assert main(["methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"cmae-mao", "cmae-huang", "dino"} <= set(names) and "cmae" not in names

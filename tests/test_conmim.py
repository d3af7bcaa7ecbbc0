"""ConMIM: the loss is the intra-image InfoNCE of the paper, the teacher is a pure EMA, positives line up."""

import json
import math
import re

import pytest
import timm
import torch
from helpers import TINY

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.ema import cosine_momentum
from mimkit.engine.trainer.logging import TIMING_KEYS
from mimkit.engine.trainer.optim import build_optimizer
from mimkit.methods.conmim import ConMIM
from mimkit.run_config import build_config

SMALL = [*TINY, "method=conmim", "conmim.proj_hidden=32", "conmim.proj_dim=16"]


def make(*overrides: str) -> ConMIM:
    torch.manual_seed(0)
    return ConMIM.from_config(build_config([], None, [*SMALL, *overrides]))


def loop_loss(s, t, mask, tau):
    """The paper's formula written out: mean over masked (b, i) of -log(e^{s_bi.t_bi/tau} / sum_j e^{s_bi.t_bj/tau})."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            num = math.exp(float(s[b, i] @ t[b, i]) / tau)
            den = sum(math.exp(float(s[b, i] @ t[b, j]) / tau) for j in range(t.shape[1]))
            total += -math.log(num / den)
            count += 1
    return total / count


def test_loss_equals_loop_formula():
    m = make("conmim.temperature=0.2").train()
    x = torch.rand(3, 3, 16, 16)
    mask = m.mask(3, "cpu")
    assert mask.dtype == torch.bool and mask.any(1).all() and (~mask).any(1).all()
    torch.manual_seed(5)
    loss, metrics = m({"image": x}, mask=mask)
    # the same step, piece by piece: same perturbation (same RNG), student on the masked weak view
    torch.manual_seed(5)
    with torch.no_grad():
        t = m.encode_teacher(m.perturb(x))
        s = m.encode_student(x, mask)
    assert s.shape == t.shape == (3, 16, 16)
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(3, 16))  # L2-normalised projections
    assert loss.item() == pytest.approx(loop_loss(s, t, mask, 0.2), rel=1e-5)
    assert 0.0 <= metrics["pos_acc"] <= 1.0 and metrics["mask_frac"] == mask.float().mean()


def test_positives_are_at_matching_positions():
    torch.manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(2, 16, 32), dim=-1)
    mask = torch.ones(2, 16, dtype=torch.bool)
    m = make("conmim.temperature=0.05")
    aligned, acc = m.loss(s, s, mask)
    shifted, acc_shifted = m.loss(s, s.roll(1, dims=1), mask)  # teacher's patch i moved to i + 1
    assert acc == 1.0 and acc_shifted == 0.0 and aligned < 0.1 < 5.0 < shifted
    # end to end: at initialisation (teacher == student), no mask and no perturbation, the student's token i is
    # the teacher's token i, so every position finds itself among the image's patches
    m = make("conmim.jitter_p=0", "conmim.grayscale_p=0", "conmim.blur_p=0", "conmim.solarize_p=0").train()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        s = m.encode_student(x, torch.zeros(4, 16, dtype=torch.bool))
        t = m.encode_teacher(m.perturb(x))
    torch.testing.assert_close(s, t)
    assert m.loss(s, t, torch.ones(4, 16, dtype=torch.bool))[1] == 1.0


def test_centering_removes_the_position_shortcut():
    """With absolute positions, 'find your own position' is solvable from position alone; conmim.center_teacher
    subtracts the teacher's per-position batch mean, which leaves a position-only student at chance."""
    torch.manual_seed(0)
    b, n, d = 64, 16, 32
    pos = torch.randn(1, n, d) * 3
    tokens = torch.cat([torch.zeros(b, 1, d), pos + torch.randn(b, n, d)], dim=1)  # class token + patches
    s = torch.nn.functional.normalize(pos.expand(b, -1, -1), dim=-1)  # knows where it is, nothing of the image
    m, mask = make(), torch.ones(b, n, dtype=torch.bool)
    plain, plain_acc = m.loss(s, m.project(torch.nn.Identity(), tokens), mask)
    centered, centered_acc = m.loss(s, m.project(torch.nn.Identity(), tokens, center=True), mask)
    assert plain < 0.1 and plain_acc == 1.0
    assert centered > math.log(n) and centered_acc < 0.12  # chance: 1/16


def test_teacher_gets_no_gradient_and_moves_by_the_ema_rule():
    m = make("conmim.momentum=0.9", "conmim.momentum_rule=fixed").train()
    assert not any(p.requires_grad for p in m.teacher.parameters())
    opt = build_optimizer(m, build_config([], None, SMALL).optim, 1e-2, m.no_weight_decay(), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in m.teacher.parameters()}
    assert id(m.mask_token) in in_opt and id(m.student["proj"][0].weight) in in_opt
    before = {k: v.clone() for k, v in m.teacher.module.named_parameters()}
    loss, _ = m({"image": torch.rand(8, 3, 16, 16)})
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.mask_token.grad is not None and m.student["vit"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    opt.step()
    student = {k: v.detach().clone() for k, v in m.student.named_parameters()}
    m.after_step(3, 10)
    mom = cosine_momentum(3, 10, 0.9)
    assert 0.9 < mom < 1.0
    for k, v in m.teacher.module.named_parameters():
        torch.testing.assert_close(v, mom * before[k] + (1 - mom) * student[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(m.teacher.module["vit"].blocks[0].attn.qkv.weight, before["vit.blocks.0.attn.qkv.weight"])
    m.after_step(10, 10)  # momentum 1 at the end: the teacher no longer moves
    frozen = {k: v.clone() for k, v in m.teacher.module.named_parameters()}
    with torch.no_grad():
        m.student["vit"].blocks[0].attn.qkv.weight.add_(1.0)
    m.after_step(10, 10)
    assert all(torch.equal(v, frozen[k]) for k, v in m.teacher.module.named_parameters())


def test_encoder_choice_and_coarse_masks():
    m = make()
    assert m.encoder is m.teacher.module["vit"] and isinstance(m.encoder, timm.models.VisionTransformer)
    s = make("conmim.export_encoder=student")
    assert s.encoder is s.student["vit"]
    c = make("conmim.mask_mode=coarse", "conmim.mask_ratio=0.5", "conmim.mask_patch_size=8")
    mask = c.mask(5, "cpu").view(5, 2, 2, 2, 2)
    assert set(mask.sum(dim=(2, 4)).unique().tolist()) <= {0, 4} and (mask.sum(dim=(1, 2, 3, 4)) == 8).all()


def test_absolute_positions_without_centering_warn_of_the_shortcut(recwarn):
    with pytest.warns(UserWarning, match="conmim.center_teacher"):
        make()  # a vit_* encoder: absolute positions
    recwarn.clear()
    make("conmim.center_teacher=true")
    make("model.name=beit_base_patch16_224")  # relative position bias only
    assert not [w for w in recwarn if "center_teacher" in str(w.message)]


def test_beit_encoder_with_relative_position_bias(tmp_path):
    """The reference's encoder: timm Beit, shared relative position bias, no absolute position, LayerScale."""
    from mimkit.export import export_encoder

    m = make("model.name=beit_base_patch16_224", "model.layer_scale=0.1", "conmim.center_teacher=true").train()
    assert isinstance(m.encoder, timm.models.beit.Beit) and m.encoder.pos_embed is None
    loss, _ = m({"image": torch.rand(4, 3, 16, 16)})
    loss.backward()
    assert torch.isfinite(loss) and m.student["vit"].rel_pos_bias.relative_position_bias_table.grad is not None
    # decayed, as in the reference (BEiT's optim_factory skips only the model's {pos_embed, cls_token} and 1-D)
    assert m.no_weight_decay() == {"student.vit.cls_token", "student.vit.pos_embed"}
    out = export_encoder(m.encoder, tmp_path / "enc", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), m.encoder.eval().forward_features(x))


def test_mask_bank_is_seeded_and_on_device():
    a, b = make("conmim.mask_bank=50"), make("conmim.mask_bank=50")
    torch.manual_seed(1)
    ma = a.mask(64, "cpu")
    torch.manual_seed(1)
    assert torch.equal(ma, b.mask(64, "cpu"))  # the bank depends on train.seed only
    assert a.mask_bank.shape == (400, 16) and (a.mask_bank.sum(1) <= 6).all() and a.mask_bank.any(1).all()
    assert "mask_bank" not in a.state_dict()  # rebuilt, not saved


@pytest.mark.parametrize(
    "override, message",
    [
        ("conmim.temperature=-1", "conmim.temperature must be > 0, got -1"),
        ("conmim.temperature=0", "conmim.temperature must be > 0, got 0"),
        ("conmim.momentum=1.5", "conmim.momentum must be in [0, 1], got 1.5"),
        ("conmim.momentum=-0.1", "conmim.momentum must be in [0, 1], got -0.1"),
        ("conmim.mask_ratio=0.01", "conmim.mask_ratio 0.01 masks no patch of 16 patches"),
        ("conmim.mask_ratio=0.99", "conmim.mask_ratio 0.99 leaves no visible patch of 16 patches"),
        ("conmim.mask_ratio=1.5", "conmim.mask_ratio 1.5 leaves no visible patch"),
        ("conmim.blur_p=2", "conmim.blur_p must be in [0, 1], got 2"),
        ("conmim.mask_mode=random", "conmim.mask_mode must be 'block' or 'coarse'"),
        ("conmim.export_encoder=ema", "conmim.export_encoder must be 'teacher', 'student' or 'auto'"),
        ("conmim.mask_bank=-1", "conmim.mask_bank must be >= 0"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        make(override)
    assert message in str(e.value)


def test_cli_pretrain_export_visualize(tmp_path, capsys, labeled_folder):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "conmim", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1"]
    code = main([*argv, *TINY, "conmim.proj_hidden=32", "conmim.proj_dim=16", "conmim.export_encoder=teacher"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "conmim" and summary["steps"] == 3 and "knn_top1_random_init" in summary
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "pos_acc", "mask_frac"} <= set(x) for x in lines)
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)  # strict
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    prefix = "teacher.module.vit."
    teacher = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())
    assert json.loads((out / "encoder" / "config.json").read_text())["mimkit"]["encoder"] == "teacher"
    png = tmp_path / "viz.png"
    argv = ["visualize", "--checkpoint", str(ckpt), "--data", str(labeled_folder), "--out", str(png), "--num", "2"]
    assert main(argv) == 0
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 2 * h  # image | masked | 3 similarity maps, for 2 rows
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "bad"), *SMALL, "conmim.temperature=-1"]) == 2
    assert "conmim.temperature must be > 0, got -1" in capsys.readouterr().err


def test_resume_is_exact(tmp_path, monkeypatch, capsys):
    """The teacher's perturbation and the masks draw from the saved RNG: a resumed run logs the same metrics."""
    argv = ["pretrain", "--data", "demo", "--max-images", "96", "--epochs", "2", *SMALL,
            "train.checkpoint_every=2", "eval.final_knn=false"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    real = ConMIM.after_step

    class Crash(BaseException):  # like a kill: nothing in mimkit handles it
        pass

    def crash_at_5(self, step, total):
        real(self, step, total)
        if step == 5:
            raise Crash

    monkeypatch.setattr(ConMIM, "after_step", crash_at_5)
    with pytest.raises(Crash):
        main([*argv, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(ConMIM, "after_step", real)
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 0

    def rows(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]

    assert rows(tmp_path / "cut") == rows(tmp_path / "full") and len(rows(tmp_path / "full")) == 12
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


# ---- fidelity to the reference (TencentARC/ConMIM: run_conmim_pretraining.py, modeling_pretrain.py, datasets.py) ----
def test_reference_backbone_init_masks_and_blur():
    """beit_*: shared relative position bias, no absolute position, LayerScale 0.1 by default, no centring; BEiT's
    init for encoder and projector; block masks of BEiT's 75 of 196; blur sigma relative to the image."""
    m = make("model.name=beit_base_patch16_224")
    vit = m.student["vit"]
    assert vit.pos_embed is None and vit.rel_pos_bias is not None and not m.options.center_teacher
    assert all((b.gamma_1 == 0.1).all() for b in vit.blocks)
    for w in (vit.blocks[0].mlp.fc1.weight, m.student["proj"][0].weight, m.student["proj"][6].weight, m.mask_token):
        assert w.abs().max() <= 0.02  # trunc-normal 0.02 cut at +-1 std (PyTorch's Linear default is wider)
    assert m.student["proj"][3].weight.std().item() == pytest.approx(0.02 * 0.5396, rel=0.05)
    assert vit.blocks[1].attn.proj.weight.abs().max() <= 0.02 / 2  # block 2: / sqrt(2 * 2)
    torch.testing.assert_close(m.teacher.module["proj"][0].weight, m.student["proj"][0].weight)  # the copy, after init
    assert m.num_masked == 6  # round(75 * 16 / 196)
    big = make("data.image_size=56")  # BEiT's 14 x 14 grid
    assert big.num_masked == 75 and big.mask(50, "cpu").sum(1).max() == 75
    coarse = make("conmim.mask_mode=coarse", "conmim.mask_patch_size=8")  # 2 x 2 cells: the reference's 0.75
    assert (coarse.mask(4, "cpu").sum(1) == 12).all()
    with pytest.raises(ConfigError, match="conmim.num_masking_patches is for mask_mode=block"):
        make("conmim.mask_mode=coarse", "conmim.num_masking_patches=4")
    # PIL radius 0.1-2 at 224 px is 0.1-2 pixels there; at 16 px the same blur is 16/224 as wide
    view = m.teacher_view  # its colour spec states the blur at 224 px and scales it to the view's size
    assert view.color.augment(view.size).blur_sigma == pytest.approx((0.1 * 16 / 224, 2.0 * 16 / 224))
    view = make("data.image_size=224", "model.patch_size=16").teacher_view
    assert view.color.augment(view.size).blur_sigma == pytest.approx((0.1, 2.0))


def test_contrastive_crop_boxes_come_from_the_online_encoder():
    m = make()
    assert m.ccrop_encoder is m.student["vit"] and m.encoder is m.teacher.module["vit"]


def test_export_auto_measures_both_encoders_and_says_which(tmp_path, capsys, labeled_folder):
    """conmim.export_encoder=auto (the default): at the end of a run on labeled data, one line names the exported
    encoder and the k-NN (among training images) that chose it; the export holds that encoder's weights."""
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "conmim", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1"]
    assert main([*argv, *TINY, "conmim.proj_hidden=32", "conmim.proj_dim=16"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("exported the ")]
    assert len(lines) == 1
    m = re.fullmatch(r"exported the (student|teacher) encoder \(conmim\.export_encoder=auto: k-NN top-1 student "
                     r"([0-9.]+), teacher ([0-9.]+) on \d+ training images, half as memory, half as queries\)",
                     lines[0])  # fmt: skip
    assert m, lines[0]
    chosen, student, teacher = m.group(1), float(m.group(2)), float(m.group(3))
    assert chosen == ("student" if student > teacher else "teacher")
    assert json.loads((out / "encoder" / "config.json").read_text())["mimkit"]["encoder"] == chosen
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    prefix = {"student": "student.vit.", "teacher": "teacher.module.vit."}[chosen]
    ref = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    assert ref and all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def test_export_choice_without_labels_or_with_a_setting():
    from mimkit.data import Splits
    from mimkit.engine.tasks.pretrain import choose_export

    cfg = build_config([], None, SMALL)
    m = make()
    line = choose_export(m, cfg, Splits(None, None, None), "cpu")
    assert (
        line == "exported the teacher encoder (conmim.export_encoder=auto, no labeled training images to "
        "measure: the fallback)"
    )
    assert m.encoder is m.teacher.module["vit"]
    m = make("conmim.export_encoder=student")
    assert (
        choose_export(m, cfg, Splits(None, None, None), "cpu")
        == "exported the student encoder (conmim.export_encoder=student)"
    )
    assert m.encoder is m.student["vit"] and m.export_meta() == {"encoder": "student"}


def test_sincos_variant_tokens_are_not_swamped_by_position():
    """mimkit's vit_* variant adds a fixed sin-cos table (RMS 0.71): with BEiT's patch init alone the content part
    of a token was 1/16 of it (RMS 0.04), so every image started as nearly the same tokens (docs/methods.md, the
    ConMIM diagnosis). The patch projection is MAE's xavier there; the reference's beit_* encoder keeps BEiT's."""
    from mimkit.models import vit as V

    x = torch.rand(32, 3, 16, 16) * 2 - 1
    m = make("conmim.center_teacher=true")
    vit = m.student["vit"]
    content = vit.patch_embed(x).pow(2).mean().sqrt()
    position = V.patch_pos_embed(vit).pow(2).mean().sqrt()
    assert content > 0.3 * position
    assert torch.equal(m.teacher.module["vit"].patch_embed.proj.weight, vit.patch_embed.proj.weight)
    beit = make("model.name=beit_base_patch16_224")
    w = beit.student["vit"].patch_embed.proj.weight
    assert w.abs().max() <= 0.02 + 1e-6  # BEiT's trunc-normal cut at +-1 std, untouched

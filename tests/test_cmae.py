"""CMAE: its three tasks, their switches and bad settings, and one end-to-end run with ContrastiveCrop."""

import json

import numpy as np
import pytest
import timm
import torch
from helpers import TINY
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.methods import MAE, build_method
from mimkit.methods.cmae import CMAE
from mimkit.run_config import build_config

CMAE_TINY = [*TINY, "method=cmae", "cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2"]
CMAE_TINY += ["cmae.proj_hidden=64", "cmae.proj_dim=16"]


def build(*extra) -> CMAE:
    torch.manual_seed(0)
    return build_method(build_config([], None, [*CMAE_TINY, *extra]))


def batch(b=4, size=16):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(b, 3, size, size, generator=g), "target": torch.randn(b, 3, size, size, generator=g)}


def test_position_labels_are_the_true_indices_of_the_visible_tokens():
    m = build()
    imgs = batch()["image"]
    ids_keep, _, _ = m.mask(4, "cpu")
    hidden = m.hide_positions(imgs, ids_keep)
    raw = m.encoder.patch_embed(imgs)  # (B, N, D) without any position embedding
    for b in range(4):
        for k, label in enumerate(ids_keep[b].tolist()):
            assert torch.equal(hidden[b, k], raw[b, label])  # token k is patch `label`, and carries no position
    logits = torch.nn.functional.one_hot(ids_keep, m.num_patches).float() * 50
    loss, acc = m.position_loss(logits, ids_keep)
    assert acc == 1.0 and loss < 1e-6
    logits = m.predict_positions(imgs, ids_keep)
    assert logits.shape == (4, ids_keep.shape[1], m.num_patches)


def test_permute_hides_positions_with_embeddings_of_other_positions():
    m = build("cmae.pos_hiding=permute")
    imgs = batch()["image"]
    ids_keep, _, _ = m.mask(4, "cpu")
    added = m.hide_positions(imgs, ids_keep) - torch.gather(
        m.encoder.patch_embed(imgs), 1, ids_keep[..., None].expand(-1, -1, m.encoder.embed_dim)
    )
    table = m.encoder.pos_embed[0, 1:]
    true = table[ids_keep]
    assert not torch.allclose(added, true)  # not (all) the true positions
    matches = (added[..., None, :] - table).abs().amax(-1) < 1e-6  # every added row is some position's embedding
    assert (matches.sum(-1) == 1).all()


def test_ema_target_gets_no_gradient_and_follows_the_encoder():
    m = build("cmae.momentum_rule=fixed")  # 0.996 at step 1 of 100
    loss, metrics = m(batch())
    loss.backward()
    assert {"loss_rec", "loss_contrast", "loss_pos", "pos_acc"} <= metrics.keys()
    assert all(p.grad is None and not p.requires_grad for p in m.target_vit.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.target_projector.parameters())
    assert m.encoder.blocks[0].attn.qkv.weight.grad is not None and m.pos_head.weight.grad is not None
    assert m.projector[0].weight.grad is not None and m.predictor[0].weight.grad is not None
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    before = m.target_vit.module.blocks[0].attn.qkv.weight.clone()
    m.after_step(1, 100)
    after = m.target_vit.module.blocks[0].attn.qkv.weight
    assert not torch.equal(before, after) and (after - before).abs().max() < 0.01  # a small EMA step
    m.train()
    assert not m.target_vit.training and m.encoder.training


def test_tasks_switch_off_and_rec_only_equals_mae():
    m = build("cmae.contrast_weight=0", "cmae.pos_weight=0")
    assert [v.name for v in m.views] == ["image"] and not hasattr(m, "projector") and not hasattr(m, "pos_head")
    cfg = build_config([], None, [*CMAE_TINY, "method=mae", "mae.decoder_dim=32", "mae.decoder_depth=1"])
    torch.manual_seed(0)
    mae = MAE.from_config(cfg)
    m.load_state_dict(mae.state_dict())
    noise = torch.rand(4, m.num_patches)
    assert torch.allclose(m(batch(), noise)[0], mae(batch(), noise)[0])
    m = build("cmae.rec_weight=0")
    loss, metrics = m(batch())
    assert m.decoder is None and "loss_rec" not in metrics and [v.crop_group for v in m.views] == [0, 1]
    m = build("cmae.rec_weight=0", "cmae.contrast_weight=0", "cmae.target_encoder=shared")
    assert set(m(batch())[1]) == {"loss", "loss_pos", "pos_acc"}
    m = build("cmae.target_encoder=shared", "cmae.predictor=false")
    assert m.target_vit is None and isinstance(m.predictor, torch.nn.Identity)
    loss, _ = m(batch())
    loss.backward()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["cmae.rec_weight=0", "cmae.contrast_weight=0", "cmae.pos_weight=0"], "are all 0: no task to train"),
        (["cmae.pos_hiding=none"], "cmae.pos_hiding=none keeps the position embeddings"),
        (["cmae.pos_hiding=shuffle"], "cmae.pos_hiding must be 'drop', 'permute' or 'none'"),
        (["cmae.contrast_weight=-1"], "cmae.contrast_weight must be >= 0"),
        (["cmae.target_encoder=momentum"], "cmae.target_encoder must be 'ema' or 'shared'"),
        (["cmae.temperature=0"], "cmae.temperature must be > 0"),
        (["cmae.mask_ratio=1.0"], "cmae.mask_ratio must be in (0, 1)"),
    ],
)
def test_bad_settings_name_the_key(extra, message):
    with pytest.raises(ConfigError) as e:
        build(*extra)
    assert message in str(e.value)


def test_pretrain_with_ccrop_through_box_update_export_and_visualize(tmp_path, labeled_folder, capsys):
    out = tmp_path / "run"
    ccrop = ["data.crop_mode=ccrop", "data.ccrop_warmup_epochs=1", "data.ccrop_interval=1"]
    args = ["pretrain", "--data", str(labeled_folder), "--out", str(out), "--epochs", "2", *CMAE_TINY, *ccrop]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ccrop_box_area" in r] == [3]  # after epoch 1 only (never after the last)
    assert all({"loss_rec", "loss_contrast", "loss_pos"} <= r.keys() for r in rows if "loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cmae" and "knn_top1" in summary
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["ccrop_boxes"].shape == (48, 4) and state["method"] == "cmae"

    timm_model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)  # strict load
    m = build_method(build_config([], None, [*CMAE_TINY, *ccrop]))
    m.load_state_dict(state["model"])
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(timm_model.eval().forward_features(x), m.encoder.eval().forward_features(x), atol=1e-5)

    png = tmp_path / "viz.png"
    argv = ["visualize", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--data", str(labeled_folder)]
    assert main([*argv, "--out", str(png), "--num", "3"]) == 0
    img = torch.from_numpy(np.array(Image.open(png))).float()
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.sum() > 50  # the boxes are drawn
    capsys.readouterr()


def test_contrastive_crops_get_independent_colour_as_contrastive_crop_pipelines():
    """Flat-coloured images: any two crops of one image are the same pixels, so without colour augmentation the
    pair is matched by its colour alone. ContrastiveCrop's jitter (p 0.8) + grayscale (p 0.2), drawn per view,
    make the two views' colours differ; with cmae.color_views=none they stay equal."""
    torch.manual_seed(0)
    b = 64
    rgb = torch.rand(b, 3, 1, 1) * 0.6 + 0.2  # saturated-enough flat colours, away from the clamp
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)  # data.mean / data.std (the config's defaults)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    flat = ((rgb - mean) / std).expand(b, 3, 16, 16)
    pair = {"image": flat.clone(), "target": flat.clone()}

    def colours(x):  # (B, 3) mean colour in [0, 1] and saturation (max - min over channels)
        c = (x * std + mean).mean(dim=(2, 3))
        return c, c.amax(1) - c.amin(1)

    off = build("cmae.color_views=none").recolor(pair)
    assert torch.equal(off["image"], off["target"])
    on = build().recolor(pair)
    (c1, s1), (c2, s2) = colours(on["image"]), colours(on["target"])
    differ = (c1 - c2).abs().amax(1) > 0.02
    assert differ.float().mean() > 0.8  # unchanged only if both views skip jitter and grayscale (0.16^2)
    assert 0 < (s1 < 1e-4).sum() < b / 2 and 0 < (s2 < 1e-4).sum() < b / 2  # grayscale views: ~20%
    assert ((s1 < 1e-4) != (s2 < 1e-4)).any()  # drawn independently per view
    target_only = build("cmae.color_views=target").recolor(pair)
    assert torch.equal(target_only["image"], flat) and not torch.equal(target_only["target"], flat)
    assert build("cmae.contrast_weight=0").recolor({"image": flat})["image"] is flat  # no pair: MAE's input

"""The exported encoder loads strictly into real timm and gives the same features as mimkit's encoder."""

import json

import timm
import torch
from helpers import TINY
from safetensors.torch import load_file

from mimkit.export import export_encoder
from mimkit.methods import build_method
from mimkit.run_config import build_config


def test_export_loads_strictly_into_timm(tmp_path):
    torch.manual_seed(0)
    cfg = build_config(dotted=TINY)
    method = build_method(cfg).eval()
    for p in method.parameters():  # move away from the init so the check means something
        p.data.add_(0.01 * torch.randn_like(p))
    out = export_encoder(
        method.encoder,
        tmp_path / "enc",
        image_size=16,
        mean=cfg.data.mean,
        std=cfg.data.std,
        mimkit_meta={"method": "mae"},
    )
    keys = set(load_file(str(out / "model.safetensors")))
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["img_size"] == 16 and config["model_args"]["embed_dim"] == 32

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # strict by default
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), method.encoder.forward_features(x))
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)
    assert tuple(model.pretrained_cfg["mean"]) == tuple(cfg.data.mean)
    # the export is a plain timm state dict: a strict load of it into a fresh model works too
    fresh = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )
    fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)

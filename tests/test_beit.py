"""BEiT: loss parity with transformers' BeitForMaskedImageModeling, tokenizer grid checks, end-to-end CLI."""

import json

import pytest
import timm
import torch
from helpers import TINY, make_tokenizer

from mimkit.cli import main
from mimkit.config import ConfigError, build_config
from mimkit.methods.beit import BEiT

BEIT_TINY = [
    *TINY, "method=beit", "model.name=beit_base_patch16_224", "model.layer_scale=0.1", "beit.mask_ratio=0.4",
]  # fmt: skip


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A small, randomly initialised trainable tokenizer: 16 px images -> 4x4 tokens (downsample 4)."""
    return make_tokenizer(tmp_path / "tok")


def _timm_beit_to_hf(ours: dict, depth: int) -> dict:
    out = {
        "beit.embeddings.cls_token": ours["encoder.cls_token"],
        "beit.embeddings.mask_token": ours["mask_token"],
        "beit.embeddings.patch_embeddings.projection.weight": ours["encoder.patch_embed.proj.weight"],
        "beit.embeddings.patch_embeddings.projection.bias": ours["encoder.patch_embed.proj.bias"],
        "beit.shared_position_bias.relative_position_bias_table": ours[
            "encoder.rel_pos_bias.relative_position_bias_table"
        ],
        "layernorm.weight": ours["encoder.norm.weight"],
        "layernorm.bias": ours["encoder.norm.bias"],
        "lm_head.weight": ours["lm_head.weight"],
        "lm_head.bias": ours["lm_head.bias"],
    }
    for i in range(depth):
        b, h = f"encoder.blocks.{i}", f"beit.layers.{i}"
        qkv = ours[f"{b}.attn.qkv.weight"]
        d = qkv.shape[1]
        out[f"{h}.attention.q_proj.weight"] = qkv[:d]
        out[f"{h}.attention.k_proj.weight"] = qkv[d : 2 * d]
        out[f"{h}.attention.v_proj.weight"] = qkv[2 * d :]
        out[f"{h}.attention.q_proj.bias"] = ours[f"{b}.attn.q_bias"]
        out[f"{h}.attention.v_proj.bias"] = ours[f"{b}.attn.v_bias"]
        out[f"{h}.lambda_1"] = ours[f"{b}.gamma_1"]
        out[f"{h}.lambda_2"] = ours[f"{b}.gamma_2"]
        pairs = {"attention.o_proj": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
        for hf_name, mine in pairs.items():
            for p in ("weight", "bias"):
                out[f"{h}.{hf_name}.{p}"] = ours[f"{b}.{mine}.{p}"]
    return out


def test_beit_loss_matches_transformers(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = build_config(dotted=[*BEIT_TINY, f"tokenizer.path={tokenizer_dir}"])
    ours = BEiT(cfg).eval()
    for p in ours.parameters():  # leave the init (layer scale 0.1 everywhere) so the check means something
        p.data.add_(0.02 * torch.randn_like(p))
    hf_cfg = transformers.BeitConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, vocab_size=64, use_mask_token=True, use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=False, layer_scale_init_value=0.1,
        layer_norm_eps=1e-6, hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.BeitForMaskedImageModeling(hf_cfg).eval()
    if "beit.layers.0.attention.q_proj.weight" not in hf.state_dict():
        pytest.skip("this transformers version names BEiT weights differently")
    mapped = _timm_beit_to_hf(ours.state_dict(), depth=2)
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and not [k for k in missing if "relative_position_index" not in k], (missing, unexpected)

    imgs, tok_imgs = torch.randn(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    mask = ours.mask(3, "cpu")
    with torch.no_grad():
        our_loss, _ = ours({"image": imgs, "tokens": tok_imgs}, mask=mask)
        ids = ours.targets(tok_imgs)
        hf_loss = hf(pixel_values=imgs, bool_masked_pos=mask, labels=ids[mask]).loss
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_tokenizer_problems_are_named(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        BEiT(build_config(dotted=BEIT_TINY))
    with pytest.raises(ConfigError, match="does not exist"):
        BEiT(build_config(dotted=[*BEIT_TINY, f"tokenizer.path={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match=r"tokenizer grid 4x4 != encoder grid 8x8"):
        BEiT(build_config(dotted=[*BEIT_TINY, f"tokenizer.path={tokenizer_dir}", "model.patch_size=2"]))


def test_beit_pretrain_exports_a_timm_beit(tmp_path, labeled_folder, tokenizer_dir, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1", *BEIT_TINY]
    assert main([*argv, f"tokenizer.path={tokenizer_dir}"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("token_acc" in r for r in rows if "loss" in r)
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)
    assert type(model).__name__ == "Beit"
    png = tmp_path / "beit.png"
    ckpt = out / "checkpoints" / "last.pt"
    assert main(["visualize", "--checkpoint", str(ckpt), "--data", str(labeled_folder), "--out", str(png)]) == 0
    capsys.readouterr()

"""BEiT: loss parity with transformers' BeitForMaskedImageModeling, tokenizer grid checks, end-to-end CLI."""

import json
import math

import pytest
import timm
import torch
from helpers import TINY, make_tokenizer

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.engine.trainer.optim import param_groups
from mimkit.masking import beit_mask_count
from mimkit.methods.beit import BEiT
from mimkit.run_config import build_config

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
    ours = BEiT.from_config(cfg).eval()
    for p in ours.parameters():  # leave the init (layer scale 0.1 everywhere) so the check means something
        p.data.add_(0.02 * torch.randn_like(p))
    hf_cfg = transformers.BeitConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, vocab_size=64, use_mask_token=True, use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=False, layer_scale_init_value=0.1,
        layer_norm_eps=1e-6, hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.BeitForMaskedImageModeling(hf_cfg).eval()
    # the name map is transformers 5's (pyproject's dev pin); another naming must fail loudly, not skip
    assert "beit.layers.0.attention.q_proj.weight" in hf.state_dict(), "transformers renamed BEiT's weights"
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
        BEiT.from_config(build_config(dotted=BEIT_TINY))
    with pytest.raises(ConfigError, match="does not exist"):
        BEiT.from_config(build_config(dotted=[*BEIT_TINY, f"tokenizer.path={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match=r"tokenizer grid 4x4 != encoder grid 8x8"):
        BEiT.from_config(build_config(dotted=[*BEIT_TINY, f"tokenizer.path={tokenizer_dir}", "model.patch_size=2"]))


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


# ---- fidelity to BEiT's code (unilm beit/: masking_generator.py, modeling_pretrain.py, run_beit_pretraining.py) ----
def trunc_std_factor(bound: float = 1.0) -> float:
    """Standard deviation of N(0, 1) truncated to [-bound, bound]: sqrt(1 - 2 b phi(b) / (2 Phi(b) - 1))."""
    phi = math.exp(-0.5 * bound**2) / math.sqrt(2 * math.pi)
    mass = math.erf(bound / math.sqrt(2))  # 2 Phi(b) - 1
    return math.sqrt(1 - 2 * bound * phi / mass)


def beit_14x14(tmp_path, *extra):
    """BEiT on BEiT's own 14 x 14 grid (56 px / patch 4, a tokenizer of 14 x 14 tokens), ViT-B's depth of 12."""
    tok = make_tokenizer(tmp_path / "tok14", image_size=56)
    dims = ["data.image_size=56", "model.embed_dim=64", "model.depth=12", "model.num_heads=2"]
    return BEiT.from_config(build_config(dotted=[*TINY, "method=beit", "model.name=beit_base_patch16_224", *dims,
                                     f"tokenizer.path={tok}", *extra]))  # fmt: skip


def test_mask_count_is_beits_75_of_196_and_scales_to_other_grids(tmp_path):
    assert beit_mask_count(196) == 75 and beit_mask_count(64) == 24 and beit_mask_count(16) == 6
    torch.manual_seed(0)
    m = beit_14x14(tmp_path)
    assert m.num_masked == 75  # not round(0.4 * 196) = 78
    counts = m.mask(200, "cpu").sum(1)
    # BEiT's generator: blocks are added until the target is met, never beyond it; it stops early only when ten
    # tries in a row find no block that fits, which is rare on 14 x 14
    assert counts.max() == 75 and counts.float().mean() > 70
    assert beit_14x14(tmp_path, "beit.num_masking_patches=60").num_masked == 60
    assert beit_14x14(tmp_path, "beit.mask_ratio=0.5").num_masked == 98
    with pytest.raises(ConfigError, match="beit.num_masking_patches and beit.mask_ratio are both set"):
        beit_14x14(tmp_path, "beit.num_masking_patches=60", "beit.mask_ratio=0.5")
    with pytest.raises(ConfigError, match="beit.num_masking_patches 196 leaves no visible patch of 196 patches"):
        beit_14x14(tmp_path, "beit.num_masking_patches=196")


def test_init_is_beits_trunc_normal_cut_at_one_std_with_depth_rescaling(tmp_path):
    torch.manual_seed(0)
    m = beit_14x14(tmp_path)
    std, factor = 0.02, trunc_std_factor(1.0)  # 0.540: BEiT's weights start ~1.85x smaller than untruncated 0.02
    fc1 = torch.cat([b.mlp.fc1.weight.flatten() for b in m.encoder.blocks])
    assert fc1.abs().max() <= std and fc1.std().item() == pytest.approx(std * factor, rel=0.02)
    for layer_id, block in enumerate(m.encoder.blocks, start=1):
        scale = math.sqrt(2 * layer_id)  # fix_init_weight
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.abs().max() <= std / scale * (1 + 1e-6)
        fc2 = block.mlp.fc2.weight
        assert fc2.std().item() == pytest.approx(std * factor / scale, rel=0.05)
    for w in (m.mask_token, m.encoder.cls_token, m.lm_head.weight, m.encoder.patch_embed.proj.weight):
        assert w.abs().max() <= std
    assert m.lm_head.weight.std().item() == pytest.approx(std * factor, rel=0.05)
    assert not m.lm_head.bias.any() and not m.encoder.blocks[0].attn.q_bias.any()


def test_layer_scale_defaults_to_beits_0_1_and_0_turns_it_off(tmp_path, tokenizer_dir):
    plain = [*TINY, "method=beit", "model.name=beit_base_patch16_224", f"tokenizer.path={tokenizer_dir}"]
    m = BEiT.from_config(build_config(dotted=plain))
    assert all((b.gamma_1 == 0.1).all() and (b.gamma_2 == 0.1).all() for b in m.encoder.blocks)
    off = BEiT.from_config(build_config(dotted=[*plain, "model.layer_scale=0"]))
    assert all(b.gamma_1 is None for b in off.encoder.blocks)
    vit = BEiT.from_config(build_config(dotted=[*plain, "model.name=vit_tiny_patch16_224"]))
    assert all((b.ls1.gamma == 0.1).all() for b in vit.encoder.blocks)


def test_weight_decay_groups_are_beits(tokenizer_dir):
    m = BEiT.from_config(build_config(dotted=[*BEIT_TINY, f"tokenizer.path={tokenizer_dir}"]))
    names = {id(p): n for n, p in m.named_parameters()}
    groups = param_groups(m, 0.05, m.no_weight_decay())
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    # BEiT's no_weight_decay() is {pos_embed, cls_token}; everything else of 2+ dims is decayed
    assert {"mask_token", "encoder.rel_pos_bias.relative_position_bias_table", "lm_head.weight"} <= decayed
    assert {"encoder.cls_token", "lm_head.bias", "encoder.blocks.0.gamma_1"} <= undecayed

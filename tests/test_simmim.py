"""SimMIM: whole-cell masks, L1 on masked pixels, parity with transformers' ViTForMaskedImageModeling."""

import pytest
import torch
from helpers import TINY
from hf_maps import hf_vit_weights

from mimkit.config import ConfigError
from mimkit.engine.trainer.optim import param_groups
from mimkit.methods.simmim import SimMIM
from mimkit.run_config import build_config


def tiny(*extra):
    return build_config(dotted=[*TINY, "method=simmim", "simmim.mask_patch_size=8", *extra])


def test_loss_ignores_visible_pixels_and_matches_direct_l1():
    torch.manual_seed(0)
    m = SimMIM.from_config(tiny()).eval()
    imgs = torch.randn(2, 3, 16, 16)
    mask = m.mask(2, "cpu")
    assert mask.shape == (2, 16) and (mask.sum(1) == 12).all()  # ceil(0.6 * 4 cells of 2x2 patches) = 3 cells
    with torch.no_grad():
        pred = m.decode(m.encode(imgs, mask))
        loss = m.loss(pred, imgs, mask)
        direct = torch.stack(
            [
                (pred[b, i] - m_patch).abs().mean()
                for b in range(2)
                for i, m_patch in enumerate(
                    imgs[b].unfold(1, 4, 4).unfold(2, 4, 4).permute(1, 2, 3, 4, 0).reshape(16, 48)
                )
                if mask[b, i]
            ]
        ).mean()
    torch.testing.assert_close(loss, direct, rtol=1e-4, atol=1e-6)


def test_bad_mask_settings_name_the_key():
    with pytest.raises(ConfigError, match="simmim.mask_patch_size 6 is not a multiple"):
        SimMIM.from_config(tiny("simmim.mask_patch_size=6"))
    with pytest.raises(ConfigError, match="simmim.mask_ratio"):
        SimMIM.from_config(tiny("simmim.mask_ratio=0.99"))


def test_simmim_loss_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # transformers masks at patch granularity; its ViT has no LayerScale (SimMIM's 0.1 is off here)
    cfg = tiny("simmim.mask_patch_size=4", "model.layer_scale=0")
    ours = SimMIM.from_config(cfg).eval()
    hf_cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, encoder_stride=4, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.ViTForMaskedImageModeling(hf_cfg).eval()
    sd = ours.state_dict()
    mapped = hf_vit_weights(sd, "encoder", set(hf.state_dict()), depth=2)
    mapped["vit.embeddings.mask_token"] = sd["mask_token"]
    # our head predicts each patch in (row, col, channel) order; the conv + PixelShuffle in (channel, row, col)
    p = 4
    order = torch.tensor([(i * p + j) * 3 + c for c in range(3) for i in range(p) for j in range(p)])
    mapped["decoder.0.weight"] = sd["head.weight"][order][:, :, None, None]
    mapped["decoder.0.bias"] = sd["head.bias"][order]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    imgs = torch.randn(3, 3, 16, 16)
    mask = ours.mask(3, "cpu")
    with torch.no_grad():
        our_loss, _ = ours({"image": imgs}, mask=mask)
        hf_loss = hf(pixel_values=imgs, bool_masked_pos=mask).loss
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_simmim_vit_is_simmims_own_layer_scale_init_and_weight_decay():
    """SimMIM's ViT-B (microsoft/SimMIM config.py, models/vision_transformer.py, optimizer.py): LayerScale 0.1,
    BEiT's init (trunc-normal cut at +-1 std, depth rescaling), weight decay on all but cls/pos and 1-D."""
    torch.manual_seed(0)
    m = SimMIM.from_config(tiny())
    assert all((b.ls1.gamma == 0.1).all() and (b.ls2.gamma == 0.1).all() for b in m.encoder.blocks)
    assert not hasattr(SimMIM.from_config(tiny("model.layer_scale=0")).encoder.blocks[0].ls1, "gamma")
    assert m.encoder.blocks[0].mlp.fc1.weight.abs().max() <= 0.02 and m.mask_token.abs().max() <= 0.02
    assert m.encoder.blocks[1].attn.proj.weight.abs().max() <= 0.02 / 2  # block 2: divided by sqrt(2 * 2)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = param_groups(m, 0.05, m.no_weight_decay())
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert "mask_token" in decayed and "encoder.cls_token" not in decayed and "head.weight" in decayed
    # SimMIM's ViT-B proper: shared relative position bias, no absolute position (a beit_* name)
    b = SimMIM.from_config(tiny("model.name=beit_base_patch16_224"))
    assert b.encoder.pos_embed is None and b.encoder.rel_pos_bias is not None
    assert "encoder.rel_pos_bias.relative_position_bias_table" in {n for n, _ in b.named_parameters()}
    with torch.no_grad():
        loss, _ = b({"image": torch.randn(2, 3, 16, 16)})
    assert torch.isfinite(loss)

"""mimkit's MAE loss equals Hugging Face transformers' ViTMAEForPreTraining on the same weights and mask."""

import pytest
import torch
from hf_maps import hf_block_weights, hf_vit_weights

from mimkit.methods.mae import MAE
from mimkit.run_config import default_config

transformers = pytest.importorskip("transformers")


def _to_hf(ours: dict, hf_keys: set, depth: int, dec_depth: int) -> dict:
    dec_layers = "decoder.decoder_layers"
    out = hf_vit_weights(ours, "encoder", hf_keys, depth)
    out["decoder.mask_token"] = ours["decoder.mask_token"]
    out["decoder.decoder_pos_embed"] = ours["decoder.pos_embed"]
    for hf, mine in {"decoder_embed": "embed", "decoder_norm": "norm", "decoder_pred": "pred"}.items():
        for p in ("weight", "bias"):
            out[f"decoder.{hf}.{p}"] = ours[f"decoder.{mine}.{p}"]
    for i in range(dec_depth):
        out.update(hf_block_weights(ours, f"decoder.blocks.{i}", f"{dec_layers}.{i}", hf_keys))
    return out


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_transformers(norm_pix):
    torch.manual_seed(0)
    cfg = default_config()
    cfg.data.image_size, cfg.model.patch_size = 32, 4
    cfg.model.name = "vit_tiny_patch16_224"  # 192 wide, 12 deep, 3 heads
    cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads = 64, 2, 4
    cfg.mae.norm_pix_loss = norm_pix
    ours = MAE.from_config(cfg).eval()

    hf_cfg = transformers.ViTMAEConfig(
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=256,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_act="gelu",
    )
    hf = transformers.ViTMAEForPreTraining(hf_cfg).eval()
    mapped = _to_hf(ours.state_dict(), set(hf.state_dict()), depth=12, dec_depth=2)
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and not [k for k in missing if "pos" not in k], (missing, unexpected)

    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        our_loss, _ = ours({"image": imgs}, noise=noise)
        hf_out = hf(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(our_loss, hf_out.loss, rtol=1e-5, atol=1e-6)
    # the mask itself agrees too (1 = masked in both libraries)
    _, our_mask, _ = ours.mask(3, imgs.device, noise)
    torch.testing.assert_close(our_mask, hf_out.mask)

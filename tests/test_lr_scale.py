"""A method-wide `<method>.lr_scale` (BEiT, SimMIM, DINO: a recipe shared with other methods, such as the demo, can
give one method its own lr) multiplies the lr of every trainable parameter through the loop's set_lr; 1 by default."""

import pytest
import torch
from helpers import TINY, make_tokenizer

from mimkit.engine.trainer.optim import build_optimizer, set_lr
from mimkit.methods import build_method
from mimkit.run_config import build_config

SMALL = {
    "beit": [],
    "simmim": ["simmim.mask_patch_size=8"],
    "dino": ["dino.out_dim=64", "dino.head_hidden=32", "dino.head_bottleneck=16", "dino.local_crops=2"],
}


@pytest.mark.parametrize("method", sorted(SMALL))
def test_lr_scale_reaches_every_parameter_group(tmp_path, method):
    tokenizer = [f"tokenizer.path={make_tokenizer(tmp_path / 'tok')}"] if method == "beit" else []
    for scale in (3.0, 1.0):
        cfg = build_config(
            [], None, [*TINY, f"method={method}", *SMALL[method], *tokenizer, f"{method}.lr_scale={scale}"]
        )
        m = build_method(cfg)
        opt = build_optimizer(m, cfg.optim, 1e-3, m.no_weight_decay(), torch.device("cpu"), m.lr_scale)
        set_lr(opt, 1e-3)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for p in m.parameters() if p.requires_grad
        }
        assert all(g["lr"] == pytest.approx(scale * 1e-3) for g in opt.param_groups)

import numpy as np
import pytest
import torch
from torch import nn

from mimkit.ema import cosine_momentum
from mimkit.masking import beit_mask_count, blockwise_mask, blockwise_masking, coarse_random_masking
from mimkit.methods.parts import MomentumTeacher
from mimkit.models.vit import create_vit, encode_with_mask_token


def test_blockwise_mask_is_rectangles_up_to_target():
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(50):
        m = blockwise_mask(rng, (14, 14), 75, min_patches=16)
        counts.append(int(m.sum()))
    assert max(counts) <= 75 and np.mean(counts) > 60  # BEiT: at most the target, usually close to it
    # by count, as BEiT's num_masking_patches (it used to take a ratio: round(0.4 * 196) = 78, not BEiT's 75)
    batch = blockwise_masking(4, (8, 8), beit_mask_count(64), generator=np.random.default_rng(1))
    assert batch.shape == (4, 64) and batch.dtype == torch.bool and (batch.sum(1) <= 24).all()
    assert batch.sum(1).max() == 24  # blocks of 16+ patches still fill the target on 8 x 8 (seeded)


def test_coarse_masking_masks_whole_cells():
    m = coarse_random_masking(3, (8, 8), 0.6, cell=2).view(3, 4, 2, 4, 2)
    # every 2x2 cell is all masked or all visible, and ceil(0.6 * 16) = 10 cells are masked
    cell_sums = m.sum(dim=(2, 4))
    assert set(cell_sums.unique().tolist()) <= {0, 4}
    assert (cell_sums.eq(4).sum(dim=(1, 2)) == 10).all()
    with pytest.raises(ValueError, match="not divisible"):
        coarse_random_masking(1, (7, 7), 0.5, cell=2)


def test_ema_rule_and_no_gradient():
    student = nn.Linear(3, 2)
    teacher = MomentumTeacher(student, base=0.9, final=0.9)  # a constant momentum
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        student.weight.add_(1.0)
    assert teacher.update(student, 5, 10) == 0.9
    expect = 0.9 * before["weight"] + 0.1 * student.weight
    torch.testing.assert_close(teacher.module.weight, expect)
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cosine_momentum(0, 10, 1.5)


def test_mask_token_replaces_only_masked_patches():
    vit = create_vit("vit_tiny_patch16_224", 16, 4, depth=1, embed_dim=32, num_heads=2).eval()
    imgs = torch.randn(2, 3, 16, 16)
    token = torch.randn(1, 1, 32)
    none = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(encode_with_mask_token(vit, imgs, none, token), vit.forward_features(imgs))
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, 3] = True
        a = encode_with_mask_token(vit, imgs, mask, token)
        # patch 3 (rows 0-3, cols 12-15) is masked: changing its pixels changes nothing
        changed = imgs.clone()
        changed[:, :, 0:4, 12:16] += 5.0
        b = encode_with_mask_token(vit, changed, mask, token)
    assert a.shape == (2, 17, 32)
    assert not torch.allclose(a, vit.forward_features(imgs))
    torch.testing.assert_close(a, b)

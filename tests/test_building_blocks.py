import torch

from mimkit.masking import gather_tokens, random_masking
from mimkit.models.pos_embed import sincos_2d
from mimkit.targets import normalize_patches, patchify, unpatchify


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4 * 6, 4 * 4 * 3)
    torch.testing.assert_close(unpatchify(patches, 4, (4, 6)), imgs)
    # patch 1 (row 0, col 1), pixel (0, 0), channel c sits at index c
    assert torch.equal(patches[0, 1, :3], imgs[0, :, 0, 4])


def test_random_masking_counts_and_restore():
    ids_keep, mask, ids_restore = random_masking(5, 64, 0.75)
    assert ids_keep.shape == (5, 16)
    assert torch.all(mask.sum(1) == 48)
    # kept ids are exactly the unmasked positions
    for b in range(5):
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    x = torch.arange(64).float().view(1, 64, 1).expand(5, 64, 1)
    assert torch.equal(gather_tokens(x, ids_keep).squeeze(-1).long(), ids_keep)
    assert torch.all(torch.argsort(ids_restore, 1)[:, :16] == ids_keep)


def test_masking_is_deterministic_given_noise():
    noise = torch.rand(2, 16)
    a = random_masking(2, 16, 0.5, noise=noise)
    b = random_masking(2, 16, 0.5, noise=noise)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_normalize_patches_uses_unbiased_variance():
    t = torch.randn(2, 3, 48)
    n = normalize_patches(t, eps=0.0)
    torch.testing.assert_close(n.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.var(-1), torch.ones(2, 3), atol=1e-4, rtol=0)


def test_sincos_matches_mae_layout():
    emb = sincos_2d(8, (2, 3), num_prefix=1)
    assert emb.shape == (7, 8)
    assert torch.all(emb[0] == 0)
    # the first half encodes the column index: tokens in the same column share it
    torch.testing.assert_close(emb[1, :4], emb[1 + 3, :4])
    assert not torch.allclose(emb[1, 4:], emb[1 + 3, 4:])

"""Batched on-device perturbations (mimkit.data.augment): torchvision's definitions, [0, 1] kept, per-sample."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mimkit.data import augment as A

OPS = {
    "jitter": dict(jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0),
    "grayscale": dict(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0, solarize_p=0.0),
    "blur": dict(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, solarize_p=0.0),
    "solarize": dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0),
}


def images(b=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


@pytest.mark.parametrize("subset", [True, False])
@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_keeps_unit_range_and_p1_changes_every_image(op, subset):
    x = images()
    x[0] = 1.0  # saturated and flat images are the edge cases of the blends
    x[1] = 0.0
    torch.manual_seed(0)
    # strong settings: sigma 0.1 (the low end of the default range) is a near-identity blur
    y = A.ColorAugment(**OPS[op], jitter=(0.9, 0.9, 0.9, 0.5), blur_sigma=(0.6, 2.0), subset=subset)(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    textured = slice(2, None)  # flat black/white images can be fixed points (e.g. blur, grayscale)
    assert ((y[textured] - x[textured]).abs().flatten(1).amax(1) > 1e-3).all()


@pytest.mark.parametrize("subset", [True, False])
def test_p0_is_identity_and_rng_use_is_fixed(subset):
    x = images()
    aug = A.ColorAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, subset=subset)
    torch.manual_seed(3)
    assert torch.equal(aug(x), x)
    after_identity = torch.rand(1)
    torch.manual_seed(3)
    A.ColorAugment(subset=subset)(x)
    assert torch.equal(torch.rand(1), after_identity)  # same RNG advance whatever gets applied


def test_subset_and_where_paths_agree():
    x = images(16)
    torch.manual_seed(1)
    a = A.ColorAugment(subset=True, blur_p=0.5)(x)
    torch.manual_seed(1)
    b = A.ColorAugment(subset=False, blur_p=0.5)(x)
    torch.testing.assert_close(a, b)


def test_parameters_differ_per_sample():
    x = images(1).expand(8, -1, -1, -1).clone()  # eight copies of one image
    torch.manual_seed(0)
    y = A.ColorAugment(**OPS["jitter"])(x)
    outs = {tuple(v.round(decimals=4).flatten()[:64].tolist()) for v in y}
    assert len(outs) == 8
    torch.manual_seed(0)
    y = A.ColorAugment(**OPS["blur"])(x)
    assert len({round(float(v.std()), 5) for v in y}) == 8  # different sigmas, different smoothness


def test_ops_match_torchvision():
    x = images(4)
    f = torch.tensor([0.6, 1.0, 1.3, 0.0])
    for ours, theirs in (
        (A.adjust_brightness, TF.adjust_brightness),
        (A.adjust_contrast, TF.adjust_contrast),
        (A.adjust_saturation, TF.adjust_saturation),
    ):
        got = ours(x, f)
        for i in range(4):
            torch.testing.assert_close(got[i], theirs(x[i], float(f[i])), atol=1e-5, rtol=1e-5)
    h = torch.tensor([-0.5, -0.1, 0.05, 0.3])
    got = A.adjust_hue(x, h)
    for i in range(4):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], float(h[i])), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(A.to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-5, rtol=0)
    torch.testing.assert_close(A.solarize(x, 0.5), TF.solarize(x, 0.5))
    sig = torch.tensor([0.3, 0.8, 1.5, 2.0])
    got = A.gaussian_blur(x, sig, 13)
    for i in range(4):
        want = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sig[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_rgb_hsv_round_trip_and_small_images():
    x = images(3, size=8)
    torch.testing.assert_close(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    assert A.blur_kernel_size(2.0, 4, 4) == 7  # capped so that reflect padding fits a 4-pixel image
    torch.manual_seed(0)
    y = A.ColorAugment(**OPS["blur"])(images(2, size=4))
    assert y.shape == (2, 3, 4, 4)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="blur_p must lie in"):
        A.ColorAugment(blur_p=1.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        A.ColorAugment(blur_sigma=(0.0, 1.0))

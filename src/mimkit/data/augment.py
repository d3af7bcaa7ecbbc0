"""Batched photometric perturbations of [0, 1] images, run on the device (no per-image Python loop).

Every op takes a batch (B, 3, H, W) in [0, 1] and per-sample parameters, and returns a batch in [0, 1]. The
random wrappers draw every parameter per sample from the *global* torch RNG of the batch's device, so a run
resumed from a checkpoint (which saves that RNG) perturbs exactly as an uninterrupted one. The draws do not
depend on which samples end up perturbed: the RNG advances by the same amount for every batch of a given size.

The ops follow torchvision's definitions (`transforms.v2.functional`: adjust_brightness / contrast / saturation /
hue, rgb_to_grayscale, gaussian_blur with reflect padding, solarize); tests/test_augment.py checks them against it.
One difference: `ColorAugment` applies the four colour-jitter ops in a fixed order (brightness, contrast,
saturation, hue) where torchvision's ColorJitter shuffles the order per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, torchvision's weights


def _per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) parameter -> (B, 1, 1, 1) on x's device and dtype."""
    return torch.as_tensor(v, device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return x[:, 0:1] * GRAY[0] + x[:, 1:2] * GRAY[1] + x[:, 2:3] * GRAY[2]


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) with the luma in all three channels."""
    return grayscale(x).expand_as(x).contiguous()


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """x * factor, factor (B,) >= 0."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the image's mean luma: factor 0 = flat grey, 1 = unchanged."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean.expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the luma image: factor 0 = grayscale, 1 = unchanged."""
    return torch.lerp(grayscale(x).expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, each channel in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(dim=1)
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]: channel n is v - v*s*clamp(min(k, 4 - k), 0, 1), with
    k = (n + 6h) mod 6 and n = 5, 3, 1 for R, G, B."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1: made on the device
    k = (n + 6.0 * h) % 6.0
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the hue by `shift` (B,) turns, in [-0.5, 0.5]: HSV's rotation without the full round trip. Value
    (max) and chroma (max - min) are kept; a grey pixel (chroma 0) stays grey whatever its hue."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)  # element-wise: faster than reductions over the channel dim
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    c = chroma.clamp_min(1e-12)
    h6 = torch.where(r == maxc, (g - b) / c, torch.where(g == maxc, (b - r) / c + 2, (r - g) / c + 4))
    h6 = h6.add_(6.0 * _per_sample(shift, x))  # hue in sextants
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1: made on the device
    k = (n + h6).remainder_(6.0)
    return (maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)).clamp_(0.0, 1.0)


def blur_kernel_size(sigma_max: float, height: int, width: int) -> int:
    """Odd kernel covering +-3 sigma of the widest blur, small enough for reflect padding of the image."""
    k = 2 * math.ceil(3.0 * sigma_max) + 1
    limit = 2 * (min(height, width) - 1) + 1
    return max(1, min(k, limit))


def gaussian_blur(x: torch.Tensor, sigma, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (B,) > 0 and one odd kernel size; reflect padding."""
    b, c, h, w = x.shape
    half = kernel_size // 2
    sig = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1, 1).expand(b, 1)
    pos = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - half
    k1 = torch.exp(-0.5 * (pos / sig) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).to(x.dtype)  # (B, K)
    k1 = k1.repeat_interleave(c, dim=0)  # (B*C, K): one kernel per (sample, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k1.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k1.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.reshape(b, c, h, w).clamp_(0.0, 1.0)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels at or above `threshold` (PIL's ImageOps.solarize at 128 is threshold 128/255)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def apply_where(x: torch.Tensor, apply: torch.Tensor, fn, subset: bool | None = None) -> torch.Tensor:
    """fn(x_sel, sel) on the samples where `apply` (B,) is True; the others pass through unchanged.

    `sel` indexes the per-sample parameters. subset=True computes fn on the selected samples only (cheapest on a
    CPU); subset=False computes it on all and selects with torch.where (no host sync: best on a GPU);
    None chooses by device."""
    if subset is None:
        subset = x.device.type == "cpu"
    if not subset:
        return torch.where(apply.view(-1, 1, 1, 1), fn(x, slice(None)), x)
    idx = apply.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, slice(None))
    out = x.clone()
    out[idx] = fn(x[idx], idx)
    return out


@dataclass
class ColorAugment:
    """The strong perturbation of BYOL/ConMIM, batched: colour jitter with probability `jitter_p` (brightness,
    contrast, saturation factors ~ U(max(0, 1 - j), 1 + j), hue shift ~ U(-j, j)), grayscale with `grayscale_p`,
    Gaussian blur with `blur_p` (sigma ~ U(blur_sigma) pixels), solarize with `solarize_p`. (B, 3, H, W) [0, 1]
    in and out; every decision and parameter is drawn per sample."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 128 / 255
    subset: bool | None = None  # see apply_where

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and the hue one <= 0.5, got {self.jitter}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be 0 < low <= high, got {self.blur_sigma}")

    def draw(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        """All random decisions and parameters for one batch, in one draw of (B, 9) uniforms."""
        u = torch.rand(batch_size, 9, device=device)
        bj, cj, sj, hj = self.jitter
        lo = lambda j: max(0.0, 1.0 - j)  # noqa: E731
        return {
            "jitter": u[:, 0] < self.jitter_p,
            "brightness": lo(bj) + u[:, 1] * (1.0 + bj - lo(bj)),
            "contrast": lo(cj) + u[:, 2] * (1.0 + cj - lo(cj)),
            "saturation": lo(sj) + u[:, 3] * (1.0 + sj - lo(sj)),
            "hue": (2.0 * u[:, 4] - 1.0) * hj,
            "grayscale": u[:, 5] < self.grayscale_p,
            "blur": u[:, 6] < self.blur_p,
            "sigma": self.blur_sigma[0] + u[:, 7] * (self.blur_sigma[1] - self.blur_sigma[0]),
            "solarize": u[:, 8] < self.solarize_p,
        }

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Perturb x (B, 3, H, W) in [0, 1] with the parameters of `draw`."""
        x = x.float()
        bj, cj, sj, hj = self.jitter

        def jitter(y, sel):
            if bj:
                y = adjust_brightness(y, p["brightness"][sel])
            if cj:
                y = adjust_contrast(y, p["contrast"][sel])
            if sj:
                y = adjust_saturation(y, p["saturation"][sel])
            if hj:
                y = adjust_hue(y, p["hue"][sel])
            return y

        k = blur_kernel_size(self.blur_sigma[1], x.shape[2], x.shape[3])
        if self.jitter_p > 0:
            x = apply_where(x, p["jitter"], jitter, self.subset)
        if self.grayscale_p > 0:
            x = apply_where(x, p["grayscale"], lambda y, sel: to_grayscale(y), self.subset)
        if self.blur_p > 0:
            x = apply_where(x, p["blur"], lambda y, sel: gaussian_blur(y, p["sigma"][sel], k), self.subset)
        if self.solarize_p > 0:
            x = apply_where(x, p["solarize"], lambda y, sel: solarize(y, self.solarize_threshold), self.subset)
        return x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> perturbed (B, 3, H, W) in [0, 1], float32."""
        return self.apply(x, self.draw(x.shape[0], x.device))


REFERENCE_SIZE = 224  # the image side the reference pipelines state their blur sigmas for


def scale_sigma(sigma: tuple[float, float], size: int, reference: int = REFERENCE_SIZE) -> tuple[float, float]:
    """Blur sigmas stated in pixels of a `reference`-px image (the papers' 224) -> pixels of a `size`-px view, so
    the blur is the same fraction of the image at any size (PIL's radius 2 at 224 px is 0.29 px at 32 px)."""
    return (sigma[0] * size / reference, sigma[1] * size / reference)


@dataclass(frozen=True)
class ColorSpec:
    """Colour perturbation of a view (a `View`'s `color`), applied on the device by the methods' colour part
    (`mimkit.methods.parts.color`), per sample, from the device's global RNG. Defaults: ContrastiveCrop's pipelines
    (xyupeng/ContrastiveCrop, datasets/transforms/small.py and imagenet.py): ColorJitter(0.4, 0.4, 0.4, 0.1) with
    p 0.8, grayscale with p 0.2; their ImageNet pipelines add Gaussian blur with p 0.5. BYOL's asymmetric pipeline
    (MoCo v3, DINO, ConMIM's teacher view) sets blur and solarize per view."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of a `blur_reference`-px image
    solarize_p: float = 0.0
    # the image side blur_sigma is stated for: scaled to the view's size so the blur is the same fraction of the
    # image at any size (the papers state 224 px); None: blur_sigma is in pixels of the view itself
    blur_reference: int | None = REFERENCE_SIZE

    def augment(self, size: int) -> ColorAugment:
        """The batched perturbation for a `size`-px view."""
        sigma = self.blur_sigma
        if self.blur_reference is not None:
            sigma = scale_sigma(sigma, size, self.blur_reference)
        return ColorAugment(self.jitter, self.jitter_p, self.grayscale_p, self.blur_p, sigma, self.solarize_p)

"""The image-tokenizer contract shared by DALL-E's dVAE and mimkit's trainable VQ-VAE, and its metrics."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class ImageTokenizer(nn.Module):
    """Images <-> a grid of discrete tokens, one token per `downsample` x `downsample` pixels.

    - `logits(x)`: x (B, 3, H, W) RGB in [0, 1] -> (B, vocab_size, H/d, W/d) token scores (higher = more likely);
    - `encode(x)`: -> LongTensor (B, H/d, W/d), the argmax ids;
    - `decode(ids)`: LongTensor (B, h, w) -> (B, 3, h*d, w*d) RGB in [0, 1].

    The tokenizer applies its own pixel mapping (DALL-E: map_pixels) and always computes in float32 with autocast
    off, so token ids do not change with the caller's precision. `image_size` is the input size it is meant for
    (the size it was trained at; 112 for DALL-E as BEiT uses it); `check_grid` compares its grid with a ViT's.
    """

    kind: str = ""
    vocab_size: int
    downsample: int
    image_size: int

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False

    # ---- to implement ----------------------------------------------------------------------------------------
    def config(self) -> dict:
        """The constructor arguments (JSON values) that rebuild this tokenizer (subclasses keep them in `_args`)."""
        return dict(self._args)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, H/d, W/d) token ids."""
        return self.logits(x).argmax(dim=1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> decode(encode(x)), same shape, in [0, 1]."""
        return self.decode(self.encode(x))

    def grid(self, image_size: int | None = None) -> int:
        """Tokens per side for a square input of `image_size` (default: the tokenizer's own input size)."""
        size = self.image_size if image_size is None else image_size
        if size % self.downsample:
            raise ValueError(f"image size {size} is not a multiple of the tokenizer's downsampling {self.downsample}")
        return size // self.downsample

    def freeze(self) -> ImageTokenizer:
        """Evaluation mode for good (a later `.train()` of a parent module leaves it in eval), no gradients."""
        self.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False if self._frozen else mode)

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tokenizer input must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(
                f"tokenizer input {x.shape[2]}x{x.shape[3]} is not a multiple of its downsampling {self.downsample}"
            )
        return x.float()

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 3 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer tensor (B, h, w), got {ids.dtype} {tuple(ids.shape)}")
        return ids.long()


def fp32(device: torch.device):
    """Autocast off: tokenizers compute in float32 whatever the caller's precision."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- metrics
def psnr(x: torch.Tensor, y: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(max^2 / MSE) over channels and pixels.
    x, y (B, C, H, W) -> (B,). Report the mean of the per-image values (what `psnr` means in mimkit's logs)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(max_value**2 / mse.clamp_min(1e-12))


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Token counts per code (V,) -> perplexity exp(H(p)) of the code distribution (V when codes are used
    uniformly, 1 when one code takes everything), usage (fraction of codes used at least once) and dead codes."""
    counts = counts.double()
    total = counts.sum()
    p = counts / total.clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    used = int((counts > 0).sum())
    return {
        "perplexity": float(math.exp(entropy)),
        "usage": used / counts.numel(),
        "dead_codes": counts.numel() - used,
    }

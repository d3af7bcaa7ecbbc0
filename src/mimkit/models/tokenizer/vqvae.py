"""mimkit's trainable tokenizer: a small convolutional VQ-VAE with an EMA codebook and dead-code restarts.

Why a VQ-VAE and not DALL-E's Gumbel-softmax dVAE: on the budgets mimkit trains tokenizers with (minutes on a CPU,
one GPU for a dataset like CIFAR-10), the EMA codebook (van den Oord et al. 2017, appendix) converges in a few
thousand steps without the temperature and KL-weight schedules a relaxed dVAE needs, and codebook collapse, the
known failure of both, is measured and fixed directly: a code left unused for `restart_every` steps is moved onto a
recent encoder output. Its `logits` are negative squared distances to the codes, so `encode` (argmax) is the
nearest-code assignment and BEiT/CIM consume it exactly as DALL-E's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from ...config import ConfigError
from .base import ImageTokenizer, fp32


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def code_counts(ids: torch.Tensor, vocab_size: int, dtype=torch.float32) -> torch.Tensor:
    """ids (any shape) -> (vocab_size,) occurrences of each code. index_add_, not bincount: no wait on the device."""
    ids = ids.flatten()
    return torch.zeros(vocab_size, dtype=dtype, device=ids.device).index_add_(0, ids, torch.ones_like(ids, dtype=dtype))


class ResBlock(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x)))), channels unchanged (VQ-VAE's residual block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class EMACodebook(nn.Module):
    """`vocab_size` codes of `dim` values, updated as running means of the encoder outputs assigned to them.

    Buffers (all in the state dict, so a resumed run continues exactly): `embed` (V, D) the codes, `cluster_size`
    (V,) and `embed_sum` (V, D) the EMA statistics, `usage` (V,) assignments since the last dead-code check,
    `initialized` (set once the codes were drawn from the first batch of encoder outputs)."""

    def __init__(self, vocab_size: int, dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.vocab_size, self.dim, self.decay, self.eps = vocab_size, dim, decay, eps
        self.register_buffer("embed", torch.randn(vocab_size, dim))
        self.register_buffer("cluster_size", torch.ones(vocab_size))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("usage", torch.zeros(vocab_size))
        self.register_buffer("initialized", torch.tensor(False))
        self.recent: torch.Tensor | None = None  # last training batch of encoder outputs (N, D): restart candidates
        self._ready = False  # host-side copy of `initialized`, so a training step does not sync to read it

    def ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) -> (N, V) squared Euclidean distances to every code."""
        e = self.embed
        return z.pow(2).sum(1, keepdim=True) - 2.0 * z @ e.t() + e.pow(2).sum(1)[None]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> codes (B, D, h, w)."""
        return F.embedding(ids, self.embed).permute(0, 3, 1, 2)

    @torch.no_grad()
    def init_from(self, z: torch.Tensor) -> None:
        """Draw the codes from a batch of encoder outputs z (N, D) (with repeats when N < V), same on every rank."""
        idx = torch.randint(0, z.shape[0], (self.vocab_size,), device=z.device)
        codes = _broadcast(z[idx].float().contiguous())
        self.embed.copy_(codes)
        self.embed_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        """EMA step from z (N, D) assigned to ids (N,), summed over all ranks; with Laplace smoothing of counts."""
        counts = code_counts(ids, self.vocab_size, z.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, z)
        counts, sums = _all_reduce(counts), _all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.vocab_size * self.eps) * total
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        self.usage.add_(counts)

    @torch.no_grad()
    def restart_dead(self) -> int:
        """Move every code unused since the last check onto a random recent encoder output; reset the usage
        window. -> the number of codes moved (identical on every rank)."""
        dead = self.usage == 0
        n = int(dead.sum())
        if n and self.recent is not None and len(self.recent):
            pick = torch.randint(0, self.recent.shape[0], (n,), device=self.recent.device)
            codes = _broadcast(self.recent[pick].float().contiguous())
            self.embed[dead] = codes
            self.embed_sum[dead] = codes
            self.cluster_size[dead] = 1.0
        else:
            n = 0
        self.usage.zero_()
        return n


class VQTokenizer(ImageTokenizer):
    """Conv encoder (stride-2 4x4 convs, log2(downsample) of them) -> nearest of `vocab_size` codes -> conv decoder
    (transposed convs) -> RGB. Channels: `width` after the stem, doubled at each downsampling up to 4x `width`."""

    kind = "vqvae"

    def __init__(
        self,
        vocab_size: int = 512,
        downsample: int = 4,
        width: int = 64,
        code_dim: int = 16,
        res_blocks: int = 2,
        image_size: int = 32,
        ema_decay: float = 0.99,
    ):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ConfigError(f"tokenizer.downsample must be a power of 2 (2, 4, 8, 16...), got {downsample}")
        if image_size % downsample:
            raise ConfigError(f"image size {image_size} is not a multiple of tokenizer.downsample {downsample}")
        if vocab_size < 2:
            raise ConfigError(f"tokenizer.vocab_size must be at least 2, got {vocab_size}")
        self._args = dict(
            vocab_size=vocab_size,
            downsample=downsample,
            width=width,
            code_dim=code_dim,
            res_blocks=res_blocks,
            image_size=image_size,
            ema_decay=ema_decay,
        )
        self.vocab_size, self.downsample, self.image_size = vocab_size, downsample, image_size
        stages = downsample.bit_length() - 1
        chans = [width * min(2**i, 4) for i in range(stages + 1)]

        enc: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1)]
        for a, b in zip(chans, chans[1:]):
            enc += [nn.ReLU(), nn.Conv2d(a, b, 4, stride=2, padding=1)]
        enc += [ResBlock(chans[-1]) for _ in range(res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(chans[-1], code_dim, 1)]
        self.encoder = nn.Sequential(*enc)

        self.codebook = EMACodebook(vocab_size, code_dim, ema_decay)

        dec: list[nn.Module] = [nn.Conv2d(code_dim, chans[-1], 3, padding=1)]
        dec += [ResBlock(chans[-1]) for _ in range(res_blocks)]
        for a, b in zip(chans[::-1], chans[-2::-1]):
            dec += [nn.ReLU(), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(chans[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    # ---- steps -------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, H/d, W/d) continuous encoder outputs."""
        return self.encoder(self._check_images(x) * 2.0 - 1.0).float()

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) nearest-code ids."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return self.codebook.distances(flat).argmin(dim=1).view(b, h, w)

    def render(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) codes -> (B, 3, h*d, w*d) unclamped pixels ([0, 1] when well trained)."""
        return (self.decoder(codes) + 1.0) * 0.5

    # ---- the tokenizer contract --------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """-> (B, V, h, w): minus the squared distance of each encoder output to each code."""
        with fp32(x.device):
            z = self.embed(x)
            b, d, h, w = z.shape
            dist_ = self.codebook.distances(z.permute(0, 2, 3, 1).reshape(-1, d))
            return (-dist_).view(b, h, w, -1).permute(0, 3, 1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with fp32(x.device):
            return self.assign(self.embed(x))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        with fp32(ids.device):
            return self.render(self.codebook.lookup(self._check_ids(ids))).clamp(0.0, 1.0)

    # ---- training ----------------------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training pass: -> recon (B, 3, H, W) unclamped, ids (B, h, w), commit (scalar, ||z - sg(e)||^2).
        Gradients reach the encoder through the straight-through estimator; in training mode the codebook
        is initialised from the first batch and then updated by EMA (no gradient)."""
        z = self.embed(x)  # the convolutions run at the caller's precision, the quantisation in float32
        b, d, h, w = z.shape
        with fp32(x.device):
            flat = z.detach().permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not self.codebook.ready():
                self.codebook.init_from(flat)
            ids = self.codebook.distances(flat).argmin(dim=1)
            if self.training:
                self.codebook.update(flat, ids)
                self.codebook.recent = flat
            ids = ids.view(b, h, w)
            codes = self.codebook.lookup(ids)
            commit = F.mse_loss(z, codes.detach())
        recon = self.render(z + (codes - z).detach()).float()
        return {"recon": recon, "ids": ids, "commit": commit}

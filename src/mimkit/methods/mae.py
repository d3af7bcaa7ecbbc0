"""MAE (He et al., 2021): encode a random 25% of patches, decode all, regress pixels of the masked ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, NonNegFloat, PositiveInt
from ..data.views import View
from ..masking import gather_tokens, random_masking
from ..models import vit as V
from ..models.decoder import MaskedDecoder
from ..targets import normalize_patches, patchify, unpatchify
from .base import Method, SharedSettings


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75
    decoder_dim: PositiveInt = 192  # MAE's ViT-B: 512 x 8 blocks; small ViTs on small images need far less
    decoder_depth: PositiveInt = 4
    decoder_heads: PositiveInt = 3
    norm_pix_loss: bool = True
    norm_pix_eps: NonNegFloat = 1e-6  # MAE's value; flat images (documents, digits) want a larger one


class MAE(Method):
    """MAE: the encoder sees a random 25% of patches; a light decoder regresses the pixels of the rest."""

    name = "mae"
    Options = MAEOptions

    def __init__(self, options: MAEOptions, shared: SharedSettings):
        super().__init__()
        o = options
        if not 0.0 < o.mask_ratio < 1.0:
            raise ConfigError(f"{self.section_name()}.mask_ratio must be in (0, 1), got {o.mask_ratio}")
        self.options = o
        self.views = (View("image", shared.image_size),)
        self.encoder = V.create_encoder(shared.model, shared.image_size)
        self.patch = V.patch_size(self.encoder)
        self.grid = V.grid_size(self.encoder)
        self.num_patches = self.grid[0] * self.grid[1]
        if int(self.num_patches * (1 - o.mask_ratio)) < 1:
            raise ConfigError(
                f"{self.section_name()}.mask_ratio {o.mask_ratio} leaves no visible patch of {self.num_patches}"
            )
        self.decoder = MaskedDecoder(
            self.encoder.embed_dim,
            o.decoder_dim,
            o.decoder_depth,
            o.decoder_heads,
            self.grid,
            out_dim=self.patch**2 * 3,
            num_prefix=self.encoder.num_prefix_tokens,
        )
        V.init_mae_weights(self)  # encoder and decoder, in MAE's order
        V.init_mae_patch_embed(self.encoder)

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device, noise=None):
        """-> ids_keep (B, K), mask (B, N) with 1 = masked, ids_restore (B, N)."""
        return random_masking(batch_size, self.num_patches, self.options.mask_ratio, device, noise)

    def encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, H, W), ids_keep (B, K) -> (B, 1 + K, D) encoded visible tokens."""
        return self.encode_patches(self.encoder.patch_embed(imgs), ids_keep)

    def encode_patches(self, patches: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Patch embeddings without positions (B, N, D), ids_keep (B, K) -> (B, 1 + K, D) encoded visible tokens."""
        patches = patches + V.patch_pos_embed(self.encoder)
        return V.encode_visible(self.encoder, gather_tokens(patches, ids_keep))

    def decode(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D), (B, N) -> (B, N, p*p*3) per-patch pixel predictions."""
        return self.decoder(tokens, ids_restore)

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, p*p*3); per-patch normalised when mae.norm_pix_loss."""
        t = patchify(imgs, self.patch)
        return normalize_patches(t, self.options.norm_pix_eps) if self.options.norm_pix_loss else t

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only: (B, N, P), (B, N, P), (B, N) -> scalar."""
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict, noise: torch.Tensor | None = None):
        imgs = batch["image"]
        ids_keep, mask, ids_restore = self.mask(imgs.shape[0], imgs.device, noise)
        pred = self.decode(self.encode(imgs, ids_keep), ids_restore)
        loss = self.loss(pred, self.targets(imgs), mask)
        return loss, {"loss": loss.detach()}

    def no_weight_decay(self) -> set[str]:
        """MAE decays every parameter of 2+ dims, the class and mask tokens included (main_pretrain.py through
        timm's add_weight_decay); its position tables are frozen."""
        return {"encoder.pos_embed", "decoder.pos_embed"}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise=None):
        """-> (masked input, reconstruction with visible patches pasted back), both (B, 3, H, W) normalised."""
        ids_keep, mask, ids_restore = self.mask(imgs.shape[0], imgs.device, noise)
        pred = self.decode(self.encode(imgs, ids_keep), ids_restore).float()
        target = patchify(imgs, self.patch)
        if self.options.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + self.options.norm_pix_eps) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.patch, self.grid)
        recon = unpatchify(target * (1 - m) + pred * m, self.patch, self.grid)
        return masked, recon

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of original | masked | reconstruction, in normalised pixel space (the caller un-normalises)."""
        imgs = batch["image"]
        masked, recon = self.reconstruct(imgs)
        return torch.cat([imgs, masked, recon], dim=3)

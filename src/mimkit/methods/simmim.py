"""SimMIM (Xie et al., 2022): mask token in the encoder, one linear layer to pixels, L1 on the masked pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, PositiveFloat, PositiveInt
from ..data.views import View
from ..masking import coarse_random_masking, mask_cell
from ..models import vit as V
from ..targets import patchify, unpatchify
from .base import Method, SharedSettings


@dataclass
class SimMIMOptions:
    mask_ratio: float = 0.6
    mask_patch_size: PositiveInt | None = None  # pixels per mask cell, a multiple of the patch; None = 2 patches
    # SimMIM's lr relative to the run's (mimkit's own knob, as dino.lr_scale): a recipe shared with other methods
    # can give SimMIM its own; the demo's 3e-3 suits MAE, and on the digits SimMIM wants several times more
    lr_scale: PositiveFloat = 1.0


LAYER_SCALE = 0.1  # SimMIM's MODEL.VIT.INIT_VALUES: LayerScale when model.layer_scale is None (0 = off)


class SimMIM(Method):
    """SimMIM: random 32-px cells masked with a learned token; a linear head regresses their raw pixels (L1)."""

    name = "simmim"
    Options = SimMIMOptions

    def __init__(self, options: SimMIMOptions, shared: SharedSettings):
        super().__init__()
        o = options
        self.options = o
        self.views = (View("image", shared.image_size),)
        # vit_*: timm's ViT with fixed sin-cos positions; beit_*: SimMIM's own ViT-B (shared relative position bias,
        # no absolute position); both with LayerScale 0.1 unless model.layer_scale says otherwise
        self.encoder = V.create_encoder(shared.model, shared.image_size, allow_beit=True, layer_scale=LAYER_SCALE)
        self.patch = V.patch_size(self.encoder)
        self.grid = V.grid_size(self.encoder)
        self.cell = mask_cell(o.mask_patch_size, self.patch, "simmim.mask_patch_size")
        if self.grid[0] % self.cell or self.grid[1] % self.cell:
            px = self.cell * self.patch
            raise ConfigError(f"simmim.mask_patch_size {px} does not tile the {shared.image_size} px image")
        cells = (self.grid[0] // self.cell) * (self.grid[1] // self.cell)
        if not 0.0 < o.mask_ratio < 1.0 or math.ceil(o.mask_ratio * cells) >= cells:
            raise ConfigError(f"simmim.mask_ratio {o.mask_ratio} leaves no masked or no visible cell of {cells}")
        dim = self.encoder.embed_dim
        self.mask_token = V.new_mask_token(dim)
        # SimMIM's ViT initialises as BEiT's (its VisionTransformerForSimMIM cuts the trunc-normal at +-1 std)
        V.init_beit_encoder(self.encoder)
        # SimMIM's decoder is a 1x1 conv to p*p*3 channels + PixelShuffle: a per-token Linear is the same map, and
        # keeps PyTorch's default initialisation as the conv does
        self.head = nn.Linear(dim, self.patch**2 * 3)

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device) -> torch.Tensor:
        """-> (B, N) bool, 1 = masked, whole cells of mask_patch_size pixels."""
        return coarse_random_masking(batch_size, self.grid, self.options.mask_ratio, self.cell, device)

    def encode(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, N) -> (B, N, D) patch tokens, masked ones seen as the mask token."""
        tokens = V.encode_with_mask_token(self.encoder, imgs, mask, self.mask_token)
        return tokens[:, self.encoder.num_prefix_tokens :]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, p*p*3) pixel predictions in patchify order."""
        return self.head(tokens)

    def loss(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 between predicted and true (normalised) pixels, averaged over the masked pixels and channels."""
        per_patch = (pred.float() - patchify(imgs, self.patch)).abs().mean(dim=-1)
        m = mask.float()
        return (per_patch * m).sum() / (m.sum() + 1e-5)

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict, mask: torch.Tensor | None = None):
        imgs = batch["image"]
        mask = self.mask(imgs.shape[0], imgs.device) if mask is None else mask
        loss = self.loss(self.decode(self.encode(imgs, mask)), imgs, mask)
        return loss, {"loss": loss.detach()}

    def no_weight_decay(self) -> set[str]:
        """SimMIM's for its ViT: the encoder's class token and absolute position embedding (besides every 1-D
        parameter); the mask token and relative position tables are decayed (only its Swin exempts the mask token)."""
        return {"encoder.cls_token", "encoder.pos_embed"}

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of original | masked | prediction pasted into the masked cells (normalised pixels)."""
        imgs = batch["image"]
        mask = self.mask(imgs.shape[0], imgs.device)
        pred = self.decode(self.encode(imgs, mask)).float()
        target = patchify(imgs, self.patch)
        m = mask.float().unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.patch, self.grid)
        recon = unpatchify(target * (1 - m) + pred * m, self.patch, self.grid)
        return torch.cat([imgs, masked, recon], dim=3)

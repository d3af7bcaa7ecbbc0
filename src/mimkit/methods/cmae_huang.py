"""CMAE, Huang et al. ("Contrastive Masked Autoencoders are Stronger Vision Learners", arXiv 2207.13532, TPAMI
2023; official code ZhichengHuang/CMAE). Not the seed's CMAE (Mao et al., `cmae-mao`): only the acronym is shared.

An online ViT encodes the visible 35% of a view (masks drawn on 2 x 2-patch cells); a pixel decoder (MAE's)
regresses the masked patches' normalised pixels, and a feature decoder (MAE's decoder class, 2 blocks) predicts
features whose mean over all tokens goes through a projector and a predictor. A momentum encoder (EMA, 0.996)
sees the whole of a pixel-shifted, colour-perturbed copy of the view; the mean of its patch tokens (no final
norm) through the momentum projector is the key. InfoNCE over the keys of every process, T = 0.07, scaled by
2T; L = L_rec + L_contrast. Views: one crop at (1 + shift) x the size; the online view is its top-left corner,
the target a randomly shifted window (the official: a 256 px crop, 224 px windows shifted by up to 31 px).
What goes downstream is the online encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, NonNegFloat, PositiveFloat, PositiveInt, Probability
from ..data.augment import ColorSpec
from ..data.views import View
from ..ema import BUDGET_HALF_LIFE, HalfLife, MomentumRule
from ..masking import cell_masking, mask_cell
from ..models import vit as V
from ..models.decoder import MaskedDecoder
from .base import SharedSettings
from .mae import MAE, MAEOptions
from .parts import MomentumTeacher, ViewColour, bn_mlp, info_nce


@dataclass
class CMAEHuangOptions(MAEOptions):
    """ZhichengHuang/CMAE configs/pre-training/cmae/cmae_vit-base-p16_32xb128-coslr-1600e_in1k.py unless noted.
    MAE's keys set the online encoder's mask and the pixel decoder."""

    mask_ratio: float = 0.65  # backbone.online.mask_ratio
    mask_patch_size: PositiveInt | None = None  # px side of a mask cell; None: 2 patches (CMAEViT: 32 px over 16)
    decoder_dim: PositiveInt = 512  # neck.pixel: MAEPretrainDecoder 512 x 8, 16 heads
    decoder_depth: PositiveInt = 8
    decoder_heads: PositiveInt = 16
    feature_decoder_depth: PositiveInt = 2  # neck.feature: the same decoder, 2 blocks (width and heads shared)
    proj_hidden: PositiveInt = 1536  # neck.projector / head.predictor: NonLinearNeck 2 layers, 1536 hidden
    proj_dim: PositiveInt = 256
    temperature: PositiveFloat = 0.07  # head.temperature
    rec_weight: NonNegFloat = 1.0  # head.rc_weight
    contrast_weight: NonNegFloat = 1.0  # head.ct_weight
    momentum: Probability = 0.996  # base_momentum; MomentumUpdateHook end_momentum 0.996: constant
    momentum_final: Probability = 0.996
    momentum_rule: MomentumRule = "budget"  # the paper's base, lowered for short runs (mimkit.ema)
    momentum_half_life: HalfLife = BUDGET_HALF_LIFE
    sync_bn: bool = True  # several processes on NCCL: the necks' BatchNorm over the global batch (the official SyncBN)
    shift: NonNegFloat = 32 / 224  # pixel shift: the crop is (1 + shift) x data.image_size (the official 256 / 224)
    # the target view's colour (CMAEDataset pipeline_aug): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
    # Gaussian blur sigma 0.1-2 px (at 224 px) p 0.5; the online view has none
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: Probability = 0.8
    color_grayscale_p: Probability = 0.2
    color_blur_p: Probability = 0.5


class CMAEHuang(MAE):
    """Huang et al.'s CMAE: MAE + a feature decoder contrasted against a momentum encoder on a pixel-shifted view."""

    name = "cmae-huang"
    Options = CMAEHuangOptions

    def __init__(self, options: CMAEHuangOptions, shared: SharedSettings):
        super().__init__(options, shared)
        o = self.options
        size = shared.image_size
        self.cell = mask_cell(o.mask_patch_size, self.patch, "cmae-huang.mask_patch_size")
        if self.grid[0] % self.cell or self.grid[1] % self.cell:
            raise ConfigError(f"cmae-huang.mask_patch_size: cells of {self.cell} patches do not tile {self.grid}")
        cells = self.num_patches // self.cell**2
        if int(cells * (1 - o.mask_ratio)) < 1:
            raise ConfigError(f"cmae-huang.mask_ratio {o.mask_ratio} leaves no visible cell of {cells}")
        self.size, self.pad = size, round(size * o.shift)
        self.views = (View("image", size + self.pad),)  # one crop; both windows are cut from it on the device
        color = ColorSpec(tuple(o.color_jitter), o.color_jitter_p, o.color_grayscale_p, o.color_blur_p)
        self.target_view = View("target", size, color=color)  # not loaded: cut from "image", then recoloured
        self.color = ViewColour((self.target_view,), shared.mean, shared.std)
        dim = self.encoder.embed_dim
        self.feature_decoder = MaskedDecoder(
            dim, o.decoder_dim, o.feature_decoder_depth, o.decoder_heads, self.grid, out_dim=dim,
            num_prefix=self.encoder.num_prefix_tokens,
        )  # fmt: skip
        V.init_mae_weights(self.feature_decoder)
        self.projector = bn_mlp(2, dim, o.proj_hidden, o.proj_dim, last_bn=False, hidden_bias=True, eps=1e-6)
        self.predictor = bn_mlp(2, o.proj_dim, o.proj_hidden, o.proj_dim, last_bn=False, hidden_bias=True, eps=1e-6)
        rule = {"rule": o.momentum_rule, "half_life": o.momentum_half_life}
        self.target_encoder = MomentumTeacher(self.encoder, o.momentum, o.momentum_final, **rule)
        # the official trains the whole model: the momentum projector's BatchNorm uses its batch's statistics
        self.target_projector = MomentumTeacher(self.projector, o.momentum, o.momentum_final, eval_mode=False, **rule)

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device, noise=None):
        """-> ids_keep (B, K), mask (B, N) 1 = masked, ids_restore (B, N); whole cells of cell x cell patches."""
        return cell_masking(batch_size, self.grid, self.cell, self.options.mask_ratio, device)

    def shift_views(self, crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S + pad, S + pad) -> online (B, 3, S, S), its top-left window, and target (B, 3, S, S), a window
        at a random offset in [0, pad)^2 per image (ShiftPixel)."""
        s, b = self.size, crop.shape[0]
        online = crop[..., :s, :s]
        if self.pad == 0:
            return online, online
        dy, dx = torch.randint(0, self.pad, (2, b, 1), device=crop.device)
        rows = (dy + torch.arange(s, device=crop.device))[:, None, :, None]  # (B, 1, S, 1)
        cols = (dx + torch.arange(s, device=crop.device))[:, None, None, :]  # (B, 1, 1, S)
        target = crop.gather(2, rows.expand(b, 3, s, crop.shape[3])).gather(3, cols.expand(b, 3, s, s))
        return online, target

    def query(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D) encoded visible tokens -> (B, d) online query: feature decoder over all N tokens, their
        mean, projector, predictor."""
        return self.predictor(self.projector(self.feature_decoder(tokens, ids_restore).mean(dim=1)))

    @torch.no_grad()
    def key(self, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) whole target view -> (B, d): the momentum encoder's patch tokens without the final norm
        (the official target has final_norm=False), their mean, the momentum projector."""
        vit = self.target_encoder.module
        x = torch.cat([V.prefix_tokens(vit, target.shape[0]), V.embed_patches(vit, target)], dim=1)
        x = vit.blocks(vit.norm_pre(vit.pos_drop(x)))
        return self.target_projector(x[:, vit.num_prefix_tokens :].mean(dim=1))

    def contrast_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) queries, keys -> (2T * InfoNCE against every process's keys, accuracy) (CMAEPretrainHead)."""
        loss, acc = info_nce(q, k, self.options.temperature, gather=True)
        return loss * (2 * self.options.temperature), acc

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        online, target = self.shift_views(batch["image"])
        target = self.color({"target": target})["target"]
        ids_keep, mask, ids_restore = self.mask(online.shape[0], online.device)
        tokens = self.encode(online, ids_keep)
        rec = self.loss(self.decode(tokens, ids_restore), self.targets(online), mask)
        contrast, acc = self.contrast_loss(self.query(tokens, ids_restore), self.key(target))
        loss = self.options.rec_weight * rec + self.options.contrast_weight * contrast
        metrics = {"loss_rec": rec.detach(), "loss_contrast": contrast.detach(), "contrast_acc": acc}
        return loss, {"loss": loss.detach(), **metrics}

    def after_step(self, step: int, total_steps: int) -> None:
        self.target_encoder.update(self.encoder, step, total_steps)
        self.target_projector.update(self.projector, step, total_steps)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"feature_decoder.pos_embed"}

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of online view | masked | reconstruction | shifted, recoloured target view."""
        online, target = self.shift_views(batch["image"])
        target = self.color({"target": target})["target"]
        masked, recon = self.reconstruct(online)
        return torch.cat([online, masked, recon, target], dim=3)

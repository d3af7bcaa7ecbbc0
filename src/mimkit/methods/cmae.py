"""CMAE, seed variant (Mao, Yin, Chang, Zhou; arXiv 2205.10546): MAE with a slimmer decoder, plus two tasks for
the encoder alone, contrastive learning between two crops and token position prediction, on ContrastiveCrop inputs.

The paper's text is public (arXiv 2205.10546), but only its abstract and front matter could be read when this was
written, and no code exists; so everything below the three ideas of the abstract is mimkit's reconstruction, with
each choice a config key (`cmae.*`, docs/methods.md "CMAE" says which rows rest on guesses):
- reconstruction: MAE's own steps (mask, encode, decode, targets, loss: this class extends `MAE`);
- contrastive: the MAE pass's visible tokens of crop 1, pooled, projected and predicted (online) against the whole
  crop 2 through the target encoder (EMA copy, or the online encoder) and a projector; symmetric InfoNCE over the
  batch, stop-gradient on the target; both crops recoloured as ContrastiveCrop's pipelines do (`cmae.color_*`);
- position: a second pass of the encoder over crop 1's visible patch embeddings with their positions hidden (no
  position embedding, or those of random positions; the tokens come in random order), then a linear head
  classifies each token's patch index (cross-entropy over the N positions).
ContrastiveCrop is a data option for every method (`data.crop_mode=ccrop`, `mimkit.data.ccrop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, NonNegFloat, PositiveFloat, PositiveInt, Probability
from ..data.augment import ColorSpec
from ..data.ccrop import outline_boxes
from ..data.views import View
from ..ema import BUDGET_HALF_LIFE, HalfLife, MomentumRule
from ..masking import gather_tokens
from ..models import vit as V
from .base import SharedSettings
from .mae import MAE, MAEOptions
from .parts import MomentumTeacher, ViewColour, info_nce, ln_mlp

TASKS = ("rec", "contrast", "pos")


@dataclass
class CMAEOptions(MAEOptions):
    """CMAE (Mao et al., arXiv 2205.10546). Every [UNVERIFIED] key is a reconstruction choice (docs/methods.md,
    "CMAE"); set a weight to 0 to switch its task off. MAE's keys (masking, decoder, norm-pix loss) with a slimmer
    decoder than MAE's 4 x 192, then CMAE's own."""

    decoder_dim: PositiveInt = 128
    decoder_depth: PositiveInt = 2
    decoder_heads: PositiveInt = 4
    # loss = rec_weight * L_rec + contrast_weight * L_contrast + pos_weight * L_pos  [UNVERIFIED weights]
    rec_weight: NonNegFloat = 1.0
    contrast_weight: NonNegFloat = 0.1
    pos_weight: NonNegFloat = 0.1
    # contrastive: pooled visible tokens of the masked crop vs the whole second crop through the target encoder
    target_encoder: Literal["ema", "shared"] = "ema"  # momentum copy (mimkit.ema) | the online encoder; both no-grad
    # EMA momentum: a cosine from a base to momentum_final; the base is `momentum` (rule fixed) or, rule budget,
    # `momentum` lowered where needed so the half-life at step 0 is at most momentum_half_life x the run (mimkit.ema)
    momentum_rule: MomentumRule = "budget"
    momentum: Probability = 0.996
    momentum_final: Probability = 1.0
    momentum_half_life: HalfLife = BUDGET_HALF_LIFE
    # which ViT goes downstream: the online one (student), the EMA target (teacher), or auto: the better by k-NN
    # among the training images at the end of a run on labeled data (the student otherwise)
    export_encoder: Literal["student", "teacher", "auto"] = "auto"
    temperature: PositiveFloat = 0.2  # InfoNCE over the batch, symmetric [UNVERIFIED: MoCo's 0.2]
    pool: Literal["avg", "cls"] = "avg"  # mean of patch tokens | class token
    proj_hidden: PositiveInt = 1024  # projector D -> hidden -> proj_dim (predictor proj_dim -> hidden -> proj_dim)
    proj_dim: PositiveInt = 256
    predictor: bool = True  # a predictor on the online side (MoCo v3 / BYOL)
    # token position prediction: a second encoder pass over the visible patches with positions hidden, a linear
    # head classifies each token's patch index. drop: no position embedding | permute: those of random positions
    pos_hiding: Literal["drop", "permute", "none"] = "drop"
    # colour of the contrastive pair [UNVERIFIED for CMAE; every ContrastiveCrop pipeline does it]: jitter and
    # grayscale drawn independently for each crop, on the device. both: crop 1 (the MAE pass: its reconstruction
    # target is the recoloured crop too) and crop 2 | target: crop 2 only | none: neither (colour then identifies
    # the pair). Only with contrast_weight > 0 (without the pair, CMAE's MAE pass sees MAE's input).
    color_views: Literal["both", "target", "none"] = "both"
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # ContrastiveCrop's ColorJitter
    color_jitter_p: Probability = 0.8
    color_grayscale_p: Probability = 0.2
    color_blur_p: Probability = 0.0  # ContrastiveCrop's ImageNet pipelines: 0.5 (sigma 0.1-2 px at 224, scaled)


def check_options(o) -> None:
    """Reject settings that cannot train or that would make a task trivial; errors name the key."""
    if not any(getattr(o, f"{t}_weight") for t in TASKS):
        raise ConfigError("cmae.rec_weight, cmae.contrast_weight and cmae.pos_weight are all 0: no task to train")
    if min(o.color_jitter) < 0 or o.color_jitter[3] > 0.5:
        raise ConfigError(f"cmae.color_jitter must be >= 0 with a hue strength <= 0.5, got {list(o.color_jitter)}")
    if o.pos_weight > 0 and o.pos_hiding == "none":
        raise ConfigError(
            "cmae.pos_hiding=none keeps the position embeddings on the tokens the position head classifies, which "
            "makes token position prediction trivial; use drop or permute (or cmae.pos_weight=0 to switch it off)"
        )


def color_spec(o) -> ColorSpec | None:
    """The contrastive pair's colour perturbation from the options (None when it changes nothing)."""
    if o.color_views == "none" or not (o.color_jitter_p or o.color_grayscale_p or o.color_blur_p):
        return None
    return ColorSpec(tuple(o.color_jitter), o.color_jitter_p, o.color_grayscale_p, o.color_blur_p)


class CMAE(MAE):
    """CMAE of Mao et al. 2022 (the seed): MAE with a slim decoder + contrast and token position on the encoder."""

    name = "cmae-mao"
    section = "cmae"  # the section it had as `cmae` (recipes and runs keep working)
    Options = CMAEOptions

    def __init__(self, options: CMAEOptions, shared: SharedSettings):
        o = options
        check_options(o)
        super().__init__(options, shared)
        self.weights = {t: getattr(o, f"{t}_weight") for t in TASKS}
        self.pixel_mean, self.pixel_std = tuple(shared.mean), tuple(shared.std)
        dim = self.encoder.embed_dim
        if not self.weights["rec"]:
            del self.decoder
            self.decoder = None
        self.target_projector = self.target_vit = None
        self.exported_teacher = False
        if self.weights["contrast"]:
            size = shared.image_size
            color = color_spec(o)
            online = color if o.color_views == "both" else None
            target = color if o.color_views in ("both", "target") else None
            self.views = (View("image", size, color=online), View("target", size, crop_group=1, color=target))
            self.color = ViewColour(self.views, shared.mean, shared.std)
            self.projector = ln_mlp(dim, o.proj_hidden, o.proj_dim)
            self.predictor = ln_mlp(o.proj_dim, o.proj_hidden, o.proj_dim) if o.predictor else nn.Identity()
            V.init_mae_weights(self.projector)
            V.init_mae_weights(self.predictor)
            if o.target_encoder == "ema":
                rule = {"rule": o.momentum_rule, "half_life": o.momentum_half_life}
                self.target_vit = MomentumTeacher(self.encoder, o.momentum, o.momentum_final, **rule)
                # a LayerNorm MLP: no batch statistics, so it may follow the method's mode
                self.target_projector = MomentumTeacher(
                    self.projector, o.momentum, o.momentum_final, eval_mode=False, **rule
                )
        if self.weights["pos"]:
            self.pos_head = nn.Linear(dim, self.num_patches)
            V.init_mae_weights(self.pos_head)

    def export_options(self):
        if self.target_vit is None:
            return None
        teacher = self.target_vit.module
        return ("cmae.export_encoder", self.options.export_encoder, {"student": self.encoder, "teacher": teacher},
                "student")  # fmt: skip

    def select_encoder(self, name: str) -> None:
        """After the run: the teacher becomes `encoder` (the two swap places; the run's last checkpoint, saved
        before, keeps the online encoder under `encoder`)."""
        if name == "teacher" and not self.exported_teacher:
            self.encoder, self.target_vit.module = self.target_vit.module, self.encoder
            self.exported_teacher = True

    def export_meta(self) -> dict:
        return {"encoder": "teacher" if self.exported_teacher else "student"}

    # ---- contrastive steps -------------------------------------------------------------------------------
    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P + K, D) encoded tokens -> (B, D): mean of the patch tokens ('avg') or the class token ('cls')."""
        return V.pool_features(self.encoder, tokens, self.options.pool)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, d) L2-normalised online embedding (projector, then predictor)."""
        return F.normalize(self.predictor(self.projector(pooled)).float(), dim=-1)

    @torch.no_grad()
    def target_embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) the whole second crop -> (B, d) L2-normalised target embedding, no gradient."""
        vit = self.target_vit.module if self.target_vit is not None else self.encoder
        proj = self.target_projector.module if self.target_projector is not None else self.projector
        tokens = V.encode_visible(vit, V.embed_patches(vit, imgs))
        return F.normalize(proj(V.pool_features(vit, tokens, self.options.pool)).float(), dim=-1)

    def contrast_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over this process's batch: (B, d), (B, d) -> scalar; the positive of q_b is k_b, and
        each query is ranked among the keys and each key among the queries (so no gather: q has a gradient)."""
        t = self.options.temperature
        return 0.5 * (info_nce(q, k, t)[0] + info_nce(k, q, t)[0])

    # ---- position steps ----------------------------------------------------------------------------------
    def hide_positions(self, imgs: torch.Tensor, ids_keep: torch.Tensor, patches=None) -> torch.Tensor:
        """(B, 3, H, W), (B, K) -> (B, K, D) visible patch embeddings, in ids_keep's random order, without their
        position: no position embedding ('drop') or the embeddings of K random distinct positions ('permute').
        `patches`: the images' patch embeddings (B, N, D) when the step has them already."""
        x = gather_tokens(self.encoder.patch_embed(imgs) if patches is None else patches, ids_keep)
        if self.options.pos_hiding == "permute":
            table = V.patch_pos_embed(self.encoder)
            fake = torch.rand(ids_keep.shape[0], self.num_patches, device=imgs.device).argsort(dim=1)
            x = x + gather_tokens(table.expand(ids_keep.shape[0], -1, -1), fake[:, : ids_keep.shape[1]])
        return x

    def predict_positions(self, imgs: torch.Tensor, ids_keep: torch.Tensor, patches=None) -> torch.Tensor:
        """(B, 3, H, W), (B, K) -> (B, K, N) logits over the patch index of each visible token."""
        tokens = V.encode_visible(self.encoder, self.hide_positions(imgs, ids_keep, patches))
        return self.pos_head(tokens[:, self.encoder.num_prefix_tokens :])

    def position_loss(self, logits: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of (B, K, N) logits against the true indices ids_keep (B, K) -> (loss, accuracy)."""
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids_keep.flatten())
        acc = (logits.argmax(dim=-1) == ids_keep).float().mean()
        return loss, acc.detach()

    # ---- contract ----------------------------------------------------------------------------------------
    def recolor(self, batch: dict) -> dict:
        """The contrastive pair's views with their colour perturbation (`cmae.color_views`), on the device."""
        if not self.weights["contrast"]:
            return batch
        return self.color(batch)

    def forward(self, batch: dict, noise: torch.Tensor | None = None):
        batch = self.recolor(batch)
        imgs = batch["image"]
        ids_keep, mask, ids_restore = self.mask(imgs.shape[0], imgs.device, noise)
        losses, metrics = {}, {}
        patches = self.encoder.patch_embed(imgs)  # once for the masked encoding and the position task
        if self.weights["rec"] or self.weights["contrast"]:
            tokens = self.encode_patches(patches, ids_keep)
        if self.weights["rec"]:
            losses["rec"] = self.loss(self.decode(tokens, ids_restore), self.targets(imgs), mask)
        if self.weights["contrast"]:
            losses["contrast"] = self.contrast_loss(self.project(self.pool(tokens)), self.target_embed(batch["target"]))
        if self.weights["pos"]:
            logits = self.predict_positions(imgs, ids_keep, patches)
            losses["pos"], metrics["pos_acc"] = self.position_loss(logits, ids_keep)
        loss = sum(self.weights[t] * v for t, v in losses.items())
        metrics.update({f"loss_{t}": v.detach() for t, v in losses.items()})
        return loss, {"loss": loss.detach(), **metrics}

    def after_step(self, step: int, total_steps: int) -> None:
        if self.target_vit is not None:
            self.target_vit.update(self.encoder, step, total_steps)
            self.target_projector.update(self.projector, step, total_steps)

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of original (its ContrastiveCrop box in red, when known) | masked | reconstruction."""
        imgs = batch["image"]
        shown = imgs
        if "ccrop_box" in batch:
            red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(self.pixel_mean)) / torch.tensor(self.pixel_std)
            shown = outline_boxes(imgs, batch["ccrop_box"], red)
        if self.decoder is None:
            return shown
        masked, recon = self.reconstruct(imgs)
        return torch.cat([shown, masked, recon], dim=3)

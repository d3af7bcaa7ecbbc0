"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

Two crops of each image, each colour-perturbed (an asymmetric pipeline: always blurred / rarely blurred, sometimes
solarised). The base ViT's class token goes through a projector and a predictor (queries); a momentum copy of the
ViT and projector gives the keys. Symmetric InfoNCE over the batch, the keys of every process as negatives:
ctr(q1, k2) + ctr(q2, k1), each cross-entropy scaled by 2 * temperature. The patch projection can stay at its
random initialisation (the paper's stability trick). What goes downstream is the base ViT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import ConfigError, PositiveFloat, PositiveInt, Probability
from ..data.augment import ColorSpec
from ..data.views import View
from ..ema import BUDGET_HALF_LIFE, HalfLife, MomentumRule
from ..models import vit as V
from .base import Method, SharedSettings
from .parts import MomentumTeacher, ViewColour, bn_mlp, info_nce


@dataclass
class MoCoV3Options:
    """The official ViT recipe's values (facebookresearch/moco-v3 main_moco.py, CONFIG.md) unless noted."""

    temperature: PositiveFloat = 0.2  # --moco-t .2 (ViT)
    # momentum: a half cosine from a base to momentum_final (--moco-m-cos); the base is `momentum` (rule fixed:
    # --moco-m 0.99, for 300 epochs of 313 steps) or, rule budget, `momentum` lowered where needed so the half-life
    # at step 0 is at most momentum_half_life x the run (mimkit.ema)
    momentum_rule: MomentumRule = "budget"
    momentum: Probability = 0.99
    momentum_final: Probability = 1.0
    momentum_half_life: HalfLife = BUDGET_HALF_LIFE
    # MLP widths: the paper's 4096 / 256 / 4096 cost more than a ViT-Tiny itself; 1024 suits ViT-Tiny/Small
    proj_hidden: PositiveInt = 1024  # projector: 3 layers, Linear-BN-ReLU x 2, Linear-BN (no affine)
    proj_dim: PositiveInt = 256
    pred_hidden: PositiveInt = 1024  # predictor: 2 layers, Linear-BN-ReLU, Linear-BN (no affine)
    # which ViT goes downstream: the base one (student, the paper's), the momentum one (teacher), or auto: the
    # better by k-NN among the training images at the end of a run on labeled data (the student otherwise)
    export_encoder: Literal["student", "teacher", "auto"] = "auto"
    freeze_patch_embed: bool = True  # random, frozen patch projection (--stop-grad-conv1)
    sync_bn: bool = True  # several processes on NCCL: the MLPs' BatchNorm over the global batch (the official SyncBN)
    # per-view colour perturbation (BYOL's asymmetric pipeline, as main_moco.py); pairs are (view 1, view 2)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2
    blur_p: tuple[Probability, Probability] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the view (the official: of the 224 px crop)
    solarize_p: tuple[Probability, Probability] = (0.0, 0.2)


def check_options(o: MoCoV3Options) -> None:
    """ConfigError naming the `mocov3.*` key for values the schema's ranges cannot express."""
    if min(o.jitter) < 0 or o.jitter[3] > 0.5:
        raise ConfigError(f"mocov3.jitter must be >= 0 with a hue strength <= 0.5, got {list(o.jitter)}")
    if not 0 < o.blur_sigma[0] <= o.blur_sigma[1]:
        raise ConfigError(f"mocov3.blur_sigma must be 0 < low <= high, got {list(o.blur_sigma)}")


def init_mocov3_vit(vit: nn.Module) -> None:
    """The official ViT initialisation: xavier-uniform Linear layers with q, k and v treated as three matrices,
    zero biases, a xavier-uniform patch projection (the one that stays frozen), class token ~ N(0, 1e-6)."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ctr(q, k): (N, d) queries, (N, d) keys -> (loss, top-1 accuracy). InfoNCE of each query against the keys
    of all processes, scaled by 2 * temperature (the official `contrastive_loss`)."""
    loss, acc = info_nce(q, k, temperature, gather=True)
    return loss * (2 * temperature), acc


class MoCoV3(Method):
    """MoCo v3: a ViT + projector + predictor against its momentum copy, InfoNCE between two crops."""

    name = "mocov3"
    Options = MoCoV3Options

    def __init__(self, options: MoCoV3Options, shared: SharedSettings):
        super().__init__()
        o = options
        check_options(o)
        self.options = o
        size = shared.image_size
        # two independent crops, each with its own colour (blur and solarize differ per view), on the device
        spec = dict(
            jitter=tuple(o.jitter), jitter_p=o.jitter_p, grayscale_p=o.grayscale_p, blur_sigma=tuple(o.blur_sigma)
        )
        color = [ColorSpec(**spec, blur_p=o.blur_p[i], solarize_p=o.solarize_p[i], blur_reference=None) for i in (0, 1)]
        self.views = (View("image", size, color=color[0]), View("target", size, crop_group=1, color=color[1]))
        self.color = ViewColour(self.views, shared.mean, shared.std)
        vit = V.create_encoder(shared.model, size)
        init_mocov3_vit(vit)
        if o.freeze_patch_embed:
            vit.patch_embed.requires_grad_(False)
        self.base = nn.ModuleDict({"vit": vit, "proj": bn_mlp(3, vit.embed_dim, o.proj_hidden, o.proj_dim)})
        self.predictor = bn_mlp(2, o.proj_dim, o.pred_hidden, o.proj_dim)
        # eval_mode off: the projector trains (its BatchNorm uses the batch's statistics); `train` keeps the ViT in eval
        self.momentum = MomentumTeacher(self.base, o.momentum, o.momentum_final, eval_mode=False,
                                        rule=o.momentum_rule, half_life=o.momentum_half_life)  # fmt: skip
        self.exported = "student" if o.export_encoder == "auto" else o.export_encoder

    @property
    def encoder(self) -> nn.Module:
        """The timm ViT that is evaluated and exported: the base (online) one (the paper's; under
        `mocov3.export_encoder=auto` until the end of the run chooses) or the momentum one."""
        return self.momentum.module["vit"] if self.exported == "teacher" else self.base["vit"]

    def export_options(self):
        return ("mocov3.export_encoder", self.options.export_encoder,
                {"student": self.base["vit"], "teacher": self.momentum.module["vit"]}, "student")  # fmt: skip

    def select_encoder(self, name: str) -> None:
        self.exported = name

    def export_meta(self) -> dict:
        return {"encoder": self.exported}

    def train(self, mode: bool = True):
        """The momentum ViT stays in eval mode (no stochastic depth on the keys); its projector keeps training
        mode, so its BatchNorm normalises with the batch's statistics, as the official code's does."""
        super().train(mode)
        self.momentum.module["vit"].eval()
        return self

    # ---- steps -------------------------------------------------------------------------------------------
    def augment(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two crops (B, 3, H, W), normalised -> their colour-perturbed views, normalised (no gradient)."""
        out = self.color({"image": x1, "target": x2})
        return out["image"], out["target"]

    def encode(self, vit: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views (B, 3, H, W) in one pass of `vit` (no op mixes samples) -> two (B, D) class tokens."""
        return vit.forward_features(torch.cat([x1, x2]))[:, 0].chunk(2)

    def project(self, proj: nn.Module, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) per view -> (B, d) per view; one view at a time, so BatchNorm's statistics are per view."""
        return proj(f1), proj(f2)

    def predict(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) projections per view -> (B, d) queries per view."""
        return self.predictor(z1), self.predictor(z2)

    @torch.no_grad()
    def targets(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views (B, 3, H, W) -> (B, d) keys per view from the momentum ViT and projector, no gradient."""
        k = self.momentum.module
        return self.project(k["proj"], *self.encode(k["vit"], x1, x2))

    def loss(self, q1, q2, k1, k2) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric: ctr(q1, k2) + ctr(q2, k1), all (B, d) -> (loss, mean top-1 accuracy of the positives)."""
        loss12, acc12 = contrastive_loss(q1, k2, self.options.temperature)
        loss21, acc21 = contrastive_loss(q2, k1, self.options.temperature)
        return loss12 + loss21, (acc12 + acc21) / 2

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        x1, x2 = self.augment(batch["image"], batch["target"])
        q1, q2 = self.predict(*self.project(self.base["proj"], *self.encode(self.base["vit"], x1, x2)))
        k1, k2 = self.targets(x1, x2)
        loss, acc = self.loss(q1, q2, k1, k2)
        return loss, {"loss": loss.detach(), "contrast_acc": acc.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.momentum.update(self.base, step, total_steps)

    def no_weight_decay(self) -> set[str]:
        return {"base.vit.cls_token", "base.vit.pos_embed"}

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of crop 1 | its perturbed view | crop 2 | its perturbed view (what the two encoders see)."""
        x1, x2 = batch["image"].float(), batch["target"].float()
        v1, v2 = self.augment(x1, x2)
        return torch.cat([x1, v1, x2, v2], dim=3)  # the caller un-normalises

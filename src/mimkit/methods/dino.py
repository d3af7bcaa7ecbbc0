"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"; facebookresearch/dino).

Self-distillation without labels: a student ViT + DINO head sees every crop of an image (2 global crops and
several small local ones, each with its own colour), a momentum teacher (EMA of the student) sees the 2 global
crops; the student's softmax (temperature 0.1) is trained towards the teacher's centred and sharpened softmax
(temperature 0.04, optionally warmed up) by cross-entropy, over every (teacher crop, other student crop) pair.
The centre is a running mean of the teacher's outputs. What goes downstream is the teacher's backbone (DINO's
choice: it is the better one throughout training). Multi-crop is a view list (`View.scale`, `View.size`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, NonNegInt, PositiveFloat, PositiveInt, Probability
from ..data.augment import ColorSpec
from ..data.views import View
from ..ema import BUDGET_HALF_LIFE, HalfLife, MomentumRule
from ..models import vit as V
from .base import Method, SharedSettings
from .parts import DINOHead, MomentumTeacher, TeacherCentre, ViewColour, perturb_views


@dataclass
class DINOOptions:
    """facebookresearch/dino main_dino.py's defaults (ViT-S/16 recipe) unless noted."""

    out_dim: PositiveInt = 65536  # --out_dim
    head_hidden: PositiveInt = 2048  # DINOHead hidden_dim
    head_bottleneck: PositiveInt = 256  # DINOHead bottleneck_dim
    norm_last_layer: bool = True  # --norm_last_layer (the README's ViT-S runs: False)
    head_bn: bool = False  # --use_bn_in_head: BatchNorm in the head's MLP (batch statistics in both networks)
    sync_bn: bool = True  # several processes on NCCL: that BatchNorm over the global batch (the official converts)
    # the feature the head reads: the class token (the official) | the mean of the patch tokens (mimkit's option,
    # for runs evaluated on that feature, e.g. the demo's avg-pooled k-NN)
    pool: Literal["cls", "avg"] = "cls"
    momentum: Probability = 0.996  # --momentum_teacher, raised to momentum_final by a cosine
    momentum_final: Probability = 1.0
    momentum_rule: MomentumRule = "budget"  # the paper's base, lowered for short runs (mimkit.ema)
    momentum_half_life: HalfLife = BUDGET_HALF_LIFE
    student_temp: PositiveFloat = 0.1  # DINOLoss student_temp
    teacher_temp: PositiveFloat = 0.04  # --teacher_temp
    warmup_teacher_temp: PositiveFloat = 0.04  # --warmup_teacher_temp
    warmup_teacher_temp_epochs: NonNegInt = 0  # --warmup_teacher_temp_epochs (the paper: 30)
    center_momentum: Probability = 0.9  # DINOLoss center_momentum
    freeze_last_layer_epochs: NonNegInt = 1  # --freeze_last_layer
    # DINO's lr relative to the run's (mimkit's own knob): a recipe shared with other methods (the demo's base lr
    # 3e-3 suits MAE) can bring DINO to its own rule, --lr 5e-4 * batch / 256, where a 6x larger lr collapses it
    lr_scale: PositiveFloat = 1.0
    # multi-crop (DataAugmentationDINO): 2 global crops at data.image_size, local_crops at local_size
    global_scale: tuple[float, float] = (0.4, 1.0)  # --global_crops_scale
    local_scale: tuple[float, float] = (0.05, 0.4)  # --local_crops_scale
    local_crops: NonNegInt = 8  # --local_crops_number (the paper's best: 10)
    # px; None: the official 96 / 224 of data.image_size, to the nearest whole patch (96 at 224, 8 at 16)
    local_size: PositiveInt | None = None
    # colour (BYOL's pipeline as DataAugmentationDINO): jitter + grayscale on every crop; blur p 1.0 / 0.1 on the
    # global crops, 0.5 on the local ones; solarize 0.2 on global crop 2. Blur sigmas are px of the official 224 px
    # images, scaled by data.image_size / 224 for every crop (the official states them for 96 px locals too)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2
    blur_p: tuple[Probability, Probability, Probability] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[Probability, Probability, Probability] = (0.0, 0.2, 0.0)


def local_size(o: DINOOptions, image_size: int, patch: int) -> int:
    """The local crops' side in px: `dino.local_size`, or 96 / 224 of the image rounded to whole patches."""
    if o.local_size is not None:
        return o.local_size
    return max(patch, round(image_size * 96 / 224 / patch) * patch)


def check_options(o: DINOOptions, image_size: int, patch: int) -> None:
    """ConfigError naming the `dino.*` key for values the schema's ranges cannot express."""
    for key in ("global_scale", "local_scale"):
        lo, hi = getattr(o, key)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"dino.{key} must be 0 < low <= high <= 1, got {list(getattr(o, key))}")
    size = local_size(o, image_size, patch)
    if o.local_crops and (size % patch or size > image_size):
        raise ConfigError(
            f"dino.local_size {size} must be a multiple of the patch size {patch} and at most "
            f"data.image_size {image_size}"
        )
    if min(o.jitter) < 0 or o.jitter[3] > 0.5:
        raise ConfigError(f"dino.jitter must be >= 0 with a hue strength <= 0.5, got {list(o.jitter)}")
    if not 0 < o.blur_sigma[0] <= o.blur_sigma[1]:
        raise ConfigError(f"dino.blur_sigma must be 0 < low <= high, got {list(o.blur_sigma)}")


def multi_crop_views(o: DINOOptions, image_size: int, patch: int) -> tuple[View, ...]:
    """2 global views ('image', 'global2') + `local_crops` local ones ('local0', ...), each its own crop group
    with its own scale, size and colour."""
    s = image_size / 224
    sigma = (o.blur_sigma[0] * s, o.blur_sigma[1] * s)

    def color(i: int) -> ColorSpec:
        return ColorSpec(tuple(o.jitter), o.jitter_p, o.grayscale_p, o.blur_p[i], sigma, o.solarize_p[i], None)

    glob = [View(n, image_size, crop_group=g, color=color(g), scale=tuple(o.global_scale)) for g, n in
            enumerate(("image", "global2"))]  # fmt: skip
    small = local_size(o, image_size, patch)
    local = [View(f"local{i}", small, crop_group=2 + i, color=color(2), scale=tuple(o.local_scale))
             for i in range(o.local_crops)]  # fmt: skip
    return tuple(glob + local)


class DINO(Method):
    """DINO: a student ViT + head distilled from its momentum teacher over multi-crop views."""

    name = "dino"
    Options = DINOOptions

    def __init__(self, options: DINOOptions, shared: SharedSettings):
        super().__init__()
        o = options
        self.options, self.epochs = o, shared.epochs
        vit = V.create_encoder(shared.model, shared.image_size, sincos_pos=False)  # learned, interpolated
        check_options(o, shared.image_size, V.patch_size(vit))
        self.views = multi_crop_views(o, shared.image_size, V.patch_size(vit))
        self.color = ViewColour(self.views, shared.mean, shared.std)
        head = DINOHead(vit.embed_dim, o.out_dim, o.head_hidden, o.head_bottleneck, 3, o.norm_last_layer, o.head_bn)
        self.student = nn.ModuleDict({"vit": vit, "head": head})
        self.teacher = MomentumTeacher(  # starts as the student
            self.student, o.momentum, o.momentum_final, rule=o.momentum_rule, half_life=o.momentum_half_life
        )
        self.centre = TeacherCentre(o.out_dim, o.center_momentum)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))  # saved: the schedules resume with it

    def train(self, mode: bool = True):
        """The teacher's ViT stays in eval mode (no drop-path); its head trains as the official teacher, which is
        never put in eval mode, so a BatchNorm in it (dino.head_bn) normalises with its batch's statistics."""
        super().train(mode)
        self.teacher.module["head"].train(mode)
        return self

    @property
    def encoder(self) -> nn.Module:
        """The teacher's timm ViT: evaluated and exported (DINO's choice)."""
        return self.teacher.module["vit"]

    # ---- steps -------------------------------------------------------------------------------------------
    def encode(self, vit: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
        """Crops (B, 3, h, w) of one size -> (len(crops) * B, D) features (`dino.pool`), in one pass (as DINO's
        MultiCropWrapper: one forward per resolution)."""
        tokens = V.encode_visible(vit, V.embed_patches_any_size(vit, torch.cat(crops)))
        return V.pool_features(vit, tokens, self.options.pool)

    def student_logits(self, batch: dict) -> torch.Tensor:
        """Every crop -> (n_crops * B, K) student logits, global crops first, then the local ones."""
        vit, head = self.student["vit"], self.student["head"]
        features = [self.encode(vit, [batch["image"], batch["global2"]])]
        local = [batch[v.name] for v in self.views[2:]]
        if local:
            features.append(self.encode(vit, local))
        return head(torch.cat(features), freeze_last_layer=int(self.epoch) < self.options.freeze_last_layer_epochs)

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The 2 global crops -> (2 * B, K) teacher logits, no gradient."""
        t = self.teacher.module
        return t["head"](self.encode(t["vit"], [batch["image"], batch["global2"]]))

    def teacher_temp(self) -> float:
        """The teacher temperature of this epoch: linear from warmup_teacher_temp to teacher_temp over the warm-up
        epochs (np.linspace of both ends, as the official), then constant."""
        o, e = self.options, int(self.epoch)
        n = o.warmup_teacher_temp_epochs
        if e >= n:
            return o.teacher_temp
        return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * (e / (n - 1) if n > 1 else 0.0)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(n_crops * B, K) student, (2 * B, K) teacher logits -> scalar: the mean over every pair (teacher crop
        t, student crop s != t) of the batch mean of H(softmax((teacher_t - c) / teacher_temp),
        softmax(student_s / student_temp)), c the running centre."""
        n_crops = student.shape[0] // (teacher.shape[0] // 2)
        s = F.log_softmax(student.float() / self.options.student_temp, dim=-1).chunk(n_crops)
        t = F.softmax(self.centre(teacher.float()) / teacher_temp, dim=-1).chunk(2)
        terms = [(-ti * s[v]).sum(dim=-1).mean() for i, ti in enumerate(t) for v in range(n_crops) if v != i]
        return sum(terms) / len(terms)

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        batch = self.color(batch)
        student, teacher = self.student_logits(batch), self.teacher_logits(batch)
        temp = self.teacher_temp()
        loss = self.loss(student, teacher, temp)
        with torch.no_grad():  # falls from log K as the teacher sharpens; near 0 = collapse to one dimension
            probs = F.softmax(self.centre(teacher.float()) / temp, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        self.centre.update(teacher)  # after the loss: the official centres with the centre before this batch
        return loss, {"loss": loss.detach(), "teacher_entropy": entropy}

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(self.student, step, total_steps)
        self.epoch.fill_(step * self.epochs // max(1, total_steps))

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of global crop 1 | global crop 2 as the networks see them (colour perturbed)."""
        views = perturb_views(batch, self.views[:2], self.color.mean, self.color.std)
        return torch.cat([views["image"].float(), views["global2"].float()], dim=3)

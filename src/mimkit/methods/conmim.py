"""ConMIM (Yi et al., 2022): masked image modeling as denoising contrast between the patches of one image.

A student ViT sees the weakly perturbed image with some patches replaced by a mask token; an EMA teacher sees the
whole image, strongly perturbed. Both project every token with a per-token MLP. For each masked position i, the
student's projection must pick the teacher's projection at i among the teacher's projections of all patches of
the *same* image (InfoNCE, intra-image negatives only). What goes downstream is the EMA teacher's ViT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, NonNegInt, PositiveFloat, PositiveInt, Probability
from ..data.augment import ColorSpec
from ..data.views import View
from ..ema import BUDGET_HALF_LIFE, HalfLife, MomentumRule
from ..masking import block_mask_count, blockwise_masking, coarse_random_masking, mask_cell
from ..models import vit as V
from .base import Method, SharedSettings
from .parts import MomentumTeacher, ViewColour


def projector(dim: int, hidden: int, out: int) -> nn.Sequential:
    """ConMIM's per-token head: 3 bias-free Linear layers, BN + ReLU between them, a BN without affine last."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False),
        nn.BatchNorm1d(out, affine=False),
    )


@dataclass
class ConMIMOptions:
    renamed: ClassVar[dict] = {"mask_min_patches": "conmim.min_block_patches",
                               "mask_cell": "conmim.mask_patch_size (in pixels now)"}  # fmt: skip
    mask_mode: Literal["block", "coarse"] = "block"  # BEiT's rectangles (the reference) | random cells (random_mps32)
    # block: masked patches per image (the reference's --num_mask_patches 75 of 196); None = round(75 * N / 196)
    num_masking_patches: PositiveInt | None = None
    # block: round(mask_ratio * N) patches instead of num_masking_patches; coarse: the fraction of cells masked,
    # ceil(ratio * cells) (None = the reference's --mask_ratio default, 0.75)
    mask_ratio: float | None = None
    min_block_patches: PositiveInt = 16  # block: smallest rectangle, in patches (BEiT's name)
    mask_patch_size: PositiveInt | None = None  # coarse: cell side in pixels, a multiple of the patch; None = 2 patches
    mask_bank: NonNegInt = 0  # block: > 0 draws masks on the device from this many precomputed (x8 flips) ones
    temperature: PositiveFloat = 0.1  # InfoNCE temperature on L2-normalised projections
    # the teacher's EMA momentum: a cosine from a base to momentum_final; the base is `momentum` (rule fixed: the
    # reference's 0.996) or, rule budget, `momentum` lowered where needed so that the teacher's half-life at step 0
    # is at most momentum_half_life x the run's steps (mimkit.ema). ConMIM keeps the reference's even on short runs:
    # measured better than the budget rule on the CIFAR-10 ladder (k-NN gain +4.0 vs +0.6 at 4 epochs, 3 seeds)
    # and the digits demo (0.852 vs 0.752); docs/methods.md, "Teachers that fit the budget"
    momentum_rule: MomentumRule = "fixed"
    momentum: Probability = 0.996
    momentum_final: Probability = 1.0
    momentum_half_life: HalfLife = BUDGET_HALF_LIFE
    proj_hidden: PositiveInt = 1024  # per-token MLP projector width (the paper: 4096 for ViT-B/L; costly on small ViTs)
    proj_dim: PositiveInt = 256  # projection size (the paper: 256)
    # which ViT goes downstream: the EMA teacher (the reference's), the student, or auto: the better of the two by
    # k-NN among the training images at the end of a run on labeled data (the teacher on unlabeled data)
    export_encoder: Literal["teacher", "student", "auto"] = "auto"
    center_teacher: bool = False  # subtract the teacher's per-position batch mean (not in the reference; see docs)
    # the strong perturbation of the teacher's view (its View.color, applied on the device by parts.ViewColour)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.1
    # in pixels of a 224 px view (the reference's PIL radius at 224), scaled to data.image_size: the same blur
    # relative to the image at any size (0.014-0.29 px at 32 px)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: Probability = 0.2


LAYER_SCALE = 0.1  # the reference's --layer_scale_init_value (ViT-S/B; 1e-5 for ViT-L), when model.layer_scale is None
COARSE_RATIO = 0.75  # the reference's --mask_ratio default, used by its random_mps32 masks


def check_config(o, num_patches: int, grid: tuple[int, int], cell: int) -> int:
    """ConfigError naming the `conmim.*` key for every value the method cannot run with (ranges and choices are
    checked by the config schema). -> the masked count per image (block) or cells (coarse)."""
    if min(o.jitter) < 0 or o.jitter[3] > 0.5:
        raise ConfigError(f"conmim.jitter must be >= 0 with a hue strength <= 0.5, got {list(o.jitter)}")
    if not 0 < o.blur_sigma[0] <= o.blur_sigma[1]:
        raise ConfigError(f"conmim.blur_sigma must be 0 < low <= high, got {list(o.blur_sigma)}")
    if o.mask_mode == "block":
        return block_mask_count(num_patches, o.num_masking_patches, o.mask_ratio, "conmim")
    if o.num_masking_patches is not None:
        raise ConfigError("conmim.num_masking_patches is for mask_mode=block; coarse masks take conmim.mask_ratio")
    if grid[0] % cell or grid[1] % cell:
        raise ConfigError(f"conmim.mask_patch_size ({cell} patches) does not tile the {grid[0]}x{grid[1]} grid")
    units = (grid[0] // cell) * (grid[1] // cell)
    ratio = COARSE_RATIO if o.mask_ratio is None else o.mask_ratio
    masked = math.ceil(ratio * units)  # as coarse_random_masking
    if ratio <= 0.0 or masked < 1:
        raise ConfigError(f"conmim.mask_ratio {ratio:g} masks no patch of {units} mask cells")
    if ratio >= 1.0 or masked >= units:
        raise ConfigError(f"conmim.mask_ratio {ratio:g} leaves no visible patch of {units} mask cells")
    return masked


def teacher_colour(o: ConMIMOptions) -> ColorSpec:
    """The strong perturbation of the teacher's view: jitter, grayscale, blur (sigmas in px of a 224 px image,
    scaled to the view's size by the spec), solarize."""
    return ColorSpec(tuple(o.jitter), o.jitter_p, o.grayscale_p, o.blur_p, tuple(o.blur_sigma), o.solarize_p)


class ConMIM(Method):
    """ConMIM: masked patches contrasted against an EMA teacher's patches of the same image."""

    name = "conmim"
    Options = ConMIMOptions

    def __init__(self, options: ConMIMOptions, shared: SharedSettings):
        super().__init__()
        o = options
        self.options = o
        # one view, the student's; the teacher's is the same crop strongly perturbed on the device (not loaded)
        self.views = (View("image", shared.image_size),)
        self.teacher_view = View("teacher", shared.image_size, color=teacher_colour(o))
        self.color = ViewColour((self.teacher_view,), shared.mean, shared.std)
        # beit_*: the reference's encoder (shared relative position bias, no absolute position); vit_*: fixed sin-cos
        # absolute positions, as MAE (mimkit's variant, docs/methods.md); LayerScale 0.1 unless model.layer_scale
        vit = V.create_encoder(shared.model, shared.image_size, allow_beit=True, layer_scale=LAYER_SCALE)
        if getattr(vit, "pos_embed", None) is not None and not o.center_teacher:
            warnings.warn(
                "conmim: the encoder has absolute positions and conmim.center_teacher is off, so the loss can be "
                "solved from position alone (pos_acc -> 1, docs/methods.md): use a beit_* model.name or "
                "conmim.center_teacher=true",
                stacklevel=2,
            )
        self.grid = V.grid_size(vit)
        self.num_patches = self.grid[0] * self.grid[1]
        self.cell = mask_cell(o.mask_patch_size, V.patch_size(vit), "conmim.mask_patch_size")
        self.num_masked = check_config(o, self.num_patches, self.grid, self.cell)
        self.student = nn.ModuleDict({"vit": vit, "proj": projector(vit.embed_dim, o.proj_hidden, o.proj_dim)})
        self.mask_token = V.new_mask_token(vit.embed_dim)
        # the reference's initialisation (BEiT's): encoder and projector trunc-normal 0.02 cut at +-1 std
        V.init_beit_encoder(vit)
        V.init_beit_weights(self.student["proj"])
        V.init_sincos_patch_embed(vit)  # vit_* only: content at the scale of the sin-cos table
        # eval_mode off: the teacher follows the method's train / eval mode, so its projector's BatchNorm normalises
        # with the batch's statistics in training (and a model.drop_path acts on its ViT too)
        self.teacher = MomentumTeacher(self.student, o.momentum, o.momentum_final, eval_mode=False,
                                       rule=o.momentum_rule, half_life=o.momentum_half_life)  # fmt: skip
        self.exported = "teacher" if o.export_encoder == "auto" else o.export_encoder
        self.bank_seed = shared.seed
        self.register_buffer("mask_bank", None, persistent=False)  # built on first use (conmim.mask_bank > 0)

    @property
    def encoder(self) -> nn.Module:
        """The timm ViT (or Beit) that is evaluated and exported: the EMA teacher's or the student's
        (`conmim.export_encoder`; under auto the teacher until the end of the run chooses, `select_encoder`)."""
        return self.teacher.module["vit"] if self.exported == "teacher" else self.student["vit"]

    def export_options(self):
        return ("conmim.export_encoder", self.options.export_encoder,
                {"student": self.student["vit"], "teacher": self.teacher.module["vit"]}, "teacher")  # fmt: skip

    def select_encoder(self, name: str) -> None:
        self.exported = name

    @property
    def ccrop_encoder(self) -> nn.Module:
        """The network whose heat maps place ContrastiveCrop's boxes: the online (student) ViT, as ContrastiveCrop
        uses its online encoder (MoCo's query encoder), whichever ViT is exported."""
        return self.student["vit"]

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device) -> torch.Tensor:
        """-> (B, N) bool, True = masked (BEiT blocks or coarse random cells)."""
        o = self.options
        if o.mask_mode == "coarse":
            ratio = COARSE_RATIO if o.mask_ratio is None else o.mask_ratio
            return coarse_random_masking(batch_size, self.grid, ratio, self.cell, device)
        if o.mask_bank > 0:
            if self.mask_bank is None:
                self.mask_bank = self.build_mask_bank()
            self.mask_bank = self.mask_bank.to(device)  # no-op once there
            return self.mask_bank[torch.randint(0, self.mask_bank.shape[0], (batch_size,), device=device)]
        return blockwise_masking(batch_size, self.grid, self.num_masked, o.min_block_patches, device=device)

    def build_mask_bank(self) -> torch.Tensor:
        """(8 * conmim.mask_bank, N) bool: BEiT block masks and their flips and transposes (4 on a non-square
        grid), to which BEiT's distribution is symmetric; from a generator seeded by train.seed alone, so a resumed
        run rebuilds the same bank. Drawing from it is one gather on the device, where generating B masks per step
        is a Python loop on the host (docs/benchmarks.md)."""
        o, (gh, gw) = self.options, self.grid
        rng = np.random.default_rng([self.bank_seed, 0xC0])
        m = blockwise_masking(o.mask_bank, self.grid, self.num_masked, o.min_block_patches, generator=rng)
        m = m.view(-1, gh, gw)
        variants = [m, m.flip(1), m.flip(2), m.flip(1).flip(2)]
        if gh == gw:
            variants += [v.transpose(1, 2) for v in variants]
        return torch.cat(variants).reshape(-1, gh * gw)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> the teacher's strongly perturbed copy of the same crop, normalised (no
        gradient)."""
        return self.color({"teacher": x})["teacher"]

    def project(self, proj: nn.Module, tokens: torch.Tensor, center: bool = False) -> torch.Tensor:
        """(B, P + N, D) all tokens -> (B, N, d) L2-normalised patch projections (BN statistics over B*(P+N)).
        center: first subtract the batch mean at each position (removes what position alone predicts)."""
        b, n, d = tokens.shape
        z = proj(tokens.reshape(b * n, d)).reshape(b, n, -1)[:, self.student["vit"].num_prefix_tokens :].float()
        if center:
            z = z - z.mean(dim=0, keepdim=True)
        return F.normalize(z, dim=-1)

    def encode_student(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, H, W) normalised, mask (B, N) -> (B, N, d) projections of the masked-image tokens."""
        tokens = V.encode_with_mask_token(self.student["vit"], imgs, mask, self.mask_token)
        return self.project(self.student["proj"], tokens)

    @torch.no_grad()
    def encode_teacher(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, H, W) normalised, unmasked -> (B, N, d) projections, no gradient."""
        t = self.teacher.module
        return self.project(t["proj"], t["vit"].forward_features(imgs), self.options.center_teacher)

    def logits(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s (B, N, d), t (B, N, d) -> (B, N, N): logits[b, i, j] = s_bi . t_bj / temperature."""
        return torch.einsum("bid,bjd->bij", s, t) / self.options.temperature

    def loss(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over masked positions of -log softmax_j(logits[b, i, :])[i]: (B, N, d), (B, N, d), (B, N) ->
        (loss, top-1 accuracy of finding the own position). No boolean indexing: no host sync."""
        logits = self.logits(s, t)
        b, n, _ = logits.shape
        target = torch.arange(n, device=logits.device).expand(b, n)
        ce = F.cross_entropy(logits.reshape(b * n, n), target.reshape(-1), reduction="none").view(b, n)
        m = mask.to(ce.dtype)
        count = m.sum().clamp(min=1.0)
        acc = ((logits.argmax(dim=-1) == target).to(ce.dtype) * m).sum() / count
        return (ce * m).sum() / count, acc

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict, mask: torch.Tensor | None = None):
        x = batch["image"]  # (B, 3, H, W) normalised
        if mask is None:
            mask = self.mask(x.shape[0], x.device)
        t = self.encode_teacher(self.perturb(x))
        s = self.encode_student(x, mask)
        loss, acc = self.loss(s, t, mask)
        metrics = {"loss": loss.detach(), "pos_acc": acc.detach(), "mask_frac": mask.float().mean().detach()}
        return loss, metrics

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(self.student, step, total_steps)

    def no_weight_decay(self) -> set[str]:
        """The reference's (BEiT's optim_factory with the model's no_weight_decay): the class token and absolute
        position embedding only, besides every 1-D parameter; the mask token and relative position table decay."""
        return {"student.vit.cls_token", "student.vit.pos_embed"}

    def export_meta(self) -> dict:
        return {"encoder": self.exported}

    @torch.no_grad()
    def similarity_maps(self, x: torch.Tensor, num_queries: int = 3):
        """x (B, 3, H, W) normalised -> mask (B, N), queries (B, Q) masked positions, maps (B, Q, N): softmax over
        the teacher's patches of the student's masked-patch feature (the teacher sees the unperturbed image)."""
        mask = self.mask(x.shape[0], x.device)
        s = self.encode_student(x, mask)
        t = self.encode_teacher(x)
        # queries: masked positions spread over each image's masked set (random order from the global RNG)
        score = torch.rand(mask.shape, device=x.device) + mask.float()  # masked first, shuffled
        queries = score.argsort(dim=1, descending=True)[:, :num_queries]
        sq = torch.gather(s, 1, queries.unsqueeze(-1).expand(-1, -1, s.shape[-1]))
        maps = self.logits(sq, t).softmax(dim=-1)
        return mask, queries, maps

    @torch.no_grad()
    def visualize(self, batch: dict, num_queries: int = 3) -> torch.Tensor:
        """Rows of image | masked student input | for 3 masked query patches (green box): teacher-patch similarity
        heat map."""
        mask, queries, maps = self.similarity_maps(batch["image"].float(), num_queries)
        mean, std = self.color.mean.view(1, 3, 1, 1), self.color.std.view(1, 3, 1, 1)
        x = (batch["image"].float() * std + mean).clamp(0, 1)  # the panels are drawn in [0, 1]
        b, _, h, w = x.shape
        gh, gw = self.grid
        ph, pw = h // gh, w // gw
        up = lambda m: m.view(b, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)  # noqa: E731
        masked = x * (1 - up(mask.float())) + 0.5 * up(mask.float())
        panels = [x, masked]
        gray = x.mul(torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        for q in range(queries.shape[1]):
            heat = maps[:, q] / maps[:, q].amax(dim=1, keepdim=True)
            hm = up(heat)
            color = torch.cat([(3 * hm).clamp(0, 1), (3 * hm - 1).clamp(0, 1), (3 * hm - 2).clamp(0, 1)], 1)
            panel = 0.3 * gray + 0.7 * color
            box = torch.zeros(b, 1, gh, gw, device=x.device)
            box.view(b, -1).scatter_(1, queries[:, q : q + 1], 1.0)
            edge = up(box.view(b, -1)) - F.avg_pool2d(up(box.view(b, -1)), 3, 1, 1, count_include_pad=False)
            outline = (edge > 1e-6).float()
            green = torch.tensor([0.0, 1.0, 0.0], device=x.device).view(1, 3, 1, 1)
            panels.append(panel * (1 - outline) + green * outline)
        return (torch.cat(panels, dim=3).clamp(0, 1) - mean) / std  # the caller un-normalises

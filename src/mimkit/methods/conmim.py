"""ConMIM (Yi et al., 2022): masked image modeling as denoising contrast between the patches of one image.

A student ViT sees the weakly perturbed image with some patches replaced by a mask token; an EMA teacher sees the
whole image, strongly perturbed. Both project every token with a per-token MLP. For each masked position i, the
student's projection must pick the teacher's projection at i among the teacher's projections of all patches of
the *same* image (InfoNCE, intra-image negatives only). What goes downstream is the EMA teacher's ViT.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data.augment import ColorAugment
from ..data.views import View
from ..ema import cosine_momentum, ema_update, make_teacher
from ..masking import blockwise_masking, coarse_random_masking
from ..models import vit as V
from .base import Method


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


def check_config(o, num_patches: int, grid: tuple[int, int]) -> None:
    """ConfigError naming the `conmim.*` key for every value the method cannot run with."""
    if o.mask_mode not in ("block", "coarse"):
        raise ConfigError(f"conmim.mask_mode must be 'block' or 'coarse', got '{o.mask_mode}'")
    if o.export_encoder not in ("teacher", "student"):
        raise ConfigError(f"conmim.export_encoder must be 'teacher' or 'student', got '{o.export_encoder}'")
    for key in ("momentum", "momentum_final", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        v = getattr(o, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"conmim.{key} must be in [0, 1], got {v:g}")
    if o.temperature <= 0:
        raise ConfigError(f"conmim.temperature must be > 0, got {o.temperature:g}")
    if o.mask_bank < 0:
        raise ConfigError(f"conmim.mask_bank must be >= 0 (0 = new masks every step), got {o.mask_bank}")
    for key in ("proj_hidden", "proj_dim", "mask_min_patches", "mask_cell"):
        if getattr(o, key) < 1:
            raise ConfigError(f"conmim.{key} must be >= 1, got {getattr(o, key)}")
    if min(o.jitter) < 0 or o.jitter[3] > 0.5:
        raise ConfigError(f"conmim.jitter must be >= 0 with a hue strength <= 0.5, got {list(o.jitter)}")
    if not 0 < o.blur_sigma[0] <= o.blur_sigma[1]:
        raise ConfigError(f"conmim.blur_sigma must be 0 < low <= high, got {list(o.blur_sigma)}")
    if o.mask_mode == "block":
        units, masked, what = num_patches, int(round(o.mask_ratio * num_patches)), "patches"
    else:
        if grid[0] % o.mask_cell or grid[1] % o.mask_cell:
            raise ConfigError(f"conmim.mask_cell {o.mask_cell} does not divide the {grid[0]}x{grid[1]} patch grid")
        units = (grid[0] // o.mask_cell) * (grid[1] // o.mask_cell)
        masked, what = math.ceil(o.mask_ratio * units), "mask cells"  # as coarse_random_masking
    if o.mask_ratio <= 0.0 or masked < 1:
        raise ConfigError(f"conmim.mask_ratio {o.mask_ratio:g} masks no patch of {units} {what}")
    if o.mask_ratio >= 1.0 or masked >= units:
        raise ConfigError(f"conmim.mask_ratio {o.mask_ratio:g} leaves no visible patch of {units} {what}")


class ConMIM(Method):
    """ConMIM: masked patches contrasted against an EMA teacher's patches of the same image."""

    name = "conmim"

    def __init__(self, cfg: Config):
        super().__init__()
        o = cfg.conmim
        self.cfg = o
        # one [0, 1] view: the teacher's strong perturbation is made from it on the device, then both are normalised
        self.views = (View("image", cfg.data.image_size, normalize="unit"),)
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1), persistent=False)
        # vit_*: fixed sin-cos absolute positions, as MAE; beit_*: the reference's encoder (shared relative
        # position bias, no absolute position, LayerScale via model.*)
        vit = V.create_encoder(cfg.model, cfg.data.image_size, allow_beit=True)
        self.grid = V.grid_size(vit)
        self.num_patches = self.grid[0] * self.grid[1]
        check_config(o, self.num_patches, self.grid)
        self.student = nn.ModuleDict({"vit": vit, "proj": projector(vit.embed_dim, o.proj_hidden, o.proj_dim)})
        self.mask_token = V.new_mask_token(vit.embed_dim)
        self.teacher = make_teacher(self.student)  # same names, so the EMA matches parameters by name
        self.augment = ColorAugment(o.jitter, o.jitter_p, o.grayscale_p, o.blur_p, o.blur_sigma, o.solarize_p)
        self.bank_seed = cfg.train.seed
        self.register_buffer("mask_bank", None, persistent=False)  # built on first use (conmim.mask_bank > 0)

    @property
    def encoder(self) -> nn.Module:
        """The timm ViT (or Beit) that is evaluated and exported: the EMA teacher's (default) or the student's."""
        return self.teacher["vit"] if self.cfg.export_encoder == "teacher" else self.student["vit"]

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device) -> torch.Tensor:
        """-> (B, N) bool, True = masked (BEiT blocks or coarse random cells)."""
        o = self.cfg
        if o.mask_mode == "coarse":
            return coarse_random_masking(batch_size, self.grid, o.mask_ratio, o.mask_cell, device)
        if o.mask_bank > 0:
            if self.mask_bank is None:
                self.mask_bank = self.build_mask_bank()
            self.mask_bank = self.mask_bank.to(device)  # no-op once there
            return self.mask_bank[torch.randint(0, self.mask_bank.shape[0], (batch_size,), device=device)]
        return blockwise_masking(batch_size, self.grid, o.mask_ratio, o.mask_min_patches, device=device)

    def build_mask_bank(self) -> torch.Tensor:
        """(8 * conmim.mask_bank, N) bool: BEiT block masks and their flips and transposes (4 on a non-square
        grid), to which BEiT's distribution is symmetric; from a generator seeded by train.seed alone, so a resumed
        run rebuilds the same bank. Drawing from it is one gather on the device, where generating B masks per step
        is a Python loop on the host (docs/benchmarks.md)."""
        o, (gh, gw) = self.cfg, self.grid
        rng = np.random.default_rng([self.bank_seed, 0xC0])
        m = blockwise_masking(o.mask_bank, self.grid, o.mask_ratio, o.mask_min_patches, generator=rng).view(-1, gh, gw)
        variants = [m, m.flip(1), m.flip(2), m.flip(1).flip(2)]
        if gh == gw:
            variants += [v.transpose(1, 2) for v in variants]
        return torch.cat(variants).reshape(-1, gh * gw)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> mean/std-normalised (data.mean / data.std)."""
        return (x - self.mean) / self.std

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the teacher's strongly perturbed copy, same crop (batched, no gradient)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.augment(x)

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
        return self.project(self.teacher["proj"], self.teacher["vit"].forward_features(imgs), self.cfg.center_teacher)

    def logits(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s (B, N, d), t (B, N, d) -> (B, N, N): logits[b, i, j] = s_bi . t_bj / temperature."""
        return torch.einsum("bid,bjd->bij", s, t) / self.cfg.temperature

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
        x = batch["image"]  # (B, 3, H, W) in [0, 1]
        if mask is None:
            mask = self.mask(x.shape[0], x.device)
        strong = self.perturb(x)
        t = self.encode_teacher(self.normalize(strong))
        s = self.encode_student(self.normalize(x), mask)
        loss, acc = self.loss(s, t, mask)
        metrics = {"loss": loss.detach(), "pos_acc": acc.detach(), "mask_frac": mask.float().mean().detach()}
        return loss, metrics

    def after_step(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.cfg.momentum, self.cfg.momentum_final)
        ema_update(self.teacher, self.student, m)

    def no_weight_decay(self) -> set[str]:
        names = {"mask_token", "student.vit.cls_token", "student.vit.pos_embed"}
        return names | {n for n, _ in self.student.named_parameters(prefix="student") if "relative_position" in n}

    def export(self, out_dir, cfg):
        from ..export import export_encoder

        meta = {"method": cfg.method, "encoder": cfg.conmim.export_encoder}
        size, mean, std = cfg.data.image_size, cfg.data.mean, cfg.data.std
        return export_encoder(self.encoder, out_dir, image_size=size, mean=mean, std=std, mimkit_meta=meta)

    @torch.no_grad()
    def similarity_maps(self, x: torch.Tensor, num_queries: int = 3):
        """x (B, 3, H, W) in [0, 1] -> mask (B, N), queries (B, Q) masked positions, maps (B, Q, N): softmax over
        the teacher's patches of the student's masked-patch feature (the teacher sees the unperturbed image)."""
        mask = self.mask(x.shape[0], x.device)
        s = self.encode_student(self.normalize(x), mask)
        t = self.encode_teacher(self.normalize(x))
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
        x = batch["image"].float()
        b, _, h, w = x.shape
        mask, queries, maps = self.similarity_maps(x, num_queries)
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
        return self.normalize(torch.cat(panels, dim=3).clamp(0, 1))  # the caller un-normalises

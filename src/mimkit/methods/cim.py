"""CIM (Fang et al., ICLR 2023): a small BEiT generator and a frozen tokenizer corrupt the image; an enhancer
(any timm ViT or CNN) restores all pixels (ResPix) or detects which visual tokens were replaced (RevDet).

One step: tokenize the image (frozen) -> mask ~50% of the tokens -> the generator predicts them (its own BEiT
cross-entropy) -> sample replacements from its softmax -> decode the *whole* token map with the tokenizer
(so kept and replaced regions share the decoder's artefacts) -> the enhancer sees only that image. The corrupted
image is built without gradient: the enhancer's loss never reaches the generator.

The two variants differ only in what the enhancer predicts: an objective (`ResPix`, `RevDet`) supplies the head,
targets, loss, logged metrics, held-out baselines and picture; `CIMResPix` / `CIMRevDet` plug one into the shared
steps (tokenize, mask, generate, sample, corrupt by decoding, enhance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt
from ..data.pipeline import ViewDataset, collate, prepare_batch
from ..masking import random_masking
from ..models import vit as V
from ..models.cim_heads import PixelShuffleHead, TokenLogitHead, generator_model
from ..targets import normalize_patches, patchify, sliding_window_targets, unpatchify, window_stats
from .base import Method, SharedSettings
from .beit import BEiT, BEiTOptions, check_mask_ratio, require_tokenizer

__all__ = ["CIMOptions", "CIMResPix", "CIMRevDet", "ResPix", "RevDet", "sliding_window_targets", "window_stats"]


@dataclass
class CIMOptions:
    """CIM's generator, corruption and enhancer (cim-respix / cim-revdet). Values the paper does not give are
    marked UNVERIFIED: see docs/methods.md."""

    # a constant loss weight does nothing under Adam (see docs/methods.md, CIM): the balance is a learning rate now
    renamed: ClassVar[dict] = {"enhancer_weight": "cim.generator_lr_scale (a loss weight had no effect under Adam)"}
    mask_ratio: float = 0.5  # share of tokens the generator must fill (paper ablation: ~50%)
    mask_mode: Literal["random", "block"] = "random"  # random | BEiT's blockwise masks
    # beit: a timm Beit with shared relative position bias and LayerScale (the paper's "small BEiT");
    # vit: a plain ViT with fixed sin-cos positions and no LayerScale (mimkit's generator before)
    generator: Literal["beit", "vit"] = "beit"
    generator_depth: PositiveInt = 4  # a *small* BEiT: paper ablation favours 4-6 layers
    generator_dim: PositiveInt = 192  # UNVERIFIED width; keep it well below the enhancer's
    generator_heads: PositiveInt = 3
    # pixels per visual token; default: the ViT enhancer's patch (the paper: one token per patch) / model.patch_size.
    # For a ViT, a divisor of its patch gives each patch token (patch / generator_patch)^2 visual tokens: a finer
    # corruption and as many more RevDet labels per image (UNVERIFIED; for small images, docs/methods.md)
    generator_patch: PositiveInt | None = None
    generator_layer_scale: NonNegFloat = 0.1  # the beit generator's LayerScale init (BEiT's ViT-B value); 0 = off
    # the generator's lr relative to the run's (the enhancer's); 1 = one lr for both (joint training; UNVERIFIED)
    generator_lr_scale: PositiveFloat = 1.0
    sample: Literal["softmax", "argmax"] = "softmax"  # softmax (paper) | argmax (ablation)
    temperature: PositiveFloat = 1.0  # UNVERIFIED
    target_norm: Literal["window", "patch", "none"] = "window"  # ResPix targets: window (paper) | patch (MAE) | none
    window: PositiveInt = 9  # UNVERIFIED sliding-window size (odd)
    # a vit_*/deit_* enhancer is MAE's sin-cos ViT: mae = MAE's initialisation too | timm = timm's (mimkit's before);
    # UNVERIFIED (the paper does not say). beit_* and CNN enhancers keep their timm initialisation
    enhancer_init: Literal["mae", "timm"] = "mae"
    cnn_output_stride: Literal[8, 16, 32] = 32  # CNN enhancers (dilation keeps small images' maps large enough)
    vocab_size: NonNegInt = 0  # 0 = the tokenizer's codebook size; otherwise must equal it
    eval_images: NonNegInt = 256  # held-out images for the epoch-end check against trivial baselines


class ResPix:
    """CIM-ResPix: the enhancer restores every pixel of the original image (not only the replaced ones). Targets:
    each pixel standardised by its `cim.window` neighbourhood (the paper's sliding-window normalisation), by its
    patch (MAE's norm_pix) or raw; MSE over all pixels and channels. Pixels are predicted per enhancer patch
    (`patch`, `grid`), whatever the visual tokens' size."""

    name = "respix"

    def __init__(self, o: CIMOptions, patch: int, grid: tuple[int, int], tokens_per_side: int):
        self.norm, self.window, self.patch, self.grid = o.target_norm, o.window, patch, grid

    def vit_head(self, dim: int) -> nn.Module:
        return nn.Linear(dim, self.patch**2 * 3)  # p*p*3 pixels per patch token

    def cnn_map_fits(self, side: int) -> bool:
        return True  # any map whose stride tiles the image: PixelShuffle brings it back to full size

    def cnn_head(self, channels: int, stride: int) -> nn.Module:
        return PixelShuffleHead(channels, stride)

    def from_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*3) -> (B, 3, H, W)."""
        return unpatchify(out, self.patch, self.grid)

    def targets(self, imgs: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 3, H, W) targets (`replaced` is not needed: every pixel counts)."""
        if self.norm == "window":
            return sliding_window_targets(imgs, self.window)
        if self.norm == "patch":
            return unpatchify(normalize_patches(patchify(imgs.float(), self.patch)), self.patch, self.grid)
        return imgs.float()

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.float(), target)

    def metrics(self, out: torch.Tensor, target: torch.Tensor) -> dict:
        return {}

    def baselines(self, out: torch.Tensor, target: torch.Tensor) -> dict:
        """MSE against predicting 0 in target space (each pixel's window mean, for window targets)."""
        return {"respix_mse": F.mse_loss(out, target).item(), "window_mean_mse": target.pow(2).mean().item()}

    def picture(self, out: torch.Tensor, imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The reconstruction in the images' normalised space: window targets are de-normalised with the original
        image's window statistics; other targets are shown as predicted."""
        if self.norm != "window":
            return out
        win_mean, win_var = window_stats(imgs, self.window)
        return out * (win_var + 1e-6) ** 0.5 + win_mean


class RevDet:
    """CIM-RevDet: for every visual token, was it replaced? The label is "id changed" (ELECTRA's convention: a
    masked token resampled to its original id is original), BCE over all token positions. A ViT patch token
    answers for the r x r visual tokens inside its patch (r = `tokens_per_side`, 1 in the paper)."""

    name = "revdet"

    def __init__(self, o: CIMOptions, patch: int, grid: tuple[int, int], tokens_per_side: int):
        self.r = tokens_per_side
        self.grid = (grid[0] * self.r, grid[1] * self.r)  # the visual tokens' grid

    def vit_head(self, dim: int) -> nn.Module:
        return nn.Linear(dim, self.r**2)  # one logit per visual token in the patch

    def cnn_map_fits(self, side: int) -> bool:
        return side <= self.grid[0]  # one logit per token: a finer map than the token grid has no token to match

    def cnn_head(self, channels: int, stride: int) -> nn.Module:
        return TokenLogitHead(channels, self.grid)

    def from_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """(B, h*w, r*r) patch tokens' logits -> (B, N) in the visual tokens' raster order (N = h*r * w*r)."""
        (h, w), r = self.grid, self.r
        out = out.view(-1, h // r, w // r, r, r).permute(0, 1, 3, 2, 4)  # (B, rows, r, cols, r)
        return out.reshape(-1, h * w)

    def targets(self, imgs: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        return replaced.float()

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out.float(), target)

    def metrics(self, out: torch.Tensor, target: torch.Tensor) -> dict:
        return {"revdet_acc": ((out > 0) == target.bool()).float().mean()}

    def baselines(self, out: torch.Tensor, target: torch.Tensor) -> dict:
        """Accuracy against predicting "original" everywhere."""
        return {"revdet_acc": ((out > 0) == target.bool()).float().mean().item(),
                "all_original_acc": 1.0 - target.mean().item()}  # fmt: skip

    def picture(self, out: torch.Tensor, imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The replaced-probability map per token, white = "replaced" once the caller un-normalises."""
        prob = torch.sigmoid(out).view(-1, 1, *self.grid)
        prob = F.interpolate(prob, size=imgs.shape[-2:], mode="nearest").expand(-1, 3, -1, -1)
        return (prob - mean) / std


class CIM(Method):
    """CIM: a BEiT generator corrupts, an enhancer restores pixels (ResPix) or spots replaced tokens (RevDet)."""

    name = "cim"
    section = "cim"  # both variants read the `cim` section
    Options = CIMOptions
    needs_tokenizer = True
    Objective: ClassVar[type]  # ResPix | RevDet, set by the registered variants below

    def __init__(self, options: CIMOptions, shared: SharedSettings):
        super().__init__()
        o = options
        self.options, self._mean, self._std = o, shared.mean, shared.std
        # made once on the module's device (non-persistent: not in the state dict); used every step
        self.register_buffer("pixel_mean", torch.tensor(shared.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(shared.std).view(1, 3, 1, 1), persistent=False)
        if o.window % 2 == 0:
            raise ConfigError(f"cim.window must be a positive odd number, got {o.window}")
        size = shared.image_size
        self.enhancer, self.is_vit = self.build_enhancer(shared)
        enhancer_patch = V.patch_size(self.enhancer) if self.is_vit else None
        self.patch = o.generator_patch or enhancer_patch or shared.model.patch_size
        if self.patch is None:
            raise ConfigError(
                f"a CNN enhancer ({shared.model.name}) has no patch: set cim.generator_patch (pixels/token)"
            )
        if self.is_vit and enhancer_patch % self.patch:
            raise ConfigError(f"cim.generator_patch {self.patch} does not divide the ViT enhancer's patch "
                              f"{enhancer_patch} (each patch token answers for whole visual tokens)")  # fmt: skip
        if size % self.patch:
            raise ConfigError(f"data.image_size {size} is not divisible by cim.generator_patch {self.patch}")
        check_mask_ratio("cim.mask_ratio", o.mask_ratio, (size // self.patch) ** 2)
        # the generator: a small BEiT over the same tokenizer (its cross-entropy is the generator loss)
        tokenizer = require_tokenizer(shared.tokenizer, "cim")
        if tokenizer.vocab_size != o.vocab_size and o.vocab_size:
            raise ConfigError(f"cim.vocab_size {o.vocab_size} != the tokenizer's codebook size {tokenizer.vocab_size}")
        gen_options = BEiTOptions(mask_ratio=o.mask_ratio)  # BEiT's block shapes when cim.mask_mode=block
        # BEiT reads its encoder from `shared.model`: the generator's settings in its place, the rest shared
        gen_shared = dataclasses.replace(shared, model=generator_model(shared.model, o, self.patch))
        self.generator = BEiT(gen_options, gen_shared, tokenizer=tokenizer)
        self.grid = V.grid_size(self.generator.encoder)
        self.num_patches = self.grid[0] * self.grid[1]
        self.views = self.generator.views  # the image and the same crop at the tokenizer's input size
        r = enhancer_patch // self.patch if self.is_vit else 1  # visual tokens per side of a ViT patch
        self.objective = self.Objective(o, self.patch * r, (self.grid[0] // r, self.grid[1] // r), r)
        self.head = self.build_head(shared, size)

    # ---- construction ------------------------------------------------------------------------------------
    def build_enhancer(self, shared: SharedSettings) -> tuple[nn.Module, bool]:
        name = shared.model.name
        if name.startswith(("vit_", "deit_", "beit_")):
            vit = V.create_encoder(shared.model, shared.image_size, allow_beit=True)
            if self.options.enhancer_init == "mae" and not name.startswith("beit_"):
                V.init_mae_encoder(vit)
            return vit, True
        if not timm.is_model(name):
            raise ConfigError(f"model.name '{name}' is not a timm model")
        kwargs = {"num_classes": 0, "drop_path_rate": shared.model.drop_path}
        if self.options.cnn_output_stride != 32:
            kwargs["output_stride"] = self.options.cnn_output_stride
        try:
            cnn = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            raise ConfigError(f"model.name '{name}' does not accept cim.cnn_output_stride: {e}") from None
        return cnn, False

    def build_head(self, shared: SharedSettings, size: int) -> nn.Module:
        if self.is_vit:
            return self.objective.vit_head(self.enhancer.embed_dim)
        with torch.no_grad():
            fmap = self.enhancer.forward_features(torch.zeros(1, 3, size, size))
        side = fmap.shape[-1]
        if size % side or not self.objective.cnn_map_fits(side):
            raise ConfigError(
                f"model.name '{shared.model.name}' gives a {fmap.shape[-2]}x{side} feature map at {size} px, "
                f"which does not fit the {self.grid[0]}x{self.grid[1]} token grid (set cim.cnn_output_stride 8|16|32)"
            )
        return self.objective.cnn_head(fmap.shape[1], size // side)

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device) -> torch.Tensor:
        """-> (B, N) bool, 1 = masked: random (default, CIM's ablation winner) or BEiT's blockwise."""
        if self.options.mask_mode == "block":
            return self.generator.mask(batch_size, device)
        _, mask, _ = random_masking(batch_size, self.num_patches, self.options.mask_ratio, device)
        return mask.bool()

    def generate(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, N) -> (M, V) the generator's logits at the M masked positions."""
        return self.generator.predict(self.generator.encode(imgs, mask), mask)

    @torch.no_grad()
    def corrupt(self, ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids (B, N), mask (B, N), generator logits (M, V) -> corrupted ids (B, N), replaced (B, N) bool,
        and the corrupted image (B, 3, H, W) in the enhancer's normalised space. Sampled, so no gradient."""
        if self.options.sample == "softmax":
            probs = torch.softmax(logits.float() / self.options.temperature, dim=-1)
            sampled = torch.multinomial(probs, 1).squeeze(1)
        else:
            sampled = logits.argmax(-1)
        corrupted = ids.clone()
        corrupted[mask] = sampled
        replaced = corrupted != ids  # a sample equal to the original id counts as original (ELECTRA)
        pixels = self.generator.tokenizer.decode(corrupted.view(-1, *self.grid)).float()
        return corrupted, replaced, self.to_encoder_space(pixels)

    def to_encoder_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels at the tokenizer's resolution -> the enhancer's input size, mean/std normalised."""
        size = self.grid[0] * self.patch
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (pixels - self.pixel_mean) / self.pixel_std

    def enhance(self, corrupted_imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the objective's prediction: RevDet logits (B, N) or ResPix pixels (B, 3, H, W)."""
        feats = self.enhancer.forward_features(corrupted_imgs)
        if not self.is_vit:
            return self.head(feats)
        return self.objective.from_tokens(self.head(feats[:, self.enhancer.num_prefix_tokens :]))

    def enhancer_loss(self, out: torch.Tensor, imgs: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        """The objective's loss on the enhancer's output `out` for the original images and the replaced map."""
        return self.objective.loss(out, self.objective.targets(imgs, replaced))

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        imgs = batch["image"]
        ids = self.generator.targets(batch["tokens"])
        mask = self.mask(imgs.shape[0], imgs.device)
        gen_logits = self.generate(imgs, mask)
        masked_ids = ids[mask]  # once: boolean indexing waits on the device
        gen_loss = self.generator.loss(gen_logits, masked_ids)
        _, replaced, corrupted_imgs = self.corrupt(ids, mask, gen_logits.detach())
        out = self.enhance(corrupted_imgs)
        target = self.objective.targets(imgs, replaced)
        enh_loss = self.objective.loss(out, target)
        loss = gen_loss + enh_loss  # no loss weight: the two share no parameter (see generator_lr_scale)
        metrics = {
            "loss": loss.detach(),
            "gen_loss": gen_loss.detach(),
            "enh_loss": enh_loss.detach(),
            "gen_acc": (gen_logits.detach().argmax(-1) == masked_ids).float().mean(),
            "replaced_frac": replaced.float().mean(),
        }
        return loss, metrics | self.objective.metrics(out.detach(), target)

    @property
    def encoder(self) -> nn.Module:
        return self.enhancer

    def no_weight_decay(self) -> set[str]:
        """The generator's are BEiT's rule; the enhancer's tokens, position tables and relative position bias."""
        names = {f"generator.{n}" for n in self.generator.no_weight_decay()}
        for n, _ in self.enhancer.named_parameters():
            if n.endswith(("cls_token", "pos_embed")) or "relative_position_bias_table" in n:
                names.add(f"enhancer.{n}")
        return names

    def lr_scale(self, name: str) -> float:
        """`cim.generator_lr_scale` for the generator's parameters, 1 for the enhancer and its head."""
        return self.options.generator_lr_scale if name.startswith("generator.") else 1.0

    @torch.no_grad()
    def infer(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """One pass without training: -> mask (B, N), replaced (B, N), corrupted image, enhancer output (float)."""
        imgs = batch["image"]
        ids = self.generator.targets(batch["tokens"])
        mask = self.mask(imgs.shape[0], imgs.device)
        _, replaced, corrupted_imgs = self.corrupt(ids, mask, self.generate(imgs, mask))
        return mask, replaced, corrupted_imgs, self.enhance(corrupted_imgs).float()

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """Enhancer quality against the objective's trivial baseline on one batch (see ResPix/RevDet.baselines)."""
        _, replaced, _, out = self.infer(batch)
        return self.objective.baselines(out, self.objective.targets(batch["image"], replaced))

    @torch.no_grad()
    def on_epoch_end(self, ctx) -> dict:
        """Held-out check against the trivial baselines (query split, else the first training images)."""
        source = ctx.splits.query if ctx.splits.query is not None else ctx.splits.train
        n = min(self.options.eval_images, len(source))
        ds = ViewDataset(source, self.views, ctx.cfg.data, seed=0, train=False)
        batch = prepare_batch(collate([ds[i] for i in range(n)]), self.views, ctx.device, self._mean, self._std)
        was_training = self.training
        self.eval()
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(0)  # the same masks and samples every epoch, and the training RNG is untouched
            res = self.evaluate(batch)
        self.train(was_training)
        return {f"heldout_{k}": v for k, v in res.items()}

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of original | masked | corrupted | enhancer output: ResPix's reconstruction or RevDet's probability
        that each token was replaced, white = replaced (the objective's `picture`)."""
        imgs = batch["image"]
        mask, replaced, corrupted_imgs, out = self.infer(batch)
        cells = F.interpolate(mask.view(-1, 1, *self.grid).float(), size=imgs.shape[-2:], mode="nearest")
        panel = self.objective.picture(out, imgs, self.pixel_mean, self.pixel_std)
        return torch.cat([imgs, imgs * (1 - cells), corrupted_imgs, panel], dim=3)


class CIMResPix(CIM):
    """CIM-ResPix: the enhancer restores every original pixel (sliding-window normalised targets)."""

    name = "cim-respix"
    Objective = ResPix


class CIMRevDet(CIM):
    """CIM-RevDet: the enhancer predicts, for every visual token, whether the generator replaced it."""

    name = "cim-revdet"
    Objective = RevDet

"""CIM (Fang et al., ICLR 2023): a small BEiT generator and a frozen tokenizer corrupt the image; an enhancer
(any timm ViT or CNN) restores all pixels (ResPix) or detects which visual tokens were replaced (RevDet).

One step: tokenize the image (frozen) -> mask ~50% of the tokens -> the generator predicts them (its own BEiT
cross-entropy) -> sample replacements from its softmax -> decode the *whole* token map with the tokenizer
(so kept and replaced regions share the decoder's artefacts) -> the enhancer sees only that image. The corrupted
image is built without gradient: the enhancer's loss never reaches the generator.
"""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data.pipeline import ViewDataset, collate, prepare_batch
from ..masking import random_masking
from ..models import vit as V
from ..targets import normalize_patches, patchify, unpatchify
from .base import Method
from .beit import BEiT, check_mask_ratio, require_tokenizer


def sliding_window_targets(imgs: torch.Tensor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): each pixel standardised by the mean and (biased) variance of the
    `window` x `window` neighbourhood centred on it, per channel; borders use the pixels inside the image."""
    mean, var = window_stats(imgs, window)
    return (imgs - mean) / (var + eps).sqrt()


def window_stats(imgs: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and biased variance over a centred window (stride 1, zero padding not counted)."""
    pad = window // 2
    x = imgs.float()
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    return mean, (sq - mean * mean).clamp_min(0)


class CNNHead(nn.Module):
    """From a CNN feature map (B, C, h, w) to the token grid (RevDet logits) or to pixels (ResPix)."""

    def __init__(self, channels: int, stride: int, grid: tuple[int, int], out: str):
        super().__init__()
        self.grid, self.out, self.stride = grid, out, stride
        if out == "revdet":
            self.proj = nn.Conv2d(channels, 1, kernel_size=1)
        else:  # SimMIM's light decoder: a 1x1 conv to stride^2 * 3 channels, then PixelShuffle
            self.proj = nn.Sequential(nn.Conv2d(channels, stride**2 * 3, kernel_size=1), nn.PixelShuffle(stride))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.out == "revdet":
            if tuple(fmap.shape[-2:]) != self.grid:  # e.g. stride 32 maps (7x7) up to a 14x14 token grid
                fmap = F.interpolate(fmap, size=self.grid, mode="bilinear", align_corners=False)
            return self.proj(fmap).flatten(1)  # (B, N)
        return self.proj(fmap)  # (B, 3, H, W)


class CIM(Method):
    """CIM: a BEiT generator corrupts, an enhancer restores pixels (ResPix) or spots replaced tokens (RevDet)."""

    name = "cim"
    objective = ""  # set by the registered variants below

    def __init__(self, cfg: Config):
        super().__init__()
        o = cfg.cim
        self.cfg, self._mean, self._std = o, cfg.data.mean, cfg.data.std
        # made once on the module's device (non-persistent: not in the state dict); used every step
        self.register_buffer("pixel_mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.data.std).view(1, 3, 1, 1), persistent=False)
        if o.sample not in ("softmax", "argmax"):
            raise ConfigError(f"cim.sample must be softmax or argmax, got '{o.sample}'")
        if o.temperature <= 0:
            raise ConfigError(f"cim.temperature must be > 0, got {o.temperature}")
        if o.target_norm not in ("window", "patch", "none"):
            raise ConfigError(f"cim.target_norm must be window, patch or none, got '{o.target_norm}'")
        if o.window < 1 or o.window % 2 == 0:
            raise ConfigError(f"cim.window must be a positive odd number, got {o.window}")
        size = cfg.data.image_size
        self.enhancer, self.is_vit = self.build_enhancer(cfg)
        self.patch = o.generator_patch or (V.patch_size(self.enhancer) if self.is_vit else cfg.model.patch_size)
        if self.is_vit and self.patch != V.patch_size(self.enhancer):
            raise ConfigError(f"cim.generator_patch {self.patch} differs from the ViT enhancer's patch")
        # the generator: a small BEiT over the same tokenizer (its cross-entropy is the generator loss)
        tokenizer = require_tokenizer(cfg, "cim")
        if tokenizer.vocab_size != o.vocab_size and o.vocab_size:
            raise ConfigError(f"cim.vocab_size {o.vocab_size} != the tokenizer's codebook size {tokenizer.vocab_size}")
        gen_cfg = copy.deepcopy(cfg)
        gen_cfg.model.name, gen_cfg.model.patch_size = "vit_small_patch16_224", self.patch
        gen_cfg.model.embed_dim, gen_cfg.model.depth, gen_cfg.model.num_heads = (
            o.generator_dim, o.generator_depth, o.generator_heads,
        )  # fmt: skip
        gen_cfg.model.drop_path, gen_cfg.model.layer_scale = 0.0, None
        gen_cfg.beit.mask_ratio = o.mask_ratio
        self.generator = BEiT(gen_cfg, tokenizer=tokenizer)
        self.grid = V.grid_size(self.generator.encoder)
        self.num_patches = self.grid[0] * self.grid[1]
        check_mask_ratio("cim.mask_ratio", o.mask_ratio, self.num_patches)
        self.views = self.generator.views  # the image and the same crop at the tokenizer's input size
        self.head = self.build_head(cfg, size)

    # ---- construction ------------------------------------------------------------------------------------
    def build_enhancer(self, cfg: Config) -> tuple[nn.Module, bool]:
        name = cfg.model.name
        if name.startswith(("vit_", "deit_", "beit_")):
            return V.create_encoder(cfg.model, cfg.data.image_size, allow_beit=True), True
        if not timm.is_model(name):
            raise ConfigError(f"model.name '{name}' is not a timm model")
        kwargs = {"num_classes": 0, "drop_path_rate": cfg.model.drop_path}
        if self.cfg.cnn_output_stride != 32:
            kwargs["output_stride"] = self.cfg.cnn_output_stride
        try:
            cnn = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            raise ConfigError(f"model.name '{name}' does not accept cim.cnn_output_stride: {e}") from None
        return cnn, False

    def build_head(self, cfg: Config, size: int) -> nn.Module:
        if self.is_vit:
            out = 1 if self.objective == "revdet" else self.patch**2 * 3
            return nn.Linear(self.enhancer.embed_dim, out)
        with torch.no_grad():
            fmap = self.enhancer.forward_features(torch.zeros(1, 3, size, size))
        stride = size // fmap.shape[-1]
        if size % fmap.shape[-1] or (self.objective == "revdet" and fmap.shape[-1] > self.grid[0]):
            raise ConfigError(
                f"model.name '{cfg.model.name}' gives a {fmap.shape[-2]}x{fmap.shape[-1]} feature map at {size} px, "
                f"which does not fit the {self.grid[0]}x{self.grid[1]} token grid (set cim.cnn_output_stride 8|16|32)"
            )
        return CNNHead(fmap.shape[1], stride, self.grid, self.objective)

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device) -> torch.Tensor:
        """-> (B, N) bool, 1 = masked: random (default, CIM's ablation winner) or BEiT's blockwise."""
        if self.cfg.mask_mode == "block":
            return self.generator.mask(batch_size, device)
        _, mask, _ = random_masking(batch_size, self.num_patches, self.cfg.mask_ratio, device)
        return mask.bool()

    @torch.no_grad()
    def corrupt(self, ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids (B, N), mask (B, N), generator logits (M, V) -> corrupted ids (B, N), replaced (B, N) bool,
        and the corrupted image (B, 3, H, W) in the enhancer's normalised space. Sampled, so no gradient."""
        if self.cfg.sample == "softmax":
            probs = torch.softmax(logits.float() / self.cfg.temperature, dim=-1)
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
        """(B, 3, H, W) -> RevDet logits (B, N) or ResPix predictions (B, 3, H, W)."""
        feats = self.enhancer.forward_features(corrupted_imgs)
        if not self.is_vit:
            return self.head(feats)
        out = self.head(feats[:, self.enhancer.num_prefix_tokens :])
        if self.objective == "revdet":
            return out.squeeze(-1)
        return unpatchify(out, self.patch, self.grid)

    def pixel_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> targets: sliding-window (default), per-patch normalised, or raw normalised pixels."""
        if self.cfg.target_norm == "window":
            return sliding_window_targets(imgs, self.cfg.window)
        if self.cfg.target_norm == "patch":
            return unpatchify(normalize_patches(patchify(imgs.float(), self.patch)), self.patch, self.grid)
        return imgs.float()

    def enhancer_loss(self, out: torch.Tensor, imgs: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        """RevDet: BCE over all token positions; ResPix: MSE over all pixels and channels."""
        if self.objective == "revdet":
            return F.binary_cross_entropy_with_logits(out.float(), replaced.float())
        return F.mse_loss(out.float(), self.pixel_targets(imgs))

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        imgs = batch["image"]
        ids = self.generator.targets(batch["tokens"])
        mask = self.mask(imgs.shape[0], imgs.device)
        gen_logits = self.generator.predict(self.generator.encode(imgs, mask), mask)
        masked_ids = ids[mask]  # once: boolean indexing waits on the device
        gen_loss = self.generator.loss(gen_logits, masked_ids)
        _, replaced, corrupted_imgs = self.corrupt(ids, mask, gen_logits.detach())
        out = self.enhance(corrupted_imgs)
        enh_loss = self.enhancer_loss(out, imgs, replaced)
        loss = gen_loss + self.cfg.enhancer_weight * enh_loss
        metrics = {
            "loss": loss.detach(),
            "gen_loss": gen_loss.detach(),
            "enh_loss": enh_loss.detach(),
            "gen_acc": (gen_logits.detach().argmax(-1) == masked_ids).float().mean(),
            "replaced_frac": replaced.float().mean(),
        }
        if self.objective == "revdet":
            metrics["revdet_acc"] = ((out.detach() > 0) == replaced).float().mean()
        return loss, metrics

    @property
    def encoder(self) -> nn.Module:
        return self.enhancer

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith(("cls_token", "pos_embed", "mask_token"))}
        return names | {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.no_grad()
    def infer(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """One pass without training: -> mask (B, N), replaced (B, N), corrupted image, enhancer output (float)."""
        imgs = batch["image"]
        ids = self.generator.targets(batch["tokens"])
        mask = self.mask(imgs.shape[0], imgs.device)
        logits = self.generator.predict(self.generator.encode(imgs, mask), mask)
        _, replaced, corrupted_imgs = self.corrupt(ids, mask, logits)
        return mask, replaced, corrupted_imgs, self.enhance(corrupted_imgs).float()

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """Enhancer quality against trivial baselines on one batch: RevDet accuracy vs predicting 'original'
        everywhere, ResPix MSE vs predicting each pixel's window mean (which is 0 in target space)."""
        imgs = batch["image"]
        mask, replaced, corrupted_imgs, out = self.infer(batch)
        if self.objective == "revdet":
            return {"revdet_acc": ((out > 0) == replaced).float().mean().item(),
                    "all_original_acc": 1.0 - replaced.float().mean().item()}  # fmt: skip
        target = self.pixel_targets(imgs)
        return {"respix_mse": F.mse_loss(out, target).item(), "window_mean_mse": target.pow(2).mean().item()}

    @torch.no_grad()
    def on_epoch_end(self, ctx) -> dict:
        """Held-out check against the trivial baselines (query split, else the first training images)."""
        source = ctx.splits.query if ctx.splits.query is not None else ctx.splits.train
        n = min(self.cfg.eval_images, len(source))
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
        """Rows of original | masked | corrupted | enhancer output (ResPix reconstruction, or RevDet's
        replaced-probability map with the true replaced tokens outlined in the corrupted panel's frame)."""
        imgs = batch["image"]
        mask, replaced, corrupted_imgs, out = self.infer(batch)
        size = imgs.shape[-2:]
        cells = F.interpolate(mask.view(-1, 1, *self.grid).float(), size=size, mode="nearest")
        if self.objective == "revdet":
            prob = torch.sigmoid(out).view(-1, 1, *self.grid)
            prob = F.interpolate(prob, size=size, mode="nearest").expand(-1, 3, -1, -1)
            panel = (prob - self.pixel_mean) / self.pixel_std  # white = "replaced" once the caller un-normalises
        else:
            mean, var = window_stats(imgs, self.cfg.window) if self.cfg.target_norm == "window" else (0.0, 1.0)
            panel = out * (var + 1e-6) ** 0.5 + mean if self.cfg.target_norm == "window" else out
        return torch.cat([imgs, imgs * (1 - cells), corrupted_imgs, panel], dim=3)


class CIMResPix(CIM):
    """CIM-ResPix: the enhancer restores every original pixel (sliding-window normalised targets)."""

    name = "cim-respix"
    objective = "respix"


class CIMRevDet(CIM):
    """CIM-RevDet: the enhancer predicts, for every visual token, whether the generator replaced it."""

    name = "cim-revdet"
    objective = "revdet"

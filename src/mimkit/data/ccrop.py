"""ContrastiveCrop's localisation (Peng et al., CVPR 2022): a box per training image from the model's own features.

At the end of epoch e, when `update_due`, the encoder (eval mode, no labels) looks at every training image through
a deterministic transform (the whole image squashed to the training size), its last feature map is reduced over
channels into a heat map, min-max normalised, bilinearly upsampled to the input size, and the box spans the first
to the last row (column) whose maximum exceeds `data.ccrop_threshold`. Boxes are relative (x0, y0, x1, y1) of the
whole image, so they apply to any crop of it. The sampling inside a box is `pipeline.contrastive_crop_box`.

ViTs [UNVERIFIED adaptation; the paper uses a ResNet's last stage]: the feature map is the last block's patch
tokens on the patch grid, *before* the final LayerNorm (after it, every token has zero mean over channels, so a
plain channel sum is flat). `data.ccrop_heat=l1` sums absolute values (what a channel sum of a post-ReLU CNN map
is), `sum` the signed values. Checked on synthetic scenes (tests/test_ccrop.py): a randomly initialised ResNet's
map, and a ViT's whose tokens carry content only, place the box on the object to within the map's resolution; a
ViT with MAE's fixed sin-cos positions does not at initialisation (the position table dominates the tokens), nor
after 300 MAE steps on such scenes (measured once on a CPU), so on such ViTs the boxes are unproven.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from ..config import DataConfig
from .folder import DataError, ImageSource
from .pipeline import ViewDataset, eval_loader, prepare_batch
from .views import View


def update_due(cfg: DataConfig, epochs_done: int, total_epochs: int) -> bool:
    """Re-estimate after epoch `epochs_done` (1-based)? At warm-up's end and every interval after it, never
    after the last epoch (nothing would use the boxes)."""
    return (
        cfg.crop_mode == "ccrop"
        and epochs_done >= cfg.ccrop_warmup_epochs
        and epochs_done % cfg.ccrop_interval == 0
        and epochs_done < total_epochs
    )


def check_boxes(boxes: torch.Tensor, num_images: int, where: str) -> torch.Tensor:
    """Boxes restored from `where` (a checkpoint) must be one per training image."""
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"'{where}' holds no valid ContrastiveCrop boxes (expected an (N, 4) tensor)")
    if boxes.shape[0] != num_images:
        raise DataError(
            f"'{where}' holds ContrastiveCrop boxes for {boxes.shape[0]} images but the training set has "
            f"{num_images}: the boxes come from another dataset (data.path / data.max_images changed?)"
        )
    return boxes


def box_encoder(method: nn.Module) -> nn.Module:
    """The network whose heat maps place the boxes: a method's `ccrop_encoder` (the `Method` contract: the exported
    `encoder` unless the method says otherwise, e.g. ConMIM's online student, as ContrastiveCrop localises with its
    online encoder); the `encoder` of any other module with the method contract (the tokenizer trainer)."""
    chosen = getattr(method, "ccrop_encoder", None)
    return method.encoder if chosen is None else chosen


@torch.no_grad()
def feature_heatmap(encoder: nn.Module, imgs: torch.Tensor, mode: str = "l1") -> torch.Tensor:
    """(B, 3, H, W) -> (B, h, w): the encoder's last feature map (timm `forward_intermediates`, no final norm;
    ViT patch tokens on the patch grid) reduced over channels: sum of |values| ('l1') or of values ('sum')."""
    feats = encoder.forward_intermediates(imgs, indices=1, norm=False, intermediates_only=True)[-1].float()
    return feats.abs().sum(dim=1) if mode == "l1" else feats.sum(dim=1)


def boxes_from_heatmaps(heat: torch.Tensor, size: int, threshold: float) -> torch.Tensor:
    """(B, h, w) heat maps -> (B, 4) relative boxes (x0, y0, x1, y1): min-max normalise, upsample bilinearly to
    size x size, keep rows / columns whose maximum exceeds `threshold`; a flat map gives the whole image."""
    heat = heat.float()
    lo = heat.amin(dim=(1, 2), keepdim=True)
    hi = heat.amax(dim=(1, 2), keepdim=True)
    norm = (heat - lo) / (hi - lo).clamp_min(1e-12)
    up = F.interpolate(norm[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    idx = torch.arange(size, device=up.device)

    def span(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keep (B, size) bool -> first kept index, last kept index + 1 (0, size when none is kept)."""
        first = torch.where(keep, idx, size).amin(dim=1)
        last = torch.where(keep, idx, -1).amax(dim=1) + 1
        none = ~keep.any(dim=1)
        return first.masked_fill(none, 0), last.masked_fill(none, size)

    y0, y1 = span(up.amax(dim=2) > threshold)
    x0, x1 = span(up.amax(dim=1) > threshold)
    return torch.stack([x0, y0, x1, y1], dim=1).float() / size


@torch.no_grad()
def estimate_boxes(
    encoder: nn.Module,
    source: ImageSource,
    cfg: DataConfig,
    device,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, float]:
    """Boxes of the images `rank::world` of `source` (other rows 0, for an all-reduce sum) -> ((N, 4) on the CPU,
    images per second). The encoder runs in eval mode and is restored."""
    view = View("image", cfg.image_size)
    dataset = ViewDataset(source, [view], cfg, seed=0, train=False, eval_crop="full")
    mine = list(range(rank, len(dataset), world))
    loader = eval_loader(Subset(dataset, mine), batch_size, cfg.num_workers)
    was_training = encoder.training
    encoder.eval()
    start = time.perf_counter()
    found = []
    mean, std = torch.tensor(cfg.mean, device=device), torch.tensor(cfg.std, device=device)
    for batch in loader:
        imgs = prepare_batch(batch, [view], device, mean, std)["image"]
        heat = feature_heatmap(encoder, imgs, cfg.ccrop_heat)
        found.append(boxes_from_heatmaps(heat, cfg.image_size, cfg.ccrop_threshold))  # on the device: no sync
    encoder.train(was_training)
    boxes = torch.zeros(len(dataset), 4)
    boxes[mine] = torch.cat(found).cpu()
    return boxes, len(mine) / max(time.perf_counter() - start, 1e-9)


def outline_boxes(imgs: torch.Tensor, boxes: torch.Tensor, color: torch.Tensor, width: int = 1) -> torch.Tensor:
    """imgs (B, C, H, W), relative boxes (B, 4) -> a copy with each box's outline painted in `color` (C,)."""
    out = imgs.clone()
    _, _, h, w = imgs.shape
    c = color.to(imgs).view(-1, 1, 1)
    for img, (x0, y0, x1, y1) in zip(out, boxes.tolist()):
        left, right = min(int(x0 * w), w - 1), max(round(x1 * w), 1)  # pixel columns [left, right)
        top, bottom = min(int(y0 * h), h - 1), max(round(y1 * h), 1)
        img[:, top:bottom, left : left + width] = c
        img[:, top:bottom, max(right - width, 0) : right] = c
        img[:, top : top + width, left:right] = c
        img[:, max(bottom - width, 0) : bottom, left:right] = c
    return out

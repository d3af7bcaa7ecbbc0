"""Frozen features of an encoder (any timm model) over a labeled image source."""

from __future__ import annotations

import torch
from torch import nn

from ..config import DataConfig
from ..data.folder import ImageSource
from ..data.pipeline import ViewDataset, eval_loader, prepare_batch
from ..data.views import View


def pooled_features(encoder: nn.Module, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(B, 3, H, W) -> (B, D). ViTs: class token ('cls') or mean of patch tokens ('avg'); CNNs: average pool."""
    out = encoder.forward_features(images)
    if out.ndim == 4:  # CNN feature map (B, C, h, w)
        return out.mean(dim=(2, 3))
    if pool == "cls":
        return out[:, 0]
    return out[:, getattr(encoder, "num_prefix_tokens", 1) :].mean(dim=1)


@torch.no_grad()
def extract(
    encoder: nn.Module,
    source: ImageSource,
    data: DataConfig,
    image_size: int,
    device,
    pool: str = "avg",
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> features (N, D) float32 on CPU, labels (N,) long. The encoder is put in eval mode and restored."""
    view = View("image", image_size)
    loader = eval_loader(ViewDataset(source, [view], data, seed=0, train=False), batch_size, data.num_workers)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        b = prepare_batch(batch, [view], device, data.mean, data.std)
        feats.append(pooled_features(encoder, b["image"], pool).float().cpu())
        labels.append(batch["label"])
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)

"""Labeled images through timm's fine-tuning transforms (RandomResizedCrop, flip, RandAugment, random erasing).

Fine-tuning draws its augmentation per image on the CPU, like every published recipe; the pre-training data path
(`pipeline.py`) is the one built for speed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from .folder import ImageSource
from .pipeline import load_first_readable


class ClassificationDataset(Dataset):
    """(image tensor, label, bad) per index. An unreadable file is replaced by the next readable one and its
    index returned in `bad` (the caller counts them, as the pre-training loop does)."""

    def __init__(self, source: ImageSource, transform):
        if not source.labeled:
            raise ConfigError(f"'{source.name}' has no labels (class sub-folders): fine-tuning needs them")
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        img, used, bad = load_first_readable(self.source.load, index, len(self.source), self.source.name)
        return self.transform(img), self.source.labels[used], bad


def collate_labeled(items) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    images, labels, bad = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), [i for b in bad for i in b]


def finetune_transforms(cfg, image_size: int, mean, std) -> tuple:
    """(train, eval) transforms of the fine-tuning recipe `cfg` (a FinetuneConfig), from timm.
    Eval: resize to `image_size` and centre crop (crop_pct 1: small images have no border to spare)."""
    from timm.data import create_transform

    train = create_transform(
        input_size=image_size,
        is_training=True,
        scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip,
        auto_augment=cfg.randaug or None,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )
    evaluate = create_transform(
        input_size=image_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=1.0,
        mean=tuple(mean),
        std=tuple(std),
    )
    return train, evaluate

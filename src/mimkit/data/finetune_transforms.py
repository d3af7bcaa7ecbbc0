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


def finetune_transforms(cfg, image_size: int, mean, std, hflip: float = 0.5) -> tuple:
    """(train, eval) transforms of the fine-tuning recipe `cfg` (a FinetuneConfig), from timm; `hflip`: the flip
    probability (data.hflip).
    Eval: resize to `image_size` and centre crop (crop_pct 1: small images have no border to spare)."""
    from timm.data import create_transform

    train = create_transform(
        input_size=image_size,
        is_training=True,
        scale=tuple(cfg.crop_scale),
        hflip=hflip,
        auto_augment=cfg.randaug or None,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )
    clamp_posterize_bits(train)
    evaluate = create_transform(
        input_size=image_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=1.0,
        mean=tuple(mean),
        std=tuple(std),
    )
    return train, evaluate


class PosterizeBits:
    """A timm posterize level function whose result, the number of bits kept, is clamped to Pillow's [1, 8].

    timm turns the magnitude into bits with int(): 'PosterizeIncreasing' keeps 4 - int(m / 10 * 4), 0 bits at
    m = 10 and fewer than 0 past it (`mmax`), 'Posterize' keeps int(m / 10 * 4), 0 below m = 2.5. The magnitude
    noise of `mstd` reaches those ends (mimkit's default rand-m9-mstd0.5: m >= 10 in 2% of draws), and Pillow
    raises ValueError for any count outside [1, 8]. One bit is the strongest posterize there is (0 would make
    every image black), as in the RandAugment authors' code. A class, not a closure: data-loader workers
    started by spawn pickle the transform."""

    def __init__(self, level_fn):
        self.level_fn = level_fn

    def __call__(self, level: float, hparams: dict) -> tuple[int]:
        (bits,) = self.level_fn(level, hparams)
        return (min(8, max(1, int(bits))),)


def clamp_posterize_bits(transform) -> int:
    """Wrap the level function of every timm posterize op inside `transform` (a Compose, RandAugment,
    AutoAugment, AugMix, or a list of them) in `PosterizeBits`, in place. -> the number of ops wrapped."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(transform, AugmentOp):
        if transform.name.startswith("Posterize") and not isinstance(transform.level_fn, PosterizeBits):
            transform.level_fn = PosterizeBits(transform.level_fn)
            return 1
        return 0
    if isinstance(transform, list | tuple):
        return sum(clamp_posterize_bits(t) for t in transform)
    # Compose.transforms, RandAugment.ops / AugMixAugment.ops, AutoAugment.policy (a list of sub-policies)
    children = [getattr(transform, a) for a in ("transforms", "ops", "policy") if hasattr(transform, a)]
    return sum(clamp_posterize_bits(c) for c in children if isinstance(c, list | tuple))

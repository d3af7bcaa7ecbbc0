"""Semantic segmentation data: image/mask pairs from `images/` + `masks/` folders (or the synthetic demo),
checked up front, and the joint geometric transforms of mmsegmentation's recipes.

Layout: <root>/train/ and <root>/val/ (or test/), each with images/ and masks/; a mask is a single-channel image
(8-bit or palette PNG, or 16-bit) of class ids with the same relative path and stem as its image.

Every pair is checked once before training (mask present, same size as its image, ids < num_classes or equal to
the ignore index), so a bad file stops the run with its name instead of failing inside a loader worker. The same
pass counts the pixels of each class: the constant predictor's baseline needs them.

Training: the image is resized so its short side is `base_size * s`, s ~ U(scale_range), padded to the crop
(image 0, mask ignore_index) where smaller, randomly cropped to `crop` x `crop` and flipped (mmseg's Resize +
RandomCrop + RandomFlip; not its retry of crops dominated by one class). Evaluation: the short side is resized to
`base_size` (rounded to a multiple of the encoder's stride); the mask keeps its own size, so metrics are at the
original resolution.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .folder import IMAGE_EXTENSIONS, DataError, list_images, split_folders
from .pipeline import to_uint8_chw

MASK_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose values are the class ids


@dataclass
class PairSource:
    """Image/mask pairs: files (`images`, `masks`), or in-memory arrays (uint8 NxHxWx3 and NxHxW) for the demo.
    `reduce_zero_label`: id 0 becomes `ignore_index` and the others shift down by one (raw ADE20K masks)."""

    name: str
    images: list[str] | None = None
    masks: list[str] | None = None
    arrays: tuple[np.ndarray, np.ndarray] | None = None
    reduce_zero_label: bool = False
    ignore_index: int = 255

    def __len__(self) -> int:
        return len(self.arrays[0]) if self.arrays is not None else len(self.images)

    def mask_name(self, i: int) -> str:
        return self.masks[i] if self.masks is not None else f"{self.name}[{i}]"

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, HxW int64 class ids)."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[0][i]), self.arrays[1][i].astype(np.int64)
        with Image.open(self.images[i]) as img:
            image = img.convert("RGB")
        return image, self._ids(read_mask(self.masks[i]))

    def _ids(self, mask: np.ndarray) -> np.ndarray:
        mask = mask.astype(np.int64)
        if self.reduce_zero_label:
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
        return mask

    def subset(self, indices: list[int]) -> PairSource:
        if self.arrays is not None:
            arrays = (self.arrays[0][indices], self.arrays[1][indices])
            return PairSource(self.name, arrays=arrays, ignore_index=self.ignore_index)
        images, masks = [self.images[i] for i in indices], [self.masks[i] for i in indices]
        return PairSource(self.name, images, masks, None, self.reduce_zero_label, self.ignore_index)


def read_mask(path: str) -> np.ndarray:
    """HxW class ids of a single-channel mask file; an RGB (colour-coded) mask is refused, naming the file."""
    try:
        with Image.open(path) as m:
            if m.mode not in MASK_MODES:
                raise DataError(
                    f"mask '{path}' is a {m.mode} image; masks must be single-channel class ids (8-bit, palette or "
                    "16-bit PNG), not colour-coded"
                )
            return np.asarray(m)
    except OSError as e:
        raise DataError(f"mask '{path}' cannot be read: {e}") from None


def scan_pairs(folder: str | Path, reduce_zero_label: bool = False, ignore_index: int = 255) -> PairSource:
    """The images under `folder`/images with their masks under `folder`/masks (same relative path and stem)."""
    root = Path(folder)
    image_dir, mask_dir = root / "images", root / "masks"
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"segmentation folder '{root}' has no {d.name}/ sub-folder (needs images/ and masks/)")
    images = list_images(image_dir)
    if not images:
        raise DataError(f"'{image_dir}' holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    by_stem: dict[str, str] = {}
    for m in list_images(mask_dir):  # a .png mask wins over another extension with the same stem
        key = os.path.splitext(os.path.relpath(m, mask_dir))[0]
        if key not in by_stem or m.endswith(".png"):
            by_stem[key] = m
    masks = [by_stem.get(os.path.splitext(os.path.relpath(p, image_dir))[0]) for p in images]
    missing = [p for p, m in zip(images, masks) if m is None]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(images)} images in '{image_dir}' have no mask of the same stem in "
            f"'{mask_dir}', e.g. '{missing[0]}'"
        )
    return PairSource(str(root), images, masks, None, reduce_zero_label, ignore_index)


def segmentation_splits(path: str | Path, reduce_zero_label: bool, ignore_index: int) -> tuple[PairSource, PairSource]:
    """(train pairs, evaluation pairs) of a folder with train/ and val/ (or test/)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist")
    train_dir, eval_dir = split_folders(root)
    if train_dir == root or eval_dir is None:
        raise DataError(f"segmentation data '{root}' needs train/ and val/ (or test/), each with images/ and masks/")
    return (
        scan_pairs(train_dir, reduce_zero_label, ignore_index),
        scan_pairs(eval_dir, reduce_zero_label, ignore_index),
    )


def check_pairs(pairs: PairSource, num_classes: int, ignore_index: int, workers: int = 4) -> np.ndarray:
    """Pixels per class id over all masks -> (num_classes,) int64. Raises DataError naming the first bad file:
    a mask whose size differs from its image's, or an id >= num_classes other than `ignore_index`."""

    def one(i: int) -> np.ndarray:
        if pairs.arrays is not None:
            mask, size = pairs._ids(pairs.arrays[1][i]), pairs.arrays[0][i].shape[1::-1]
        else:
            try:
                with Image.open(pairs.images[i]) as img:
                    size = img.size  # the header only
            except OSError as e:
                raise DataError(f"image '{pairs.images[i]}' cannot be read: {e}") from None
            mask = pairs._ids(read_mask(pairs.masks[i]))
        if tuple(mask.shape[::-1]) != tuple(size):
            raise DataError(
                f"mask '{pairs.mask_name(i)}' is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{size[0]}x{size[1]} (width x height)"
            )
        counts = np.bincount(mask[mask != ignore_index].ravel().clip(min=0), minlength=num_classes)
        if len(counts) > num_classes or (mask < 0).any():
            bad = int(mask[(mask != ignore_index) & ((mask >= num_classes) | (mask < 0))].flat[0])
            raise DataError(
                f"mask '{pairs.mask_name(i)}' holds class id {bad}, outside 0..{num_classes - 1} "
                f"(segment.num_classes={num_classes}) and not segment.ignore_index={ignore_index}"
            )
        return counts

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        return np.sum(list(pool.map(one, range(len(pairs)))), axis=0, dtype=np.int64)


def resized_shape(width: int, height: int, short: float, divisor: int = 1) -> tuple[int, int]:
    """(w, h) with the short side ~`short`, aspect kept, each a multiple of `divisor` (at least one)."""
    s = short / min(width, height)
    return tuple(max(divisor, divisor * round(v * s / divisor)) for v in (width, height))


class SegmentationDataset(Dataset):
    """Training: (uint8 3 x crop x crop, int64 crop x crop). Evaluation: (uint8 image resized to base_size,
    int64 mask at its original size)."""

    def __init__(self, pairs: PairSource, train: bool, crop: int, base_size: int, scale_range=(0.5, 2.0),
                 hflip: float = 0.5, photometric: bool = False, ignore_index: int = 255, divisor: int = 1):  # fmt: skip
        self.pairs, self.train, self.crop, self.base_size = pairs, train, crop, base_size
        self.scale_range, self.hflip, self.ignore_index, self.divisor = scale_range, hflip, ignore_index, divisor
        self.jitter = None
        if photometric:
            from torchvision.transforms import ColorJitter

            self.jitter = ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.pairs.load(i)
        if not self.train:
            image = image.resize(resized_shape(*image.size, self.base_size, self.divisor), Image.BILINEAR)
            return to_uint8_chw(image), torch.from_numpy(mask)
        return self._augment(image, mask)

    def _augment(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        size = resized_shape(*image.size, self.base_size * s)
        image = image.resize(size, Image.BILINEAR)
        if self.jitter is not None:
            image = self.jitter(image)
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
        img = to_uint8_chw(image)
        m = torch.from_numpy(mask)
        ph, pw = max(0, self.crop - img.shape[1]), max(0, self.crop - img.shape[2])
        if ph or pw:
            img = torch.nn.functional.pad(img, (0, pw, 0, ph), value=0)
            m = torch.nn.functional.pad(m, (0, pw, 0, ph), value=self.ignore_index)
        y = torch.randint(0, img.shape[1] - self.crop + 1, ()).item()
        x = torch.randint(0, img.shape[2] - self.crop + 1, ()).item()
        img, m = img[:, y : y + self.crop, x : x + self.crop], m[y : y + self.crop, x : x + self.crop]
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            img, m = img.flip(-1), m.flip(-1)
        return img.contiguous(), m.contiguous()


# ------------------------------------------------------------------------------------------- synthetic demo


def synthetic_pairs(n: int, size: int, seed: int) -> PairSource:
    """`n` images of squares and disks of random colours on a noisy ground; masks: 0 ground, 1 square, 2 disk.
    Colour says nothing about the class, so the model has to look at shape."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size, 3)) * 80).astype(np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            r = rng.integers(size // 8, size // 4 + 1)
            cy, cx = rng.integers(r, size - r, 2)
            if rng.random() < 0.5:
                shape, cls = (abs(yy - cy) <= r) & (abs(xx - cx) <= r), 1
            else:
                shape, cls = (yy - cy) ** 2 + (xx - cx) ** 2 <= (2 * r + 1) ** 2 / math.pi, 2  # the square's area
            images[i][shape] = rng.integers(90, 256, 3)
            masks[i][shape] = cls
    return PairSource(f"demo-shapes(seed={seed})", arrays=(images, masks))

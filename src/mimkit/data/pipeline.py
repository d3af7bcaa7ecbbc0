"""Datasets and loaders: one seeded crop per image (per crop group), every view resized from it, resumable batch
order. Crops are RandomResizedCrop's or ContrastiveCrop's (boxes estimated by `data.ccrop`).

Randomness in the data never depends on worker scheduling: each (epoch, index) pair seeds its own generator, so
the same seed gives the same batches with 0 or 8 workers, and a run resumed mid-epoch sees exactly the batches
it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, DataConfig
from .folder import ImageSource
from .views import View, group_scales

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
MAX_BAD_RETRIES = 50


def load_first_readable(load, index: int, size: int, name: str):
    """The rule for unreadable files, shared by every data path: `load(index)`, or else the next index that
    loads (wrapping, at most MAX_BAD_RETRIES tries). -> (value, index used, unreadable indices tried first)."""
    bad = []
    for k in range(min(MAX_BAD_RETRIES, size)):
        i = (index + k) % size
        try:
            return load(i), i, bad
        except Exception:  # noqa: BLE001 — truncated JPEG, not an image, permission...
            bad.append(i)
    raise RuntimeError(f"{len(bad)} consecutive unreadable images from index {index} in '{name}'")


def _rrc_size(
    rng: np.random.Generator, width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int] | None:
    """(w, h) drawn as torchvision's RandomResizedCrop draws it (area fraction, log-uniform aspect; 10 tries),
    or None when no try fits the image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return w, h
    return None


def _fallback_box(width: int, height: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback: the centred crop of the whole image clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) sampled as torchvision's RandomResizedCrop does (10 tries, then centre)."""
    size = _rrc_size(rng, width, height, scale, ratio)
    if size is None:
        return _fallback_box(width, height, ratio)
    w, h = size
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return left, top, left + w, top + h


def contrastive_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    box: Sequence[float],
    alpha: float,
) -> tuple[int, int, int, int]:
    """ContrastiveCrop (Peng et al., CVPR 2022): a crop sized as RandomResizedCrop's whose centre lies inside
    `box` = relative (x0, y0, x1, y1). Each axis: the top-left corner ranges over the positions that put the
    crop's centre between the box edges (clamped so the crop stays inside the image), and is drawn there with a
    Beta(alpha, alpha) fraction; alpha < 1 favours the ends, so two crops of one image overlap less.
    -> (left, top, right, bottom) in pixels; the centred fallback when no size fits."""
    size = _rrc_size(rng, width, height, scale, ratio)
    if size is None:
        return _fallback_box(width, height, ratio)
    w, h = size

    def corner(lo: float, hi: float, extent: int, length: int) -> int:
        first = min(max(int(extent * lo) - length // 2, 0), extent - length)
        last = min(max(int(extent * hi) - length // 2, 0), extent - length)
        return first + int((last - first) * rng.beta(alpha, alpha))

    top = corner(box[1], box[3], height, h)
    left = corner(box[0], box[2], width, w)
    return left, top, left + w, top + h


def check_crop_mode(cfg: DataConfig) -> str:
    """`data.crop_mode`, checked together with the ContrastiveCrop keys it uses."""
    if cfg.crop_mode not in ("rrc", "ccrop"):
        raise ConfigError(f"data.crop_mode must be 'rrc' or 'ccrop', got '{cfg.crop_mode}'")
    if cfg.crop_mode == "ccrop":
        if cfg.ccrop_alpha <= 0:
            raise ConfigError(f"data.ccrop_alpha must be > 0 (Beta(alpha, alpha)), got {cfg.ccrop_alpha}")
        if not 0.0 <= cfg.ccrop_threshold < 1.0:
            raise ConfigError(f"data.ccrop_threshold must be in [0, 1), got {cfg.ccrop_threshold}")
        if cfg.ccrop_heat not in ("l1", "sum"):
            raise ConfigError(f"data.ccrop_heat must be 'l1' or 'sum', got '{cfg.ccrop_heat}'")
        if cfg.ccrop_warmup_epochs < 0 or cfg.ccrop_interval < 1:
            raise ConfigError(
                f"data.ccrop_warmup_epochs must be >= 0 and data.ccrop_interval >= 1, got "
                f"{cfg.ccrop_warmup_epochs} and {cfg.ccrop_interval}"
            )
    return cfg.crop_mode


def full_boxes(n: int) -> torch.Tensor:
    """(n, 4) relative boxes (x0, y0, x1, y1) covering every image: ContrastiveCrop's starting state."""
    boxes = torch.zeros(n, 4)
    boxes[:, 2:] = 1.0
    return boxes


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square."""
    s = min(width, height)
    left, top = (width - s) // 2, (height - s) // 2
    return left, top, left + s, top + s


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class ViewDataset(Dataset):
    """Items are keyed by (epoch, index). Training: one random crop + flip per key and crop group, rendered into
    every view of that group. Evaluation (`train=False`): the centred square (`eval_crop='center'`) or the whole
    image squashed to a square (`'full'`) resized to each view, no randomness.

    Crops are RandomResizedCrop's (`data.crop_mode=rrc`) or, with `data.crop_mode=ccrop` and past
    `data.ccrop_warmup_epochs`, ContrastiveCrop's inside each image's box. The boxes live in `self.boxes`, an
    (N, 4) tensor of relative (x0, y0, x1, y1) in shared memory: the training loop updates it in place and
    DataLoader workers (persistent ones included) read the new boxes.

    An unreadable file is replaced by the next readable one (so batches keep their shape) and reported in the
    item's `bad` list; the training loop counts them and stops past `data.bad_file_limit`."""

    def __init__(
        self,
        source: ImageSource,
        views: Sequence[View],
        cfg: DataConfig,
        seed: int,
        train: bool = True,
        eval_crop: str = "center",
    ):
        self.source, self.views, self.cfg, self.seed, self.train = source, tuple(views), cfg, seed, train
        self.eval_crop = eval_crop
        self.groups = sorted({v.crop_group for v in self.views})
        self.scales = group_scales(self.views, cfg.crop_scale)  # {group: crop area range} (multi-crop)
        self.boxes = None
        if train and check_crop_mode(cfg) == "ccrop":
            self.boxes = full_boxes(len(source)).share_memory_()

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[Image.Image, int, list[int]]:
        return load_first_readable(self.source.load, index, len(self.source), self.source.name)

    def _random_crop(self, rng: np.random.Generator, w: int, h: int, epoch: int, index: int, scale):
        """-> ((left, top, right, bottom), flip) for one crop group (area range `scale`) of image `index`."""
        c = self.cfg
        if self.boxes is not None and epoch >= c.ccrop_warmup_epochs:
            box = contrastive_crop_box(rng, w, h, scale, c.crop_ratio, self.boxes[index].tolist(), c.ccrop_alpha)
        else:
            box = random_resized_crop_box(rng, w, h, scale, c.crop_ratio)
        return box, c.hflip > 0 and rng.random() < c.hflip

    def random_crops(self, epoch: int, index: int, used: int, w: int, h: int) -> dict:
        """{crop group: ((left, top, right, bottom), flip)} of key (epoch, index) on a w x h image (`used`: the
        image actually read, which differs from `index` when that file was unreadable). Shared with
        `device_cache.DeviceCache`, so both paths draw the same crops."""
        rng = np.random.default_rng([self.seed, epoch, index])
        return {g: self._random_crop(rng, w, h, epoch, used, self.scales[g]) for g in self.groups}  # 0 first

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, used, bad = self._load(index)
        w, h = img.size
        if self.train:
            crops = self.random_crops(epoch, index, used, w, h)
        else:
            whole = (0, 0, w, h) if self.eval_crop == "full" else center_box(w, h)
            crops = {g: (whole, False) for g in self.groups}
        item = {}
        for view in self.views:
            box, flip = crops[view.crop_group]
            out = img.resize((view.size, view.size), RESAMPLE[view.interpolation], box=box)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            item[view.name] = to_uint8_chw(out)
        labels = self.source.labels
        item["label"] = labels[used] if labels is not None else -1
        item["bad"] = bad
        return item


def collate(items: list[dict]) -> dict:
    batch = {}
    for k in items[0]:
        if k == "bad":
            batch[k] = [i for it in items for i in it[k]]
        elif k == "label":
            batch[k] = torch.tensor([it[k] for it in items], dtype=torch.long)
        else:
            batch[k] = torch.stack([it[k] for it in items])
    return batch


class EpochBatchSampler:
    """Seeded permutation per epoch, sharded across ranks, cut into full batches (drop_last, so every step has
    the same shape). `start(epoch, batch)` positions it, which is how a resumed run continues mid-epoch."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.first_batch = 0, 0
        if self.batches_per_epoch() == 0:
            raise ConfigError(
                f"train.batch_size {batch_size} x {world} process(es) is more than the {size} training images; "
                "lower --batch-size"
            )

    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def start(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.first_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)
        n = self.batches_per_epoch() * self.batch_size * self.world
        mine = perm[:n][self.rank :: self.world].tolist()
        for b in range(self.first_batch, self.batches_per_epoch()):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]


def train_loader(dataset, sampler: EpochBatchSampler, num_workers: int, pin: bool, collate_fn=collate) -> DataLoader:
    """Batches of `dataset` in the order of `sampler` (re-iterable, positioned by `sampler.start(epoch, batch)`),
    with workers that persist across epochs. Every training data path builds its loader here."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator(),  # iterators would otherwise draw a seed from the global RNG (breaks resume)
    )


def eval_loader(dataset: ViewDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator(),
    )


def prepare_batch(batch: dict, views: Sequence[View], device, mean, std) -> dict:
    """uint8 views -> float on `device` ([0, 1] for 'unit' views, mean/std-normalised otherwise). `mean` / `std`:
    sequences, or tensors already on `device` (no host-to-device copy, whose blocking wait would sync the host)."""
    out = {}
    m = torch.as_tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=device).view(1, -1, 1, 1)
    for view in views:
        x = batch[view.name].to(device, non_blocking=True).float().div_(255.0)
        out[view.name] = (x - m) / s if view.normalize == "mean_std" else x
    if "label" in batch:
        out["label"] = batch["label"].to(device, non_blocking=True)
    return out

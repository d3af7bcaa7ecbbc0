"""A device-resident training data path for datasets that fit in memory (CIFAR-10 at 32 px, the demo digits,
Imagenette at low resolution): every training image is decoded ONCE into a uint8 tensor (N, 3, H, W) on the
training device, and each batch is cropped, resized and flipped there in a few batched matrix products, with no
loader workers and no per-step host decoding.

Same batches as the worker loader. For a batch of (epoch, index) keys from the same `EpochBatchSampler`, the
crop boxes and flips come from `ViewDataset.random_crops` (the same per-key numpy generator, RandomResizedCrop or
ContrastiveCrop inside `dataset.boxes`, which the cache reads live), labels and unreadable-file replacements
follow `ViewDataset._load`, and `prepare_batch` normalises. The resize replays Pillow's `Image.resize(size,
filter, box=box)`: its kernels (bicubic a = -0.5, not torch's -0.75; bilinear; lanczos; nearest), antialiased
when shrinking, taps in 22-bit fixed point, two separable passes each rounded and clipped to uint8, in Pillow's
order (horizontal first; Pillow >= 13 goes vertical first when the height shrinks much more than the width). Each
pass is one weight matrix per image, applied with batched float64 products, which hold Pillow's fixed-point sums
exactly. Measured against Pillow 13 on random crops of random images, every filter and flip: identical uint8
pixels (tests/test_device_data.py; Pillow 10-12 by their source, same code without the reordering). float64
costs little at 32-128 px; on GPUs with slow float64 (consumer cards) large views cost more. The boxes are
drawn on the host, one numpy generator per key (~25 us each), one asynchronous copy per batch; with
`data.device_crops=fast` they are drawn for the whole batch on the device instead (mimkit.data.device_crops: same
distributions, its own seeded stream, so not the worker loader's crops), which lifts that cap.

Images of different sizes are squashed once to `data.device_cache_size` squared (0 = the largest view size),
as the downsampled-ImageNet datasets are, with Pillow and the largest view's filter; crops are then drawn on the
squashed image, so for non-square or large images they differ from the worker loader's (other aspect ratios,
less detail). When every image has one size and `device_cache_size` is 0 they are cached as they are and the
two paths match. The cache is for small datasets: building it refuses more than `data.device_cache_max_gb`.
Every process of a distributed run holds the whole cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, DataConfig
from .device_crops import FastCrops
from .folder import DataError, ImageSource
from .pillow_resize import resize_crops
from .pipeline import RESAMPLE, EpochBatchSampler, ViewDataset, load_first_readable, prepare_batch, to_uint8_chw


# ------------------------------------------------------------------------------------------ the cache
def check_cache_config(cfg: DataConfig) -> None:
    if cfg.device_crops not in ("exact", "fast"):
        raise ConfigError(f"data.device_crops must be 'exact' or 'fast', got '{cfg.device_crops}'")
    if cfg.device_cache_size < 0:
        raise ConfigError(
            f"data.device_cache_size must be >= 0 (0 = the largest view size), got {cfg.device_cache_size}"
        )
    if not cfg.device_cache_max_gb > 0:
        raise ConfigError(f"data.device_cache_max_gb must be > 0, got {cfg.device_cache_max_gb}")


def _header_size(source: ImageSource, index: int) -> tuple[int, int] | None:
    """(width, height) from the file header alone (no decoding); None when unreadable."""
    try:
        with Image.open(source.open(index)) as img:
            return img.size
    except Exception:  # noqa: BLE001 — as ViewDataset._load: whatever Pillow raises marks the file unreadable
        return None


def _check_size(source: ImageSource, width: int, height: int, max_gb: float) -> None:
    need = len(source) * 3 * width * height / 1e9
    if need > max_gb:
        raise DataError(
            f"data.device_cache: the {len(source)} images of '{source.name}' at {width}x{height} need {need:.2f} GB, "
            f"more than data.device_cache_max_gb={max_gb}; lower data.device_cache_size or data.max_images, raise "
            "the limit, or train without data.device_cache"
        )


def _check_free_memory(source: ImageSource, width: int, height: int, device: torch.device) -> None:
    need, free = len(source) * 3 * width * height, torch.cuda.mem_get_info(device)[0]
    if need > 0.8 * free:  # leave room for the model
        raise DataError(
            f"data.device_cache: the {len(source)} images of '{source.name}' at {width}x{height} need "
            f"{need / 1e9:.2f} GB, more than 80% of the {free / 1e9:.2f} GB free on {device}"
        )


def cache_shape(source: ImageSource, cfg: DataConfig, view_size: int, threads: int) -> tuple[int, int]:
    """(width, height) of the cached images: their own when they all share one and `data.device_cache_size` is 0,
    else device_cache_size (0: `view_size`) squared. Raises DataError past `data.device_cache_max_gb`."""
    if cfg.device_cache_size > 0:
        shape = (cfg.device_cache_size, cfg.device_cache_size)
    elif source.arrays is not None:
        shape = (source.arrays.shape[2], source.arrays.shape[1])
    else:
        first = next(filter(None, (_header_size(source, i) for i in range(min(16, len(source))))), None)
        if first is not None:  # a lower bound: fail before reading every header of a dataset far too large
            smallest = min(first, (view_size, view_size), key=lambda s: s[0] * s[1])
            _check_size(source, *smallest, cfg.device_cache_max_gb)
        with ThreadPoolExecutor(threads) as pool:
            sizes = {s for s in pool.map(lambda i: _header_size(source, i), range(len(source))) if s is not None}
        shape = sizes.pop() if len(sizes) == 1 else (view_size, view_size)
    _check_size(source, *shape, cfg.device_cache_max_gb)
    return shape


def decode_all(source: ImageSource, width: int, height: int, resample, threads: int):
    """Every image as uint8 (N, 3, height, width) on the host, squashed to that size where it differs;
    -> (images, readable (N,) list of bool)."""
    n = len(source)
    arrays = source.arrays
    if arrays is not None and arrays.ndim == 4 and arrays.shape[1:] == (height, width, 3):
        return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).contiguous(), [True] * n
    images = torch.zeros(n, 3, height, width, dtype=torch.uint8)

    def one(i: int) -> bool:
        try:
            img = source.load(i)
        except Exception:  # noqa: BLE001 — truncated JPEG, not an image, permission...
            return False
        if img.size != (width, height):
            img = img.resize((width, height), resample)
        images[i] = to_uint8_chw(img)
        return True

    with ThreadPoolExecutor(threads) as pool:  # Pillow releases the GIL while decoding
        readable = list(pool.map(one, range(n)))
    return images, readable


def replacements(readable: Sequence[bool], name: str) -> tuple[list[int], dict[int, list[int]]]:
    """ViewDataset._load's rule for unreadable files: each index reads the next readable image (at most
    MAX_BAD_RETRIES tries). -> (used index per index, {index: unreadable indices tried first})."""

    def check(i: int) -> None:
        if not readable[i]:
            raise OSError(i)

    n = len(readable)
    used, bad = list(range(n)), {}
    for index in (i for i in range(n) if not readable[i]):
        _, used[index], bad[index] = load_first_readable(check, index, n, name)
    return used, bad


class DeviceCache:
    """The training images of `dataset` decoded once into `images` (N, 3, H, W) uint8 on `device`; `batch(keys)`
    renders the views of a list of (epoch, index) keys there as the worker loader would (module docstring).
    Reads `dataset.random_crops`, hence `dataset.boxes` (ContrastiveCrop), at every batch."""

    def __init__(self, dataset: ViewDataset, device, threads: int | None = None):
        if not dataset.train:
            raise ValueError("DeviceCache renders training crops; evaluation keeps the worker loader")
        cfg, source = dataset.cfg, dataset.source
        check_cache_config(cfg)
        self.dataset, self.device = dataset, torch.device(device)
        threads = threads or min(16, os.cpu_count() or 1)
        largest = max(dataset.views, key=lambda v: v.size)
        self.width, self.height = cache_shape(source, cfg, largest.size, threads)
        if self.device.type == "cuda":
            _check_free_memory(source, self.width, self.height, self.device)
        images, readable = decode_all(source, self.width, self.height, RESAMPLE[largest.interpolation], threads)
        self.used, self.bad = replacements(readable, source.name)
        self.images = images.to(self.device)
        labels = source.labels if source.labels is not None else [-1] * len(source)
        self.labels = torch.tensor(labels, dtype=torch.long, device=self.device)
        self.groups = dataset.groups
        self.fast = None
        if cfg.device_crops == "fast":
            self.fast = FastCrops(cfg, dataset.seed, self.width, self.height, self.groups, self.device, dataset.scales)

    def __len__(self) -> int:
        return len(self.used)

    def _crop_table(self, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(B, 1 + 5 G) float64 on the device: the image read, then (left, top, right, bottom, flip) per crop
        group, drawn on the host with the dataset's per-key generators; one (pinned, asynchronous) copy."""
        rows = []
        for epoch, index in keys:
            used = self.used[index]
            crops = self.dataset.random_crops(epoch, index, used, self.width, self.height)
            rows.append([used] + [v for g in self.groups for v in (*crops[g][0], float(crops[g][1]))])
        return self._to_device(torch.tensor(rows, dtype=torch.float64))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: the copy does not wait for the device
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _exact_crops(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        """-> (used (B,) long, {group: (boxes (B, 4), flips (B,) bool)}) from the host-drawn table."""
        table = self._crop_table(keys)
        crops = {}
        for k, g in enumerate(self.groups):
            c = 1 + 5 * k
            crops[g] = (table[:, c : c + 4], table[:, c + 4] > 0)
        return table[:, 0].long(), crops

    def _fast_crops(self, keys: Sequence[tuple[int, int]], position: int | None) -> tuple[torch.Tensor, dict]:
        """As `_exact_crops`, with the batch's crops drawn on the device (`data.device_crops=fast`); `position`:
        the batch's first image's place in the epoch's order (None: that image's index)."""
        epoch = keys[0][0]  # a sampler's batch never spans two epochs
        used = torch.tensor([self.used[index] for _, index in keys])
        boxes, c = self.dataset.boxes, self.dataset.cfg
        if boxes is not None and epoch >= c.ccrop_warmup_epochs:  # read live: the training loop updates them
            boxes = self._to_device(boxes.index_select(0, used))
        else:
            boxes = None
        position = keys[0][1] if position is None else position
        return self._to_device(used), self.fast.draw(len(keys), epoch, position, boxes)

    def collate(self, keys: Sequence[tuple[int, int]], position: int | None = None) -> dict:
        """What `collate([dataset[k] for k in keys])` gives (uint8 views, labels, unreadable files), on the device.
        `position` seeds fast-mode crops (`_fast_crops`); exact mode draws them from the keys alone."""
        used, crops = self._exact_crops(keys) if self.fast is None else self._fast_crops(keys, position)
        images = self.images.index_select(0, used).to(torch.float64)  # once for every view (resize_crops' dtype)
        out = {}
        for view in self.dataset.views:
            boxes, flips = crops[view.crop_group]
            out[view.name] = resize_crops(images, boxes, flips, view.size, view.interpolation)
        out["label"] = self.labels.index_select(0, used)
        out["bad"] = [b for _, index in keys for b in self.bad.get(index, ())]
        return out

    def batch(self, keys: Sequence[tuple[int, int]], mean, std, position: int | None = None) -> dict:
        """`prepare_batch(collate(...))` plus "bad": float views on the device, normalised as each view says."""
        raw = self.collate(keys, position)
        out = prepare_batch(raw, self.dataset.views, self.device, mean, std)
        out["bad"] = raw["bad"]
        return out

    def loader(self, sampler: EpochBatchSampler, mean, std) -> DeviceLoader:
        return DeviceLoader(self, sampler, mean, std)


class DeviceLoader:
    """Iterates the batches of `sampler` (re-iterable: `sampler.start(epoch, batch)` positions it, as for the
    worker loader) from a DeviceCache. No host sync: crops travel in one asynchronous copy per batch."""

    def __init__(self, cache: DeviceCache, sampler: EpochBatchSampler, mean, std):
        self.cache, self.sampler = cache, sampler
        self.mean = torch.as_tensor(mean, device=cache.device)  # once: a per-batch copy would wait on the device
        self.std = torch.as_tensor(std, device=cache.device)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        for b, keys in enumerate(s, start=s.first_batch):
            position = b * s.batch_size * s.world + s.rank  # of keys[0] in the epoch's permutation: rank-distinct
            yield self.cache.batch(keys, self.mean, self.std, position)

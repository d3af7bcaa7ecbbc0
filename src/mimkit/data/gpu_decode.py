"""The training data path with JPEG decoding on the device (`data.decode=gpu`), for datasets too large for the
device cache: loader workers only read the encoded bytes and parse the JPEG header; each batch is decoded on the
device in one `torchvision.io.decode_jpeg(list, device=...)` call (nvjpeg on CUDA), then cropped, resized and
flipped there by the device cache's Pillow-exact batched resize (`pillow_resize.resize_crops`).

Same batches as the worker loader, up to the JPEG decoder: for a batch of (epoch, index) keys from the same
`EpochBatchSampler`, crop boxes and flips come from `ViewDataset.random_crops` (drawn in the workers from the
header's size, so ContrastiveCrop boxes are read live as there), labels follow the image actually read, and
`prepare_batch` normalises. The decoded pixels are libjpeg-turbo's (CPU) or nvjpeg's (CUDA) instead of Pillow's;
the two libjpeg-turbo builds give identical pixels on the files measured (tests/test_gpu_decode.py), nvjpeg's
IDCT and chroma upsampling may differ by a few levels.

What the device does not decode falls back to Pillow in the worker, the worker loader's decode exactly, and is
counted (`cpu_decoded`): files that are not JPEG, JPEGs in modes other than RGB/greyscale (CMYK...), JPEGs without
their end-of-image marker (truncated: Pillow, not the device decoder, decides whether they are readable, so the
unreadable-file rule and its replacements are the worker loader's), in-memory arrays, and any image the device
decoder refuses at run time. Images of one size are resized together; a batch of mixed sizes takes one batched
resize per distinct size. On a CPU device `decode_jpeg` decodes in the main process, one image after another.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from .pillow_resize import resize_crops
from .pipeline import EpochBatchSampler, ViewDataset, load_first_readable, prepare_batch, to_uint8_chw, train_loader

JPEG_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) converts as Pillow's convert("RGB") does
JPEG_END = b"\xff\xd9"


def decode_jpeg(data: list[torch.Tensor], device) -> list[torch.Tensor]:
    """torchvision's batched decoder -> (3, H, W) uint8 tensors on `device`. torchvision 0.29 deprecates its
    image decoders in favour of TorchCodec (its warning is silenced here)."""
    with warnings.catch_warnings():  # raised at every call
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg

        return tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


@dataclass
class EncodedItem:
    """One key's image as a worker delivers it: the JPEG bytes (`data`, 1-D uint8) or, when the device does not
    decode it, the image decoded on the host (`image`, (3, H, W) uint8); its crops and label."""

    epoch: int
    index: int
    used: int  # the image read (the next readable one when `index` is unreadable)
    bad: list[int]
    width: int
    height: int
    crops: dict  # {crop group: ((left, top, right, bottom), flip)}
    label: int
    data: torch.Tensor | None = None
    image: torch.Tensor | None = None


def read_bytes(source, index: int) -> bytes:
    opened = source.open(index)
    if isinstance(opened, str):
        with open(opened, "rb") as f:
            return f.read()
    return opened.read()


def pillow_decode(data: bytes) -> torch.Tensor:
    """`ImageSource.load` on the bytes (draft, then convert to RGB) -> (3, H, W) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (img.width, img.height))
        return to_uint8_chw(img.convert("RGB"))


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """A JPEG the device decodes as Pillow would: RGB or greyscale, ending with its end-of-image marker (a
    truncated file goes to Pillow, which refuses it as the worker loader does)."""
    return img.format == "JPEG" and img.mode in JPEG_MODES and data.rstrip(b"\0").endswith(JPEG_END)


class EncodedDataset(Dataset):
    """Items keyed by (epoch, index) -> EncodedItem: read and header-parse in loader workers, decode elsewhere."""

    def __init__(self, dataset: ViewDataset):
        if not dataset.train:
            raise ValueError("data.decode=gpu serves training crops; evaluation keeps the worker loader")
        self.dataset, self.source = dataset, dataset.source

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> tuple[bytes | None, torch.Tensor | None, int, int]:
        """(JPEG bytes, None, w, h) or (None, decoded image, w, h); raises for an unreadable file."""
        if self.source.arrays is not None:
            image = to_uint8_chw(self.source.load(index))
            return None, image, image.shape[2], image.shape[1]
        data = read_bytes(self.source, index)
        with Image.open(io.BytesIO(data)) as img:  # the header only: no pixels decoded
            if device_decodable(img, data):
                return data, None, img.width, img.height
        image = pillow_decode(data)
        return None, image, image.shape[2], image.shape[1]

    def __getitem__(self, key) -> EncodedItem:
        epoch, index = key
        (data, image, w, h), used, bad = load_first_readable(self.read, index, len(self.source), self.source.name)
        labels = self.source.labels
        item = EncodedItem(epoch, index, used, bad, w, h, self.dataset.random_crops(epoch, index, used, w, h),
                           labels[used] if labels is not None else -1, image=image)  # fmt: skip
        if data is not None:
            item.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return item


def _items(items: list[EncodedItem]) -> list[EncodedItem]:
    return items


class GPUDecodeLoader:
    """Iterates the batches of `sampler` (re-iterable: `sampler.start(epoch, batch)` positions it, as for the
    worker loader) as dicts of normalised views on `device`, plus "label" and "bad" (as `DeviceLoader`).
    `cpu_decoded` / `device_decoded` count the images each way since the loader was made."""

    def __init__(self, dataset: ViewDataset, sampler: EpochBatchSampler, device, mean, std, num_workers: int = 0):
        self.dataset, self.device = dataset, torch.device(device)
        self.views, self.groups = dataset.views, dataset.groups
        self.mean = torch.as_tensor(mean, device=self.device)  # once: a per-batch copy would wait on the device
        self.std = torch.as_tensor(std, device=self.device)
        self.cpu_decoded = self.device_decoded = 0
        self.loader = train_loader(EncodedDataset(dataset), sampler, num_workers, pin=False, collate_fn=_items)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            yield self.batch(items)

    def batch(self, items: list[EncodedItem]) -> dict:
        raw = self.collate(items)
        out = prepare_batch(raw, self.views, self.device, self.mean, self.std)
        out["bad"] = raw["bad"]
        return out

    def collate(self, items: list[EncodedItem]) -> dict:
        """uint8 views (B, 3, size, size) on the device, labels and unreadable indices, as the worker loader's
        `collate` gives them."""
        images = self.decode(items)
        crops = self._crop_table(items)
        by_size = defaultdict(list)
        for i, img in enumerate(images):
            by_size[tuple(img.shape[1:])].append(i)
        out = {}
        for view in self.views:
            out[view.name] = torch.empty(len(items), 3, view.size, view.size, dtype=torch.uint8, device=self.device)
        for rows in by_size.values():
            pick = torch.tensor(rows, device=self.device)
            group = torch.stack([images[i] for i in rows]).to(torch.float64)  # once for every view
            table = crops.index_select(0, pick)
            for view in self.views:
                c = 5 * self.groups.index(view.crop_group)
                resized = resize_crops(group, table[:, c : c + 4], table[:, c + 4] > 0, view.size, view.interpolation)
                out[view.name].index_copy_(0, pick, resized)
        out["label"] = torch.tensor([it.label for it in items], dtype=torch.long)
        out["bad"] = [b for it in items for b in it.bad]
        return out

    def decode(self, items: list[EncodedItem]) -> list[torch.Tensor]:
        """Every item's (3, H, W) uint8 image on the device: the JPEGs in one batched decode, the rest copied."""
        encoded = [i for i, it in enumerate(items) if it.data is not None]
        images: list[torch.Tensor | None] = [None] * len(items)
        try:
            decoded = decode_jpeg([items[i].data for i in encoded], self.device) if encoded else []
        except RuntimeError:  # one bad image fails the whole call: decode them one by one
            decoded = [self._decode_one(items[i]) for i in encoded]
        for i, img in zip(encoded, decoded):
            if img is None or tuple(img.shape) != (3, items[i].height, items[i].width):
                self._host_decode(items[i])  # refused, or the header and the decoder disagree: Pillow decides
            else:
                images[i] = img
                self.device_decoded += 1
        for i, it in enumerate(items):
            if images[i] is None:
                images[i] = it.image.to(self.device, non_blocking=True)
                self.cpu_decoded += 1
        return images

    def _decode_one(self, item: EncodedItem) -> torch.Tensor | None:
        try:
            return decode_jpeg([item.data], self.device)[0]
        except RuntimeError:
            return None

    def _host_decode(self, item: EncodedItem) -> None:
        """Pillow decodes `item` in place (`item.image`); when Pillow refuses it too, the next readable image
        replaces it, with that image's crops and label, by the worker loader's rule."""
        try:
            item.image = pillow_decode(item.data.numpy().tobytes())
        except Exception:  # noqa: BLE001 — whatever Pillow raises marks the file unreadable
            source = self.dataset.source

            def load(i: int) -> torch.Tensor:
                if i == item.used:
                    raise OSError(i)
                return to_uint8_chw(source.load(i))

            item.image, item.used, more = load_first_readable(load, item.used, len(source), source.name)
            item.bad = item.bad + more
            item.height, item.width = item.image.shape[1:]
            item.crops = self.dataset.random_crops(item.epoch, item.index, item.used, item.width, item.height)
            labels = source.labels
            item.label = labels[item.used] if labels is not None else -1
        item.data = None

    def _crop_table(self, items: list[EncodedItem]) -> torch.Tensor:
        """(B, 5 G) float64 on the device: (left, top, right, bottom, flip) per crop group; one copy."""
        rows = [[v for g in self.groups for v in (*it.crops[g][0], float(it.crops[g][1]))] for it in items]
        table = torch.tensor(rows, dtype=torch.float64)
        if self.device.type == "cuda":  # pinned: the copy does not wait for the device
            return table.pin_memory().to(self.device, non_blocking=True)
        return table.to(self.device)

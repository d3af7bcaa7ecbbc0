"""Image sources: folders on disk (labeled by sub-folder, or flat) and in-memory arrays (the demo digits)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


class DataError(ConfigError):
    """A data folder or file that cannot be used as given."""


@dataclass
class ImageSource:
    """The contract every image source honours, read by index so that seeded crops, the seeded sampler and exact
    resume work alike on all of them: `len()`, `load(index)` (an RGB PIL image), `labels` (one int per image, or
    None), `classes`, `name`, `describe(index)` (names one item in messages) and `subset(indices)`.

    This class serves image files named by `paths` (folders, list files; decoded lazily) and in-memory `arrays`
    (uint8 N x H x W x 3: the demo digits). `sources/` subclasses it for tar shards and Arrow/Parquet tables by
    overriding `__len__`, `open`, `describe` and `subset`; `load` decodes all of them the same way."""

    name: str
    paths: list[str] = field(default_factory=list)
    arrays: np.ndarray | None = None
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self.paths)

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def open(self, index: int) -> str | BinaryIO:
        """The encoded image at `index` as Pillow opens it: a path, or a binary file object."""
        return self.paths[index]

    def describe(self, index: int) -> str:
        """Names item `index` for messages (its file, or its place in a shard or table)."""
        return f"{self.name}[{index}]" if self.arrays is not None else self.paths[index]

    def load(self, index: int) -> Image.Image:
        """The RGB image at `index`; raises OSError/ValueError for an unreadable file."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[index])
        with Image.open(self.open(index)) as img:
            img.draft("RGB", (img.width, img.height))  # cheap for JPEG; a no-op otherwise
            return img.convert("RGB")

    def subset(self, indices: list[int]) -> ImageSource:
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        if self.arrays is not None:
            return ImageSource(self.name, arrays=self.arrays[indices], labels=labels, classes=self.classes)
        return ImageSource(self.name, paths=[self.paths[i] for i in indices], labels=labels, classes=self.classes)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_folder(path: str | Path) -> ImageSource:
    """Every image under `path`, in sorted order. Labeled when every image sits inside a first-level sub-folder
    (the sub-folder names, sorted, are the classes); otherwise the images are unlabeled."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is not a folder")
    paths = shared_listing(root)
    if not paths:
        raise DataError(f"data folder '{root}' holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    tops = [Path(p).relative_to(root).parts for p in paths]
    if all(len(t) > 1 for t in tops):
        classes = sorted({t[0] for t in tops})
        index = {c: i for i, c in enumerate(classes)}
        return ImageSource(str(root), paths=paths, labels=[index[t[0]] for t in tops], classes=classes)
    return ImageSource(str(root), paths=paths)


def list_images(root: str | Path) -> list[str]:
    """Every image file under `root` (links followed), in sorted order: sub-folders by name, then files."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return paths


def split_folders(path: str | Path) -> tuple[Path, Path | None]:
    """(train folder, evaluation folder or None). A folder with train/ and val/ or test/ is split; any other
    folder is used whole for pre-training (and for evaluation, when labeled)."""
    root = Path(path)
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        return root / "train", None
    return root, None


def seeded_subset(source, max_images: int | None, seed: int, key: str = "data.max_images"):
    """A fixed subset of `max_images` items of `source` (anything with `len` and `subset`: images, image/mask
    pairs), the same for a given seed, kept in the original order. `key` names the setting in errors."""
    if max_images is None or max_images >= len(source):
        return source
    if max_images <= 0:
        raise ConfigError(f"{key} must be positive, got {max_images}")
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(source), generator=g)[:max_images].tolist())
    return source.subset(keep)


def check_decodable(source: ImageSource, tries: int = 16) -> None:
    """Fail early, naming the folder, when none of the first few images decodes."""
    if source.arrays is not None:
        return
    n = min(tries, len(source))
    errors = []
    for i in range(n):
        try:
            source.load(i)
            return
        except Exception as e:  # noqa: BLE001 — Pillow raises many types for a bad file
            errors.append(f"{source.describe(i)}: {e}")
    raise DataError(f"no decodable image in '{source.name}' (tried {n} images; first error: {errors[0]})")


# ------------------------------------------------------------------------------------------ one scan per run
SCAN_CACHE_FORMAT = "mimkit-scan/1"
RACY_NS = 2_000_000_000


def user_cache_dir(kind: str) -> Path:
    """`$XDG_CACHE_HOME/mimkit/<kind>` (default ~/.cache/mimkit/<kind>): where derived files go when they cannot
    sit next to the data."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mimkit" / kind


def folder_signature(root: Path) -> list:
    """What a rescan would notice cheaply: the mtimes of `root` and of each first-level sub-folder (adding or
    removing an image changes its parent's mtime). Changes two or more levels down are not seen."""
    subdirs = sorted([e.name, e.stat().st_mtime_ns] for e in os.scandir(root) if e.is_dir(follow_symlinks=True))
    return [os.path.realpath(root), root.stat().st_mtime_ns, subdirs]


def _scan_cache_path(root: Path) -> Path:
    return user_cache_dir("scans") / (hashlib.sha1(os.path.realpath(root).encode()).hexdigest() + ".txt")


def cached_listing(root: Path) -> list[str]:
    """`list_images(root)`, from the scan cache when the folder's signature is unchanged. The cache (a JSON header
    line, then one relative path per line) lives in the user cache folder, not in the data folder: writing there
    would change the very mtime it is keyed by. An unwritable cache folder only costs the rescan."""
    cache, signature = _scan_cache_path(root), folder_signature(root)
    try:
        with open(cache, encoding="utf-8") as f:
            header = json.loads(f.readline())
            if header.get("format") == SCAN_CACHE_FORMAT and header.get("signature") == signature:
                body = f.read().rstrip("\n")
                prefix = os.path.join(str(root), "")  # os.walk's dirpath + '/' exactly, without a join per path
                return (prefix + body.replace("\n", "\n" + prefix)).split("\n") if body else []
    except (OSError, ValueError):
        pass
    paths = list_images(root)
    start = len(os.path.join(str(root), ""))
    body = "\n".join(p[start:] for p in paths)
    header = json.dumps({"format": SCAN_CACHE_FORMAT, "signature": signature, "images": len(paths)})
    newest = max([signature[1], *(m for _, m in signature[2])])
    # a folder changed in the last seconds may change again within the mtime's granularity: not cached (git's
    # "racily clean" rule); nor a listing whose file names hold newlines
    if time.time_ns() - newest > RACY_NS and body.count("\n") == max(len(paths) - 1, 0):
        try:
            write_text_atomic(cache, header + "\n" + body + "\n")
        except OSError:
            pass
    return paths


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so readers (other ranks, other runs) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def rank_zero_computes(compute):
    """`compute()` on rank 0 alone, its result (or the error it raised) broadcast to every rank, when
    torch.distributed is initialised with more than one process; otherwise just `compute()`. Spares a shared
    filesystem one scan per rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = compute()
        except Exception as e:  # noqa: BLE001 — re-raised on every rank below, so none waits forever
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def shared_listing(root: Path) -> list[str]:
    """Every image under `root` in sorted order, scanned once per run (rank 0, scan cache)."""

    def scan() -> str | list[str]:
        paths = cached_listing(root)
        text = "\n".join(paths)  # one string pickles as one copy, a million strings as a million objects
        return text if text.count("\n") == max(len(paths) - 1, 0) else paths

    listing = rank_zero_computes(scan)
    return listing if isinstance(listing, list) else listing.split("\n") if listing else []

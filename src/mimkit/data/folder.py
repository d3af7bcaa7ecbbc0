"""Image sources: folders on disk (labeled by sub-folder, or flat) and in-memory arrays (the demo digits)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


class DataError(ConfigError):
    """A data folder or file that cannot be used as given."""


@dataclass
class ImageSource:
    """A list of images with optional integer labels. Either `paths` (decoded lazily) or `arrays` (uint8 HWC)."""

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

    def load(self, index: int) -> Image.Image:
        """The RGB image at `index`; raises OSError/ValueError for an unreadable file."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[index])
        with Image.open(self.paths[index]) as img:
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
    paths = list_images(root)
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
            errors.append(f"{source.paths[i]}: {e}")
    raise DataError(f"no decodable image in '{source.name}' (tried {n} files; first error: {errors[0]})")

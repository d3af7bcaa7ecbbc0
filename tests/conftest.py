"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_images

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def labeled_folder(tmp_path) -> Path:
    """train/{a,b}/ and val/{a,b}/ with 24 + 8 images per class."""
    root = tmp_path / "data"
    for split, n in (("train", 24), ("val", 8)):
        for c, cls in enumerate(("a", "b")):
            write_images(root / split / cls, n, seed=c * 100 + (split == "val"))
    return root

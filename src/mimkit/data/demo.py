"""The built-in demo data: scikit-learn's 1,797 real 8x8 handwritten digits, so a fresh install runs offline."""

from __future__ import annotations

import numpy as np
import torch

from .folder import ImageSource

DEMO_TEST_SIZE = 500  # held out for the k-NN comparison; pre-training sees the other 1,297


def load_digits_sources(seed: int = 0) -> tuple[ImageSource, ImageSource]:
    """(train, test) sources of RGB uint8 8x8 digit images with their labels, split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values 0..16 -> 0..255
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    labels = digits.target.astype(int)
    order = torch.randperm(len(rgb), generator=torch.Generator().manual_seed(seed)).numpy()
    test, train = np.sort(order[:DEMO_TEST_SIZE]), np.sort(order[DEMO_TEST_SIZE:])
    classes = [str(i) for i in range(10)]
    return (
        ImageSource("demo:digits/train", arrays=rgb[train], labels=labels[train].tolist(), classes=classes),
        ImageSource("demo:digits/test", arrays=rgb[test], labels=labels[test].tolist(), classes=classes),
    )

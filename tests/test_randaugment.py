"""Fine-tuning augmentation cannot crash: every timm RandAugment op, drawn at its extreme magnitudes with
magnitude noise, runs on a real photograph (timm's posterize asks Pillow for 0 or fewer bits at the ends)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageOps
from timm.data.auto_augment import NAME_TO_OP, AugmentOp, RandAugment

from mimkit.data.finetune_transforms import PosterizeBits, clamp_posterize_bits, finetune_transforms
from mimkit.run_config import build_config

# (magnitude, magnitude_std, magnitude_max): both ends of timm's default range [0, 10] with normal noise, a
# range widened by mmax (the RandAugment paper went to 28), and uniform draws (mstd > 100 = inf)
EXTREMES = [(0, 1.0, None), (10, 1.0, None), (30, 1.0, 30), (10, float("inf"), None), (30, float("inf"), 30)]
DRAWS = 25


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """scikit-learn's bundled photograph (a temple in China), RGB, made small."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).resize((64, 43), Image.Resampling.BICUBIC)


def recipe_hparams() -> dict:
    """The hyper-parameters (fill colour, translate range, ...) timm gives RandAugment in mimkit's recipe."""
    cfg = build_config(["finetune"])
    train, _ = finetune_transforms(cfg.finetune, 32, cfg.data.mean, cfg.data.std)
    (ra,) = [t for t in train.transforms if isinstance(t, RandAugment)]
    return ra.ops[0].hparams


def extreme_ops(hparams: dict) -> list[AugmentOp]:
    return [
        AugmentOp(name, prob=1.0, magnitude=m, hparams={**hparams, "magnitude_std": std, "magnitude_max": mmax})
        for name in sorted(NAME_TO_OP)
        for m, std, mmax in EXTREMES
    ]


def test_every_op_at_its_extremes_runs_on_a_photo(photo):
    ops = extreme_ops(recipe_hparams())
    wrapped = clamp_posterize_bits(ops)
    assert wrapped == 3 * len(EXTREMES)  # Posterize, PosterizeIncreasing, PosterizeOriginal
    random.seed(0)
    for op in ops:
        for _ in range(DRAWS):
            out = op(photo)
            assert out.mode == "RGB" and out.size == photo.size, op


def test_posterize_ends_keep_one_bit(photo):
    """At the ends timm asks for 0 (or fewer) bits; clamped, the op is Pillow's strongest posterize, 1 bit."""
    hparams = recipe_hparams()
    ends = [("PosterizeIncreasing", 10, None), ("PosterizeIncreasing", 30, 30), ("Posterize", 0, None)]
    for name, magnitude, mmax in ends:
        op = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams={**hparams, "magnitude_max": mmax})
        assert op.level_fn(magnitude, op.hparams)[0] <= 0  # what timm computes
        clamp_posterize_bits(op)
        assert np.array_equal(np.asarray(op(photo)), np.asarray(ImageOps.posterize(photo, 1)))
    wide = AugmentOp("PosterizeOriginal", prob=1.0, magnitude=30, hparams={**hparams, "magnitude_max": 30})
    clamp_posterize_bits(wide)
    assert wide.level_fn(30, wide.hparams) == (8,) and np.array_equal(np.asarray(wide(photo)), np.asarray(photo))


def test_recipe_transform_at_the_top_magnitude_never_raises(photo):
    """The whole fine-tuning transform, RandAugment at m=10 with noise, every op applied: the draws that made
    2 of 4 fine-tuning runs die (PosterizeIncreasing at m >= 10) come up dozens of times here."""
    cfg = build_config(["finetune"], dotted=["finetune.randaug=rand-m10-n3-mstd1-inc1-p1.0"])
    train, _ = finetune_transforms(cfg.finetune, 32, cfg.data.mean, cfg.data.std)
    (ra,) = [t for t in train.transforms if isinstance(t, RandAugment)]
    assert [type(op.level_fn) for op in ra.ops if op.name.startswith("Posterize")] == [PosterizeBits]
    random.seed(0)
    np.random.seed(0)  # RandAugment picks its ops with numpy
    for _ in range(300):
        assert train(photo).shape == (3, 32, 32)

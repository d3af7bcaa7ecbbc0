"""Test helpers: tiny image folders made on the fly and a tiny, fast configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_images(folder: Path, n: int, size: int = 16, seed: int = 0, fmt: str = "png") -> list[Path]:
    """n random-but-structured RGB images (a bright square on a dark ground) in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        s = size // 2
        y, x = rng.integers(0, size - s, 2)
        img[y : y + s, x : x + s] = rng.integers(150, 255, 3)
        p = folder / f"img_{i:04d}.{fmt}"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


TINY = [
    "data.image_size=16",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
]


def make_tokenizer(out_dir: Path, image_size: int = 16, vocab_size: int = 64, downsample: int = 4) -> Path:
    """A small, randomly initialised VQ tokenizer saved as a tokenizer folder (16 px -> 4x4 tokens)."""
    import torch

    from mimkit.models.tokenizer import VQTokenizer, save_tokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(vocab_size=vocab_size, downsample=downsample, width=16, code_dim=8, res_blocks=1,
                      image_size=image_size)  # fmt: skip
    return save_tokenizer(tok, out_dir)


def sgd_steps(method, data_cfg, steps: int, opt=None, reseed: int | None = None) -> list[float]:
    """`steps` SGD steps (lr 0.05, or `opt`) of a built method in train mode on fixed uint8 crops made into its views
    as the pipeline does ('unit' views in [0, 1], the others normalised), the teacher updated after each (step of 10)
    -> the losses. `reseed`: torch's global seed before each step's forward is reseed + step (masks alike)."""
    import torch

    from mimkit.data.pipeline import prepare_batch

    method.train()
    opt = opt or torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        raw = {v.name: torch.randint(0, 256, (8, 3, v.size, v.size), generator=g, dtype=torch.uint8)
               for v in method.views}  # fmt: skip
        if reseed is not None:
            torch.manual_seed(reseed + step)
        loss, _ = method(prepare_batch(raw, method.views, "cpu", data_cfg.mean, data_cfg.std))
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step + 1, 10)
        losses.append(loss.item())
    return losses

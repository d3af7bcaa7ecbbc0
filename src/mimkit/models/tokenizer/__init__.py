"""Image tokenizers: images <-> grids of discrete tokens (targets for BEiT, the corruptor of CIM).

A tokenizer folder holds `tokenizer.json` (kind, constructor arguments, vocabulary, grid) and `model.safetensors`;
`mimkit tokenizer train` and `mimkit tokenizer import-dalle` write one, `load_tokenizer` reads it back frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ... import __version__
from ...atomic import write_weights_folder
from ...config import ConfigError
from .base import ImageTokenizer, codebook_stats, psnr
from .dalle import DalleTokenizer, map_pixels, unmap_pixels
from .vqvae import VQTokenizer

__all__ = [
    "DalleTokenizer",
    "ImageTokenizer",
    "KINDS",
    "VQTokenizer",
    "aligned_input_size",
    "check_grid",
    "codebook_stats",
    "load_tokenizer",
    "map_pixels",
    "psnr",
    "save_tokenizer",
    "tokenizer_folder",
    "unmap_pixels",
]

KINDS: dict[str, type[ImageTokenizer]] = {"vqvae": VQTokenizer, "dalle": DalleTokenizer}
CONFIG_NAME, WEIGHTS_NAME = "tokenizer.json", "model.safetensors"


def save_tokenizer(tok: ImageTokenizer, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write `tok` as a tokenizer folder (replaced atomically); `meta` (JSON values) is kept under 'mimkit'."""
    out_dir = Path(out_dir)
    config = {
        "kind": tok.kind,
        "args": tok.config(),
        "vocab_size": tok.vocab_size,
        "downsample": tok.downsample,
        "image_size": tok.image_size,
        "grid": tok.grid(),
        "mimkit": {"version": __version__, **(meta or {})},
    }
    return write_weights_folder(tok, out_dir, config, config_name=CONFIG_NAME)


def tokenizer_folder(path: str | Path) -> Path:
    """The tokenizer folder `path` names: itself, or the `tokenizer/` inside a `mimkit tokenizer train` run
    folder (`--out runs/tok` writes `runs/tok/tokenizer/`) when `path` has no tokenizer.json of its own."""
    p = Path(path)
    inner = p / "tokenizer"
    if not (p / CONFIG_NAME).is_file() and (inner / CONFIG_NAME).is_file():
        return inner
    return p


def read_tokenizer_config(path: str | Path) -> dict:
    """tokenizer.json of a tokenizer folder (or of a tokenizer run folder's `tokenizer/`); ConfigError naming
    the path when it is neither."""
    p = tokenizer_folder(path)
    if not p.exists():
        raise ConfigError(f"tokenizer path '{p}' does not exist")
    if not p.is_dir() or not (p / CONFIG_NAME).is_file():
        raise ConfigError(
            f"tokenizer path '{p}' is not a tokenizer folder (no {CONFIG_NAME}, nor tokenizer/{CONFIG_NAME}); make "
            "one with `mimkit tokenizer train` or `mimkit tokenizer import-dalle`"
        )
    try:
        config = json.loads((p / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{p / CONFIG_NAME}' is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("kind") not in KINDS or not isinstance(config.get("args"), dict):
        kind = config.get("kind") if isinstance(config, dict) else None
        raise ConfigError(f"'{p / CONFIG_NAME}' names tokenizer kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return config


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
    """A tokenizer folder, or a tokenizer run folder holding one in `tokenizer/` -> the tokenizer on `device`,
    frozen (eval mode for good, no gradients)."""
    p = tokenizer_folder(path)
    config = read_tokenizer_config(p)
    try:
        tok = KINDS[config["kind"]](**config["args"])
    except TypeError as e:
        kind = config["kind"]
        raise ConfigError(f"'{p / CONFIG_NAME}' has arguments that do not fit a {kind} tokenizer: {e}") from None
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"tokenizer folder '{p}' has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
        tok.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 — truncated file, wrong shapes, missing keys
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"'{weights}' does not fit the tokenizer described in {CONFIG_NAME}: {first}") from None
    return tok.to(device).freeze()


def check_grid(tok: ImageTokenizer, image_size: int, patch_size: int, tokenizer_size: int | None = None) -> int:
    """The token grid must be the ViT's patch grid (one token per patch). The tokenizer's grid is
    `tokenizer_size` (default: its own input size, `tok.image_size`) / `tok.downsample`; the encoder's is
    `image_size` / `patch_size`. -> the grid side; ConfigError naming both grids when they differ."""
    size = tok.image_size if tokenizer_size is None else tokenizer_size
    if image_size % patch_size:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    enc = image_size // patch_size
    aligned = enc * tok.downsample
    if size % tok.downsample:
        raise ConfigError(
            f"tokenizer input {size} px is not a multiple of its downsampling {tok.downsample}; "
            f"feed it {aligned} px images to match the encoder grid {enc}x{enc}"
        )
    grid = size // tok.downsample
    if grid != enc:
        raise ConfigError(
            f"tokenizer grid {grid}x{grid} != encoder grid {enc}x{enc}: the {tok.kind} tokenizer turns {size} px "
            f"images into {grid}x{grid} tokens (downsampling {tok.downsample}), the encoder cuts {image_size} px "
            f"images into {patch_size} px patches; {grid_fix(grid, image_size, patch_size)}"
        )
    return grid


def grid_fix(grid: int, image_size: int, patch_size: int) -> str:
    """What makes the encoder's grid the tokenizer's `grid`: one patch per token, or images of that many patches."""
    fixes = [f"model.patch_size={image_size // grid} (one patch per token)"] if image_size % grid == 0 else []
    fixes.append(f"data.image_size={grid * patch_size} ({grid}x{grid} patches of {patch_size} px)")
    enc = image_size // patch_size
    return f"set {' or '.join(fixes)}, or use a tokenizer with {enc}x{enc} tokens"


def aligned_input_size(tok: ImageTokenizer, image_size: int, patch_size: int) -> int:
    """The tokenizer input size that gives one token per patch of the encoder (DALL-E, 224 px / 16: 112)."""
    return image_size // patch_size * tok.downsample

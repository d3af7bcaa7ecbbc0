"""Checks across config keys, run once the whole config is known and before anything is written: a range given
as [min, max], attention heads that must divide a width, sin-cos position tables that need a width divisible by
4. Each would otherwise pass the per-key checks and fail later as a traceback ("math domain error", "dim should be
divisible by num_heads"), after the run folder was made."""

from __future__ import annotations

import dataclasses

from .errors import ConfigError

# [min, max] ranges: dotted key -> (lowest allowed min (exclusive), highest allowed max or None)
RANGES = {
    "data.crop_scale": (0.0, 1.0),  # RandomResizedCrop: a share of the image's area
    "data.crop_ratio": (0.0, None),  # aspect ratios (logs are taken)
    "finetune.crop_scale": (0.0, 1.0),
    "segment.scale_range": (0.0, None),
}


def check_across_keys(cfg) -> None:
    """ConfigError naming the key(s) and value(s) of the first combination that cannot be built or run."""
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        lo, hi = getattr(getattr(cfg, section), name)
        if not (lo > low and lo <= hi and (high is None or hi <= high)):
            bound = f" <= {high:g}" if high is not None else ""
            raise ConfigError(f"{key} must be [min, max] with {low:g} < min <= max{bound}, got [{lo:g},{hi:g}]")
    check_model_widths(cfg.model)
    for section in sorted(cfg.sections):
        check_widths(section, cfg.sections[section])


def check_widths(section: str, options) -> None:
    """A section's `<x>_heads` divides its `<x>_dim` (every head gets an equal share of the width); a
    `decoder_dim` is divisible by 4 (MAE's decoder has a fixed 2-D sin-cos position table)."""
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    for heads_key, heads in values.items():
        dim_key = heads_key.removesuffix("heads") + "dim"
        if heads_key.endswith("_heads") and isinstance(values.get(dim_key), int) and isinstance(heads, int):
            if values[dim_key] % heads:
                raise ConfigError(f"{section}.{dim_key}={values[dim_key]} is not divisible by {section}.{heads_key}="
                                  f"{heads} (each head gets an equal share of the width)")  # fmt: skip
    dim = values.get("decoder_dim")
    if isinstance(dim, int) and dim % 4:
        raise ConfigError(f"{section}.decoder_dim={dim} is not divisible by 4 (the decoder's sin-cos positions)")


def check_model_widths(model) -> None:
    """model.num_heads divides model.embed_dim, either taken from the architecture when not set; a vit_*/deit_*
    width is divisible by 4 (mimkit gives them fixed 2-D sin-cos positions)."""
    dim, heads = model.embed_dim, model.num_heads
    if dim is None and heads is None:
        return
    if dim is None or heads is None:
        sizes = architecture_sizes(model.name)
        if sizes is None:
            return  # not a timm model: building it says so
        dim, heads = dim or sizes[0], heads or sizes[1]
    if dim % heads:
        unset = [k for k in ("embed_dim", "num_heads") if getattr(model, k) is None]
        whose = f"; {unset[0]} is {model.name}'s own" if unset else ""
        raise ConfigError(f"model.embed_dim={dim} is not divisible by model.num_heads={heads} (each head gets an "
                          f"equal share of the width{whose})")  # fmt: skip
    if model.embed_dim and model.embed_dim % 4 and model.name.startswith(("vit_", "deit_")):
        raise ConfigError(f"model.embed_dim={model.embed_dim} is not divisible by 4 (a vit_* encoder's sin-cos "
                          "positions)")  # fmt: skip


def architecture_sizes(name: str) -> tuple[int, int] | None:
    """(embed_dim, num_heads) of the timm architecture `name`, built on the meta device (no memory, no weights);
    None when it is not a timm model with attention blocks."""
    import timm
    import torch

    if not timm.is_model(name):
        return None
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        return int(model.embed_dim), int(model.blocks[0].attn.num_heads)
    except Exception:  # noqa: BLE001 — not a ViT-like model: nothing to check here
        return None

"""Export an encoder as a timm Hugging Face Hub folder: `config.json` + `model.safetensors`.

`timm.create_model('local-dir:DIR', pretrained=True)` loads the folder strictly, and the same folder can be
uploaded to the Hub and loaded with `hf-hub:user/name`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import __version__
from .atomic import write_weights_folder


def timm_model_args(encoder: nn.Module) -> dict:
    """The factory arguments that rebuild `encoder` (recorded by timm), minus training-only ones."""
    args = dict(getattr(encoder, "_model_args", {}) or {})
    for k in ("pretrained", "drop_path_rate", "drop_rate", "pretrained_cfg", "pretrained_cfg_overlay", "device"):
        args.pop(k, None)
    args["num_classes"] = 0
    return {k: v for k, v in args.items() if isinstance(v, int | float | str | bool | list | tuple | type(None))}


def _pool_name(encoder: nn.Module) -> str:
    """ViTs keep the pooling as a string; CNNs as a SelectAdaptivePool2d module with a `pool_type`."""
    pool = getattr(encoder, "global_pool", "")
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "") or "")


def export_encoder(
    encoder: nn.Module,
    out_dir: str | Path,
    *,
    image_size: int,
    mean,
    std,
    interpolation: str = "bicubic",
    mimkit_meta: dict | None = None,
) -> Path:
    """Write the encoder's state dict and its timm config into `out_dir` (replaced atomically)."""
    out_dir = Path(out_dir)
    architecture = encoder.default_cfg.get("architecture") or encoder.pretrained_cfg["architecture"]
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(encoder.num_features),
        "global_pool": _pool_name(encoder),
        "model_args": timm_model_args(encoder),
        "pretrained_cfg": {
            "tag": "mimkit",
            "custom_load": False,
            "input_size": [3, image_size, image_size],
            "fixed_input_size": bool(encoder.pretrained_cfg.get("fixed_input_size", False)),
            "interpolation": interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": encoder.pretrained_cfg.get("first_conv"),
            "classifier": encoder.pretrained_cfg.get("classifier"),
        },
        "mimkit": {"version": __version__, **(mimkit_meta or {})},
    }
    return write_weights_folder(encoder, out_dir, config, config_name="config.json")


def read_export(path: str | Path) -> dict:
    """What an export folder says about its encoder: architecture, model_args, image_size, mean, std and the
    mimkit method that trained it (errors name the folder or file)."""
    import json

    from .config import ConfigError

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(f"'{path}' is not an exported encoder folder (needs config.json and model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
        pcfg = config["pretrained_cfg"]
        return {
            "architecture": config["architecture"],
            "model_args": dict(config.get("model_args") or {}),
            "image_size": int(pcfg["input_size"][-1]),
            "mean": tuple(pcfg["mean"]),
            "std": tuple(pcfg["std"]),
            "method": config.get("mimkit", {}).get("method"),
        }
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"'{config_file}' is not a timm export config: {e!r}") from None


def load_exported(path: str | Path) -> nn.Module:
    """Build the timm model from an export folder (strict load), for evaluation and fine-tuning."""
    import timm

    return timm.create_model(f"local-dir:{Path(path).resolve()}", pretrained=True)


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}

"""Encoders back from disk for evaluation: a pre-training checkpoint (.pt) or an export folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..export import encoder_state
from ..safe_load import check_finite, load_exported, read_export
from .pretrain import method_from_checkpoint


def load_encoder(path: str | Path, device="cpu", allow_download: bool = False) -> tuple[nn.Module, dict]:
    """An encoder from a training checkpoint (.pt) or an export folder -> (encoder, preprocessing info with
    image_size, mean, std, method)."""
    p = Path(path)
    if p.is_dir():
        info = read_export(p, allow_download=allow_download)
        info = {k: v for k, v in info.items() if k in ("image_size", "mean", "std", "method")}
        return load_exported(p, allow_download=allow_download).to(device).eval(), info
    method, cfg, _ = method_from_checkpoint(p, device)
    check_finite(encoder_state(method.encoder), f"checkpoint '{p}'")
    info = {"image_size": cfg.data.image_size, "mean": cfg.data.mean, "std": cfg.data.std, "method": cfg.method,
            "config": cfg}  # fmt: skip
    return method.encoder.eval(), info

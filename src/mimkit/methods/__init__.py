"""Pre-training methods. The registry is a plain dict: a new method joins by adding its file and one line."""

from __future__ import annotations

from ..config import ConfigError
from .base import Method
from .mae import MAE

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
}


def build_method(cfg) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[cfg.method](cfg)

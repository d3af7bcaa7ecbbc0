"""Pre-training methods. The registry is a plain dict: a new method joins by adding its file and one line."""

from __future__ import annotations

from ..config import ConfigError
from .base import Method
from .beit import BEiT
from .cim import CIMResPix, CIMRevDet
from .cmae import CMAE
from .conmim import ConMIM
from .mae import MAE
from .simmim import SimMIM
from .tokenizer import TokenizerTraining

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
    "cmae": CMAE,
    "conmim": ConMIM,
    "simmim": SimMIM,
    "beit": BEiT,
    "cim-respix": CIMResPix,
    "cim-revdet": CIMRevDet,
    "tokenizer": TokenizerTraining,
}


def build_method(cfg) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[cfg.method](cfg)

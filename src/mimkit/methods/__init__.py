"""Pre-training methods. The registry is a plain dict: a new method joins by adding its file and one line."""

from __future__ import annotations

import sys

from ..config import ConfigError
from .base import Method
from .beit import BEiT
from .cim import CIMResPix, CIMRevDet
from .cmae import CMAE
from .cmae_huang import CMAEHuang
from .conmim import ConMIM
from .dino import DINO
from .mae import MAE
from .mocov3 import MoCoV3
from .simmim import SimMIM

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
    "cmae-mao": CMAE,
    "cmae-huang": CMAEHuang,
    "conmim": ConMIM,
    "mocov3": MoCoV3,
    "dino": DINO,
    "simmim": SimMIM,
    "beit": BEiT,
    "cim-respix": CIMResPix,
    "cim-revdet": CIMRevDet,
}
# old names that still work, with a one-line notice: {old: (new, why)}
RENAMED = {"cmae": ("cmae-mao", "two papers are called CMAE: cmae-mao (Mao et al. 2022, the seed) and cmae-huang")}
_noticed: set[str] = set()


def option_sections() -> dict[str, type]:
    """{config section: options dataclass} of every registered method (`mimkit.run_config` attaches them to a run)."""
    return {cls.section_name(): cls.Options for cls in METHODS.values()}


def method_class(name: str) -> type[Method]:
    if name in RENAMED:
        new, why = RENAMED[name]
        if name not in _noticed:
            _noticed.add(name)
            print(f"notice: --method {name} is now '{new}' ({why})", file=sys.stderr)
        name = new
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_method(cfg) -> Method:
    return method_class(cfg.method).from_config(cfg)

"""Training-state checkpoints: tensors and plain values only (they load with `torch.load(weights_only=True)`),
written atomically so a crash mid-write never leaves a half-written `last.pt`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..config import ConfigError


def save_atomic(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, expect_method: str | None = None) -> dict:
    """Load a mimkit checkpoint safely; errors name the file (missing, foreign, or from another method)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"checkpoint '{path}' is not a mimkit checkpoint that loads safely: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"checkpoint '{path}' is not a mimkit checkpoint (no 'model'/'config' entries)")
    if expect_method is not None and state.get("method") != expect_method:
        raise ConfigError(f"checkpoint '{path}' was written by method '{state.get('method')}', not '{expect_method}'")
    return state


def check_same_run(state: dict, path: Path, kind: str, source: str, stored_source: str, cfg, sections) -> None:
    """A downstream checkpoint (`kind` fine-tune / segment) continues this run only if it was written for the same
    encoder `source` and with the same config `sections`; otherwise an error naming the file and the difference."""
    from ..config import config_from_dict, to_dict

    if state.get("kind") != kind:
        raise ConfigError(f"'{path}' is not a {kind} checkpoint; use another --out")
    if stored_source != source:
        raise ConfigError(f"'{path}' was written for encoder '{stored_source}', not '{source}'; use another --out")
    old, new = to_dict(config_from_dict(state["config"])), to_dict(cfg)  # keys added since: their defaults
    for key in sections:
        if old[key] != new[key]:
            raise ConfigError(f"'{path}' was written with other '{key}' settings; use another --out or the same ones")


def capture_rng(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)

"""Weights folders written atomically (exports, tokenizers): no half-written folder after a crash."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from . import __version__


def write_weights_folder(module: nn.Module, out_dir: str | Path, config: dict, config_name: str) -> Path:
    """`module`'s state dict as model.safetensors + `config` as JSON, written into a temporary folder beside
    `out_dir` and renamed over it, so a crash never leaves a half-written folder."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "mimkit": __version__})
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

"""Weights folders written atomically (exports, tokenizers): no half-written folder after a crash."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from . import __version__


def write_weights_folder(
    module: nn.Module, out_dir: str | Path, config: dict, config_name: str, texts: dict[str, str] | None = None
) -> Path:
    """`module`'s state dict as model.safetensors + `config` as JSON (+ `texts`: {file name: content}, e.g. a
    model card), written into a temporary folder beside `out_dir` and renamed over it, so a crash never leaves a
    half-written folder."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "mimkit": __version__})
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            from .errors import CheckpointError

            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise CheckpointError(
                f"no space left in '{out_dir.parent}' for '{out_dir.name}' (about {need / 2**20:.0f} MiB); "
                f"{'the previous folder is unchanged' if out_dir.exists() else 'nothing was written'}"
            ) from None
        raise
    return out_dir


def replace_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path` and rename it over `path`: readers see the old file or the
    new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""Files and folders written atomically (exports, tokenizers, rewritten text files): no half-written file after a
crash; and the one error path of a refused write (full, failing or read-only device), for every write of a run."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .errors import MimkitError, WriteError, write_failure


@contextlib.contextmanager
def on_write_failure(path: str | Path, kept: str | Callable[[], str] = "", need: int | None = None):
    """A refused write (a full disk, an I/O error, a read-only file system, or torch's and safetensors' disguises
    of them) while writing `path` becomes a one-line WriteError naming the file, the folder, the size when known
    (`need` bytes) and what is left (`kept`, or a function saying it, asked only then)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        reason = write_failure(e, writing=True)
        if reason is None:
            raise
        path = Path(path)
        size = f" (about {need / 2**20:.1f} MiB)" if need is not None else ""
        left = kept() if callable(kept) else kept
        raise WriteError(f"cannot write '{path.name}' in '{path.parent}': {reason}{size}" +
                         (f"; {left}" if left else ""), reason) from None  # fmt: skip


def temp_name(path: Path) -> str:
    """The prefix of `path`'s temporary siblings: hidden, with this process's id, so a later run can tell a dead
    writer's leftovers (`remove_leftovers`) from a live one's."""
    return f".{path.name}.{os.getpid()}."


def remove_leftovers(path: Path) -> list[str]:
    """Remove the temporary siblings of `path` that killed writers left behind: `.<name>.<pid>.<...>tmp` whose
    process is gone (a live one's are kept), and the `.<name>.<random>` folders of mimkit's exports before the pid
    was in the name. -> the names removed."""
    ours = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\..*tmp|[a-z0-9_]{{8}})")
    removed = []
    for p in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else []:
        match = ours.fullmatch(p.name)
        if match is None or (match[1] is not None and pid_alive(int(match[1]))) or (match[1] is None and p.is_file()):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else discard(p)
        if not os.path.lexists(p):  # what the device would not remove is tried again by the next run
            removed.append(p.name)
    return removed


def discard(path: str | Path) -> bool:
    """Remove the temporary file `path` if it is there. A removal the device refuses leaves a leftover that the
    next run in the folder removes (`remove_leftovers`), never a reason to fail a write that succeeded.
    -> False when it is still there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """True unless no process `pid` runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def write_weights_folder(
    module: nn.Module, out_dir: str | Path, config: dict, config_name: str, texts: dict[str, str] | None = None
) -> Path:
    """`module`'s state dict as model.safetensors + `config` as JSON (+ `texts`: {file name: content}, e.g. a
    model card), written into a temporary folder beside `out_dir` and exchanged with it in one step where the
    system can (`exchange`), so a crash never leaves a half-written folder, nor (on Linux) none. Its files are
    fsynced before the exchange, so a power loss does not put empty files in place of the previous export."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise MimkitError(f"'{out_dir}' exists and is not a folder (a file or a link): remove it or write elsewhere")
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    kept = "the previous folder is unchanged" if out_dir.exists() else "nothing was written"
    with on_write_failure(out_dir, kept, need):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)  # a killed export's temporary folder
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(out_dir), suffix=".tmp", dir=out_dir.parent))
        try:
            write_folder(tmp, out_dir, tensors, config, config_name, texts)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def write_folder(tmp: Path, out_dir: Path, tensors: dict, config: dict, config_name: str, texts: dict | None):
    """The folder's files into `tmp`, flushed, then `tmp` exchanged with `out_dir` (or renamed to it)."""
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "mimkit": __version__})
    (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (texts or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    for f in tmp.iterdir():
        f.chmod(0o644)
        fsync_path(f)
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    fsync_path(tmp)
    if out_dir.exists() and exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder (a later export removes what stays)
    else:
        if out_dir.exists():
            shutil.rmtree(out_dir)  # no atomic exchange here: a moment without the folder
        tmp.rename(out_dir)
    fsync_path(out_dir.parent)


def fsync_path(path: Path) -> None:
    """Flush a written file, or a folder's entries, to the device (folders only on POSIX systems)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of `a` and `b` in one step (Linux's renameat2 with RENAME_EXCHANGE), so a reader or a crash
    never finds neither. -> False where the C library, the file system or a sandbox cannot (the caller falls
    back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    # no kernel or file-system support, overlayfs lower-layer folders (EXDEV), seccomp sandboxes (EPERM), or `b`
    # gone in the meantime: the caller's remove-and-rename handles all of them
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM, errno.ENOENT):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path` and rename it over `path`: readers see the old file or the
    new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(temp_name(path) + "tmp")
    try:
        with on_write_failure(path, f"'{path.name}' is unchanged" if path.exists() else ""):
            with tmp.open("w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # the new content is on disk before its name is
            tmp.chmod(0o644)
            os.replace(tmp, path)
    finally:
        discard(tmp)
    return path


def save_torch(state: dict, path: str | Path, keep_previous: bool = False,
                kept: Callable[[], str] | None = None) -> None:  # fmt: skip
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (the old file becomes
    `prev.pt` first when `keep_previous`). A refused write raises WriteError naming the folder, the size and what
    is left (`kept()`, by default whether `path` is unchanged); no temporary file is left either way."""
    path = Path(path)
    kept = kept or (lambda: f"'{path}' is unchanged" if path.exists() else f"'{path}' was not written")
    with on_write_failure(path, kept, state_bytes(state)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=".tmp", dir=path.parent)
        prev = path.with_name("prev.pt")
        link = prev.with_name(temp_name(prev) + "link.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            if keep_previous and path.exists():
                discard(link)  # a leftover of this process (a link that stays makes os.link say so)
                os.link(path, link)  # `path` stays in place until the new state replaces it
                os.replace(link, prev)
            os.replace(tmp, path)
        finally:
            discard(tmp)
            discard(link)


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0

"""The errors mimkit raises for what a user can fix. The CLI turns every `MimkitError` into a one-line message and
exit status 2; a `TrainingError` (the run itself went wrong, e.g. a diverged loss) exits with status 1."""

from __future__ import annotations

import errno


class MimkitError(ValueError):
    """Bad input a user can fix; the message names the file, key or value."""


class ConfigError(MimkitError):
    """A recipe, override or CLI value that does not fit the schema."""


class DataError(ConfigError):
    """A data folder, shard or file that cannot be used as given."""


class CheckpointError(MimkitError):
    """A checkpoint or export that is missing, unreadable, foreign or does not fit the run."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class DivergedError(TrainingError):
    """A loss or gradient was not finite at `step`; nothing after the step before it was saved."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class WriteError(MimkitError):
    """The device refused a write: full (ENOSPC), over quota (EDQUOT), failing (EIO) or read-only (EROFS). The
    message names the file and what the run folder keeps; `reason` says which, for the advice; `advised`: the
    message already says what to do."""

    def __init__(self, message: str, reason: str = "", advised: bool = False):
        super().__init__(message)
        self.reason, self.advised = reason, advised


_NO_SPACE, _QUOTA = "no space left on the device", "disk quota exceeded"
_IO, _READ_ONLY = "input/output error (the device failed)", "read-only file system"
_DENIED, _DISGUISED = "permission denied", "the device refused the write (full or failing)"
_REASONS = {errno.ENOSPC: _NO_SPACE, errno.EDQUOT: _QUOTA, errno.EROFS: _READ_ONLY}
# as likely in a read (a failing or unreadable data file): counted only where a write is known to be under way
_WRITING_REASONS = {errno.EIO: _IO, errno.EACCES: _DENIED, errno.EPERM: _DENIED}
# what torch.save and safetensors make of these: the OSError is only the context of a RuntimeError ("[enforce fail
# at inline_container.cc] unexpected pos", "file write failed") or text inside another error ("(os error 5)")
_REASON_TEXT = {"No space left on device": _NO_SPACE, "(os error 28)": _NO_SPACE,
                "Disk quota exceeded": _QUOTA, "(os error 122)": _QUOTA,
                "Input/output error": _IO, "(os error 5)": _IO, "(os error 13)": _DENIED,
                "Read-only file system": _READ_ONLY, "(os error 30)": _READ_ONLY}  # fmt: skip
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def write_failure(e: BaseException, writing: bool = False) -> str | None:
    """Why a write failed when the device refused it ('no space left on the device', 'disk quota exceeded', a
    read-only file system, torch's writer failing without saying why and, when `writing` (the caller knows a write
    was under way), an input/output error or a denied permission), looking through the chain of causes; None for
    any other error."""
    reasons = {**_REASONS, **_WRITING_REASONS} if writing else _REASONS
    known = set(reasons.values())
    seen, disguised = set(), None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in reasons:
            return reasons[e.errno]
        text = str(e)
        for needle, reason in _REASON_TEXT.items():
            if needle in text and reason in known:
                return reason
        if disguised is None and isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
            disguised = _DISGUISED
        e = e.__cause__ or e.__context__
    return disguised


def write_advice(reason: str) -> str:
    """What to do about a refused write of `reason` (from write_failure), before re-running the same command."""
    if reason in (_NO_SPACE, _QUOTA):
        return "free some space"
    if reason in (_READ_ONLY, _DENIED):
        return "make the folder writable or use another --out"
    if reason == _DISGUISED:
        return "free some space or check the device"
    return "check the device (or use another --out)"

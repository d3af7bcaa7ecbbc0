"""What the non-folder sources share: fsspec paths, brace patterns, the classes file and side files (indexes,
caches) written next to the data when possible and into the user cache folder otherwise."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..folder import DataError, user_cache_dir

CLASSES_FILE = "classes.txt"  # one class name per line, line k naming label k (written by `mimkit data pack`)
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: 'a-{000..012}.tar' (zero-padded as written) and 'a-{x,y}.tar', nested or
    several per pattern. A pattern without braces is itself."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    if ".." in body:
        first, last = body.split("..", 1)
        if not (first.isdigit() and last.isdigit()):
            raise DataError(f"shard pattern '{pattern}': '{{{body}}}' is not a range of integers like {{000..099}}")
        width = len(first) if first.startswith("0") else 0
        items = [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def url_to_fs(url: str):
    """(fsspec filesystem, path on it) of a local path or any URL fsspec opens (s3://, gs://, https://...)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing (s3fs, gcsfs...)
        raise DataError(f"cannot open '{url}': {e}") from e


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def expand_pattern(spec: str) -> list[str]:
    """The files a shard/table pattern names, sorted within each glob: braces expanded, then '*' / '?' globbed."""
    out = []
    for item in expand_braces(spec):
        if any(c in item for c in "*?["):
            fs, path = url_to_fs(item)
            found = sorted(fs.glob(path))
            out.extend([fs.unstrip_protocol(p) for p in found] if "://" in item else found)
        else:
            out.append(item)
    return out


def read_classes(folder: str) -> list[str] | None:
    """The class names in `folder`/classes.txt (local or URL), or None when there is no such file."""
    fs, path = url_to_fs(folder.rstrip("/") + "/" + CLASSES_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def check_classes(labels: list[int] | None, classes: list[str] | None, where: str) -> list[str]:
    """`classes`, or '0'..'max label' when no classes file names them; a label outside the names is an error."""
    if labels is None:
        return classes or []
    top = max(labels, default=-1)
    if classes is None:
        return [str(i) for i in range(top + 1)]
    if top >= len(classes) or min(labels, default=0) < 0:
        raise DataError(f"'{where}': labels run from {min(labels)} to {top} but {CLASSES_FILE} names {len(classes)}")
    return classes


def side_files(path: str, suffix: str, kind: str, local: bool, hidden: bool = False) -> list[Path]:
    """Where a file derived from `path` may live, in order of preference: beside it (local data only; a hidden
    file when `hidden`), then in the user cache folder under a name keyed by the path."""
    key = os.path.abspath(path) if local else path
    cached = user_cache_dir(kind) / (hashlib.sha1(key.encode()).hexdigest() + suffix)
    if not local:
        return [cached]
    folder, name = os.path.split(key)
    return [Path(folder) / f"{'.' if hidden else ''}{name}{suffix}", cached]

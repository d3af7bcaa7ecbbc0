"""Tar shards in the WebDataset layout, read by index: one seek + read per image.

A sample is the run of members sharing a key (the member name up to the first dot of its base name): one image
(`.jpg`, `.png`, ...) and optionally `.cls` (its integer label). Each shard has an index of its images' byte
offsets, `<shard>.index.json`, written by `mimkit data pack` or built on first open (one sequential pass with
`tarfile`) and kept beside the shard when that folder is writable, else in the user cache folder.

Why not webdataset's `wids`: it copies whole remote shards into a local cache before reading, needs a shard-list
file with sample counts, and rebuilds its index on every open; here a remote image is one ranged read.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
import threading

import numpy as np

from ..folder import IMAGE_EXTENSIONS, DataError, ImageSource, rank_zero_computes, write_text_atomic
from .common import check_classes, expand_pattern, is_local, read_classes, side_files, url_to_fs

INDEX_FORMAT = "mimkit-tar-index/1"
INDEX_SUFFIX = ".index.json"
MAX_OPEN_SHARDS = 256  # file descriptors kept open per process


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: 'dir/abc.seg.png' -> ('dir/abc', 'seg.png')."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def build_index(url: str) -> dict:
    """Read shard `url` once, in order -> its index: {format, bytes, keys, offsets, sizes, labels (or None)}."""
    fs, path = url_to_fs(url)
    samples: dict[str, list] = {}  # key -> [data offset, size, label]; members of a sample are adjacent
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                entry = samples.setdefault(key, [-1, 0, None])
                if "." + ext in IMAGE_EXTENSIONS and entry[0] < 0:
                    entry[0], entry[1] = member.offset_data, member.size
                elif ext == "cls":
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    if not text.lstrip("-").isdigit():
                        raise DataError(f"tar shard '{url}': label member '{member.name}' holds '{text[:20]}'")
                    entry[2] = int(text)
            end = tar.offset  # where the end-of-archive marker (two zero blocks) should start
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"tar shard '{url}' cannot be read as a tar file: {e}") from e
    images = [(k, e) for k, e in samples.items() if e[0] >= 0]
    if not images:
        raise DataError(f"tar shard '{url}' holds no image members ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    total = fs.size(path)
    if total < end + 1024:  # tarfile takes a cut archive's end for its end: no end marker means it was cut
        raise DataError(f"tar shard '{url}' is truncated: {total} bytes, its members reach byte {end}")
    labeled = [e[2] is not None for _, e in images]
    if any(labeled) and not all(labeled):
        raise DataError(f"tar shard '{url}': {labeled.count(False)} of {len(images)} samples have no .cls label")
    return {
        "format": INDEX_FORMAT,
        "bytes": total,
        "keys": [k for k, _ in images],
        "offsets": [e[0] for _, e in images],
        "sizes": [e[1] for _, e in images],
        "labels": [e[2] for _, e in images] if all(labeled) else None,
    }


def _read_index(fs, path: str, size: int) -> dict | None:
    try:
        with fs.open(path, "rt", encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    return index if index.get("format") == INDEX_FORMAT and index.get("bytes") == size else None


def shard_index(url: str) -> dict:
    """The index of shard `url`: read from beside it or from the user cache when it matches the shard's size,
    else built and saved to the first writable of those places (atomically: ranks may race to build it)."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise DataError(f"tar shard '{url}' does not exist")
    size = fs.size(path)
    local = is_local(fs)
    places = side_files(path if local else url, INDEX_SUFFIX, "tar-index", local)
    found = None if local else _read_index(fs, path + INDEX_SUFFIX, size)  # uploaded beside a remote shard
    for place in places:
        found = found or _read_index(url_to_fs(str(place))[0], str(place), size)
    if found is not None:
        return found
    index = build_index(url)
    for place in places:
        try:
            write_text_atomic(place, json.dumps(index, separators=(",", ":")))
            break
        except OSError:
            continue
    return index


def index_path(shard: str) -> str:
    """Where `pack` writes the index of a local shard (the first place `shard_index` looks)."""
    return str(side_files(shard, INDEX_SUFFIX, "tar-index", local=True)[0])


class TarShards(ImageSource):
    """Images of one or more tar shards, in shard order then member order. Image `i` is the byte range
    `offsets[i]`, `sizes[i]` of shard `shard[i]`: a `pread` on a kept-open descriptor for local shards (safe from
    threads and forked workers), one ranged read through fsspec for remote ones."""

    def __init__(self, name, urls, shard, offsets, sizes, keys, labels, classes):
        super().__init__(name, labels=labels, classes=classes)
        self.urls, self.shard, self.offsets, self.sizes, self.keys = urls, shard, offsets, sizes, keys
        self._fs = url_to_fs(urls[0])[0]  # one pattern, one filesystem
        self._paths = [url_to_fs(u)[1] for u in urls]
        self._local = is_local(self._fs)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()  # an evicted descriptor's number may be reused: read and evict one at a time

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_lock": None}  # descriptors do not travel to spawned workers

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[s] = os.open(self._paths[s], os.O_RDONLY)
        return fd

    def read_bytes(self, index: int) -> bytes:
        s, start, size = int(self.shard[index]), int(self.offsets[index]), int(self.sizes[index])
        if self._local:
            with self._lock:
                data = os.pread(self._fd(s), size, start)
        else:
            data = self._fs.cat_file(self._paths[s], start=start, end=start + size)
        if len(data) != size:
            raise OSError(f"{self.describe(index)}: shard ends after {len(data)} of {size} bytes")
        return data

    def open(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.read_bytes(index))

    def describe(self, index: int) -> str:
        return f"{self.urls[int(self.shard[index])]}:{self.keys[index].decode('utf-8')}"

    def subset(self, indices: list[int]) -> TarShards:
        rows = np.asarray(indices, dtype=np.int64)
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return TarShards(self.name, self.urls, self.shard[rows], self.offsets[rows], self.sizes[rows],
                         self.keys[rows], labels, self.classes)  # fmt: skip


def open_shards(spec: str | list[str], name: str | None = None) -> TarShards:
    """A TarShards source over a pattern ('train-{000000..000255}.tar', globs, URLs) or a list of shards. Labels
    come from the .cls members (every sample has one, or none does), class names from classes.txt beside the
    first shard."""
    urls = expand_pattern(spec) if isinstance(spec, str) else list(spec)
    if not urls:
        raise DataError(f"shard pattern '{spec}' names no file")
    indexes = rank_zero_computes(lambda: [shard_index(u) for u in urls])  # other ranks touch no shard here
    labeled = {idx["labels"] is not None for idx in indexes}
    if len(labeled) > 1:
        raise DataError(f"shards '{spec}': some have .cls labels and some do not")
    shard = np.concatenate([np.full(len(idx["offsets"]), s, dtype=np.int32) for s, idx in enumerate(indexes)])
    offsets = np.concatenate([np.asarray(idx["offsets"], dtype=np.int64) for idx in indexes])
    sizes = np.concatenate([np.asarray(idx["sizes"], dtype=np.int64) for idx in indexes])
    keys = np.array([k.encode("utf-8") for idx in indexes for k in idx["keys"]])  # bytes: compact, no refcounts
    labels = [lab for idx in indexes for lab in idx["labels"]] if labeled == {True} else None
    label = name or (spec if isinstance(spec, str) else urls[0])
    classes = check_classes(labels, read_classes(posixpath.dirname(urls[0]) or "."), label)
    return TarShards(label, urls, shard, offsets, sizes, keys, labels, classes)

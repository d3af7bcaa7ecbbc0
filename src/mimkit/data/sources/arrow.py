"""Hugging Face datasets (`save_to_disk` folders) and Parquet files, read by index from memory-mapped Arrow.

Conventions (fixed; no config keys): the image column is `image`, else the first column of binary type or of
struct type with a binary `bytes` field (how `datasets.Image` stores an encoded image); it must hold the encoded
file (JPEG, PNG...), not a path. The label column, optional, is an integer column named `label`. Class names
come from the `datasets` ClassLabel metadata in the schema, else from classes.txt beside the files.

Arrow files (`save_to_disk`) are memory-mapped as they are. A Parquet file is converted once into an Arrow file,
as `datasets` does (kept beside it as a hidden `.<name>.arrow` when the folder is writable, else in the user
cache folder), then memory-mapped: random access to one image without decoding its row group.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ...atomic import discard
from ..folder import DataError, ImageSource, rank_zero_computes
from .common import check_classes, read_classes, side_files

CACHE_SUFFIX = ".arrow"
SOURCE_KEY = b"mimkit_parquet"  # schema metadata of a converted file: the Parquet file's size and mtime


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401 — a submodule pyarrow does not import itself
    except ImportError as e:
        raise DataError("hf: data needs pyarrow: pip install 'mimkit[data]'") from e
    return pa


def memory_map_table(path: str):
    """An Arrow IPC file (file or stream format: `datasets` writes the latter) as a zero-copy Table."""
    pa = _pyarrow()
    try:
        source = pa.memory_map(path)
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"'{path}' cannot be read as an Arrow file: {e}") from e


def _stamp(path: str) -> bytes:
    st = os.stat(path)
    return json.dumps([st.st_size, st.st_mtime_ns]).encode()


def _converted(cache: Path, stamp: bytes) -> bool:
    pa = _pyarrow()
    try:
        schema = pa.ipc.open_file(pa.memory_map(str(cache))).schema
    except (OSError, pa.ArrowInvalid):
        return False
    return (schema.metadata or {}).get(SOURCE_KEY) == stamp


def parquet_as_arrow(path: str) -> str:
    """The Arrow file holding Parquet file `path`'s rows, converted now unless an up-to-date one exists."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise DataError(f"Parquet file '{path}' does not exist")
    stamp, places = _stamp(path), side_files(path, CACHE_SUFFIX, "arrow", local=True, hidden=True)
    for place in places:
        if _converted(place, stamp):
            return str(place)
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"'{path}' cannot be read as a Parquet file: {e}") from e
    image_column(parquet.schema_arrow, path)  # fail before converting
    schema = parquet.schema_arrow.with_metadata({**(parquet.schema_arrow.metadata or {}), SOURCE_KEY: stamp})
    for place in places:
        tmp = place.with_name(f".{place.name}.{os.getpid()}.tmp")
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in parquet.iter_batches(batch_size=256):
                    writer.write_batch(batch.replace_schema_metadata(schema.metadata))
            os.replace(tmp, place)  # atomic: ranks converting at once leave one whole file
            return str(place)
        except OSError:
            discard(tmp)  # if refused too, the temporary file stays and the next place is tried
    raise DataError(f"no writable place for the Arrow copy of '{path}' (tried {', '.join(map(str, places))})")


def image_column(schema, where: str) -> tuple[str, bool]:
    """(name, whether it is a struct whose `bytes` field holds the image) of the image column."""
    pa = _pyarrow()

    def kind(t) -> str | None:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "binary"
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct" if kind(t.field("bytes").type) == "binary" else None
        return None

    names = (["image"] if "image" in schema.names else []) + [f.name for f in schema]
    for name in names:
        k = kind(schema.field(name).type)
        if k is not None:
            return name, k == "struct"
    raise DataError(
        f"'{where}' has no image column: need a column 'image' or any column of encoded bytes (binary, or a struct "
        f"with a binary 'bytes' field); its columns are {', '.join(f'{f.name}: {f.type}' for f in schema)}"
    )


def hf_class_names(schema) -> list[str] | None:
    """ClassLabel names of column `label` in the `datasets` metadata of an Arrow/Parquet schema, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        return list(features["label"]["names"])
    except (ValueError, KeyError, TypeError):
        return None


class ArrowTable(ImageSource):
    """Rows of Arrow tables (memory-mapped files), image `i` being row `rows[i]` of their concatenation. The
    tables are reopened in each process that unpickles the source (the map is not copied)."""

    def __init__(self, name: str, files: list[str], origins: list[str] | None = None):
        super().__init__(name)
        self.files = files  # the Arrow files read
        self.origins = origins or files  # the files the user named (Parquet ones were converted): for messages
        self._open()
        self.rows = np.arange(self._starts[-1], dtype=np.int64)  # subset() narrows this
        if self._label_chunks is not None:
            all_labels = np.concatenate([c.to_numpy(zero_copy_only=False) for c in self._label_chunks])
            self.labels = all_labels[self.rows].tolist()
        classes = hf_class_names(self._schema)
        if classes is None:
            classes = read_classes(os.path.dirname(os.path.abspath(self.origins[0])))
        self.classes = check_classes(self.labels, classes, name)

    def _open(self) -> None:
        pa = _pyarrow()
        tables = [memory_map_table(f) for f in self.files]
        schema = tables[0].schema
        for f, t in zip(self.origins, tables):
            if not t.schema.remove_metadata().equals(schema.remove_metadata()):
                raise DataError(f"'{f}' has other columns than '{self.origins[0]}'")
        column, is_struct = image_column(schema, self.origins[0])
        chunks = [c for t in tables for c in t.column(column).chunks]
        self._chunks = [c.field("bytes") if is_struct else c for c in chunks]
        self._starts = np.cumsum([0] + [len(c) for c in chunks])
        label = schema.field("label") if "label" in schema.names else None
        labeled = label is not None and pa.types.is_integer(label.type)
        self._label_chunks = [c for t in tables for c in t.column("label").chunks] if labeled else None
        self._schema = schema

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_chunks", "_label_chunks", "_schema")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def read_bytes(self, index: int) -> bytes:
        row = int(self.rows[index])
        c = int(np.searchsorted(self._starts, row, side="right")) - 1
        value = self._chunks[c][row - int(self._starts[c])].as_py()
        if value is None:
            raise OSError(f"{self.describe(index)}: no image bytes (null)")
        return value

    def open(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.read_bytes(index))

    def describe(self, index: int) -> str:
        row = int(self.rows[index])
        f = int(np.searchsorted(self._file_starts(), row, side="right")) - 1
        return f"{self.origins[f]}:row {row - int(self._file_starts()[f])}"

    def _file_starts(self) -> np.ndarray:
        lengths = [memory_map_table(f).num_rows for f in self.files]  # only for messages: cheap, not cached
        return np.cumsum([0] + lengths)

    def subset(self, indices: list[int]) -> ArrowTable:
        out = object.__new__(ArrowTable)
        out.__dict__.update(self.__dict__)
        out.rows = self.rows[np.asarray(indices, dtype=np.int64)]
        out.labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return out


def open_table_files(files: list[str], name: str) -> ArrowTable:
    """An ArrowTable over Arrow and/or Parquet files (the latter converted once)."""
    if not files:
        raise DataError(f"'{name}' names no Arrow or Parquet file")

    def convert() -> list[str]:
        return [parquet_as_arrow(f) if f.endswith(".parquet") else f for f in files]

    rank_zero_computes(convert)  # rank 0 converts first; the others then find its copy (or, node-local, make one)
    arrow = convert()
    for f in arrow:
        if not os.path.isfile(f):
            raise DataError(f"Arrow file '{f}' does not exist")
    return ArrowTable(name, arrow, files)

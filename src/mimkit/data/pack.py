"""`mimkit data pack`: an image folder -> tar shards (WebDataset layout, each with its index) or Parquet files.

The folder is read as pre-training reads it (train/ and val/ or test/ when present, class sub-folders when every
image has one) and written in the same order, so image `i` of a packed split is image `i` of the folder. Image
files are copied byte for byte (never re-encoded: the pixels are the folder's). Written into `out`:

    train-000000.tar, train-000000.tar.index.json, ...   --format tar: samples '<key>.<ext>' (+ '<key>.cls')
    train-00000.parquet, ...                              --format parquet: columns image {bytes, path}, label
    val-*.tar / val-*.parquet                             the evaluation split, named as the folder names it
    classes.txt                                           class k on line k (labeled folders)
    pack.json                                             what was packed; written last, so it marks a whole pack

The Parquet files carry the `datasets` feature metadata (Image, ClassLabel), so `datasets.load_dataset` reads
them too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tarfile
from pathlib import Path

from .folder import DataError, ImageSource, scan_folder, split_folders
from .sources.common import CLASSES_FILE
from .sources.tar import index_path, shard_index

FORMATS = ("tar", "parquet")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip
PARQUET_ROWS = 256  # rows per written batch (a row group holds up to ~1M rows: pyarrow's default)


def parse_size(text: str | int) -> int:
    """'1GB' / '512MB' / '1.5GiB' / 1000000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise DataError(f"--shard-size '{text}' is not a size like 1GB, 512MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def sample_keys(source: ImageSource, root: Path) -> list[str]:
    """WebDataset keys: each file's path under `root` without its extension, dots in the base name made '_'
    (a key ends at the base name's first dot); a clash gets a numbered suffix."""
    keys, seen = [], set()
    for p in source.paths:
        rel = Path(p).relative_to(root)
        key = str(rel.parent / rel.stem.replace(".", "_")) if rel.parent != Path(".") else rel.stem.replace(".", "_")
        unique, n = key, 1
        while unique in seen:
            unique, n = f"{key}_{n}", n + 1
        seen.add(unique)
        keys.append(unique)
    return keys


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: the same folder packs to the same bytes
    return info, data


def write_tar_shards(source: ImageSource, root: Path, out: Path, split: str, shard_bytes: int) -> list[str]:
    """`source` (a scanned folder under `root`) as out/split-NNNNNN.tar shards of about `shard_bytes`, each
    followed by its index. -> shard file names."""
    import io

    shards: list[str] = []
    tar, written = None, 0
    for i, key in enumerate(sample_keys(source, root)):
        data = _read(source.paths[i])
        if tar is None or (written + len(data) > shard_bytes and written > 0):
            if tar is not None:
                _close_shard(tar, out / shards[-1])
            shards.append(f"{split}-{len(shards):06d}.tar")
            tar, written = tarfile.open(out / shards[-1], "w", format=tarfile.PAX_FORMAT), 0
        members = [_tar_member(f"{key}{Path(source.paths[i]).suffix.lower()}", data)]
        if source.labels is not None:
            members.append(_tar_member(f"{key}.cls", str(source.labels[i]).encode()))
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))
            written += 512 + len(payload)
    _close_shard(tar, out / shards[-1])
    return shards


def _close_shard(tar: tarfile.TarFile, path: Path) -> None:
    tar.close()
    shard_index(str(path))  # built by reading the shard back: the same code path as a shard from elsewhere
    if not os.path.isfile(index_path(str(path))):
        raise DataError(f"could not write the index of '{path}' beside it")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e}") from e


def parquet_schema(labeled: bool, classes: list[str]):
    """image: struct<bytes, path> (datasets.Image's storage), label: int64; with the `datasets` features."""
    import pyarrow as pa

    fields = [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    features = {"image": {"_type": "Image"}}
    if labeled:
        fields.append(pa.field("label", pa.int64()))
        features["label"] = {"names": classes, "_type": "ClassLabel"}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=meta)


def write_parquet_files(source: ImageSource, root: Path, out: Path, split: str, shard_bytes: int) -> list[str]:
    """`source` as out/split-NNNNN.parquet files of about `shard_bytes` (uncompressed: images are compressed
    already). -> file names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(source.labels is not None, source.classes)
    files: list[str] = []
    writer, written, rows = None, 0, []

    def flush() -> None:
        if rows:
            columns = {"image": [{"bytes": b, "path": p} for b, p, _ in rows]}
            if source.labels is not None:
                columns["label"] = [lab for _, _, lab in rows]
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            rows.clear()

    for i, p in enumerate(source.paths):
        data = _read(p)
        if writer is None or (written + len(data) > shard_bytes and written > 0):
            if writer is not None:
                flush()
                writer.close()
            files.append(f"{split}-{len(files):05d}.parquet")
            writer, written = pq.ParquetWriter(out / files[-1], schema, compression="none"), 0
        label = source.labels[i] if source.labels is not None else None
        rows.append((data, Path(p).relative_to(root).as_posix(), label))
        written += len(data)
        if len(rows) >= PARQUET_ROWS:
            flush()
    flush()
    writer.close()
    return files


def pack(folder: str | Path, out: str | Path, shard_size: str | int = "1GB", fmt: str = "tar") -> dict:
    """Pack image folder `folder` into `out` (module docstring); -> the manifest also written to out/pack.json."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    shard_bytes = parse_size(shard_size)
    train_dir, eval_dir = split_folders(folder)
    splits = {"train": scan_folder(train_dir)}
    if eval_dir is not None:
        splits[Path(eval_dir).name] = scan_folder(eval_dir)
    labeled = {name: s.labeled for name, s in splits.items()}
    if len(set(labeled.values())) > 1 or len({tuple(s.classes) for s in splits.values()}) > 1:
        raise DataError(f"the splits of '{folder}' differ in their class sub-folders: {labeled}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out '{out}' is not empty: pack writes into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    classes = splits["train"].classes
    if classes:
        (out / CLASSES_FILE).write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    write = write_tar_shards if fmt == "tar" else write_parquet_files
    manifest = {"format": fmt, "source": str(folder), "classes": len(classes), "splits": {}}
    for name, source in splits.items():
        root = train_dir if name == "train" else eval_dir
        files = write(source, Path(root), out, name, shard_bytes)
        manifest["splits"][name] = {"images": len(source), "files": files}
    (out / "pack.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`pack` under the `mimkit data` sub-commands."""
    p = subparsers.add_parser(
        "pack",
        help="convert an image folder into tar shards or Parquet files (with indexes and classes.txt)",
        description="Convert an image folder (train/ + val|test/ or one folder; class sub-folders optional) into "
        "tar shards in the WebDataset layout with per-shard indexes, or Parquet files readable by Hugging Face "
        "datasets, in the folder's order. Pre-train from them with --data OUT (tar) or --data hf:OUT (Parquet).",
    )
    p.add_argument("--data", required=True, help="the image folder to pack")
    p.add_argument("--out", required=True, help="a new or empty folder for the shards")
    p.add_argument("--shard-size", default="1GB", help="about this many bytes per shard (default 1GB)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="tar", help="tar (default) or parquet")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    manifest = pack(args.data, args.out, args.shard_size, args.fmt)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['images']} images in {len(split['files'])} {manifest['format']} file(s)")
    data = args.out if manifest["format"] == "tar" else f"hf:{args.out}"
    print(f"wrote '{args.out}'; pre-train with --data {data}")
    return 0

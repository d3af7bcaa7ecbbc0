"""Where `data.path` points, resolved into a training source and an evaluation source (or None).

| `--data`                                                   | train / evaluation                         |
|------------------------------------------------------------|--------------------------------------------|
| DIR holding train/ and val/ or test/ folders               | image folders (as before)                  |
| DIR holding train-*.tar (and val-*.tar or test-*.tar)      | tar shards (`mimkit data pack`'s layout)   |
| DIR holding train*.parquet or train*.arrow (and val*/test*)| Arrow/Parquet tables                       |
| DIR holding train.txt (and val.txt or test.txt)            | list files                                 |
| any other DIR                                              | one folder of images, labeled or flat      |
| 'x-{000000..000255}.tar', '*.tar', a URL fsspec opens      | tar shards, no evaluation split            |
| list.txt                                                   | one list file, no evaluation split         |
| hf:PATH (a save_to_disk Dataset/DatasetDict folder, Parquet/Arrow files or a folder of them) | tables |

The evaluation split is the first of val, validation, test that exists. A URL names shards or a folder of them
(read through fsspec); the other forms are local.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..folder import DataError, ImageSource, scan_folder, split_folders
from .arrow import open_table_files
from .common import expand_pattern, url_to_fs
from .listfile import read_list
from .tar import open_shards

EVAL_SPLITS = ("val", "validation", "test")
TABLE_SUFFIXES = (".parquet", ".arrow")

__all__ = ["EVAL_SPLITS", "open_shards", "open_table_files", "read_list", "split_sources"]


def _shard_files(folder: str, split: str) -> list[str]:
    """The shards of `split` in `folder` (local or URL): split-*.tar, else split.tar."""
    sharded = expand_pattern(folder.rstrip("/") + f"/{split}-*.tar")
    one = folder.rstrip("/") + f"/{split}.tar"
    fs, path = url_to_fs(one)
    return sharded or ([one] if fs.exists(path) else [])


def _table_files(folder: Path, split: str | None) -> list[str]:
    """Arrow/Parquet files of `split` (all of them when None) in `folder` or its data/ (the Hub's layout)."""
    for where in (folder, folder / "data"):
        found = sorted(
            str(p)
            for suffix in TABLE_SUFFIXES
            for p in where.glob(f"{split or ''}*{suffix}")
            if not p.name.startswith(".")  # hidden: mimkit's own Arrow copies of Parquet files
        )
        if found:
            return found
    return []


def _split_pair(find):
    """(train files, evaluation split name, its files) by `find(split)`, the last two None when there is no
    evaluation split; None when there is no train split."""
    train = find("train")
    if not train:
        return None
    for name in EVAL_SPLITS:
        files = find(name)
        if files:
            return train, name, files
    return train, None, None


def _saved_dataset_files(folder: Path) -> list[str]:
    """The Arrow files of a `datasets` save_to_disk Dataset folder (listed in its state.json)."""
    state = json.loads((folder / "state.json").read_text())
    return [str(folder / f["filename"]) for f in state["_data_files"]]


def hf_splits(path: str) -> tuple[ImageSource, ImageSource | None]:
    """`hf:PATH`: a save_to_disk DatasetDict (train + val/validation/test) or Dataset, a folder of Parquet/Arrow
    files (split by name prefix, else one training set), or a file or pattern of them."""
    folder = Path(path)
    if not folder.is_dir():
        files = expand_pattern(path)
        return open_table_files(files, path), None
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise DataError(f"'{path}' (a DatasetDict) has no 'train' split, only {splits}")
        train = open_table_files(_saved_dataset_files(folder / "train"), f"{path}/train")
        name = next((s for s in EVAL_SPLITS if s in splits), None)
        evaluate = open_table_files(_saved_dataset_files(folder / name), f"{path}/{name}") if name else None
        return train, evaluate
    if (folder / "state.json").is_file():
        return open_table_files(_saved_dataset_files(folder), path), None
    found = _split_pair(lambda split: _table_files(folder, split))
    if found is None:
        return open_table_files(_table_files(folder, None), path), None
    train, name, evaluate = found
    return open_table_files(train, f"{path}/train"), open_table_files(evaluate, f"{path}/{name}") if name else None


def _shard_splits(where: str, train: list[str], name: str | None, evaluate: list[str] | None):
    return open_shards(train, f"{where}/train"), open_shards(evaluate, f"{where}/{name}") if name else None


def _is_shard_pattern(spec: str) -> bool:
    return spec.endswith(".tar") or "{" in spec or any(c in os.path.basename(spec) for c in "*?[")


def split_sources(spec: str) -> tuple[ImageSource, ImageSource | None]:
    """(training source, evaluation source or None) that `data.path` names (module docstring)."""
    if spec.startswith("hf:"):
        return hf_splits(spec[3:])
    if _is_shard_pattern(spec):
        return open_shards(spec), None
    if "://" in spec:  # a folder of shards in object storage
        fs, path = url_to_fs(spec)
        if not fs.isdir(path):
            raise DataError(f"'{spec}' is neither a folder of shards nor a shard pattern")
        found = _split_pair(lambda split: _shard_files(spec, split))
        if found is None:
            raise DataError(f"'{spec}' holds no train-*.tar shards")
        return _shard_splits(spec.rstrip("/"), *found)
    root = Path(spec)
    if root.is_file():
        if root.suffix == ".txt":
            return read_list(spec), None
        if root.suffix in TABLE_SUFFIXES:
            return hf_splits(spec)
        raise DataError(f"'{spec}' is a file but not a list (.txt), a shard (.tar) or a table (.parquet, .arrow)")
    if root.is_dir() and not (root / "train").is_dir():
        found = _folder_of_sources(root)
        if found is not None:
            return found
    train_dir, eval_dir = split_folders(spec)
    return scan_folder(train_dir), scan_folder(eval_dir) if eval_dir is not None else None


def _folder_of_sources(root: Path) -> tuple[ImageSource, ImageSource | None] | None:
    """A folder holding a train split as shards, tables or a list file; None when it holds none of those."""
    found = _split_pair(lambda split: _shard_files(str(root), split))
    if found is not None:
        return _shard_splits(str(root), *found)
    if _table_files(root, "train"):
        return hf_splits(str(root))
    lists = {s: root / f"{s}.txt" for s in ("train", *EVAL_SPLITS) if (root / f"{s}.txt").is_file()}
    if "train" in lists:
        evaluate = next((lists[s] for s in EVAL_SPLITS if s in lists), None)
        return read_list(str(lists["train"])), read_list(str(evaluate)) if evaluate else None
    return None

"""Data: image sources (folders, tar shards, Arrow/Parquet tables, list files, the demo digits), views, seeded
crops and resumable loaders."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, DataConfig
from .demo import load_digits_sources
from .folder import DataError, ImageSource, check_decodable, seeded_subset
from .sources import split_sources
from .views import View

__all__ = ["DataError", "ImageSource", "Splits", "View", "load_splits"]


@dataclass
class Splits:
    """`train`: what pre-training reads. `memory` / `query`: labeled images for k-NN and linear evaluation
    (None when the data has no labels)."""

    train: ImageSource
    memory: ImageSource | None
    query: ImageSource | None


def load_splits(data: DataConfig, seed: int = 0, max_eval_images: int | None = None) -> Splits:
    """Resolve `data.path` ('demo', a folder, shards, tables or a list: `sources.split_sources`) into pre-training
    and evaluation sources."""
    if data.path == "demo":
        train, test = load_digits_sources(seed=0)  # fixed split: results comparable across seeds
        train = seeded_subset(train, data.max_images, seed)
        return Splits(train, train, seeded_subset(test, max_eval_images, seed))
    return _splits(*split_sources(data.path), data, seed, max_eval_images)


def _splits(
    train_source: ImageSource, eval_source: ImageSource | None, data: DataConfig, seed: int, max_eval_images: int | None
) -> Splits:
    train = seeded_subset(train_source, data.max_images, seed)
    check_decodable(train)
    memory = query = None
    if eval_source is not None:
        query = seeded_subset(eval_source, max_eval_images, seed)
        if train.labeled and query.labeled:
            if query.classes != train.classes:
                raise DataError(f"classes of '{eval_source.name}' differ from those of '{train_source.name}'")
            memory = train
        else:
            query = None
    return Splits(train, memory, query)


def labeled_splits(
    path: str, data: DataConfig, seed: int, max_eval_images: int | None
) -> tuple[ImageSource, ImageSource]:
    """(memory/train, query/test) for evaluation commands. Labeled data without an evaluation split (a folder
    without train/ and val|test/, one shard pattern, one list) is split 80/20 with a fixed seed."""
    cfg = DataConfig(**{**data.__dict__, "path": path})
    if path == "demo":
        s = load_splits(cfg, seed, max_eval_images)
        return s.memory, s.query
    src, eval_source = split_sources(path)
    if eval_source is not None:
        s = _splits(src, eval_source, cfg, seed, max_eval_images)
        if s.memory is None:
            raise DataError(f"'{path}' has no labels in both its train and val|test splits: evaluation needs labels")
        return s.memory, s.query
    if not src.labeled:
        raise DataError(f"'{path}' has no labels (class sub-folders): evaluation needs labeled images")
    check_decodable(src)
    import torch

    order = torch.randperm(len(src), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(0.8 * len(src))
    memory = seeded_subset(src.subset(sorted(order[:cut])), data.max_images, seed)
    return memory, seeded_subset(src.subset(sorted(order[cut:])), max_eval_images, seed)


def describe(cfg: Config, splits: Splits) -> str:
    n_eval = f", eval {len(splits.memory)}/{len(splits.query)} labeled" if splits.query is not None else ""
    return f"data '{cfg.data.path}': {len(splits.train)} training images{n_eval}"

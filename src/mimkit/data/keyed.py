"""Per-item randomness keyed by (seed, epoch, index) for datasets whose augmentations draw from the global RNGs
(timm's fine-tuning transforms, the segmentation crops): item (epoch, index) draws the same numbers whichever
worker loads it and whenever, so batches are identical with 0 or N workers and a run resumed mid-epoch sees
exactly the batches it would have seen. The caller's RNG states are left as they were."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 32-bit seed for item `index` of `epoch`; `stream` tells apart draws keyed alike (e.g. per batch)."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1)[0])


class KeyedDataset(Dataset):
    """`dataset[index]` under Python, NumPy and torch RNGs seeded from (seed, epoch, index); keys are
    (epoch, index) pairs as `pipeline.EpochBatchSampler` yields them."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = item_seed(self.seed, epoch, index)
        py, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py)
                np.random.set_state(np_state)

"""A recipe written for a GPU node, run on a laptop or a small subset: the batch and the loader workers are
fitted to the data and the machine before anything is built, each change said in one line. What the run used is
what `config.yaml` records."""

from __future__ import annotations

import os

from .logging import say

MIN_STEPS_PER_EPOCH = 4  # a batch shrunk to fit the data leaves at least this many steps per epoch


def machine_cores() -> int:
    """CPU cores this process may use (its affinity mask, which a batch scheduler sets), shared by the processes
    of this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local_world, 1))


def fit_batch(cfg, num_images: int, world: int, main: bool = True) -> None:
    """A batch larger than the data (`train.batch_size` x processes > images) becomes the largest power of two
    that leaves `MIN_STEPS_PER_EPOCH` steps per epoch; lr then follows the base-lr rule (optim.blr x batch / 256)
    unless the recipe gives an absolute optim.lr."""
    batch = cfg.train.batch_size
    fitted = fitted_batch(batch, num_images, world)
    if fitted == batch:
        return
    cfg.train.batch_size = fitted
    say(f"train.batch_size {batch} x {world} process(es) is more than the {num_images} training images: using "
        f"{fitted} ({num_images // (fitted * world)} steps per epoch; --batch-size N chooses)", main)  # fmt: skip


def fitted_batch(batch: int, num_images: int, world: int) -> int:
    """The per-process batch a run over `num_images` uses (`fit_batch`)."""
    if batch * world <= num_images:
        return batch
    per_process = max(1, num_images // (world * MIN_STEPS_PER_EPOCH))
    return 1 << (per_process.bit_length() - 1)


def fit_workers(cfg, main: bool = True) -> None:
    """More loader workers than this process's cores only compete for them: cap `data.num_workers`."""
    cores = machine_cores()
    if cfg.data.num_workers > cores:
        say(f"data.num_workers {cfg.data.num_workers} is more than the {cores} CPU core(s) this process has: using "
            f"{cores}", main)  # fmt: skip
        cfg.data.num_workers = cores


def fit_to_machine(cfg, num_images: int, world: int, main: bool = True) -> None:
    fit_batch(cfg, num_images, world, main)
    fit_workers(cfg, main)

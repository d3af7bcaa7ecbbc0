"""The one pre-training loop, for every method.

Re-running the same command with the same `out` resumes from `out/checkpoints/last.pt`: model, optimizer, scaler,
RNG and the position inside the epoch are restored, so on CPU a killed-and-resumed run logs exactly the metrics
of an uninterrupted one. Losses are read back to the host only every `train.log_every` steps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..config import Config, ConfigError, config_from_dict, dump_yaml, to_dict
from ..data import DataError, Splits, describe, load_splits
from ..data.ccrop import check_boxes, estimate_boxes, update_due
from ..data.device_cache import DeviceCache
from ..data.pipeline import EpochBatchSampler, ViewDataset, prepare_batch, train_loader
from ..eval import extract, knn_accuracy
from ..methods import Method, build_method
from . import distributed as D
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_atomic
from .logging import MetricsLog, progress, say
from .optim import build_optimizer, lr_at, peak_lr, set_lr


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


# settings that must match for a checkpoint to continue a run
RESUME_KEYS = (("method",), ("model", "name"), ("model", "patch_size"), ("data", "image_size"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", D.local_rank())
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device '{name}' asked for, but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", D.local_rank())
    if name != "cpu" and not name.startswith("cuda:"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got '{name}'")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """-> autocast dtype, or None for fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if name not in table:
        raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, got '{name}'")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return table[name]


def check_resume_compatible(cfg: Config, state: dict, path: Path) -> None:
    old = state["config"]
    new = to_dict(cfg)
    for keys in RESUME_KEYS:
        a, b = old, new
        for k in keys:
            a, b = a.get(k), b.get(k)
        if a != b:
            raise ConfigError(
                f"checkpoint '{path}' has {'.'.join(keys)}={a!r} but this run asks for {b!r}; "
                "use another --out or the same settings"
            )


@dataclass
class EpochContext:
    """What `Method.on_epoch_end` may use."""

    epoch: int
    step: int
    splits: Splits
    cfg: Config
    device: torch.device
    main: bool


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of `epoch` already consumed
    bad_in_epoch: int = 0


def pretrain(cfg: Config) -> dict:
    """Pre-train `cfg.method` on `cfg.data`; -> summary dict (also written to out/summary.json by the CLI)."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if cfg.optim.accum_steps < 1:
        raise ConfigError(f"optim.accum_steps must be >= 1, got {cfg.optim.accum_steps}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")

    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    resume = None
    if ckpt_path.exists():
        resume = load_checkpoint(ckpt_path, expect_method=cfg.method)
        check_resume_compatible(cfg, resume, ckpt_path)

    # everything that can fail on bad input happens before anything is written into `out`
    splits = load_splits(cfg.data, cfg.train.seed, cfg.eval.max_eval_images)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(device)
    rank, world = D.init_distributed(device)
    main = rank == 0
    views = method.views
    dataset = ViewDataset(splits.train, views, cfg.data, seed=cfg.train.seed)
    sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world)
    if resume is not None and dataset.boxes is not None and "ccrop_boxes" in resume:  # ContrastiveCrop state
        dataset.boxes.copy_(check_boxes(resume["ccrop_boxes"], len(dataset), ckpt_path))
    cache = DeviceCache(dataset, device) if cfg.data.device_cache else None  # may refuse the size: before `out`

    accum = cfg.optim.accum_steps
    steps_per_epoch = sampler.batches_per_epoch() // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"optim.accum_steps {accum} is more than the {sampler.batches_per_epoch()} batches per epoch")
    micro_per_epoch = steps_per_epoch * accum
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    effective_batch = cfg.train.batch_size * world * accum
    lr_peak = peak_lr(cfg.optim, effective_batch)
    optimizer = build_optimizer(method, cfg.optim, lr_peak, method.no_weight_decay(), device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    st = RunState()
    log = MetricsLog(out, enabled=main, tensorboard=True)
    window = {"count": 0, "sums": {}, "bad_step": torch.tensor(-1, device=device)}
    if resume is not None:
        method.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        st = RunState(**resume["run"])
        window["count"] = resume["window"]["count"]
        window["sums"] = {k: v.to(device) for k, v in resume["window"]["sums"].items()}
        log.truncate_after(st.step)
        say(f"resuming from '{ckpt_path}' at step {st.step} (epoch {st.epoch + 1}, batch {st.batch})", main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # masks differ across ranks; model init did not
    if resume is not None:
        restore_rng(resume["rng"], device)

    say(
        f"{describe(cfg, splits)}; method {cfg.method}, {trained_model(cfg)} at "
        f"{cfg.data.image_size}px; {world} process(es) on {device}; {cfg.train.epochs} epochs x {steps_per_epoch} "
        f"steps; effective batch {effective_batch}, lr {lr_peak:.3g}",
        main,
    )

    if device.type == "cuda" and cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)  # NHWC convolutions (CNN enhancers, tokenizers, patch embeds)
    model = method
    if world > 1:
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(model) if cfg.train.compile else model
    # made once on the device: a per-batch host->device copy of two small tensors would block the host each step
    mean_std = (torch.tensor(cfg.data.mean, device=device), torch.tensor(cfg.data.std, device=device))
    if cache is not None:  # batches cropped on the device from the decoded images, same keys from `sampler`
        loader = cache.loader(sampler, *mean_std)
    else:
        loader = train_loader(dataset, sampler, cfg.data.num_workers, pin=device.type == "cuda")

    def checkpoint(finished: bool = False) -> None:
        check_finite(window, st.step, ckpt_path)
        if not main:
            return
        state = {
            "mimkit_version": __version__,
            "method": cfg.method,
            "config": to_dict(cfg),
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "run": dict(st.__dict__),
            "window": {"count": window["count"], "sums": {k: v.detach().cpu() for k, v in window["sums"].items()}},
            "rng": capture_rng(device),
            "finished": finished,
        }
        if dataset.boxes is not None:
            state["ccrop_boxes"] = dataset.boxes.clone()
        save_atomic(state, ckpt_path)

    bar = progress(total_steps, st.step, main)
    t_last, imgs_since = time.perf_counter(), 0
    bad_limit = max(0, int(cfg.data.bad_file_limit * len(dataset)))
    method.train()
    while st.epoch < cfg.train.epochs:
        sampler.start(st.epoch, st.batch)
        bad_seen: set[int] = set()
        for batch in loader:
            if st.batch >= micro_per_epoch:
                break
            if batch["bad"]:
                bad_seen.update(batch["bad"])
                if len(bad_seen) > bad_limit:
                    raise DataError(
                        f"{len(bad_seen)} unreadable images in '{splits.train.name}' this epoch, more than "
                        f"data.bad_file_limit={cfg.data.bad_file_limit} of {len(dataset)}; e.g. "
                        f"{[splits.train.paths[i] for i in sorted(bad_seen)[:3]] if splits.train.paths else ''}"
                    )
            b = batch if cache is not None else prepare_batch(batch, views, device, mean_std[0], mean_std[1])
            update = (st.batch + 1) % accum == 0
            sync = contextlib.nullcontext() if update or world == 1 else model.no_sync()
            with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, metrics = step_fn(b)
            with sync:
                scaler.scale(loss / accum).backward()
            for k, v in metrics.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v.float()
            window["count"] += 1
            window["bad_step"] = torch.where(
                torch.isfinite(loss.detach()) | (window["bad_step"] >= 0),
                window["bad_step"],
                torch.tensor(st.step + 1, device=device),
            )
            imgs_since += b[views[0].name].shape[0] * world
            st.batch += 1
            if not update:
                continue
            lr = lr_at(st.step, total_steps, warmup_steps, lr_peak, cfg.optim.min_lr)
            set_lr(optimizer, lr)
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            st.step += 1
            method.after_step(st.step, total_steps)
            bar.update(1)
            if st.step % cfg.train.log_every == 0 or st.step == total_steps:
                check_finite(window, st.step, ckpt_path)
                now = time.perf_counter()
                record = {"step": st.step, "epoch": st.epoch + 1, "lr": lr}
                record.update(flush_window(window))
                record["img_per_s"] = imgs_since / max(now - t_last, 1e-9)
                t_last, imgs_since = now, 0
                log.write(record)
                bar.set_postfix_str(f"loss {record['loss']:.4f}")
            # not on an epoch's last step: that state is saved after the epoch-end work (k-NN, held-out checks),
            # so a resume never sits between that work's log lines and the checkpoint and logs them twice
            if cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0 and st.batch < micro_per_epoch:
                checkpoint()
        bad_total = D.all_reduce_sum_int(len(bad_seen), device)
        if bad_total:
            say(f"epoch {st.epoch + 1}: skipped {bad_total} unreadable image(s) of {len(dataset)}", main)
        st.epoch, st.batch = st.epoch + 1, 0
        if update_due(cfg.data, st.epoch, cfg.train.epochs):
            area = update_ccrop_boxes(method, dataset, cfg, device, amp_dtype, rank, world)
            log.write({"step": st.step, "epoch": st.epoch, "ccrop_box_area": area})
        extra = method.on_epoch_end(EpochContext(st.epoch, st.step, splits, cfg, device, main))
        if extra and main:
            log.write({"step": st.step, "epoch": st.epoch, **extra})
        if cfg.eval.knn_every and st.epoch % cfg.eval.knn_every == 0 and splits.query is not None:
            res = monitor_knn(method, splits, cfg, device) if main else None
            if main:
                log.write({"step": st.step, "epoch": st.epoch, "knn_top1": res["top1"]})
                say(f"epoch {st.epoch}: k-NN top-1 {res['top1']:.4f}", main)
            D.barrier()
        checkpoint(finished=st.epoch >= cfg.train.epochs)
    bar.close()
    log.close()
    return {"method": method, "splits": splits, "device": device, "steps": st.step, "out": out, "main": main}


def trained_model(cfg: Config) -> str:
    """What the run trains, for the start-up line (the tokenizer trainer has no ViT)."""
    if cfg.method == "tokenizer":
        t = cfg.tokenizer
        return f"VQ tokenizer ({t.vocab_size} codes, {t.downsample}x downsampling)"
    return f"model {cfg.model.name}/{cfg.model.patch_size}"


def update_ccrop_boxes(method, dataset, cfg: Config, device, amp_dtype, rank: int, world: int) -> float:
    """Re-estimate every training image's ContrastiveCrop box with the current encoder (each rank a shard, then
    summed), in place in the dataset's shared tensor so that (persistent) loader workers see them.
    -> mean box area (fraction of the image)."""
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        boxes, rate = estimate_boxes(method.encoder, dataset.source, cfg.data, device, rank=rank, world=world)
    if world > 1:  # each rank estimated a shard
        boxes = D.all_reduce_sum(boxes.to(device)).cpu()
    dataset.boxes.copy_(boxes)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item()
    say(f"ContrastiveCrop: {len(boxes)} boxes re-estimated ({rate * world:.0f} img/s), mean area {area:.3f}", rank == 0)
    return area


def flush_window(window: dict) -> dict:
    """Mean of each metric over the window (one host sync), all-reduced across ranks; resets the window."""
    names = sorted(window["sums"])
    if not names:
        return {}
    stacked = torch.stack([window["sums"][k] for k in names]) / max(window["count"], 1)
    stacked = D.all_reduce_mean(stacked).tolist()
    window["sums"], window["count"] = {}, 0
    return dict(zip(names, stacked))


def check_finite(window: dict, step: int, ckpt_path: Path) -> None:
    bad = int(window["bad_step"].item())
    if bad >= 0:
        raise TrainingError(
            f"non-finite loss at step {bad}; stopped before saving, so '{ckpt_path}' still holds the last good "
            "state (try a lower optim.blr, optim.clip_grad, or train.precision=fp32)"
        )


@torch.no_grad()
def monitor_knn(method: Method, splits: Splits, cfg: Config, device) -> dict:
    """k-NN top-1 of the method's encoder on the labeled split (DINO's weighted vote)."""
    size = cfg.data.image_size
    tr, ytr = extract(method.encoder, splits.memory, cfg.data, size, device, cfg.eval.pool)
    te, yte = extract(method.encoder, splits.query, cfg.data, size, device, cfg.eval.pool)
    return knn_accuracy(tr, ytr, te, yte, len(splits.memory.classes), cfg.eval.knn_k, cfg.eval.knn_temperature)


def method_from_checkpoint(path: str | Path, device="cpu") -> tuple[Method, Config, dict]:
    """Rebuild a method (and its config) from a training checkpoint, weights loaded."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    return method.to(device).eval(), cfg, state

"""End-to-end fine-tuning: the recipe of MAE, BEiT and CIM, assembled from timm's parts.

timm provides the layer-wise lr decay (`create_optimizer_v2(layer_decay=...)`, one param group per block with an
`lr_scale`), mixup/cutmix with label smoothing (`Mixup` + `SoftTargetCrossEntropy`), RandAugment and random
erasing (`create_transform`) and the weight EMA (`ModelEmaV3`). mimkit adds the schedule (linear warm-up then
cosine, per step, as pre-training), the loop, epoch checkpoints (re-running the command resumes after the last
finished epoch) and the report: top-1 on the val/test split after the last epoch (the headline) and the best
epoch's, written to `out/finetune.json`. `--checkpoint none` runs the identical recipe from random init.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .. import __version__
from ..config import Config, ConfigError, dump_yaml, to_dict
from ..data import DataError
from ..data.classify import ClassificationDataset, collate_labeled, finetune_transforms
from ..data.folder import ImageSource
from . import distributed as D
from .checkpoint import capture_rng, check_same_run, load_checkpoint, restore_rng, save_atomic
from .downstream import EncoderSpec, build_model, encoder_spec
from .logging import MetricsLog, progress, say
from .optim import lr_at, peak_lr, set_lr
from .train import TrainingError, resolve_device, resolve_precision

# settings a resumed fine-tuning run must share with the checkpoint it continues
RESUME_KEYS = ("finetune", "optim", "train", "model", "data")


def finetune(cfg: Config, checkpoint: str, model_flag: str | None = None, image_size: int | None = None) -> dict:
    """Fine-tune the encoder in `checkpoint` (export folder, .pt, or 'none') on `cfg.data.path`.
    -> the summary written to out/finetune.json."""
    try:
        return _finetune(cfg, checkpoint, model_flag, image_size)
    finally:
        D.shutdown()


def _finetune(cfg: Config, checkpoint: str, model_flag: str | None, image_size: int | None) -> dict:
    ft = cfg.finetune
    check_recipe(cfg)
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    spec = encoder_spec(checkpoint, cfg, model_flag)
    if checkpoint != "none":  # the encoder's own size and normalisation unless --image-size says otherwise
        cfg.data.image_size = image_size or spec.image_size
        cfg.data.mean, cfg.data.std = spec.mean, spec.std
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    resume = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if resume is not None:
        check_same_run(resume, ckpt_path, "finetune", checkpoint, resume.get("checkpoint"), cfg, RESUME_KEYS)

    train_src, eval_src = load_labeled(cfg)
    num_classes = len(train_src.classes)
    rank, world = D.init_distributed(device)
    main = rank == 0
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)  # timm's RandAugment and erasing draw from Python's RNG
    model = build_classifier(spec, cfg, num_classes).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    effective_batch = cfg.train.batch_size * world
    lr_peak = peak_lr(cfg.optim, effective_batch)
    optimizer = build_finetune_optimizer(model, cfg, lr_peak, device)
    ema = None
    if ft.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=ft.ema_decay)
    mixup, criterion = mixup_and_criterion(cfg, num_classes)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    train_tf, eval_tf = finetune_transforms(ft, cfg.data.image_size, cfg.data.mean, cfg.data.std)
    train_ds = ClassificationDataset(train_src, train_tf)
    eval_ds = ClassificationDataset(eval_src, eval_tf)
    steps_per_epoch = len(train_ds) // effective_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} x {world} is more than the {len(train_ds)} images")
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    start_epoch, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"])
        start_epoch, history = resume["epoch"], resume["history"]
        restore_rng(resume["rng"], device)
        say(f"resuming fine-tuning from '{ckpt_path}' after epoch {start_epoch}", main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    say(
        f"fine-tuning {spec.architecture} ({'random init' if spec.state is None else spec.source}) on "
        f"'{cfg.data.path}': {len(train_src)} train / {len(eval_src)} eval images, {num_classes} classes, "
        f"{cfg.data.image_size}px; {cfg.train.epochs} epochs x {steps_per_epoch} steps, batch {effective_batch}, "
        f"lr {lr_peak:.3g}, layer decay {ft.layer_decay}; {world} process(es) on {device}",
        main,
    )
    train_model = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    log = MetricsLog(out, enabled=main, tensorboard=True)
    log.truncate_after(start_epoch * steps_per_epoch)
    sampler, generator = make_sampler(train_ds, cfg.train.seed, rank, world)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_labeled,
        pin_memory=device.type == "cuda",
        drop_last=True,  # mixup pairs the batch with its flip: every batch must have the same, even size
        persistent_workers=cfg.data.num_workers > 0,
    )
    eval_loader = DataLoader(
        eval_ds, batch_size=max(64, cfg.train.batch_size), num_workers=cfg.data.num_workers, collate_fn=collate_labeled
    )
    bar = progress(total_steps, start_epoch * steps_per_epoch, main)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.train.epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        generator.manual_seed(cfg.train.seed * 100_003 + epoch)
        model.train()
        sums, count, bad, t0, seen = torch.zeros(1, device=device), 0, 0, time.perf_counter(), 0
        for images, labels, bad_items in loader:
            if count >= steps_per_epoch:
                break
            bad += len(bad_items)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, labels)
            else:
                targets = labels
            lr = lr_at(step, total_steps, warmup_steps, lr_peak, cfg.optim.min_lr)
            set_lr(optimizer, lr)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = criterion(train_model(images), targets)
            scaler.scale(loss).backward()
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=step)
            sums += loss.detach().float()
            count, step, seen = count + 1, step + 1, seen + images.shape[0] * world
            bar.update(1)
            if step % cfg.train.log_every == 0 or count == steps_per_epoch:
                mean_loss = D.all_reduce_mean(sums / count).item()
                if not math.isfinite(mean_loss):
                    raise TrainingError(f"non-finite loss at step {step}; '{ckpt_path}' keeps epoch {epoch}")
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                log.write({"step": step, "epoch": epoch + 1, "lr": lr, "loss": mean_loss, "img_per_s": rate})
                bar.set_postfix_str(f"loss {mean_loss:.4f}")
        bad = D.all_reduce_sum_int(bad, device)
        if bad:
            say(f"epoch {epoch + 1}: replaced {bad} unreadable image(s) of {len(train_ds)}", main)
        last = epoch + 1 == cfg.train.epochs
        if last or (ft.eval_every and (epoch + 1) % ft.eval_every == 0):
            record = {"epoch": epoch + 1, "top1": evaluate(model, eval_loader, device, amp_dtype)}
            if ema is not None:
                record["top1_ema"] = evaluate(ema.module, eval_loader, device, amp_dtype)
            history.append(record)
            log.write({"step": step, **record})
            say(
                f"epoch {epoch + 1}: top-1 {record['top1']:.4f}"
                + (f" (EMA {record['top1_ema']:.4f})" if ema is not None else ""),
                main,
            )
        if main:
            state = {
                "mimkit_version": __version__,
                "kind": "finetune",
                "checkpoint": checkpoint,
                "config": to_dict(cfg),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "rng": capture_rng(device),
            }
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            save_atomic(state, ckpt_path)
        D.barrier()
    bar.close()
    log.close()
    summary = report(cfg, spec, checkpoint, history, len(train_src), len(eval_src), num_classes)
    if main:
        (out / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(
            f"top-1 after the last epoch {summary['top1']:.4f} (best {summary['top1_best']:.4f}, epoch "
            f"{summary['best_epoch']}); written to '{out / 'finetune.json'}'",
            main,
        )
    return summary


def check_recipe(cfg: Config) -> None:
    ft = cfg.finetune
    if ft.global_pool not in ("avg", "token"):
        raise ConfigError(f"finetune.global_pool must be avg or token, got '{ft.global_pool}'")
    if not 0.0 < ft.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {ft.layer_decay}")
    if (ft.mixup > 0 or ft.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even train.batch_size, got {cfg.train.batch_size}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")


def load_labeled(cfg: Config) -> tuple[ImageSource, ImageSource]:
    from ..data import labeled_splits

    train, evaluate_on = labeled_splits(cfg.data.path, cfg.data, cfg.train.seed, cfg.finetune.max_eval_images)
    if train is None or evaluate_on is None:
        raise DataError(f"'{cfg.data.path}' has no labeled train and val|test split: fine-tuning needs both")
    return train, evaluate_on


def build_classifier(spec: EncoderSpec, cfg: Config, num_classes: int) -> nn.Module:
    """The encoder with a new linear head; ViTs pool by the mean of patch tokens (+ fc_norm) or the class
    token. The head starts small (MAE: trunc-normal std 2e-5) so fine-tuning starts from the encoder's features."""
    ft = cfg.finetune
    pool = ft.global_pool if spec.is_vit else "avg"
    if not spec.is_vit and ft.global_pool != "avg":
        raise ConfigError(f"finetune.global_pool '{ft.global_pool}' is for ViTs; {spec.architecture} pools by avg")
    model = build_model(
        spec, cfg.data.image_size, num_classes=num_classes, global_pool=pool, drop_path_rate=ft.drop_path
    )
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
    return model


def build_finetune_optimizer(model: nn.Module, cfg: Config, lr: float, device) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups (no weight decay on biases, norms, tokens, position embeddings)."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    layer_decay = cfg.finetune.layer_decay if cfg.finetune.layer_decay < 1.0 else None
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return create_optimizer_v2(
        model, "adamw", lr=lr, weight_decay=o.weight_decay, layer_decay=layer_decay, betas=tuple(o.betas), **kwargs
    )


def mixup_and_criterion(cfg: Config, num_classes: int):
    """timm's Mixup (which also smooths the labels) with soft-target CE; without mixup, smoothed CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    ft = cfg.finetune
    if ft.mixup > 0 or ft.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=ft.mixup,
            cutmix_alpha=ft.cutmix,
            prob=ft.mixup_prob,
            switch_prob=ft.mixup_switch_prob,
            label_smoothing=ft.smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if ft.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=ft.smoothing)
    return None, nn.CrossEntropyLoss()


def make_sampler(dataset, seed: int, rank: int, world: int):
    """A seeded shuffle per epoch (the generator is re-seeded at each epoch start, so a resumed run shuffles
    as an uninterrupted one); DistributedSampler across processes."""
    generator = torch.Generator().manual_seed(seed)
    if world > 1:
        return DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        ), generator
    return RandomSampler(dataset, generator=generator), generator


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype) -> float:
    """Top-1 accuracy over the whole evaluation split (every process evaluates it all: small splits)."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for images, labels, _ in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device, non_blocking=True))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


def report(cfg: Config, spec: EncoderSpec, checkpoint: str, history: list, n_train: int, n_eval: int, k: int) -> dict:
    best = max(history, key=lambda r: r["top1"])
    summary = {
        "top1": history[-1]["top1"],  # the headline: after the last epoch, not the best one
        "top1_best": best["top1"],
        "best_epoch": best["epoch"],
        "checkpoint": checkpoint,
        "pretrain_method": spec.method if spec.state is not None else "none (random init)",
        "architecture": spec.architecture,
        "model_args": spec.model_args,
        "image_size": cfg.data.image_size,
        "data": cfg.data.path,
        "train_images": n_train,
        "eval_images": n_eval,
        "num_classes": k,
        "epochs": cfg.train.epochs,
        "recipe": {k: v for k, v in to_dict(cfg).items() if k in ("finetune", "optim")},
        "history": history,
    }
    if "top1_ema" in history[-1]:
        summary["top1_ema"] = history[-1]["top1_ema"]
        summary["top1_ema_best"] = max(r["top1_ema"] for r in history)
    return summary

"""`mimkit segment`: semantic segmentation fine-tuning of an encoder on `images/` + `masks/` folders.

The model is mimkit.models.seg_heads.SegmentationModel: the encoder's four feature levels and a decode head,
`light` (SegFormer's MLP decoder: the default, cheap enough for small data and CPUs) or `upernet` (BEiT/MAE's
ADE20K head, with its optional auxiliary FCN head). Training follows BEiT/MAE's mmsegmentation recipe: random
scale / crop / flip, AdamW with layer-wise lr decay, linear warm-up then poly decay (power 1), cross-entropy with
the ignore index; evaluation is on the whole resized image or, as BEiT/MAE on ADE20K, in sliding crop windows.

Metrics: one confusion matrix over the evaluation split, at each mask's own resolution (logits are resized to
it), ignore-index pixels left out. IoU_c = TP / (TP + FP + FN). A class absent from both the ground truth and
the predictions of the whole split has no IoU (null in segment.json) and is left out of the mIoU (mmseg's
nanmean); a class predicted but absent from the ground truth counts with IoU 0. Pixel accuracy: correct /
labelled pixels. The constant predictor, the most frequent class of the training masks everywhere, is scored by
the same rule on the same pixels and reported next to the model.

Writes <out>/segment.json, metrics.jsonl (per log interval and per evaluation), config.yaml, and
checkpoints/last.pt (weights-only loadable) after every epoch: re-running the same command resumes after the
last finished epoch (a finished run is only re-reported). Under torchrun each process trains on its share of
every batch and scores every world-th evaluation image; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..config import Config, ConfigError, SegmentConfig, dump_yaml, to_dict
from ..data.folder import seeded_subset
from ..data.segmentation import (
    SegmentationDataset,
    check_pairs,
    segmentation_splits,
    synthetic_pairs,
)
from ..export import encoder_state
from ..models.seg_heads import HEADS, SegmentationModel, is_vit, resize
from . import distributed as D
from .checkpoint import capture_rng, check_same_run, load_checkpoint, restore_rng, save_atomic
from .downstream import EncoderSpec, build_model, encoder_spec
from .logging import MetricsLog, say
from .optim import lr_at, peak_lr, set_lr
from .train import TrainingError, resolve_device, resolve_precision


# ------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) int64 counts on the inputs' device, rows = ground truth, columns = prediction; `ignore_index`
    pixels left out. index_add_ into a spare bin rather than boolean indexing / bincount: no wait on the device."""
    k2 = num_classes**2
    idx = torch.where(target != ignore_index, target.long() * num_classes + pred.long(), k2).flatten()
    counts = torch.zeros(k2 + 1, dtype=torch.int64, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
    return counts[:k2].view(num_classes, num_classes)


def scores(conf: torch.Tensor | np.ndarray, names: list[str]) -> dict:
    """mIoU (classes with TP + FP + FN > 0), per-class IoU (None when absent from both), pixel accuracy."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / max(conf.sum(), 1)),
        "per_class_iou": {n: (float(v) if ok else None) for n, v, ok in zip(names, iou, present)},
    }


def constant_confusion(eval_counts: np.ndarray, cls: int) -> np.ndarray:
    """The confusion matrix of predicting `cls` for every pixel, from the ground truth's per-class counts."""
    conf = np.zeros((len(eval_counts), len(eval_counts)), np.int64)
    conf[:, cls] = eval_counts
    return conf


# --------------------------------------------------------------------------------------------------- setup
def class_names(cfg: SegmentConfig) -> list[str]:
    if not cfg.class_names:
        return [f"class_{i}" for i in range(cfg.num_classes)]
    names = [n.strip() for n in cfg.class_names.split(",")]
    if len(names) != cfg.num_classes:
        raise ConfigError(f"segment.class_names has {len(names)} names, segment.num_classes is {cfg.num_classes}")
    return names


def check_config(s: SegmentConfig) -> None:
    if s.num_classes < 2:
        raise ConfigError(f"segment.num_classes must be at least 2, got {s.num_classes}")
    if 0 <= s.ignore_index < s.num_classes:
        raise ConfigError(f"segment.ignore_index {s.ignore_index} is a class id (0..{s.num_classes - 1})")
    if s.head not in HEADS:
        raise ConfigError(f"segment.head must be one of {', '.join(HEADS)}, got '{s.head}'")
    if s.eval_mode not in ("whole", "slide"):
        raise ConfigError(f"segment.eval_mode must be whole or slide, got '{s.eval_mode}'")
    if s.lr_schedule not in ("poly", "cosine"):
        raise ConfigError(f"segment.lr_schedule must be poly or cosine, got '{s.lr_schedule}'")
    if not 0 < s.scale_range[0] <= s.scale_range[1]:
        raise ConfigError(f"segment.scale_range must be 0 < low <= high, got {list(s.scale_range)}")


def load_pairs(cfg: Config):
    """(train pairs, eval pairs) for data.path: a folder, or 'demo' (synthetic shapes, fixed split)."""
    s = cfg.segment
    if cfg.data.path == "demo":
        train, val = synthetic_pairs(512, s.base_size, seed=0), synthetic_pairs(128, s.base_size, seed=1)
    else:
        train, val = segmentation_splits(cfg.data.path, s.reduce_zero_label, s.ignore_index)
    return (seeded_subset(train, cfg.data.max_images, cfg.train.seed),
            seeded_subset(val, s.max_eval_images, 0, key="segment.max_eval_images"))  # fmt: skip


def build_segmenter(spec: EncoderSpec, cfg: Config) -> SegmentationModel:
    """The encoder of `spec` at the crop size (ViTs accept any size at evaluation) + the configured head."""
    s, crop = cfg.segment, cfg.data.image_size
    kwargs = {"num_classes": 0, "drop_path_rate": cfg.model.drop_path}
    if spec.is_vit and not spec.architecture.startswith("beit_"):  # timm's Beit has no dynamic size
        kwargs["dynamic_img_size"] = True
    encoder = build_model(spec, image_size=crop, **kwargs)
    try:
        model = SegmentationModel(encoder, s.num_classes, s.head, s.head_width, s.feature_indices,
                                  aux=s.aux_weight > 0, dropout=s.dropout)  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"encoder '{spec.source}' ({spec.architecture}): {e}") from None
    if is_vit(encoder) and crop % model.divisor:
        raise ConfigError(f"data.image_size {crop} (the crop) is not a multiple of the encoder's patch {model.divisor}")
    return model


def param_groups(model: SegmentationModel, s: SegmentConfig, weight_decay: float) -> list[dict]:
    """Encoder groups (timm's layer-wise lr decay when < 1) + head groups at lr scale `head_lr_mult`; no weight
    decay on biases, norms, position embeddings and class tokens."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    enc = model.encoder
    no_wd = set(enc.no_weight_decay()) if hasattr(enc, "no_weight_decay") else set()
    if s.layer_decay < 1.0:
        groups = param_groups_layer_decay(enc, weight_decay, no_wd, layer_decay=s.layer_decay)
    else:
        groups = param_groups_weight_decay(enc, weight_decay, no_weight_decay_list=no_wd)
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups.append({"params": [p for p in head if p.ndim > 1], "weight_decay": weight_decay})
    groups.append({"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0})
    for g in groups[-2:]:
        g["lr_scale"] = s.head_lr_mult
    return [g for g in groups if g["params"]]


def lr_for(step: int, total: int, warmup: int, peak: float, min_lr: float, schedule: str) -> float:
    """Linear warm-up, then poly (power 1, mmseg) or half-cycle cosine down to `min_lr`."""
    if schedule == "cosine" or step < warmup:
        return lr_at(step, total, warmup, peak, min_lr)
    return min_lr + (peak - min_lr) * max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy over labelled pixels (0, not NaN, for a crop with none)."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return loss / (target != ignore_index).sum().clamp(min=1)


# --------------------------------------------------------------------------------------------- inference
def slide_logits(model, x: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K, H, W): logits of crop x crop windows every `stride` px (edge windows padded),
    averaged where they overlap."""
    B, _, H, W = x.shape
    out = x.new_zeros(B, num_classes, H, W, dtype=torch.float32)
    count = x.new_zeros(1, 1, H, W, dtype=torch.float32)
    for y in _window_starts(H, crop, stride):
        for x0 in _window_starts(W, crop, stride):
            win = x[..., y : y + crop, x0 : x0 + crop]
            h, w = win.shape[-2:]
            logits = model(F.pad(win, (0, crop - w, 0, crop - h)))[..., :h, :w]
            out[..., y : y + h, x0 : x0 + w] += logits.float()
            count[..., y : y + h, x0 : x0 + w] += 1
    return out / count


def _window_starts(n: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering 0..n, the last one flush with the end."""
    return [min(i * stride, max(n - crop, 0)) for i in range(max(0, math.ceil((n - crop) / stride)) + 1)]


@torch.no_grad()
def evaluate(model, loader, cfg: Config, device, amp, mean, std, slide: bool) -> torch.Tensor:
    """The confusion matrix (on the CPU) of `model` over the evaluation split: `loader` holds this process's share
    (batches of one image resized to base_size, with its mask at the original size); the shares are summed."""
    s, crop = cfg.segment, cfg.data.image_size
    stride = s.eval_stride or max(1, crop * 2 // 3)
    conf = torch.zeros(s.num_classes, s.num_classes, dtype=torch.int64, device=device)
    model.eval()
    for img, mask in loader:
        x = (img.to(device).float() / 255 - mean) / std
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = slide_logits(model, x, crop, stride, s.num_classes) if slide else model(x)
        pred = resize(logits.float(), mask.shape[-2:]).argmax(1)
        conf += confusion_matrix(pred, mask.to(device), s.num_classes, s.ignore_index)
    model.train()
    return D.all_reduce_sum(conf).cpu()


def make_loaders(cfg: Config, train_pairs, eval_pairs, divisor: int, device, rank: int = 0, world: int = 1):
    """Training: shuffled batches of crops per process (the last partial batch dropped: batch norm in the heads).
    Evaluation: one image at a time, as images may differ in size; each process scores every world-th image
    (the confusion matrices are summed), so no image is counted twice."""
    s, workers = cfg.segment, cfg.data.num_workers
    crop, batch = cfg.data.image_size, min(cfg.train.batch_size, len(train_pairs) // world)
    train_ds = SegmentationDataset(train_pairs, True, crop, s.base_size, s.scale_range, s.hflip, s.photometric,
                                   s.ignore_index)  # fmt: skip
    shard = eval_pairs.subset(list(range(rank, len(eval_pairs), world))) if world > 1 else eval_pairs
    eval_ds = SegmentationDataset(shard, False, crop, s.base_size, ignore_index=s.ignore_index,
                                  divisor=divisor)  # fmt: skip
    g = torch.Generator().manual_seed(cfg.train.seed)
    sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.train.seed, drop_last=True) \
        if world > 1 else RandomSampler(train_ds, generator=g)  # fmt: skip
    train = DataLoader(train_ds, batch, sampler=sampler, drop_last=True, num_workers=workers, generator=g,
                       persistent_workers=workers > 0, pin_memory=device.type == "cuda")  # fmt: skip
    return train, DataLoader(eval_ds, 1, num_workers=workers)


def train_step(model, opt, scaler, img, target, cfg: Config, mean, std, amp) -> torch.Tensor:
    """One update on uint8 crops (B, 3, S, S) and ids (B, S, S); returns the (unsynchronised) loss."""
    s, device = cfg.segment, mean.device
    x = (img.to(device, non_blocking=True).float() / 255 - mean) / std
    target = target.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits, aux = model(x, with_aux=True)
        loss = seg_loss(logits, target, s.ignore_index)
        if aux is not None:
            loss = loss + s.aux_weight * seg_loss(aux, target, s.ignore_index)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.optim.clip_grad:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def save_segmenter(model, spec: EncoderSpec, cfg: Config, names: list[str], step: int, path: Path,
                   epoch: int = 0, optimizer=None, result=None, finished: bool = True) -> None:  # fmt: skip
    """Weights and plain values only (loads with weights_only=True), written atomically; with the optimizer,
    epoch and last scores while the run is in progress, so that re-running the command resumes it."""
    encoder = {"source": spec.source, "architecture": spec.architecture, "model_args": spec.model_args,
               "mean": list(spec.mean), "std": list(spec.std)}  # fmt: skip
    state = encoder_state(model)
    save_atomic({"kind": "segment", "model": state, "config": to_dict(cfg), "encoder": encoder, "class_names": names,
                 "step": step, "epoch": epoch, "finished": finished, "result": result,
                 "optimizer": optimizer.state_dict() if optimizer is not None else {},
                 "rng": capture_rng(next(model.parameters()).device)}, path)  # fmt: skip


def resume_state(path: Path, cfg: Config, checkpoint: str) -> dict | None:
    """The state of an earlier run of the same command in this --out, or None; another run's is an error."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    source = str(Path(checkpoint)) if checkpoint != "none" else "none"
    stored = state.get("encoder", {}).get("source")
    check_same_run(state, path, "segment", source, stored, cfg, ("data", "model", "optim", "train", "segment"))
    return state


# ---------------------------------------------------------------------------------------------- training
def segment(cfg: Config, checkpoint: str, model_flag: str | None = None, image_size: int | None = None) -> dict:
    """See `_segment`; under torchrun every process trains on its share of each batch, rank 0 writes."""
    try:
        return _segment(cfg, checkpoint, model_flag, image_size)
    finally:
        D.shutdown()


def _segment(cfg: Config, checkpoint: str, model_flag: str | None = None, image_size: int | None = None) -> dict:
    """Fine-tune `checkpoint` (an export folder, a training checkpoint or 'none') for segmentation on
    cfg.data.path; returns (and writes to <out>/segment.json) the final scores and the constant baseline."""
    s = cfg.segment
    if image_size:
        cfg.data.image_size = image_size
    check_config(s)
    names = class_names(s)
    device = resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    spec = encoder_spec(checkpoint, cfg, model_flag)
    rank, world = D.init_distributed(device)
    main = rank == 0
    train_pairs, eval_pairs = load_pairs(cfg)
    say(f"checking {len(train_pairs)} training and {len(eval_pairs)} evaluation image/mask pairs", main)
    train_counts = check_pairs(train_pairs, s.num_classes, s.ignore_index, cfg.data.num_workers)
    eval_counts = check_pairs(eval_pairs, s.num_classes, s.ignore_index, cfg.data.num_workers)
    if train_counts.sum() == 0:
        raise ConfigError(f"the training masks of '{cfg.data.path}' hold no labelled pixel (all ignore_index)")
    model = build_segmenter(spec, cfg).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    slide = s.eval_mode == "slide" or (is_vit(model.encoder) and not getattr(model.encoder, "dynamic_img_size", 0))
    if slide and s.eval_mode == "whole":
        say(f"{spec.architecture} takes {cfg.data.image_size} px inputs only: evaluating in sliding windows", main)

    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    resume = resume_state(ckpt_path, cfg, checkpoint)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    log = MetricsLog(out, enabled=main)

    train_loader, eval_loader = make_loaders(cfg, train_pairs, eval_pairs, model.divisor, device, rank, world)
    crop, batch = cfg.data.image_size, train_loader.batch_size * world
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    steps_per_epoch = len(train_loader)
    total = cfg.train.epochs * steps_per_epoch
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    peak = peak_lr(cfg.optim, batch)
    opt = torch.optim.AdamW(param_groups(model, s, cfg.optim.weight_decay), lr=peak, betas=cfg.optim.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # a ViT's final norm and unused blocks get no gradient from the multi-level features: DDP must be told
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True) if world > 1 else model  # fmt: skip
    majority = int(train_counts.argmax())
    baseline = scores(constant_confusion(eval_counts, majority), names)
    say(
        f"segment: {spec.architecture} ({checkpoint}) + {s.head} head, {len(train_pairs)} train / {len(eval_pairs)} "
        f"eval pairs, crop {crop}, {cfg.train.epochs} epochs x {steps_per_epoch} steps of {batch}, lr {peak:.2e}; "
        f"constant predictor ({names[majority]}): mIoU {baseline['miou']:.4f}, pixel acc {baseline['pixel_acc']:.4f}",
        main,
    )

    step, start, result, first_epoch = 0, time.time(), None, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        if resume["optimizer"]:
            opt.load_state_dict(resume["optimizer"])
        step, first_epoch, result = resume["step"], resume["epoch"], resume["result"]
        restore_rng(resume["rng"], device)
        say(f"resuming from '{ckpt_path}' after epoch {first_epoch}", main)
    log.truncate_after(step)
    tick, seen = time.time(), 0
    for epoch in range(first_epoch, cfg.train.epochs):
        train_loader.generator.manual_seed(cfg.train.seed * 100_003 + epoch)  # the same order when resumed
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        for img, target in train_loader:
            lr = lr_for(step, total, warmup, peak, cfg.optim.min_lr, s.lr_schedule)
            set_lr(opt, lr)
            loss = train_step(train_model, opt, scaler, img, target, cfg, mean, std, amp)
            step, seen = step + 1, seen + len(img) * world
            if step % cfg.train.log_every == 0 or step == total:
                value = D.all_reduce_mean(loss).item()
                if not math.isfinite(value):
                    raise TrainingError(f"non-finite loss {value} at step {step}; lower the lr (optim.blr/lr)")
                ips, tick, seen = seen / (time.time() - tick), time.time(), 0
                log.write({"step": step, "epoch": epoch + 1, "loss": value, "lr": lr, "img_per_s": ips})
                say(f"epoch {epoch + 1} step {step}/{total} loss {value:.4f} lr {lr:.2e} {ips:.1f} img/s", main)
        last = epoch + 1 == cfg.train.epochs
        if last or (s.eval_every and (epoch + 1) % s.eval_every == 0):
            result = scores(evaluate(model, eval_loader, cfg, device, amp, mean, std, slide), names)
            log.write({"step": step, "epoch": epoch + 1, "miou": result["miou"], "pixel_acc": result["pixel_acc"],
                       "constant_miou": baseline["miou"], "per_class_iou": result["per_class_iou"]})  # fmt: skip
            say(f"epoch {epoch + 1} eval: mIoU {result['miou']:.4f} pixel acc {result['pixel_acc']:.4f}", main)
        if main:
            save_segmenter(model, spec, cfg, names, step, ckpt_path, epoch + 1, opt, result, finished=last)
        D.barrier()
    log.close()
    if result is None:  # zero epochs: score the untrained model
        result = scores(evaluate(model, eval_loader, cfg, device, amp, mean, std, slide), names)

    if cfg.train.epochs == 0 and main:
        save_segmenter(model, spec, cfg, names, step, ckpt_path, result=result)
    summary = {
        **result,
        "constant_baseline": {"class": names[majority], "miou": baseline["miou"], "pixel_acc": baseline["pixel_acc"]},
        "checkpoint": str(checkpoint),
        "architecture": spec.architecture,
        "head": s.head,
        "eval_mode": "slide" if slide else "whole",
        "train_images": len(train_pairs),
        "eval_images": len(eval_pairs),
        "steps": step,
        "time_s": round(time.time() - start, 1),
        "config": {k: v for k, v in to_dict(cfg).items() if k in ("out", "data", "model", "optim", "train", "segment")},
    }
    if main:
        (out / "segment.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} -" for n, v in result["per_class_iou"].items())
    say(
        f"mIoU {result['miou']:.4f} (constant predictor {baseline['miou']:.4f}), pixel acc {result['pixel_acc']:.4f} "
        f"({baseline['pixel_acc']:.4f}); per class: {table}; wrote {out / 'segment.json'}",
        main,
    )
    return summary

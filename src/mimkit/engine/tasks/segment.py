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
from torch.utils.data import DataLoader

from ...atomic import replace_text
from ...config import Config, ConfigError, SegmentConfig, to_dict
from ...data.folder import seeded_subset
from ...data.keyed import KeyedDataset
from ...data.pipeline import EpochBatchSampler, train_loader
from ...data.segmentation import (
    SegmentationDataset,
    check_pairs,
    segmentation_splits,
    synthetic_pairs,
)
from ...models.seg_heads import SegmentationModel, resize
from ...runtime import autocast, enable_grad_checkpointing, fused_adamw, is_vit
from ..trainer import Runtime, Task, run
from ..trainer import distributed as D
from ..trainer.fit import fit_workers
from ..trainer.logging import say
from ..trainer.optim import lr_at
from .encoders import EncoderSpec, build_model, encoder_spec


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
    if 0 <= s.ignore_index < s.num_classes:
        raise ConfigError(f"segment.ignore_index {s.ignore_index} is a class id (0..{s.num_classes - 1})")
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
        with autocast(device, amp):
            logits = slide_logits(model, x, crop, stride, s.num_classes) if slide else model(x)
        pred = resize(logits.float(), mask.shape[-2:]).argmax(1)
        conf += confusion_matrix(pred, mask.to(device), s.num_classes, s.ignore_index)
    model.train()
    return D.all_reduce_sum(conf).cpu()


def make_eval_loader(cfg: Config, eval_pairs, divisor: int, rank: int = 0, world: int = 1) -> DataLoader:
    """One image at a time, as images may differ in size; each process scores every world-th image (the
    confusion matrices are summed), so no image is counted twice."""
    s = cfg.segment
    shard = eval_pairs.subset(list(range(rank, len(eval_pairs), world))) if world > 1 else eval_pairs
    eval_ds = SegmentationDataset(shard, False, cfg.data.image_size, s.base_size, ignore_index=s.ignore_index,
                                  divisor=divisor)  # fmt: skip
    return DataLoader(eval_ds, 1, num_workers=cfg.data.num_workers)


def train_step(model, img, target, cfg: Config, mean, std) -> torch.Tensor:
    """The loss of one batch of uint8 crops (B, 3, S, S) and ids (B, S, S), under the caller's autocast."""
    s, device = cfg.segment, mean.device
    x = (img.to(device, non_blocking=True).float() / 255 - mean) / std
    target = target.to(device, non_blocking=True)
    logits, aux = model(x, with_aux=True)
    loss = seg_loss(logits, target, s.ignore_index)
    if aux is not None:
        loss = loss + s.aux_weight * seg_loss(aux, target, s.ignore_index)
    return loss


class SegmentTask(Task):
    kind = "segment"
    resume_keys = ("data", "model", "optim", "train.batch_size", "train.seed", "segment")
    find_unused_parameters = True  # a ViT's final norm and unused blocks get no gradient from multi-level features

    def __init__(
        self, cfg: Config, rt: Runtime, checkpoint: str, model_flag: str | None = None, allow_download: bool = False
    ):
        super().__init__(cfg, rt)
        self.started = time.time()  # the summary's time_s: data checks and model building included
        s = cfg.segment
        check_config(s)
        self.names = class_names(s)
        self.checkpoint = checkpoint
        fit_workers(cfg, rt.main)
        torch.manual_seed(cfg.train.seed)
        self.spec = encoder_spec(checkpoint, cfg, model_flag, allow_download)
        self.train_pairs, self.eval_pairs = load_pairs(cfg)
        say(f"checking {len(self.train_pairs)} training and {len(self.eval_pairs)} evaluation image/mask pairs",
            rt.main)  # fmt: skip
        self.train_counts = check_pairs(self.train_pairs, s.num_classes, s.ignore_index, cfg.data.num_workers)
        self.eval_counts = check_pairs(self.eval_pairs, s.num_classes, s.ignore_index, cfg.data.num_workers)
        if self.train_counts.sum() == 0:
            raise ConfigError(f"the training masks of '{cfg.data.path}' hold no labelled pixel (all ignore_index)")
        self.model = build_segmenter(self.spec, cfg).to(rt.device)
        if cfg.model.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        if rt.device.type == "cuda" and cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        enc = self.model.encoder
        self.slide = s.eval_mode == "slide" or (is_vit(enc) and not getattr(enc, "dynamic_img_size", 0))
        if self.slide and s.eval_mode == "whole":
            say(f"{self.spec.architecture} takes {cfg.data.image_size} px inputs only: evaluating in sliding windows",
                rt.main)  # fmt: skip
        self.batch_size = min(cfg.train.batch_size, len(self.train_pairs) // rt.world)
        train_ds = SegmentationDataset(self.train_pairs, True, cfg.data.image_size, s.base_size, s.scale_range,
                                       s.hflip, s.photometric, s.ignore_index)  # fmt: skip
        self.train_ds = KeyedDataset(train_ds, cfg.train.seed)
        self.sampler = EpochBatchSampler(len(train_ds), self.batch_size, cfg.train.seed, rt.rank, rt.world)
        self.num_images = len(train_ds)
        self.eval_loader = make_eval_loader(cfg, self.eval_pairs, self.model.divisor, rt.rank, rt.world)
        self.mean = torch.tensor(self.spec.mean, device=rt.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.spec.std, device=rt.device).view(1, 3, 1, 1)
        self.majority = int(self.train_counts.argmax())
        self.baseline = scores(constant_confusion(self.eval_counts, self.majority), self.names)
        self.result = None

    def identity(self) -> dict:
        return {"encoder": str(Path(self.checkpoint)) if self.checkpoint != "none" else "none",
                "class_names": self.names}  # fmt: skip

    def describe(self, steps_per_epoch: int, effective_batch: int, lr: float) -> str:
        s, b = self.cfg.segment, self.baseline
        return (
            f"segment: {self.spec.architecture} ({self.checkpoint}) + {s.head} head, {len(self.train_pairs)} train / "
            f"{len(self.eval_pairs)} eval pairs, crop {self.cfg.data.image_size}, {self.cfg.train.epochs} epochs x "
            f"{steps_per_epoch} steps of {effective_batch}, lr {lr:.2e}; constant predictor "
            f"({self.names[self.majority]}): mIoU {b['miou']:.4f}, pixel acc {b['pixel_acc']:.4f}"
        )

    def make_loader(self):
        pin = self.rt.device.type == "cuda"
        return train_loader(self.train_ds, self.sampler, self.cfg.data.num_workers, pin, collate_fn=None)  # tuples

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.cfg.segment, self.cfg.optim.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=self.cfg.optim.betas, fused=fused_adamw(self.rt.device))

    def lr(self, step: int, total: int, warmup: int, peak: float) -> float:
        return lr_for(step, total, warmup, peak, self.cfg.optim.min_lr, self.cfg.segment.lr_schedule)

    def step(self, model, batch):
        img, target = batch
        loss = train_step(model, img, target, self.cfg, self.mean, self.std)
        return loss, {"loss": loss.detach()}, []

    def end_epoch(self, epoch: int, step: int, last: bool) -> dict:
        s = self.cfg.segment
        if not (last or (s.eval_every and epoch % s.eval_every == 0)):
            return {}
        conf = evaluate(self.model, self.eval_loader, self.cfg, self.rt.device, self.rt.amp, self.mean, self.std,
                        self.slide)  # fmt: skip
        self.result = scores(conf, self.names)
        r = self.result
        say(f"epoch {epoch} eval: mIoU {r['miou']:.4f} pixel acc {r['pixel_acc']:.4f}", self.rt.main)
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"], "constant_miou": self.baseline["miou"],
                "per_class_iou": r["per_class_iou"]}  # fmt: skip

    def state_dict(self) -> dict:
        return {"result": self.result, "class_names": self.names, "encoder": encoder_info(self.spec)}

    def load_state_dict(self, state: dict, path: Path) -> None:
        self.result = state.get("result")

    def report(self, steps: int) -> dict:
        cfg, s, b, result = self.cfg, self.cfg.segment, self.baseline, self.result
        summary = {
            **result,
            "constant_baseline": {"class": self.names[self.majority], "miou": b["miou"], "pixel_acc": b["pixel_acc"]},
            "checkpoint": str(self.checkpoint),
            "architecture": self.spec.architecture,
            "head": s.head,
            "eval_mode": "slide" if self.slide else "whole",
            "train_images": len(self.train_pairs),
            "eval_images": len(self.eval_pairs),
            "steps": steps,
            "time_s": round(time.time() - self.started, 1),
            "config": {
                k: v for k, v in to_dict(cfg).items() if k in ("out", "data", "model", "optim", "train", "segment")
            },  # fmt: skip
        }
        out = Path(cfg.out)
        if self.rt.main:
            replace_text(out / "segment.json", json.dumps(summary, indent=2) + "\n")
        table = ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} -" for n, v in result["per_class_iou"].items())
        say(
            f"mIoU {result['miou']:.4f} (constant predictor {b['miou']:.4f}), pixel acc {result['pixel_acc']:.4f} "
            f"({b['pixel_acc']:.4f}); per class: {table}; wrote {out / 'segment.json'}",
            self.rt.main,
        )
        return summary


def encoder_info(spec: EncoderSpec) -> dict:
    """What rebuilds the segmenter's encoder (plain values, for the checkpoint)."""
    return {"source": spec.source, "architecture": spec.architecture, "model_args": spec.model_args,
            "mean": list(spec.mean), "std": list(spec.std)}  # fmt: skip


def segment(
    cfg: Config,
    checkpoint: str,
    model_flag: str | None = None,
    image_size: int | None = None,
    allow_download: bool = False,
) -> dict:
    """Fine-tune `checkpoint` (an export folder, a training checkpoint or 'none') for segmentation on
    cfg.data.path; returns (and writes to <out>/segment.json) the final scores and the constant baseline. Under
    torchrun every process trains on its share of each batch, rank 0 writes."""
    if image_size:
        cfg.data.image_size = image_size
    return run(cfg, lambda rt: SegmentTask(cfg, rt, checkpoint, model_flag, allow_download))

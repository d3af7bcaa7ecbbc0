"""End-to-end fine-tuning as a task of the one loop: the recipe of MAE, BEiT and CIM, assembled from timm's parts.

timm provides the layer-wise lr decay (`create_optimizer_v2(layer_decay=...)`, one param group per block with an
`lr_scale`), mixup/cutmix with label smoothing (`Mixup` + `SoftTargetCrossEntropy`), RandAugment and random
erasing (`create_transform`). The loop adds the schedule (linear warm-up then cosine, per step), accumulation, the
weight EMA (`train.ema`), checkpoints and exact resume; this task adds the report: top-1 on the val/test split
after the last epoch (the headline) and the best epoch's, written to `out/finetune.json`. `--checkpoint none`
runs the identical recipe from random init.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ...atomic import replace_text
from ...config import Config, ConfigError, to_dict
from ...data import DataError
from ...data.finetune_transforms import ClassificationDataset, collate_labeled, finetune_transforms
from ...data.folder import ImageSource
from ...data.keyed import KeyedDataset, item_seed
from ...data.pipeline import EpochBatchSampler, train_loader
from ...runtime import enable_grad_checkpointing, fused_adamw
from ..trainer import Runtime, Task, run
from ..trainer.fit import fit_to_machine
from ..trainer.logging import say
from .encoders import EncoderSpec, build_model, encoder_spec, init_head


class FinetuneTask(Task):
    kind = "finetune"
    resume_keys = ("finetune", "optim", "train.batch_size", "train.seed", "model", "data")

    def __init__(self, cfg: Config, rt: Runtime, checkpoint: str, model_flag: str | None = None,
                 image_size: int | None = None, allow_download: bool = False):  # fmt: skip
        super().__init__(cfg, rt)
        ft = cfg.finetune
        check_recipe(cfg)
        self.checkpoint = checkpoint
        self.spec = encoder_spec(checkpoint, cfg, model_flag, allow_download)
        if checkpoint != "none":  # the encoder's own size and normalisation unless --image-size says otherwise
            cfg.data.image_size = image_size or self.spec.image_size
            cfg.data.mean, cfg.data.std = self.spec.mean, self.spec.std
        self.train_src, self.eval_src = load_labeled(cfg)
        self.num_classes = len(self.train_src.classes)
        torch.manual_seed(cfg.train.seed)
        self.model = build_classifier(self.spec, cfg, self.num_classes).to(rt.device)
        if cfg.model.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        if rt.device.type == "cuda" and cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.mixup, self.criterion = mixup_and_criterion(cfg, self.num_classes)
        train_tf, eval_tf = finetune_transforms(ft, cfg.data.image_size, cfg.data.mean, cfg.data.std, cfg.data.hflip)
        self.train_ds = KeyedDataset(ClassificationDataset(self.train_src, train_tf), cfg.train.seed)
        self.eval_ds = ClassificationDataset(self.eval_src, eval_tf)
        fit_to_machine(cfg, len(self.train_ds), rt.world, rt.main)  # a GPU recipe on a small machine or subset
        self.batch_size = cfg.train.batch_size
        self.sampler = EpochBatchSampler(len(self.train_ds), self.batch_size, cfg.train.seed, rt.rank, rt.world)
        self.num_images = len(self.train_ds)
        self.history: list[dict] = []

    def identity(self) -> dict:
        return {"encoder": self.checkpoint}

    def describe(self, steps_per_epoch: int, effective_batch: int, lr: float) -> str:
        cfg, spec = self.cfg, self.spec
        return (
            f"fine-tuning {spec.architecture} ({'random init' if spec.state is None else spec.source}) on "
            f"'{cfg.data.path}': {len(self.train_src)} train / {len(self.eval_src)} eval images, {self.num_classes} "
            f"classes, {cfg.data.image_size}px; {cfg.train.epochs} epochs x {steps_per_epoch} steps, batch "
            f"{effective_batch}, lr {lr:.3g}, layer decay {cfg.finetune.layer_decay}; {self.rt.world} process(es) "
            f"on {self.rt.device}"
        )

    def make_loader(self):
        pin = self.rt.device.type == "cuda"
        return train_loader(self.train_ds, self.sampler, self.cfg.data.num_workers, pin, collate_labeled)

    def batches(self, epoch: int, start: int):
        """(images, labels, unreadable, (epoch, batch)): the key seeds the batch's mixup."""
        for b, (images, labels, bad) in enumerate(super().batches(epoch, start), start=start):
            yield images, labels, bad, (epoch, b)

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return build_finetune_optimizer(self.model, self.cfg, lr, self.rt.device)

    def step(self, model, batch):
        images, labels, bad, (epoch, b) = batch
        images = images.to(self.rt.device, non_blocking=True)
        targets = labels.to(self.rt.device, non_blocking=True)
        if self.mixup is not None:  # timm's Mixup draws from NumPy's global RNG: keyed by the batch, as the crops
            with numpy_seeded(item_seed(self.cfg.train.seed, epoch, b, stream=1)):
                images, targets = self.mixup(images, targets)
        loss = self.criterion(model(images), targets)
        return loss, {"loss": loss.detach()}, bad

    def end_epoch(self, epoch: int, step: int, last: bool) -> dict:
        ft = self.cfg.finetune
        if not (last or (ft.eval_every and epoch % ft.eval_every == 0)):
            return {}
        loader = DataLoader(self.eval_ds, batch_size=max(64, self.batch_size), num_workers=self.cfg.data.num_workers,
                            collate_fn=collate_labeled)  # fmt: skip
        record = {"epoch": epoch, "top1": evaluate(self.model, loader, self.rt)}
        if self.ema is not None:
            record["top1_ema"] = evaluate(self.ema.module, loader, self.rt)
        self.history.append(record)
        ema = f" (EMA {record['top1_ema']:.4f})" if "top1_ema" in record else ""
        say(f"epoch {epoch}: top-1 {record['top1']:.4f}{ema}", self.rt.main)
        return {k: v for k, v in record.items() if k != "epoch"}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict, path) -> None:
        self.history = list(state.get("history", []))

    def bad_file_names(self, indices: list[int]) -> list[str]:
        return [self.train_src.describe(i) for i in indices]

    def report(self, steps: int) -> dict:
        """The summary (every process), written to out/finetune.json by rank 0."""
        summary = summarise(self.cfg, self.spec, self.checkpoint, self.history, len(self.train_src),
                            len(self.eval_src), self.num_classes)  # fmt: skip
        if self.rt.main:
            out = Path(self.cfg.out)
            replace_text(out / "finetune.json", json.dumps(summary, indent=2) + "\n")
            say(f"top-1 after the last epoch {summary['top1']:.4f} (best {summary['top1_best']:.4f}, epoch "
                f"{summary['best_epoch']}); written to '{out / 'finetune.json'}'")  # fmt: skip
        return summary


@contextlib.contextmanager
def numpy_seeded(seed: int):
    """NumPy's global RNG seeded for a block, its state restored after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def finetune(
    cfg: Config,
    checkpoint: str,
    model_flag: str | None = None,
    image_size: int | None = None,
    allow_download: bool = False,
) -> dict:
    """Fine-tune the encoder in `checkpoint` (export folder, .pt, or 'none') on `cfg.data.path`.
    -> the summary written to out/finetune.json."""

    def make_task(rt: Runtime) -> FinetuneTask:
        random.seed(cfg.train.seed)
        return FinetuneTask(cfg, rt, checkpoint, model_flag, image_size, allow_download)

    return run(cfg, make_task)


def check_recipe(cfg: Config) -> None:
    ft = cfg.finetune  # ranges and choices are checked by the config schema
    if (ft.mixup > 0 or ft.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even train.batch_size, got {cfg.train.batch_size}")


def load_labeled(cfg: Config) -> tuple[ImageSource, ImageSource]:
    from ...data import labeled_splits

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
        spec,
        cfg.data.image_size,
        num_classes=num_classes,
        global_pool=pool,
        drop_path_rate=cfg.model.drop_path,
        **({"fc_norm": None} if "fc_norm" in spec.model_args else {}),  # timm's rule: avg pooling -> fc_norm (MAE)
    )
    init_head(model.get_classifier(), cfg.finetune.head_init_scale)
    return model


def build_finetune_optimizer(model: nn.Module, cfg: Config, lr: float, device) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups (no weight decay on biases, norms, tokens, position embeddings)."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    layer_decay = cfg.finetune.layer_decay if cfg.finetune.layer_decay < 1.0 else None
    kwargs = {"fused": fused_adamw(device)}
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


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime) -> float:
    """Top-1 accuracy over the whole evaluation split (every process evaluates it all: small splits)."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=rt.device), 0
    for images, labels, _ in loader:
        with rt.autocast():
            logits = model(images.to(rt.device, non_blocking=True))
        correct += (logits.argmax(1) == labels.to(rt.device)).sum()
        total += len(labels)
    model.train(was_training)
    return correct.item() / max(total, 1)


def summarise(cfg: Config, spec: EncoderSpec, checkpoint: str, history: list, n_train: int, n_eval: int,
              k: int) -> dict:  # fmt: skip
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

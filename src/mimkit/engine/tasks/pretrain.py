"""Pre-training as a task of the one loop: a method (or any module with the method contract, e.g. the tokenizer
trainer) on seeded crops of the training images; ContrastiveCrop boxes, the method's epoch-end work and the k-NN
monitor after each epoch; at the end, the export and the k-NN of the encoder against its random initialisation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...atomic import replace_text
from ...config import Config, ConfigError
from ...data import Splits, describe, load_splits
from ...data.ccrop import box_encoder, check_boxes, estimate_boxes, update_due
from ...data.device_cache import DeviceCache
from ...data.gpu_decode import GPUDecodeLoader
from ...data.pipeline import EpochBatchSampler, ViewDataset, prepare_batch, train_loader
from ...eval import FeatureEval
from ...export import export_encoder, write_model_card
from ...methods import Method, build_method, method_class
from ...run_config import config_from_dict
from ...runtime import enable_grad_checkpointing, is_vit
from ..trainer import Runtime, Task, run
from ..trainer import distributed as D
from ..trainer.checkpoint import load_checkpoint
from ..trainer.fit import fit_to_machine
from ..trainer.logging import say
from ..trainer.optim import build_optimizer


@dataclass
class EpochContext:
    """What `Method.on_epoch_end` may use."""

    epoch: int
    step: int
    splits: Splits
    cfg: Config
    device: torch.device
    main: bool


class PretrainTask(Task):
    kind = "pretrain"
    resume_keys = ("model.name", "model.patch_size", "data.image_size")

    def __init__(self, cfg: Config, rt: Runtime, build=build_method):
        """`build(cfg)` makes the trained module (default: the registered method `cfg.method`), after seeding."""
        super().__init__(cfg, rt)
        self.splits = load_splits(cfg.data, cfg.train.seed, cfg.eval.max_eval_images)
        torch.manual_seed(cfg.train.seed)
        self.module = build(cfg)
        if cfg.model.init:  # continue from existing weights (strict unless model.init_strict=false)
            from ...models.init_weights import describe_init, load_initial_weights

            report = load_initial_weights(self.module, cfg.model.init, cfg.model.init_strict)
            for line in describe_init(report):
                say(line, rt.main)
        self.module.to(rt.device)
        self.sync_batchnorm = bool(getattr(self.module, "sync_batchnorm", False))
        if cfg.model.grad_checkpointing:
            enable_grad_checkpointing(self.module)
        self.model = self.module
        self.dataset = ViewDataset(self.splits.train, self.module.views, cfg.data, seed=cfg.train.seed)
        fit_to_machine(cfg, len(self.dataset), rt.world, rt.main)  # a GPU recipe on a small machine or subset
        self.batch_size = cfg.train.batch_size
        self.sampler = EpochBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.train.seed, rt.rank, rt.world)
        self.num_images = len(self.dataset)
        if cfg.data.device_cache and cfg.data.decode == "gpu":
            raise ConfigError("data.device_cache and data.decode=gpu both decode on the device: choose one")
        self.cache = DeviceCache(self.dataset, rt.device) if cfg.data.device_cache else None  # may refuse the size
        # made once on the device: a per-batch host->device copy of two small tensors would block the host
        self.mean = torch.tensor(cfg.data.mean, device=rt.device)
        self.std = torch.tensor(cfg.data.std, device=rt.device)
        if rt.device.type == "cuda" and cfg.train.channels_last:
            self.module.to(memory_format=torch.channels_last)  # NHWC convolutions (CNN enhancers, tokenizers)
        torch.manual_seed(cfg.train.seed * 1000 + rt.rank + 1)  # masks differ across ranks; model init did not

    # ---- the loop's questions ------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"method": self.cfg.method}

    def method_sections(self) -> tuple[str, ...]:
        return (method_class(self.cfg.method).section_name(),)

    def describe(self, steps_per_epoch: int, effective_batch: int, lr: float) -> str:
        cfg = self.cfg
        return (
            f"{describe(cfg, self.splits)}; {self.trained_what()} at {cfg.data.image_size}px; {self.rt.world} "
            f"process(es) on {self.rt.device}; {cfg.train.epochs} epochs x {steps_per_epoch} steps; effective "
            f"batch {effective_batch}, lr {lr:.3g}"
        )

    def trained_what(self) -> str:
        patch = getattr(getattr(self.module.encoder, "patch_embed", None), "patch_size", None)
        return f"method {self.cfg.method}, model {self.cfg.model.name}" + (f"/{patch[0]}" if patch else "")

    def make_loader(self):
        if self.cache is not None:  # cropped on the device from the decoded images, same keys from `sampler`
            return self.cache.loader(self.sampler, self.mean, self.std)
        if self.cfg.data.decode == "gpu":  # JPEG bytes from workers, decoded and cropped on the device
            return GPUDecodeLoader(self.dataset, self.sampler, self.rt.device, self.mean, self.std,
                                   self.cfg.data.num_workers)  # fmt: skip
        return train_loader(self.dataset, self.sampler, self.cfg.data.num_workers, pin=self.rt.device.type == "cuda")

    def batches(self, epoch: int, start: int):
        on_device = self.cache is not None or self.cfg.data.decode == "gpu"
        for raw in super().batches(epoch, start):
            if on_device:
                yield raw
            else:
                batch = prepare_batch(raw, self.module.views, self.rt.device, self.mean, self.std)
                batch["bad"] = raw["bad"]
                yield batch

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        m = self.module
        return build_optimizer(m, self.cfg.optim, lr, m.no_weight_decay(), self.rt.device, lr_scale=m.lr_scale)

    def step(self, model, batch):
        bad = batch.pop("bad", [])
        loss, metrics = model(batch)
        return loss, metrics, bad

    def after_step(self, step: int, total: int) -> None:
        self.module.after_step(step, total)

    def end_epoch(self, epoch: int, step: int, last: bool) -> dict:
        cfg, rt = self.cfg, self.rt
        logged = {}
        if self.dataset.boxes is not None and update_due(cfg.data, epoch, cfg.train.epochs):
            logged["ccrop_box_area"] = self.update_ccrop_boxes()
        logged.update(self.module.on_epoch_end(EpochContext(epoch, step, self.splits, cfg, rt.device, rt.main)))
        if cfg.eval.knn_every and epoch % cfg.eval.knn_every == 0 and self.splits.query is not None:
            if rt.main:
                top1 = self.feature_eval().knn(self.module.encoder)["top1"]
                logged["knn_top1"] = top1
                say(f"epoch {epoch}: k-NN top-1 {top1:.4f}", rt.main)
        return logged if rt.main else {}

    def state_dict(self) -> dict:
        return {"ccrop_boxes": self.dataset.boxes.clone()} if self.dataset.boxes is not None else {}

    def load_state_dict(self, state: dict, path: Path) -> None:
        if self.dataset.boxes is not None and "ccrop_boxes" in state:
            self.dataset.boxes.copy_(check_boxes(state["ccrop_boxes"], len(self.dataset), path))

    def bad_file_names(self, indices: list[int]) -> list[str]:
        return [self.splits.train.describe(i) for i in indices]

    # ---- epoch-end work ------------------------------------------------------------------------------------
    def feature_eval(self) -> FeatureEval:
        cfg = self.cfg
        return FeatureEval(self.splits.memory, self.splits.query, cfg.data, cfg.data.image_size, self.rt.device,
                           cfg.eval)  # fmt: skip

    def update_ccrop_boxes(self) -> float:
        """Re-estimate every training image's ContrastiveCrop box with the current encoder (each rank a shard, then
        summed), in place in the dataset's shared tensor so that (persistent) loader workers see them.
        -> mean box area (fraction of the image)."""
        rt = self.rt
        with rt.autocast():
            boxes, rate = estimate_boxes(box_encoder(self.module), self.dataset.source, self.cfg.data, rt.device,
                                         rank=rt.rank, world=rt.world)  # fmt: skip
        if rt.world > 1:  # each rank estimated a shard
            boxes = D.all_reduce_sum(boxes.to(rt.device)).cpu()
        self.dataset.boxes.copy_(boxes)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item()
        say(f"ContrastiveCrop: {len(boxes)} boxes re-estimated ({rate * rt.world:.0f} img/s), mean area {area:.3f}",
            rt.main)  # fmt: skip
        return area

    # ---- after the loop ------------------------------------------------------------------------------------
    def report(self, steps: int) -> dict:
        """Export the encoder to out/encoder and, on labeled data, compare its k-NN accuracy with the same encoder
        at random initialisation, on rank 0. -> the summary written to out/summary.json ({} on other ranks)."""
        if not self.rt.main:
            return {}
        cfg, out = self.cfg, Path(self.cfg.out)
        self.module.eval()
        card = {"method": cfg.method, "data": data_name(cfg.data.path), "train_images": self.num_images,
                "epochs": cfg.train.epochs, "steps": steps,
                "effective_batch": self.batch_size * self.rt.world * cfg.optim.accum_steps}  # fmt: skip
        choice = choose_export(self.module, cfg, self.splits, self.rt.device)
        if choice:
            say(choice)
        enc_dir = export_method(self.module, cfg, out / "encoder", card)
        summary = {"method": cfg.method, "steps": steps, "encoder": str(enc_dir), "pool": cfg.eval.pool}
        if choice:  # what `mimkit export --checkpoint` exports again under an 'auto' setting
            summary["exported_encoder"] = self.module.export_meta()["encoder"]
        say(f"encoder exported to '{enc_dir}' (timm.create_model('local-dir:{enc_dir}', pretrained=True))")
        if cfg.eval.final_knn and self.splits.query is not None:
            fe = self.feature_eval()
            trained = fe.knn(self.module.encoder)
            with torch.random.fork_rng():
                torch.manual_seed(cfg.train.seed)
                random_init = build_method(cfg).to(self.rt.device).eval()
            baseline = fe.knn(random_init.encoder)
            summary["knn_top1"] = trained["top1"]
            summary["knn_top1_random_init"] = baseline["top1"]
            card["knn"] = {"top1": trained["top1"], "top1_random_init": baseline["top1"], "k": cfg.eval.knn_k,
                           "memory": len(self.splits.memory), "query": len(self.splits.query)}  # fmt: skip
            summary["knn"] = card["knn"]  # what `mimkit export` puts on its card
            write_model_card(enc_dir, card)
            say(f"k-NN top-1 (k={cfg.eval.knn_k}, {cfg.eval.pool} pooling, {len(self.splits.memory)} memory / "
                f"{len(self.splits.query)} query images):")  # fmt: skip
            say(f"  pre-trained encoder  {trained['top1']:.4f}")
            say(f"  random-init encoder  {baseline['top1']:.4f}")
        replace_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def choose_export(method: Method, cfg: Config, splits: Splits, device, max_images: int = 2000) -> str | None:
    """For a method with a student and an EMA teacher (`Method.export_options`): select the encoder to export and
    -> one line saying which and why (None for other methods). A setting of 'auto' measures both by k-NN among the
    *training* images (up to `max_images` of them, seeded: even ones as memory, odd ones as queries; the held-out
    split that the run reports is not used to choose) and keeps the better (ties: the fallback); without labels,
    the fallback. `eval.*` gives k, temperature and pooling."""
    options = method.export_options()
    if options is None:
        return None
    key, setting, encoders, fallback = options
    if setting != "auto":
        method.select_encoder(setting)
        return f"exported the {setting} encoder ({key}={setting})"
    source = splits.memory
    if source is None or not source.labeled or len(source) < 4:
        method.select_encoder(fallback)
        return f"exported the {fallback} encoder ({key}=auto, no labeled training images to measure: the fallback)"
    from ...data.folder import seeded_subset
    from ...eval.features import extract
    from ...eval.knn import knn_accuracy

    picked = seeded_subset(source, max_images, cfg.train.seed, key="eval.max_eval_images")
    top1 = {}
    for name, enc in encoders.items():
        feats, labels = extract(enc, picked, cfg.data, cfg.data.image_size, device, cfg.eval.pool)
        r = knn_accuracy(feats[0::2], labels[0::2], feats[1::2], labels[1::2], len(source.classes), cfg.eval.knn_k,
                         cfg.eval.knn_temperature)  # fmt: skip
        top1[name] = r["top1"]
    best = max(top1, key=lambda n: (top1[n], n == fallback))
    method.select_encoder(best)
    scores = ", ".join(f"{n} {v:.4f}" for n, v in top1.items())
    return (f"exported the {best} encoder ({key}=auto: k-NN top-1 {scores} on {len(picked)} training images, half "
            f"as memory, half as queries)")  # fmt: skip


def reapply_export_choice(method: Method, summary: dict, step: int) -> str | None:
    """`mimkit export` of a checkpoint taken at `step`: select the encoder the run exported. An explicit setting is
    applied as is; under 'auto' the choice the run measured (its summary.json) when the run ended at that step, else
    the fallback. -> one line saying which and why (None for methods with a single encoder)."""
    options = method.export_options()
    if options is None:
        return None
    key, setting, _, fallback = options
    if setting != "auto":
        name, why = setting, f"{key}={setting}"
    elif summary.get("exported_encoder") and summary.get("steps") == step:
        name, why = summary["exported_encoder"], f"{key}=auto: the one the run chose, summary.json"
    else:
        name, why = fallback, f"{key}=auto and no choice recorded at step {step} in summary.json: the fallback"
    method.select_encoder(name)
    return f"the {name} encoder ({why})"


def data_name(path: str) -> str:
    """What a model card says about the data: the folder's or file's name, not the user's full path."""
    return path if path == "demo" else Path(path.rstrip("/")).name


def export_method(method: Method, cfg: Config, out_dir, card: dict | None = None) -> Path:
    """The method's encoder as a timm Hub folder, with the run's preprocessing and the method's metadata. The
    export's pooling is the one mimkit's k-NN reported (`eval.pool`), so a plain timm forward gives those features."""
    meta = {"method": cfg.method, **method.export_meta()}
    return export_encoder(method.encoder, out_dir, image_size=cfg.data.image_size, mean=cfg.data.mean,
                          std=cfg.data.std, mimkit_meta=meta, global_pool=cfg.eval.pool, card=card)  # fmt: skip


def generator_patch_from_tokenizer(cfg: Config, main: bool = True) -> None:
    """CIM with a CNN enhancer: a CNN has no patch, so the generator's pixels per token (`cim.generator_patch`)
    come from the tokenizer's grid over the run's images (8x8 tokens over 32 px: 4) when the user gave none."""
    options = cfg.sections.get(method_class(cfg.method).section_name())
    unset = hasattr(options, "generator_patch") and options.generator_patch is None  # CIM's, and left to us
    if not unset or is_vit(cfg.model.name) or not cfg.tokenizer.path:
        return
    from ...models.tokenizer import read_tokenizer_config

    grid = read_tokenizer_config(cfg.tokenizer.path)["grid"]
    if cfg.data.image_size % grid:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of the tokenizer's grid {grid} "
                          f"('{cfg.tokenizer.path}'): set cim.generator_patch (pixels per token)")  # fmt: skip
    options.generator_patch = cfg.data.image_size // grid
    say(f"cim.generator_patch={options.generator_patch}: the tokenizer's {grid}x{grid} tokens over "
        f"{cfg.data.image_size} px images (a CNN enhancer has no patch of its own)", main)  # fmt: skip


def pretrain(cfg: Config, task_cls: type[PretrainTask] | None = None) -> dict:
    """`mimkit pretrain` (or another pre-training-like task, e.g. the tokenizer's): train, then export and report
    on rank 0. -> the summary (empty on other ranks)."""

    def make_task(rt: Runtime) -> PretrainTask:
        if task_cls is None:
            generator_patch_from_tokenizer(cfg, rt.main)
        return (task_cls or PretrainTask)(cfg, rt)

    return run(cfg, make_task)


def method_from_checkpoint(path: str | Path, device="cpu") -> tuple[Method, Config, dict]:
    """Rebuild a method (and its config) from a pre-training checkpoint, weights loaded."""
    state = load_checkpoint(path)
    if state.get("kind", "pretrain") != "pretrain":
        from ...errors import CheckpointError

        raise CheckpointError(f"'{path}' is a {state['kind']} checkpoint, not a pre-training one")
    cfg = config_from_dict(state["config"])
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    return method.to(device).eval(), cfg, state

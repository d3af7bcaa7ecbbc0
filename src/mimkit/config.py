"""Typed run configuration: the sections every run shares, as dataclasses, and the `Config` that holds them.

A recipe is plain YAML whose keys mirror the dataclasses below. Every key is checked: an unknown key, a value of
the wrong type, a value outside its range (`Annotated[int, Range(1)]`) or outside its choices (`Literal[...]`)
raises `ConfigError` naming the dotted key, so a typo never silently falls back to a default.

The machinery lives below and knows no method: the types and checks in `config_schema`, YAML and dotted overrides
in `config_yaml`. A method's own section (`mae`, `beit`, ...) is the `Options` dataclass in the method's file;
`mimkit.run_config` attaches every registered one when it builds a run's config, so adding a method never touches
this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from .config_schema import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Probability, Range
from .errors import ConfigError

# the schema's vocabulary is imported from here by the sections declared elsewhere (each method's Options)
__all__ = ["Config", "ConfigError", "Range", "PositiveInt", "NonNegInt", "PositiveFloat", "NonNegFloat",
           "Probability", "DataConfig", "ModelConfig", "TokenizerConfig", "OptimConfig", "TrainConfig", "LogConfig",
           "EvalConfig", "FinetuneConfig", "SegmentConfig", "to_dict"]  # fmt: skip


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class DataConfig:
    path: str = "demo"  # a folder (labeled, flat, or with train/ and val|test/) or "demo"
    image_size: PositiveInt = 32
    max_images: PositiveInt | None = None  # fixed, seeded subset of the training images
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: Probability = 0.5  # horizontal flip probability (0 for digits and text)
    # ContrastiveCrop (Peng et al. 2022), for every method: crops whose centre lies inside a per-image box found on
    # the model's own feature heat map; RandomResizedCrop until the first box update (docs/design.md)
    crop_mode: Literal["rrc", "ccrop"] = "rrc"
    ccrop_alpha: float = 0.6  # Beta(alpha, alpha) placement inside the box; < 1 pushes the crops apart
    ccrop_threshold: float = 0.1  # heat-map rows/columns whose max (min-max normalised) exceeds this span the box
    ccrop_warmup_epochs: NonNegInt = 20  # RandomResizedCrop for these epochs; boxes are first estimated at their end
    ccrop_interval: PositiveInt = 20  # re-estimate the boxes after every epoch e >= warm-up with e % interval == 0
    ccrop_heat: Literal["l1", "sum"] = "l1"  # ViT heat map: sum of |pre-norm token| | signed channel sum [UNVERIFIED]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: NonNegInt = 2
    bad_file_limit: Probability = 0.01  # fraction of undecodable files past which a run stops (at least 1 file)
    device_cache: bool = False  # decode the training set once into the device's memory, crop there (small datasets)
    # side images of different sizes are squashed to (> 0: every image); 0 = the largest view's size
    device_cache_size: NonNegInt = 0
    device_cache_max_gb: PositiveFloat = 4.0  # refuse to build a device cache larger than this (N x 3 x H x W bytes)
    # exact: the worker loader's crops, drawn on the host | fast: drawn per batch on the device
    device_crops: Literal["exact", "fast"] = "exact"
    decode: Literal["cpu", "gpu"] = "cpu"  # gpu: JPEG bytes decoded in batches on the device (torchvision decode_jpeg)


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm vit_* name
    patch_size: PositiveInt | None = None  # None: the one the timm name says (vit_small_patch16_224 -> 16)
    drop_path: Probability = 0.0  # stochastic depth rate (fine-tuning recipes: 0.1)
    # optional size overrides of the named architecture (timm accepts them as factory arguments)
    depth: PositiveInt | None = None
    embed_dim: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    layer_scale: float | None = None  # LayerScale init; None: the method's default (BEiT, SimMIM, ConMIM 0.1); 0: off
    # beit_* encoders only (BEiT, SimMIM's ViT): relative position bias shared | per_layer | none; absolute pos
    rel_pos_bias: Literal["shared", "per_layer", "none"] = "shared"
    # start from weights: a mimkit/timm export folder, a timm checkpoint file, or an official MAE checkpoint (with
    # its decoder); hf-hub:ID only downloads when named. What loaded is printed; strict unless init_strict=false
    init: str | None = None
    init_strict: bool = True
    grad_checkpointing: bool = False  # recompute each block in the backward pass: memory for compute (ViT-L/H)
    abs_pos_embed: bool = False


@dataclass
class TokenizerConfig:
    """An image tokenizer: `path` is the one BEiT/CIM read targets from; the rest shapes the VQ-VAE that
    `mimkit tokenizer train` fits (mimkit.models.tokenizer.VQTokenizer)."""

    path: str | None = None  # a tokenizer folder (`mimkit tokenizer train` / `mimkit tokenizer import-dalle`)
    vocab_size: PositiveInt = 512
    downsample: PositiveInt = 4  # pixels per token side, a power of 2: the ViT patch size (4 at 32 px gives 8x8 tokens)
    width: PositiveInt = 64  # channels after the stem, doubled at each downsampling up to 4x
    res_blocks: NonNegInt = 2  # residual blocks at token resolution, in the encoder and in the decoder
    code_dim: PositiveInt = 16  # low-dimensional codes are used more evenly (docs/results.md, "Tokenizer")
    commitment: NonNegFloat = 0.25  # weight of ||z - sg(code)||^2 (VQ-VAE's beta)
    ema_decay: Probability = 0.99  # codebook running-mean decay
    restart_every: NonNegInt = 10  # steps between dead-code restarts (codes unused since the last one); 0 = each epoch
    eval_images: NonNegInt = 1000  # held-out images for the epoch-end PSNR and codebook usage


@dataclass
class OptimConfig:
    blr: PositiveFloat = 1.5e-4  # base lr; lr = blr * effective_batch / lr_batch_divisor (MAE's rule)
    lr: PositiveFloat | None = None  # absolute lr; overrides blr when set (BEiT/ConMIM convention)
    lr_batch_divisor: PositiveInt = 256
    min_lr: NonNegFloat = 0.0
    weight_decay: NonNegFloat = 0.05
    # a per-step cosine from weight_decay to this over the run (DINO's --weight_decay_end 0.4); None = constant
    weight_decay_end: NonNegFloat | None = None
    betas: tuple[Probability, Probability] = (0.9, 0.95)
    warmup_epochs: NonNegFloat = 1.0
    clip_grad: PositiveFloat | None = None  # max global gradient norm; None = no clipping
    accum_steps: PositiveInt = 1  # micro-batches per optimizer step (effective batch = batch_size x world x accum)


@dataclass
class TrainConfig:
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128  # per process
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    log_every: PositiveInt = 10  # steps between metric lines (and the only host syncs of the loss)
    checkpoint_every: NonNegInt = 0  # steps between checkpoints; 0 = once per epoch
    keep_checkpoints: NonNegInt = 0  # also keep the newest N epoch-end states as checkpoints/epoch-<E>.pt
    compile: bool = False
    ema: bool = False  # keep an EMA of the trained weights (timm ModelEmaV3); fine-tuning evaluates it too
    ema_decay: Probability = 0.9999
    # stop when a loss is over this many times the lowest of the last 20 logged ones (its weights are as lost as NaN
    # ones: the run stops as for a non-finite loss, docs/reliability.md); 0 = never
    max_loss_jump: NonNegFloat = 1000.0
    stop_signals: str = "SIGTERM,SIGUSR1"  # finish the step, checkpoint and exit 3 on these ("" = ignore)
    channels_last: bool = True  # CUDA: convolution weights in NHWC (faster cuDNN kernels for CNNs); ignored on CPU
    allow_config_change: bool = False  # resume a run whose checkpoint has other settings (they are named either way)


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False  # Weights & Biases beside JSONL and TensorBoard; the run id is kept for resumed runs
    wandb_project: str = "mimkit"
    wandb_mode: Literal["offline", "online"] = "offline"  # compute nodes rarely reach the internet: sync later


@dataclass
class EvalConfig:
    knn_every: NonNegInt = 0  # epochs between k-NN monitor runs on labeled data (0 = off)
    knn_k: PositiveInt = 20
    knn_temperature: PositiveFloat = 0.07
    pool: Literal["avg", "cls"] = "avg"  # feature for k-NN / linear: mean of patch tokens, or the class token
    linear_epochs: PositiveInt = 90  # linear probe epochs (MAE: 90 on ImageNet)
    final_knn: bool = True  # after pre-training on labeled data: k-NN of the encoder vs random init
    max_eval_images: PositiveInt | None = 2000  # queries for the k-NN monitor / final k-NN (eval knn: the full split)


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (`mimkit finetune`): the recipe of MAE/BEiT/CIM, built from timm's parts. The
    optimizer's lr, schedule and weight decay come from `optim`, the budget from `train`."""

    renamed: ClassVar[dict] = {"drop_path": "model.drop_path", "hflip": "data.hflip", "ema": "train.ema",
                               "ema_decay": "train.ema_decay"}  # fmt: skip

    global_pool: Literal["avg", "token"] = "avg"  # avg (mean of patch tokens + fc_norm, MAE/BEiT) | token (class token)
    # layer-wise lr decay (timm param groups); 1.0 = off. ViT-B: 0.65, ViT-L: 0.75
    layer_decay: Annotated[float, Range(0, 1, min_open=True)] = 0.75
    mixup: NonNegFloat = 0.8  # Beta(alpha) of mixup; 0 = off
    cutmix: NonNegFloat = 1.0  # Beta(alpha) of cutmix; 0 = off
    mixup_prob: Probability = 1.0
    mixup_switch_prob: Probability = 0.5  # chance of cutmix instead of mixup when both are on
    smoothing: Probability = 0.1  # label smoothing
    randaug: str = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; "" = off
    reprob: Probability = 0.25  # random erasing probability
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    head_init_scale: PositiveFloat = 1e-3  # new head: trunc-normal 0.02 x this (BEiT/ConMIM; = MAE's N(0, 2e-5))
    eval_every: NonNegInt = 1  # epochs between evaluations on the val/test split (the last epoch is always evaluated)
    max_eval_images: PositiveInt | None = None  # subset of the val/test split (None = all)


@dataclass
class SegmentConfig:
    """Semantic segmentation fine-tuning (`mimkit segment`) on `images/` + `masks/` folders. The training crop
    is `data.image_size` (--image-size); the optimizer's lr and schedule length come from `optim`, the budget
    from `train` (mimkit.engine.tasks.segment)."""

    num_classes: Annotated[int, Range(2)] = 11  # class ids 0..num_classes-1 in the masks
    ignore_index: int = 255  # mask value excluded from loss and IoU (CamVid: 11)
    class_names: str = ""  # comma-separated names of ids 0..num_classes-1 ("" = class_0, class_1, ...)
    reduce_zero_label: bool = False  # raw ADE20K masks: id 0 ("other") becomes ignore_index, the rest shift by -1
    head: Literal["light", "upernet"] = "light"  # light (documented default for small data) | upernet (BEiT/MAE)
    head_width: PositiveInt = 128  # head channels (SegFormer's small decoders: 256; BEiT/MAE's UperNet on ViT-B: 768)
    feature_indices: tuple[int, int, int, int] | None = None  # ViT blocks (0-based) for strides 4/8/16/32
    aux_weight: NonNegFloat = 0.0  # FCN auxiliary head on the stride-16 level (BEiT/MAE's UperNet: 0.4); 0 = none
    dropout: Probability = 0.1  # before the classifier (mmsegmentation's decode heads)
    base_size: PositiveInt = 512  # short side images are resized to: times the jitter when training, exactly for eval
    scale_range: tuple[float, float] = (0.5, 2.0)  # training scale jitter of base_size (mmseg's ratio_range)
    hflip: Probability = 0.5
    photometric: bool = False  # colour jitter approximating mmseg's PhotoMetricDistortion (its ADE20K pipeline)
    # whole: the resized image in one pass | slide: crop-size windows (BEiT/MAE's ADE20K test)
    eval_mode: Literal["whole", "slide"] = "whole"
    eval_stride: PositiveInt | None = None  # slide: window step in px; None = 2/3 of the crop (341 over 512)
    # layer-wise lr decay of the encoder (BEiT/MAE on ADE20K: 0.65); 1.0 = off
    layer_decay: Annotated[float, Range(0, 1, min_open=True)] = 1.0
    head_lr_mult: PositiveFloat = 1.0  # lr of the head (and the ViT's adapter) relative to the encoder's top
    lr_schedule: Literal["poly", "cosine"] = "poly"  # poly (power 1 after the warm-up, mmseg/BEiT) | cosine
    eval_every: NonNegInt = 0  # epochs between evaluations; 0 = only after the last epoch (which is always evaluated)
    max_eval_images: PositiveInt | None = None  # a fixed, seeded subset of the evaluation split (None = all)


@dataclass
class Config:
    """The shared sections as fields; the method sections (`cfg.mae`, `cfg.beit`, ...) in `sections`, reached as
    attributes. `sections` is empty unless the builder fills it: `mimkit.run_config` puts every registered
    method's there, so `config.yaml` is a complete record of the run."""

    method: str = "mae"
    out: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"Config has no section '{name}'")


def to_dict(cfg: Any, sections=None) -> dict:
    """Plain nested dict (tuples become lists; method sections at the top level beside the shared ones): safe for
    YAML, JSON and weights-only checkpoints. `sections`: the method sections to keep (None: all), so that a run
    records only what it used."""

    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    d = plain(dataclasses.asdict(cfg))
    if isinstance(cfg, Config):
        d.update({k: v for k, v in d.pop("sections").items() if sections is None or k in sections})
    return d

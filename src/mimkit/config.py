"""Typed run configuration: dataclasses, YAML recipes and dotted command-line overrides.

A recipe is plain YAML whose keys mirror the dataclasses below. Every key is checked: an unknown key or a value
of the wrong type raises `ConfigError` naming the dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe, override or CLI value that does not fit the schema."""


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class DataConfig:
    path: str = "demo"  # a folder (labeled, flat, or with train/ and val|test/) or "demo"
    image_size: int = 32
    max_images: int | None = None  # fixed, seeded subset of the training images
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: bool = True
    # ContrastiveCrop (Peng et al. 2022), for every method: crops whose centre lies inside a per-image box found on
    # the model's own feature heat map; RandomResizedCrop until the first box update (docs/design.md)
    crop_mode: str = "rrc"  # rrc | ccrop
    ccrop_alpha: float = 0.6  # Beta(alpha, alpha) placement inside the box; < 1 pushes the crops apart
    ccrop_threshold: float = 0.1  # heat-map rows/columns whose max (min-max normalised) exceeds this span the box
    ccrop_warmup_epochs: int = 20  # RandomResizedCrop for these epochs; boxes are first estimated at their end
    ccrop_interval: int = 20  # re-estimate the boxes after every epoch e >= warm-up with e % interval == 0
    ccrop_heat: str = "l1"  # ViT heat map: l1 (sum of |pre-norm token|) | sum (signed channel sum) [UNVERIFIED]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 2
    bad_file_limit: float = 0.01  # fraction of undecodable files past which a run stops
    device_cache: bool = False  # decode the training set once into the device's memory, crop there (small datasets)
    device_cache_size: int = 0  # side images of different sizes are squashed to (> 0: every image); 0 = largest view
    device_cache_max_gb: float = 4.0  # refuse to build a device cache larger than this (N x 3 x H x W bytes)
    device_crops: str = "exact"  # exact (the worker loader's crops, host-drawn) | fast (batch-drawn on the device)


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm vit_* name
    patch_size: int = 4
    drop_path: float = 0.0
    # optional size overrides of the named architecture (timm accepts them as factory arguments)
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    layer_scale: float | None = None  # LayerScale init (BEiT: 0.1 for ViT-B, 1e-5 for ViT-L); None = off
    # beit_* encoders only (BEiT, SimMIM's ViT): relative position bias shared | per_layer | none; absolute pos
    rel_pos_bias: str = "shared"
    abs_pos_embed: bool = False


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 192
    decoder_depth: int = 4
    decoder_heads: int = 3
    norm_pix_loss: bool = True
    norm_pix_eps: float = 1e-6  # MAE's value; flat images (documents, digits) want a larger one


@dataclass
class BEiTConfig:
    mask_ratio: float = 0.4  # target share of patches (BEiT: 75 of 196); blockwise masks may hold fewer
    min_block_patches: int = 16  # smallest block (capped at the target count on small grids)
    max_block_patches: int | None = None
    min_aspect: float = 0.3


@dataclass
class CIMConfig:
    """CIM's generator, corruption and enhancer (cim-respix / cim-revdet). Values the paper does not give us are
    marked: see docs/methods.md."""

    mask_ratio: float = 0.5  # share of tokens the generator must fill (paper ablation: ~50%)
    mask_mode: str = "random"  # random | block (BEiT's blockwise masks)
    generator_depth: int = 4  # a *small* BEiT: paper ablation favours 4-6 layers
    generator_dim: int = 192  # UNVERIFIED width; keep it well below the enhancer's
    generator_heads: int = 3
    generator_patch: int | None = None  # pixels per token; default: the ViT enhancer's patch / model.patch_size
    sample: str = "softmax"  # softmax (paper) | argmax (ablation)
    temperature: float = 1.0  # UNVERIFIED
    target_norm: str = "window"  # ResPix targets: window (paper) | patch (MAE) | none
    window: int = 9  # UNVERIFIED sliding-window size (odd)
    enhancer_weight: float = 1.0  # lambda in L = L_gen + lambda * L_enh; UNVERIFIED
    cnn_output_stride: int = 32  # CNN enhancers: 8 | 16 | 32 (dilation keeps small images' maps large enough)
    vocab_size: int = 0  # 0 = the tokenizer's codebook size; otherwise must equal it
    eval_images: int = 256  # held-out images for the epoch-end check against trivial baselines


@dataclass
class SimMIMConfig:
    mask_ratio: float = 0.6
    mask_patch_size: int | None = None  # pixels per mask cell, a multiple of the patch; None = 2 patches (32 over 16)


@dataclass
class ConMIMConfig:
    mask_mode: str = "block"  # block (BEiT's rectangles, the reference default) | coarse (random cells, "random_mps32")
    mask_ratio: float = 0.4  # block: target fraction of patches (BEiT/ConMIM: 75 of 196); coarse: fraction of cells
    mask_min_patches: int = 16  # block: smallest rectangle, in patches
    mask_cell: int = 2  # coarse: cell side in patches (32 px cells over 16 px patches)
    mask_bank: int = 0  # block: > 0 draws masks on the device from this many precomputed (x8 flips) ones
    temperature: float = 0.1  # InfoNCE temperature on L2-normalised projections
    momentum: float = 0.996  # teacher EMA momentum at the first step, raised by a cosine to momentum_final
    momentum_final: float = 1.0
    proj_hidden: int = 1024  # per-token MLP projector width (the paper: 4096 for ViT-B/L; costly on small ViTs)
    proj_dim: int = 256  # projection size (the paper: 256)
    export_encoder: str = "teacher"  # which ViT goes downstream: teacher (EMA, the reference) | student
    center_teacher: bool = False  # subtract the teacher's per-position batch mean (not in the reference; see docs)
    # the strong perturbation of the teacher's view (batched, on the device; see mimkit.data.augment)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the view
    solarize_p: float = 0.2


@dataclass
class CMAEConfig:
    """CMAE seed variant (Mao et al., arXiv 2205.10546; only the abstract is public). Every [UNVERIFIED] key is a
    reconstruction choice (docs/design.md, "CMAE"); set a weight to 0 to switch its task off."""

    # reconstruction: MAE's masking, encoder pass, decoder and norm-pix loss, with a slimmer decoder than MAE's 4x192
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    norm_pix_eps: float = 1e-6
    # loss = rec_weight * L_rec + contrast_weight * L_contrast + pos_weight * L_pos  [UNVERIFIED weights]
    rec_weight: float = 1.0
    contrast_weight: float = 0.1
    pos_weight: float = 0.1
    # contrastive: pooled visible tokens of the masked crop vs the whole second crop through the target encoder
    target_encoder: str = "ema"  # ema (momentum copy, mimkit.ema) | shared (the online encoder); stop-gradient both
    momentum: float = 0.996  # EMA momentum at step 0, raised by a cosine to momentum_final
    momentum_final: float = 1.0
    temperature: float = 0.2  # InfoNCE over the batch, symmetric [UNVERIFIED: MoCo's 0.2]
    pool: str = "avg"  # avg (mean of patch tokens) | cls
    proj_hidden: int = 1024  # projector D -> hidden -> proj_dim (predictor proj_dim -> hidden -> proj_dim)
    proj_dim: int = 256
    predictor: bool = True  # a predictor on the online side (MoCo v3 / BYOL)
    # token position prediction: a second encoder pass over the visible patches with positions hidden, a linear
    # head classifies each token's patch index. drop: no position embedding | permute: those of random positions
    pos_hiding: str = "drop"


@dataclass
class TokenizerConfig:
    """An image tokenizer: `path` is the one BEiT/CIM read targets from; the rest shapes the VQ-VAE that
    `mimkit tokenizer train` fits (mimkit.models.tokenizer.VQTokenizer)."""

    path: str | None = None  # a tokenizer folder (`mimkit tokenizer train` / `mimkit tokenizer import-dalle`)
    vocab_size: int = 512
    downsample: int = 4  # pixels per token side, a power of 2: the ViT patch size (4 at 32 px gives 8x8 tokens)
    width: int = 64  # channels after the stem, doubled at each downsampling up to 4x
    res_blocks: int = 2  # residual blocks at token resolution, in the encoder and in the decoder
    code_dim: int = 16  # low-dimensional codes are used more evenly (docs/results.md, "Tokenizer")
    commitment: float = 0.25  # weight of ||z - sg(code)||^2 (VQ-VAE's beta)
    ema_decay: float = 0.99  # codebook running-mean decay
    restart_every: int = 10  # steps between dead-code restarts (codes unused since the last one); 0 = each epoch
    eval_images: int = 1000  # held-out images for the epoch-end PSNR and codebook usage


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / lr_batch_divisor (MAE's rule)
    lr: float | None = None  # absolute lr; overrides blr when set (BEiT/ConMIM convention)
    lr_batch_divisor: int = 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    clip_grad: float | None = None
    accum_steps: int = 1


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # per process
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)
    seed: int = 0
    log_every: int = 10  # steps between metric lines (and the only host syncs of the loss)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = once per epoch
    compile: bool = False
    channels_last: bool = True  # CUDA: convolution weights in NHWC (faster cuDNN kernels for CNNs); ignored on CPU


@dataclass
class EvalConfig:
    knn_every: int = 0  # epochs between k-NN monitor runs on labeled data (0 = off)
    knn_k: int = 20
    knn_temperature: float = 0.07
    pool: str = "avg"  # feature for k-NN / linear: avg of patch tokens, or the class token ("cls")
    final_knn: bool = True  # after pre-training on labeled data: k-NN of the encoder vs random init
    max_eval_images: int | None = 2000  # queries for the k-NN monitor / final k-NN (eval knn: the full split)


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (`mimkit finetune`): the recipe of MAE/BEiT/CIM, built from timm's parts. The
    optimizer's lr, schedule and weight decay come from `optim`, the budget from `train`."""

    global_pool: str = "avg"  # avg (mean of patch tokens + fc_norm, MAE/BEiT) | token (class token)
    layer_decay: float = 0.75  # layer-wise lr decay (timm param groups); 1.0 = off. ViT-B: 0.65, ViT-L: 0.75
    drop_path: float = 0.1
    mixup: float = 0.8  # Beta(alpha) of mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha) of cutmix; 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5  # chance of cutmix instead of mixup when both are on
    smoothing: float = 0.1  # label smoothing
    randaug: str = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; "" = off
    reprob: float = 0.25  # random erasing probability
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5  # horizontal flip probability (0 for digits and text)
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3) and evaluate it too
    ema_decay: float = 0.9999
    eval_every: int = 1  # epochs between evaluations on the val/test split (the last epoch is always evaluated)
    max_eval_images: int | None = None  # subset of the val/test split (None = all)


@dataclass
class SegmentConfig:
    """Semantic segmentation fine-tuning (`mimkit segment`) on `images/` + `masks/` folders. The training crop
    is `data.image_size` (--image-size); the optimizer's lr and schedule length come from `optim`, the budget
    from `train` (mimkit.engine.segment)."""

    num_classes: int = 11  # class ids 0..num_classes-1 in the masks
    ignore_index: int = 255  # mask value excluded from loss and IoU (CamVid: 11)
    class_names: str = ""  # comma-separated names of ids 0..num_classes-1 ("" = class_0, class_1, ...)
    reduce_zero_label: bool = False  # raw ADE20K masks: id 0 ("other") becomes ignore_index, the rest shift by -1
    head: str = "light"  # light (documented default for small data) | upernet (BEiT/MAE)
    head_width: int = 128  # head channels (SegFormer's small decoders: 256; BEiT/MAE's UperNet on ViT-B: 768)
    feature_indices: tuple[int, int, int, int] | None = None  # ViT blocks (0-based) for strides 4/8/16/32
    aux_weight: float = 0.0  # FCN auxiliary head on the stride-16 level (BEiT/MAE's UperNet: 0.4); 0 = none
    dropout: float = 0.1  # before the classifier (mmsegmentation's decode heads)
    base_size: int = 512  # short side images are resized to: times the jitter when training, exactly for eval
    scale_range: tuple[float, float] = (0.5, 2.0)  # training scale jitter of base_size (mmseg's ratio_range)
    hflip: bool = True
    photometric: bool = False  # colour jitter approximating mmseg's PhotoMetricDistortion (its ADE20K pipeline)
    eval_mode: str = "whole"  # whole (resized image in one pass) | slide (crop-size windows, BEiT/MAE's ADE20K test)
    eval_stride: int | None = None  # slide: window step in px; None = 2/3 of the crop (341 over 512)
    layer_decay: float = 1.0  # layer-wise lr decay of the encoder (BEiT/MAE on ADE20K: 0.65); 1.0 = off
    head_lr_mult: float = 1.0  # lr of the head (and the ViT's multi-level adapter) relative to the encoder's top
    lr_schedule: str = "poly"  # poly (power 1 after the warm-up, mmseg/BEiT) | cosine
    eval_every: int = 0  # epochs between evaluations; 0 = only after the last epoch (which is always evaluated)
    max_eval_images: int | None = None  # a fixed, seeded subset of the evaluation split (None = all)


@dataclass
class Config:
    method: str = "mae"
    out: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    cmae: CMAEConfig = field(default_factory=CMAEConfig)
    conmim: ConMIMConfig = field(default_factory=ConMIMConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    beit: BEiTConfig = field(default_factory=BEiTConfig)
    cim: CIMConfig = field(default_factory=CIMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


# ----------------------------------------------------------------------------------------------- typing
def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' expects a list of {len(args)} values, got {value!r}")
        return tuple(_check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v, key + ".")
        else:
            setattr(obj, k, _check_value(key, v, hints[k]))


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is read as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # e.g. 'data.path=a:b' — keep the text, the schema decides
    return key.strip(), value


def packaged_recipe(name: str) -> Path:
    path = resources.files("mimkit") / "configs" / f"{name}.yaml"
    return Path(str(path))


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        # a bare name such as 'cifar10-mae' refers to a recipe shipped with mimkit
        packaged = packaged_recipe(str(path))
        if packaged.is_file():
            p = packaged
        else:
            raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return data


def build_config(files: list[str | Path] = (), overrides: dict | None = None, dotted: list[str] = ()) -> Config:
    """Defaults <- YAML files (in order) <- `overrides` (a nested dict) <- dotted `key=value` strings."""
    cfg = Config()
    for f in files:
        _apply(cfg, read_yaml(f))
    if overrides:
        _apply(cfg, overrides)
    for text in dotted:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) — safe for YAML, JSON and weights-only checkpoints."""

    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

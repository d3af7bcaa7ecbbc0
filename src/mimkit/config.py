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
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 2
    bad_file_limit: float = 0.01  # fraction of undecodable files past which a run stops


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm vit_* name
    patch_size: int = 4
    drop_path: float = 0.0
    # optional size overrides of the named architecture (timm accepts them as factory arguments)
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 192
    decoder_depth: int = 4
    decoder_heads: int = 3
    norm_pix_loss: bool = True
    norm_pix_eps: float = 1e-6  # MAE's value; flat images (documents, digits) want a larger one


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


@dataclass
class EvalConfig:
    knn_every: int = 0  # epochs between k-NN monitor runs on labeled data (0 = off)
    knn_k: int = 20
    knn_temperature: float = 0.07
    pool: str = "avg"  # feature for k-NN / linear: avg of patch tokens, or the class token ("cls")
    final_knn: bool = True  # after pre-training on labeled data: k-NN of the encoder vs random init
    max_eval_images: int | None = None


@dataclass
class Config:
    method: str = "mae"
    out: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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

"""Encoders going downstream (fine-tuning, segmentation): where the weights come from, and the timm model they
are loaded into.

An encoder comes from an export folder (`mimkit export`, or `<run>/encoder`), a training checkpoint (.pt), or
`none`: the same architecture at random initialisation, the from-scratch baseline of the identical recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from ...config import Config, ConfigError
from ...export import encoder_state, timm_model_args
from ...models.rel_pos import per_layer_model_args, resize_tables, shared_to_per_layer
from ...safe_load import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    check_finite,
    create_timm_model,
    fit_problems,
    load_exported,
    read_export,
    read_weights,
)
from .pretrain import method_from_checkpoint


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder: timm architecture + factory arguments, weights (None = random
    init), and the preprocessing it was trained with."""

    source: str  # the checkpoint path, or "none"
    architecture: str
    model_args: dict
    state: dict[str, torch.Tensor] | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    method: str | None = None

    @property
    def is_vit(self) -> bool:
        return self.architecture.startswith(("vit_", "deit_", "beit_"))


def encoder_spec(
    checkpoint: str, cfg: Config, model_flag: str | None = None, allow_download: bool = False
) -> EncoderSpec:
    """`checkpoint`: an export folder, a training checkpoint (.pt) or 'none' (random init from `cfg.model` and
    `cfg.data`). `model_flag`: the model name the user asked for, checked against the checkpoint's.
    `allow_download`: an export may name a Hub architecture (timm fetches its config); off, nothing is fetched."""
    if checkpoint == "none":
        return scratch_spec(cfg)
    path = Path(checkpoint)
    if path.is_dir():
        spec = _spec_from_export(path, allow_download)
    elif path.is_file():
        spec = _spec_from_training_checkpoint(path)
    else:
        raise ConfigError(f"encoder checkpoint '{checkpoint}' does not exist (an export folder, a .pt file or none)")
    if model_flag and model_flag != spec.architecture:
        raise ConfigError(
            f"encoder checkpoint '{checkpoint}' holds a {spec.architecture}, but the model flag asks for {model_flag}"
        )
    return spec


def scratch_spec(cfg: Config) -> EncoderSpec:
    """The encoder pre-training would build from `cfg` (same architecture and sizes), without weights."""
    from ...models.vit import create_encoder

    name = cfg.model.name
    if name.startswith(("vit_", "deit_", "beit_")):
        encoder = create_encoder(cfg.model, cfg.data.image_size, allow_beit=True)
    elif timm.is_model(name):
        encoder = timm.create_model(name, pretrained=False, num_classes=0)
    else:
        raise ConfigError(f"model.name '{name}' is not a timm model")
    arch = encoder.default_cfg.get("architecture") or name
    return EncoderSpec("none", arch, timm_model_args(encoder), None, cfg.data.image_size, cfg.data.mean, cfg.data.std)


def _spec_from_export(path: Path, allow_download: bool = False) -> EncoderSpec:
    """An export folder, checked as untrusted input: config values, architecture, readable finite weights."""
    info = read_export(path, allow_download)
    return EncoderSpec(source=str(path), state=read_weights(path / EXPORT_WEIGHTS), **info)


def _spec_from_training_checkpoint(path: Path) -> EncoderSpec:
    from .pretrain import method_from_checkpoint

    method, cfg, _ = method_from_checkpoint(path)
    enc = method.encoder
    arch = enc.default_cfg.get("architecture") or cfg.model.name
    state = encoder_state(enc)
    check_finite(state, f"encoder checkpoint '{path}'")
    return EncoderSpec(
        source=str(path),
        architecture=arch,
        model_args=timm_model_args(enc),
        state=state,
        image_size=cfg.data.image_size,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        method=cfg.method,
    )


# heads and pooling norms that a downstream model adds on top of a headless encoder
NEW_PARAM_PREFIXES = ("head.", "fc_norm.", "fc.", "classifier.")


def build_model(
    spec: EncoderSpec, image_size: int | None = None, rel_pos: Literal["per_layer", "shared"] = "per_layer",
    **timm_kwargs,
) -> nn.Module:  # fmt: skip
    """The timm model of `spec` (with `timm_kwargs`, e.g. num_classes, global_pool, drop_path_rate), loaded with
    its weights. Only a new head / pooling norm may be missing, and only the final norm a pooling head replaces
    may be left over; anything else means the checkpoint and the architecture disagree (error names the file).
    A ViT used at another image size gets its absolute position embeddings resampled (timm's bicubic) and its
    relative position tables resized (BEiT's interpolation, as timm's Beit loader).

    rel_pos: a Beit pre-trained with one shared relative position table goes downstream with a copy of it in
    every block ('per_layer', BEiT's and ConMIM's fine-tuning: the same function at load, tables then trained
    apart), or keeps the shared one ('shared'). Encoders without a shared table are unaffected."""
    args = dict(spec.model_args)
    if rel_pos == "per_layer":
        args = per_layer_model_args(args)
    size = image_size or spec.image_size
    if spec.is_vit:
        args["img_size"] = size
    args.update(timm_kwargs)
    model = create_timm_model(spec.architecture, args, f"encoder '{spec.source}'{_file_of(spec, EXPORT_CONFIG)}")
    if spec.state is None:
        return model
    state = shared_to_per_layer(dict(spec.state)) if rel_pos == "per_layer" else dict(spec.state)
    state = resize_tables(_resample_pos_embed(state, model), model)
    replaced_norm = isinstance(getattr(model, "norm", None), nn.Identity)
    problems = fit_problems(
        state,
        model,
        may_miss=lambda k: k.startswith(NEW_PARAM_PREFIXES),
        may_leave=lambda k: replaced_norm and k.startswith("norm."),
    )
    if problems:
        raise ConfigError(
            f"encoder checkpoint '{spec.source}' does not fit {spec.architecture} {spec.model_args}"
            f"{_file_of(spec, EXPORT_WEIGHTS)}: {problems}"
        )
    model.load_state_dict(state, strict=False)
    return model


HEAD_INIT_STD, HEAD_INIT_SCALE = 0.02, 1e-3  # BEiT's/ConMIM's classifier: trunc-normal 0.02, then x init_scale


@torch.no_grad()
def init_head(head: nn.Module, init_scale: float = HEAD_INIT_SCALE, std: float = HEAD_INIT_STD) -> None:
    """A new linear classifier as BEiT's and ConMIM's fine-tuning start it (modeling_finetune.py): weight
    trunc-normal `std` (timm's cut at +-2 absolute: no cut), bias 0, both times `init_scale` (their --init_scale,
    0.001). At the defaults this is N(0, 2e-5), the same distribution as MAE's head (trunc-normal std 2e-5)."""
    if not isinstance(head, nn.Linear):
        return
    nn.init.trunc_normal_(head.weight, std=std)
    head.weight.mul_(init_scale)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def _file_of(spec: EncoderSpec, name: str) -> str:
    """ " ('<export>/<name>')" for an export folder, so errors name the file; "" for a .pt or 'none'."""
    return f" ('{Path(spec.source) / name}')" if Path(spec.source).is_dir() else ""


def _resample_pos_embed(state: dict, model: nn.Module) -> dict:
    """A square grid of position embeddings (1, P + n*n, D) resampled to the model's grid; anything else is
    left for the shape check to report."""
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or not isinstance(target, torch.Tensor) or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != target.shape[2]:
        return state
    patches = pos.shape[1] - prefix
    if patches <= 0 or math.isqrt(patches) ** 2 != patches:
        return state
    state["pos_embed"] = resample_abs_pos_embed(pos, model.patch_embed.grid_size, num_prefix_tokens=prefix)
    return state


def load_encoder(path: str | Path, device="cpu", allow_download: bool = False) -> tuple[nn.Module, dict]:
    """An encoder from a training checkpoint (.pt) or an export folder -> (encoder, preprocessing info with
    image_size, mean, std, method)."""
    p = Path(path)
    if p.is_dir():
        info = read_export(p, allow_download=allow_download)
        info = {k: v for k, v in info.items() if k in ("image_size", "mean", "std", "method")}
        return load_exported(p, allow_download=allow_download).to(device).eval(), info
    method, cfg, _ = method_from_checkpoint(p, device)
    check_finite(encoder_state(method.encoder), f"checkpoint '{p}'")
    info = {"image_size": cfg.data.image_size, "mean": cfg.data.mean, "std": cfg.data.std, "method": cfg.method,
            "config": cfg}  # fmt: skip
    return method.encoder.eval(), info

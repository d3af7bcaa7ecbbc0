"""Encoders going downstream (fine-tuning, segmentation): where the weights come from, and the timm model they
are loaded into.

An encoder comes from an export folder (`mimkit export`, or `<run>/encoder`), a training checkpoint (.pt), or
`none`: the same architecture at random initialisation, the from-scratch baseline of the identical recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from ..config import Config, ConfigError
from ..export import encoder_state, read_export, timm_model_args


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


def encoder_spec(checkpoint: str, cfg: Config, model_flag: str | None = None) -> EncoderSpec:
    """`checkpoint`: an export folder, a training checkpoint (.pt) or 'none' (random init from `cfg.model` and
    `cfg.data`). `model_flag`: the model name the user asked for, checked against the checkpoint's."""
    if checkpoint == "none":
        return scratch_spec(cfg)
    path = Path(checkpoint)
    if path.is_dir():
        spec = _spec_from_export(path)
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
    from ..models.vit import create_encoder

    name = cfg.model.name
    if name.startswith(("vit_", "deit_", "beit_")):
        encoder = create_encoder(cfg.model, cfg.data.image_size, allow_beit=True)
    elif timm.is_model(name):
        encoder = timm.create_model(name, pretrained=False, num_classes=0)
    else:
        raise ConfigError(f"model.name '{name}' is not a timm model")
    arch = encoder.default_cfg.get("architecture") or name
    return EncoderSpec("none", arch, timm_model_args(encoder), None, cfg.data.image_size, cfg.data.mean, cfg.data.std)


def _spec_from_export(path: Path) -> EncoderSpec:
    from safetensors.torch import load_file

    info = read_export(path)
    return EncoderSpec(source=str(path), state=load_file(str(path / "model.safetensors")), **info)


def _spec_from_training_checkpoint(path: Path) -> EncoderSpec:
    from .train import method_from_checkpoint

    method, cfg, _ = method_from_checkpoint(path)
    enc = method.encoder
    arch = enc.default_cfg.get("architecture") or cfg.model.name
    return EncoderSpec(
        source=str(path),
        architecture=arch,
        model_args=timm_model_args(enc),
        state=encoder_state(enc),
        image_size=cfg.data.image_size,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        method=cfg.method,
    )


# heads and pooling norms that a downstream model adds on top of a headless encoder
NEW_PARAM_PREFIXES = ("head.", "fc_norm.", "fc.", "classifier.")


def build_model(spec: EncoderSpec, image_size: int | None = None, **timm_kwargs) -> nn.Module:
    """The timm model of `spec` (with `timm_kwargs`, e.g. num_classes, global_pool, drop_path_rate), loaded with
    its weights. Only a new head / pooling norm may be missing, and only the final norm a pooling head replaces
    may be left over; anything else means the checkpoint and the architecture disagree (error names the file).
    A ViT used at another image size gets its absolute position embeddings resampled (timm's bicubic)."""
    args = dict(spec.model_args)
    size = image_size or spec.image_size
    if spec.is_vit:
        args["img_size"] = size
    args.update(timm_kwargs)
    try:
        model = timm.create_model(spec.architecture, pretrained=False, **args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"encoder '{spec.source}': timm cannot build {spec.architecture} with {args}: {e}") from None
    if spec.state is None:
        return model
    state = _resample_pos_embed(dict(spec.state), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith(NEW_PARAM_PREFIXES)]
    replaced_norm = isinstance(getattr(model, "norm", None), nn.Identity)
    bad_unexpected = [k for k in unexpected if not (replaced_norm and k.startswith("norm."))]
    if bad_missing or bad_unexpected:
        raise ConfigError(
            f"encoder checkpoint '{spec.source}' does not fit {spec.architecture} {spec.model_args}: "
            f"missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}"
        )
    return model


def _resample_pos_embed(state: dict, model: nn.Module) -> dict:
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or not isinstance(target, torch.Tensor) or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    state["pos_embed"] = resample_abs_pos_embed(pos, model.patch_embed.grid_size, num_prefix_tokens=prefix)
    return state

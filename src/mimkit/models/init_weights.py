"""Start from existing weights (`model.init`): put a checkpoint's encoder weights into a built method's `encoder`,
and an official MAE checkpoint's decoder into a method that has MAE's decoder (`models.decoder.MaskedDecoder`).

Sources (each an untrusted file: nothing in it is executed, every tensor must be finite):
- an export folder (mimkit's or timm's Hub layout: `config.json` + `model.safetensors`), read by `mimkit.safe_load`;
- a timm checkpoint file: `.safetensors`, or `.pth`/`.pt`/`.bin` read with `torch.load(weights_only=True)`, the
  state dict itself or under "model" / "state_dict" (DDP's `module.` and torch.compile's `_orig_mod.` stripped);
- an official MAE checkpoint (facebookresearch/mae: `{"model": ...}` with `decoder_embed`, `decoder_blocks`, ...);
  MAE's released encoder-only files are timm checkpoints by this rule;
- a mimkit training checkpoint (`<run>/checkpoints/last.pt`): its `encoder.*` and, for MAE-decoder methods,
  its `decoder.*` weights, so that pre-training continues where that run stopped;
- `hf-hub:ID`, downloaded (config.json + model.safetensors) only when the caller allows it.

Strict by default: every encoder key must load and nothing may be left over (ConfigError naming the file and the
first bad key). A classifier head (timm's `pretrained_cfg["classifier"]`) is dropped, as timm drops it for a
headless model. A position table of another grid is resampled (timm's `resample_abs_pos_embed`); the decoder's
fixed sin-cos table is kept when the grids differ (it is exact for the new grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..config import ConfigError
from ..safe_load import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    check_finite,
    fit_problems,
    read_export,
    read_weights,
    torch_load_safely,
)
from .decoder import MaskedDecoder

# facebookresearch/mae's decoder names -> MaskedDecoder's (prefixes end with '.', whole names do not)
MAE_DECODER_NAMES = (
    ("decoder_embed.", "embed."),
    ("decoder_blocks.", "blocks."),
    ("decoder_norm.", "norm."),
    ("decoder_pred.", "pred."),
    ("decoder_pos_embed", "pos_embed"),
    ("mask_token", "mask_token"),
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile, in either order
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INIT_DOWNLOADS_NOTHING = ("model.init downloads nothing: set its 'architecture' to a timm name of this install, e.g. "
                          "vit_base_patch16_224, or download the weights and name the local folder")  # fmt: skip


@dataclass
class InitSource:
    """Weights read from a `model.init` source: encoder keys in timm's names, decoder keys in MaskedDecoder's."""

    kind: str  # export | timm-checkpoint | mae-official | mimkit-checkpoint | hf-hub
    file: Path
    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)
    about: str = ""  # what the source says it is (export: architecture, image size, method)


def load_initial_weights(method: nn.Module, spec: str, strict: bool = True, allow_download: bool = False) -> dict:
    """Load the weights `spec` names into `method.encoder` (and `method.decoder` when the source is an official
    MAE or mimkit checkpoint with a decoder and the method has a MaskedDecoder). -> a report: source, kind, file,
    loaded / missing / unexpected / skipped / resampled key lists (method-level names). Raises ConfigError naming
    the file and the first bad key when `strict` and anything does not load."""
    source = read_init_source(spec, allow_download)
    report = {"source": spec, "kind": source.kind, "file": str(source.file), "about": source.about,
              "loaded": [], "missing": [], "unexpected": [], "skipped": [], "resampled": []}  # fmt: skip
    encoder_state = drop_classifier(source.encoder, method.encoder, report)
    encoder_state = resample_pos_embed(encoder_state, method.encoder, report)
    load_part(method.encoder, encoder_state, "encoder", source, strict, report)
    decoder = getattr(method, "decoder", None)
    if source.decoder and isinstance(decoder, MaskedDecoder):
        decoder_state = dict(source.decoder)
        pos = decoder_state.get("pos_embed")
        if pos is not None and pos.shape != decoder.pos_embed.shape:  # fixed sin-cos: ours is exact for our grid
            del decoder_state["pos_embed"]
            report["skipped"].append("decoder.pos_embed (another grid; the fixed sin-cos table of this grid kept)")
        hint = _decoder_hint(decoder_state, method.section_name() if hasattr(method, "section_name") else "mae")
        load_part(decoder, decoder_state, "decoder", source, strict, report, may_miss={"pos_embed"}, hint=hint)
    elif source.decoder:  # the encoder is what was asked for; a method without MAE's decoder has no use for it
        report["skipped"] += [f"decoder.{k} (method '{getattr(method, 'name', '?')}' has no MAE decoder)"
                              for k in source.decoder]  # fmt: skip
    return report


def describe_init(report: dict) -> list[str]:
    """Lines to print after `load_initial_weights`: what loaded from where, and everything that did not."""
    about = f" ({report['about']})" if report["about"] else ""
    lines = [f"model.init: {len(report['loaded'])} tensors from {report['kind']} '{report['file']}'{about}"]
    for kind in ("resampled", "skipped", "missing", "unexpected"):
        keys = report[kind]
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            lines.append(f"  {kind} ({len(keys)}): {shown}")
    return lines


# ------------------------------------------------------------------------------------------ reading sources
def read_init_source(spec: str, allow_download: bool = False) -> InitSource:
    """The weights `spec` names, classified by what the file holds (see the module docstring)."""
    if spec.startswith("hf-hub:"):
        return _read_hub(spec[len("hf-hub:") :], allow_download)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_export_folder(path, "export")
    if not path.is_file():
        raise ConfigError(f"model.init '{spec}' does not exist (an export folder, a checkpoint file or hf-hub:ID)")
    if path.suffix == ".safetensors":
        return _classify(read_weights(path), path, "timm-checkpoint")
    if path.suffix in _TORCH_SUFFIXES:
        return _read_torch_file(path)
    raise ConfigError(
        f"model.init '{path}': unknown weights file type '{path.suffix}' (.safetensors, {', '.join(_TORCH_SUFFIXES)})"
    )


def _read_export_folder(path: Path, kind: str) -> InitSource:
    if not (path / EXPORT_CONFIG).is_file() and (path / "encoder" / EXPORT_CONFIG).is_file():
        raise ConfigError(
            f"model.init '{path}' is a run folder: name its export '{path / 'encoder'}' (the encoder) or its "
            f"checkpoint '{path / 'checkpoints' / 'last.pt'}' (encoder and decoder, to continue that run)"
        )
    # the architecture is only reported (the weights go into the method's own encoder), and never fetched
    info = read_export(path, download_hint=INIT_DOWNLOADS_NOTHING)
    state = read_weights(path / EXPORT_WEIGHTS)
    about = f"{info['architecture']} at {info['image_size']}px" + (f", {info['method']}" if info["method"] else "")
    return InitSource(kind, path / EXPORT_WEIGHTS, clean_keys(state), about=about)


def _read_hub(repo: str, allow_download: bool) -> InitSource:
    if not allow_download:
        raise ConfigError(
            f"model.init 'hf-hub:{repo}' downloads from the Hugging Face Hub, which this caller does not allow; "
            "download it yourself and name the local folder"
        )
    from huggingface_hub import hf_hub_download

    try:
        for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
            folder = Path(hf_hub_download(repo, name)).parent
    except Exception as e:  # noqa: BLE001 — network, missing repo or file, authentication...
        raise ConfigError(
            f"model.init 'hf-hub:{repo}': cannot download {EXPORT_CONFIG}/{EXPORT_WEIGHTS}: {e}"
        ) from None
    return _read_export_folder(folder, "hf-hub")


def _read_torch_file(path: Path) -> InitSource:
    try:
        obj = torch_load_safely(path)
    except ValueError as e:
        # our advice where it applies (keep the weights, drop the rest), never torch's (load it unsafely)
        advice = ("; if you trust the file, save its state dict alone: torch.save({'model': state_dict}, "
                  "'weights.pth')" if "Python objects" in str(e) else "")  # fmt: skip
        why = f"does not load with torch.load(weights_only=True): {e}{advice}"
        raise ConfigError(f"model.init '{path}' {why}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj and "kind" in obj:
        return _mimkit_checkpoint(obj["model"], path)
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    return _classify(_tensor_dict(state, path), path, "timm-checkpoint")


def _tensor_dict(state, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"model.init '{path}' holds no state dict (tensors by name, or under 'model'/'state_dict')")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"model.init '{path}': entry '{bad[0]}' is not a tensor (not a state dict of weights)")
    check_finite(state, f"model.init '{path}'")
    return clean_keys(state)


def clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the wrappers' prefixes (DDP `module.`, torch.compile `_orig_mod.`), as timm cleans them."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _classify(state: dict[str, torch.Tensor], path: Path, kind: str) -> InitSource:
    """An official MAE state (decoder names present) is split into encoder and mapped decoder; any other state
    is an encoder's."""
    state = clean_keys(state)
    if "decoder_embed.weight" not in state:
        return InitSource(kind, path, state)
    encoder, decoder = {}, {}
    for key, value in state.items():
        mapped = official_decoder_name(key)
        if mapped is None:
            encoder[key] = value
        else:
            decoder[mapped] = value
    return InitSource("mae-official", path, encoder, decoder)


def official_decoder_name(key: str) -> str | None:
    """facebookresearch/mae's decoder key -> MaskedDecoder's (None for an encoder key)."""
    for official, ours in MAE_DECODER_NAMES:
        if key == official or (official.endswith(".") and key.startswith(official)):
            return ours + key[len(official) :]
    return None


def _mimkit_checkpoint(model_state: dict, path: Path) -> InitSource:
    state = _tensor_dict(model_state, path)
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    if not encoder:
        raise ConfigError(f"model.init '{path}' is a mimkit checkpoint without 'encoder.*' weights")
    return InitSource("mimkit-checkpoint", path, encoder, decoder)


# ------------------------------------------------------------------------------------------ fitting
def drop_classifier(state: dict, encoder: nn.Module, report: dict) -> dict:
    """`state` without the classifier head (timm's `pretrained_cfg['classifier']`, e.g. 'head' or 'fc') when the
    encoder has none: a headless encoder, as timm's own loading drops the head for num_classes=0."""
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = encoder.state_dict()
    drop = [k for k in state if k not in own and any(k.startswith(h + ".") for h in heads)]
    report["skipped"] += [f"encoder.{k} (classifier head; the encoder is headless)" for k in drop]
    return {k: v for k, v in state.items() if k not in drop}


def resample_pos_embed(state: dict, encoder: nn.Module, report: dict) -> dict:
    """`state` with its absolute position table resampled to the encoder's patch grid when the grids differ
    (bicubic, timm's `resample_abs_pos_embed`); prefix (class token) rows are kept as they are."""
    own = getattr(encoder, "pos_embed", None)
    theirs = state.get("pos_embed")
    if not isinstance(own, torch.Tensor) or theirs is None or theirs.shape == own.shape or theirs.ndim != 3:
        return state
    prefix = 0 if getattr(encoder, "no_embed_class", False) else int(getattr(encoder, "num_prefix_tokens", 1))
    old = theirs.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if side * side != old or theirs.shape[2] != own.shape[2] or old <= 0:
        return state  # not a square grid of the same width: fit_problems names the key
    grid = list(encoder.patch_embed.grid_size)
    resampled = resample_abs_pos_embed(theirs.float(), grid, [side, side], num_prefix_tokens=prefix)
    report["resampled"].append(f"encoder.pos_embed ({side}x{side} -> {grid[0]}x{grid[1]})")
    return {**state, "pos_embed": resampled.to(theirs.dtype)}


def load_part(part: nn.Module, state: dict, name: str, source: InitSource, strict: bool, report: dict,
              may_miss=frozenset(), hint: str = "; model.init_strict=false loads what fits") -> None:  # fmt: skip
    """Load `state` into `part` (the method's `name`); strict: every key and shape fits or ConfigError (with
    `hint`)."""
    problems = fit_problems(state, part, may_miss=lambda k: k in may_miss)
    if problems and strict:
        raise ConfigError(f"model.init: {source.kind} '{source.file}' does not fit the method's {name}: "
                          f"{problems}{hint}")  # fmt: skip
    own = part.state_dict()
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    part.load_state_dict(fits, strict=False)
    report["loaded"] += [f"{name}.{k}" for k in fits]
    report["missing"] += [f"{name}.{k}" for k in own if k not in fits and k not in may_miss]
    report["unexpected"] += [f"{name}.{k}" for k in state if k not in fits]


def _decoder_hint(state: dict, section: str) -> str:
    """The decoder size the checkpoint was trained with, in the method's option names."""
    embed = state.get("embed.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if embed is None:
        return ""
    return (
        f"; the checkpoint's decoder has {depth} blocks {embed.shape[0]} wide: set {section}.decoder_depth={depth} "
        f"{section}.decoder_dim={embed.shape[0]} (and its heads, {section}.decoder_heads)"
    )

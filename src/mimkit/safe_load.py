"""Export folders and weight files read as untrusted input: they are shared like any download.

The architecture must be a timm name known locally (no Hub, URL or path sources unless the caller allows
downloads), the model is built with `pretrained=False` so nothing in the config's `pretrained_cfg` (hf_hub_id,
url, file) is ever followed, and the weights must be a readable safetensors file of finite tensors whose keys and
shapes are the architecture's. Torch files are loaded with `weights_only=True`: nothing in them is executed.
Writing an export is `mimkit.export`'s.
"""

from __future__ import annotations

import difflib
import json
import math
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

# the files of an export folder (mimkit.export writes them)
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD = "config.json", "model.safetensors", "README.md"
# factory arguments that fetch or load weights, or place the model: an export never chooses them
_LOADING_ARGS = ("checkpoint_path", "cache_dir", "device", "dtype")
# strings that make timm (or a model's own code) look outside the process
_REMOTE_MARKERS = ("://", "hf-hub:", "local-dir:", "hf_hub:")

DOWNLOAD_HINT = "allow downloads with --allow-download"


def read_export(path: str | Path, allow_download: bool = False, download_hint: str = DOWNLOAD_HINT) -> dict:
    """What an export folder says about its encoder: architecture, model_args, image_size, mean, std and the
    mimkit method that trained it. Every value is checked (ConfigError naming the file and the key); the
    architecture must be a local timm name unless `allow_download` (else the error ends with `download_hint`: how
    the caller allows it)."""
    path = Path(path)
    config_file = path / EXPORT_CONFIG
    if not config_file.is_file() or not (path / EXPORT_WEIGHTS).is_file():
        raise ConfigError(f"'{path}' is not an exported encoder folder (needs {EXPORT_CONFIG} and {EXPORT_WEIGHTS})")
    config = read_json_object(config_file)
    where = f"'{config_file}'"
    pcfg = _required(config, "pretrained_cfg", dict, where)
    meta = config.get("mimkit") if isinstance(config.get("mimkit"), dict) else {}
    method = meta.get("method")
    return {
        "architecture": check_architecture(
            _required(config, "architecture", str, where), where, allow_download, download_hint
        ),  # fmt: skip
        "model_args": check_model_args(config.get("model_args") or {}, where, allow_download),
        "image_size": _image_size(_required(pcfg, "input_size", list, where, "pretrained_cfg."), where),
        "mean": _channel_stats(_required(pcfg, "mean", list, where, "pretrained_cfg."), "mean", where),
        "std": _channel_stats(_required(pcfg, "std", list, where, "pretrained_cfg."), "std", where),
        "method": method if isinstance(method, str) else None,
    }


def check_architecture(name: str, where: str, allow_download: bool = False, download_hint: str = DOWNLOAD_HINT) -> str:
    """`name` if it is a timm architecture registered in this install (tags allowed, e.g. `.augreg_in21k`);
    with `allow_download`, Hub and path sources too (timm resolves them, downloading their config)."""
    import timm

    if allow_download:
        return name
    if any(c in name for c in "/\\:"):
        raise ConfigError(
            f"{where}: architecture '{name}' is a Hub, URL or path source; mimkit builds only the timm "
            f"architectures of this install and downloads nothing at run time ({download_hint})"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: architecture '{name}' is not a timm model (timm {timm.__version__}){hint}")
    return name


def check_model_args(args, where: str, allow_download: bool = False) -> dict:
    """The export's timm factory arguments: plain JSON values only, none that loads or fetches anything."""
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: model_args must be a JSON object, got {type(args).__name__}")
    for key, value in args.items():
        if key.startswith("pretrained") or key in _LOADING_ARGS:
            raise ConfigError(f"{where}: model_args.{key} is not taken from an export (it loads or places weights)")
        values = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, bool | int | float | str) for v in values):
            raise ConfigError(f"{where}: model_args.{key} must be a number, string, bool or a list of them")
        remote = [v for v in values if isinstance(v, str) and any(m in v for m in _REMOTE_MARKERS)]
        if remote and not allow_download:
            raise ConfigError(f"{where}: model_args.{key} '{remote[0]}' names a remote or path source")
    return dict(args)


def read_json_object(file: Path) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"'{file}' is not a JSON file: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{file}' must hold a JSON object, got {type(config).__name__}")
    return config


def _required(config: dict, key: str, kind: type, where: str, prefix: str = ""):
    if key not in config:
        raise ConfigError(f"{where} lacks the key '{prefix}{key}' (not a timm export config)")
    value = config[key]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise ConfigError(f"{where}: '{prefix}{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _image_size(input_size: list, where: str) -> int:
    if len(input_size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size):
        raise ConfigError(f"{where}: 'pretrained_cfg.input_size' must be [channels, height, width], got {input_size}")
    return input_size[-1]


def _channel_stats(values: list, key: str, where: str) -> tuple[float, float, float]:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if len(values) != 3 or not numbers or (key == "std" and min(values) <= 0):
        raise ConfigError(f"{where}: 'pretrained_cfg.{key}' must be 3 finite numbers (std > 0), got {values}")
    return tuple(float(v) for v in values)


def torch_load_safely(file: str | Path, mmap: bool = False):
    """`torch.load(file, weights_only=True)` on the CPU: tensors and plain values, nothing executed. A file that
    does not load raises ValueError saying why in mimkit's words (torch's own text advises loading it unsafely and
    asks for an issue to be filed: wrong for a file that may be crafted), and torch prints no warning of its own."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 ...", with a site-packages path
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 — truncated, zeroed, a pickle with code or objects in it...
        text = str(e)
        if "Unsupported global" in text:
            why = "it holds Python objects besides tensors and plain values; refused, nothing in it was run"
        elif "zip archive" in text or "PytorchStreamReader" in text:
            why = "it is not a complete torch checkpoint (truncated or damaged)"
        elif isinstance(e, pickle.UnpicklingError) or "legacy .tar format" in text:
            why = "it is not a torch checkpoint of tensors (damaged bytes, or a plain pickle); nothing in it was run"
        else:
            why = f"it does not load ({type(e).__name__})"
        raise ValueError(why) from None


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file -> its tensors (CPU), every floating tensor finite; ConfigError naming the file
    (and the first non-finite tensor) otherwise. safetensors holds no code: reading it executes nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"'{file}' is not a readable safetensors file ({first})") from None
    if not state:
        raise ConfigError(f"'{file}' holds no tensors")
    check_finite(state, f"'{file}'")
    return state


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """ConfigError naming `where` and the first tensor with a NaN or inf (weights of a diverged run)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(
            f"{where}: tensor '{bad[0]}' holds NaN or inf values ({len(bad)} of {len(state)} tensors do); "
            "these weights come from a diverged or damaged run"
        )


def fit_problems(state: dict, model: nn.Module, may_miss=lambda key: False, may_leave=lambda key: False) -> str:
    """What keeps `state` from loading into `model` ('' when nothing): wrong shapes or kinds, missing keys
    (unless `may_miss(key)`) and leftover keys (unless `may_leave(key)`), each with its first key in the
    model's order (the file's for leftovers)."""
    expected = model.state_dict()
    problems = []
    wrong = [k for k in expected if k in state and not _same_kind(state[k], expected[k])]
    if wrong:
        k = wrong[0]
        got, want = state[k], expected[k]
        problems.append(
            f"key '{k}' is {list(got.shape)} {got.dtype}, the architecture's is {list(want.shape)} {want.dtype}"
            + (f" ({len(wrong) - 1} more keys differ)" if len(wrong) > 1 else "")
        )
    for kind, keys in (
        ("missing", [k for k in expected if k not in state and not may_miss(k)]),
        ("unexpected", [k for k in state if k not in expected and not may_leave(k)]),
    ):
        if keys:
            problems.append(f"{kind} key '{keys[0]}'" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    return "; ".join(problems)


def _same_kind(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and got.is_floating_point() == want.is_floating_point()


def create_timm_model(architecture: str, args: dict, where: str) -> nn.Module:
    """`timm.create_model(architecture, pretrained=False, **args)`: random init, nothing fetched; timm's
    refusals (unknown argument, impossible sizes) become a ConfigError naming `where`."""
    import timm

    try:
        return timm.create_model(architecture, pretrained=False, **args)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, AttributeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}: timm cannot build {architecture} with {args}: {first}") from None
    except Exception as e:  # noqa: BLE001 — a Hub architecture (--allow-download) without a network, a proxy...
        if ":" not in architecture:
            raise
        fetched = f"could not fetch the configuration of {architecture} ({type(e).__name__})"
        raise ConfigError(f"{where}: {fetched}") from None


def load_exported(path: str | Path, allow_download: bool = False) -> nn.Module:
    """The timm model of an export folder with its weights, for evaluation and fine-tuning: every key and
    shape must be the architecture's (strict). Built with `pretrained=False`; the export's preprocessing is
    recorded in `model.pretrained_cfg` as a timm local-dir load would."""
    path = Path(path)
    info = read_export(path, allow_download)
    weights = path / EXPORT_WEIGHTS
    state = read_weights(weights)
    arch, args = info["architecture"], info["model_args"]
    model = create_timm_model(arch, args, f"'{path / EXPORT_CONFIG}'")
    problems = fit_problems(state, model)
    if problems:
        raise ConfigError(f"'{weights}' does not fit {arch} {args}: {problems}")
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = model.default_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, info["image_size"], info["image_size"]),
        "mean": info["mean"],
        "std": info["std"],
    }
    return model

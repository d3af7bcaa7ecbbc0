"""Export an encoder as a timm Hugging Face Hub folder: `config.json` + `model.safetensors` (+ `README.md`, a
model card: how it was trained, its results, how to load it).

`timm.create_model('local-dir:DIR', pretrained=True)` loads the folder strictly, and the same folder can be
uploaded to the Hub and loaded with `hf-hub:user/name`. mimkit reads such folders back as untrusted input
(`mimkit.safe_load`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from timm.models import VisionTransformer
from torch import nn

from . import __version__
from .atomic import replace_text, write_weights_folder
from .safe_load import EXPORT_CARD, EXPORT_CONFIG, EXPORT_WEIGHTS, check_finite, read_json_object


def timm_model_args(encoder: nn.Module) -> dict:
    """The factory arguments that rebuild `encoder` (recorded by timm), minus training-only ones."""
    args = dict(getattr(encoder, "_model_args", {}) or {})
    for k in ("pretrained", "drop_path_rate", "drop_rate", "pretrained_cfg", "pretrained_cfg_overlay", "device"):
        args.pop(k, None)
    args["num_classes"] = 0
    return {k: v for k, v in args.items() if isinstance(v, int | float | str | bool | list | tuple | type(None))}


def _pool_name(encoder: nn.Module) -> str:
    """ViTs keep the pooling as a string; CNNs as a SelectAdaptivePool2d module with a `pool_type`."""
    pool = getattr(encoder, "global_pool", "")
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "") or "")


def export_encoder(
    encoder: nn.Module,
    out_dir: str | Path,
    *,
    image_size: int,
    mean,
    std,
    interpolation: str = "bicubic",
    mimkit_meta: dict | None = None,
    global_pool: str | None = None,
    card: dict | None = None,
) -> Path:
    """Write the encoder's state dict and its timm config into `out_dir` (replaced atomically). `global_pool`
    ('avg' | 'cls', ViTs): the pooling a plain timm forward of the export applies; mimkit's k-NN and linear
    probe pool the same way (`eval.pool`), so `model(x)` gives the features mimkit reported. `card`: what the
    model card says about the run (`model_card`'s keys); with it, README.md is part of the same atomic write."""
    out_dir = Path(out_dir)
    architecture = encoder.default_cfg.get("architecture") or encoder.pretrained_cfg["architecture"]
    model_args = timm_model_args(encoder)
    if global_pool and isinstance(encoder, VisionTransformer):  # final norm, then mean of patch tokens or the token
        model_args.update(global_pool="avg" if global_pool == "avg" else "token", fc_norm=False)
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(encoder.num_features),
        "global_pool": model_args.get("global_pool", _pool_name(encoder)),
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mimkit",
            "custom_load": False,
            "input_size": [3, image_size, image_size],
            "fixed_input_size": bool(encoder.pretrained_cfg.get("fixed_input_size", False)),
            "interpolation": interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": encoder.pretrained_cfg.get("first_conv"),
            "classifier": encoder.pretrained_cfg.get("classifier"),
        },
        "mimkit": {"version": __version__, **(mimkit_meta or {})},
    }
    texts = {}
    if card is not None:
        parameters = sum(t.numel() for t in encoder.state_dict().values())
        texts[EXPORT_CARD] = model_card(config, card, out_dir.resolve(), parameters)
    check_finite(encoder_state(encoder), f"the encoder to export to '{out_dir}'")  # never pass on diverged weights
    return write_weights_folder(encoder, out_dir, config, config_name=EXPORT_CONFIG, texts=texts)


def write_model_card(folder: str | Path, info: dict) -> Path:
    """(Re)write `folder`/README.md for an existing export from its config.json and `info` (`model_card`'s keys),
    e.g. once the final k-NN is known; the file is replaced atomically."""
    from safetensors import safe_open

    folder = Path(folder)
    config = read_json_object(folder / EXPORT_CONFIG)
    with safe_open(str(folder / EXPORT_WEIGHTS), framework="pt") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return replace_text(folder / EXPORT_CARD, model_card(config, info, folder.resolve(), parameters))


def model_card(config: dict, info: dict, folder: Path, parameters: int) -> str:
    """The README.md of an export (Hub model card: YAML header, then Markdown). `config`: the export's config.json;
    `info` (every key optional): method, data, train_images, epochs, steps, effective_batch, knn (dict: top1,
    top1_random_init, k, memory, query), metrics ({name: value}: other final numbers), repo_id (the Hub name it
    will be uploaded as)."""
    pcfg, method = config["pretrained_cfg"], info.get("method") or config.get("mimkit", {}).get("method") or "?"
    arch, size = config["architecture"], pcfg["input_size"][-1]
    header = ["---", "library_name: timm", "pipeline_tag: image-feature-extraction",
              f"tags: [image-feature-extraction, timm, mimkit, self-supervised, {method}]", "---", ""]  # fmt: skip
    lines = [f"# {arch}, pre-trained with {method} (mimkit)", "",
             f"A headless timm `{arch}` ({parameters:,} parameters, {config['num_features']} features) "
             f"pre-trained without labels by mimkit {config.get('mimkit', {}).get('version', '')}.", "",
             "## Training", "", "| | |", "|---|---|", f"| method | `{method}` |"]  # fmt: skip
    for key, label in (("data", "data"), ("train_images", "training images"), ("epochs", "epochs"),
                       ("steps", "optimizer steps"), ("effective_batch", "effective batch")):  # fmt: skip
        if info.get(key) is not None:
            lines.append(f"| {label} | {info[key]} |")
    lines += [f"| image size | {size} px |", f"| model arguments | `{json.dumps(config.get('model_args', {}))}` |"]
    lines += ["", "## Results", "", *_results(info), "", *_usage(folder, info.get("repo_id"), size)]
    lines += ["", "## Preprocessing", "", _preprocessing(pcfg, size), "", "## Pooling", "", _pooling(config)]
    return "\n".join(header + lines) + "\n"


def _results(info: dict) -> list[str]:
    knn, rows = info.get("knn") or {}, []
    if knn.get("top1") is not None:
        setup = ", ".join(f"{k}={knn[k]}" for k in ("k", "memory", "query") if knn.get(k) is not None)
        random = knn.get("top1_random_init")
        rows.append(
            f"- k-NN top-1 ({setup}; DINO's weighted vote on frozen features): **{knn['top1']:.4f}**"
            + (f"; the same encoder at random initialisation: {random:.4f}" if random is not None else "")
        )
    rows += [f"- {name}: {value:.4g}" if isinstance(value, float) else f"- {name}: {value}"
             for name, value in (info.get("metrics") or {}).items()]  # fmt: skip
    return rows or ["No evaluation was recorded for this export (no labeled data, or exported before it ran)."]


def _usage(folder: Path, repo_id: str | None, size: int) -> list[str]:
    hub = repo_id or "USER/NAME"
    return ["## Use with timm", "", "```python", "import timm", "import torch",
            "from PIL import Image", "from timm.data import create_transform, resolve_data_config", "",
            f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()  # this folder',
            f'# after uploading it to the Hugging Face Hub: timm.create_model("hf-hub:{hub}", pretrained=True)',
            "transform = create_transform(**resolve_data_config({}, model=model))  # the preprocessing below",
            f'image = Image.new("RGB", ({size}, {size}))  # your picture: Image.open("photo.jpg").convert("RGB")',
            "with torch.no_grad():",
            "    features = model(transform(image).unsqueeze(0))  # (1, num_features), pooled as below",
            "```"]  # fmt: skip


def _preprocessing(pcfg: dict, size: int) -> str:
    mean = ", ".join(f"{v:.4g}" for v in pcfg["mean"])
    std = ", ".join(f"{v:.4g}" for v in pcfg["std"])
    resize = f"the shorter side resized to {size} px ({pcfg.get('interpolation', 'bicubic')})"
    crop = f"the centred {size}x{size} square kept (crop_pct {pcfg.get('crop_pct', 1.0)})"
    return (
        f"RGB; {resize}, {crop}, scaled to [0, 1], normalised with mean ({mean}) and std ({std}): what "
        "`resolve_data_config` + `create_transform` build from config.json, and the view mimkit evaluated on. "
        "Training saw random resized crops, normalised alike."
    )


def _pooling(config: dict) -> str:
    args = config.get("model_args", {})
    pool = config.get("global_pool") or args.get("global_pool")
    tokens = "patch_size" in args  # a ViT: tokens after a final LayerNorm; else a CNN's feature map
    described = {
        ("avg", True): "the mean of the patch tokens after the final LayerNorm (`global_pool='avg'`, `fc_norm=False`)",
        ("token", True): "the class token after the final LayerNorm (`global_pool='token'`)",
        ("avg", False): "the global average of the last feature map (`global_pool='avg'`)",
    }.get((pool, tokens), f"timm's `global_pool='{pool}'` of the last features")
    return (
        f"`model(x)` returns {described}: the feature mimkit's k-NN and linear probe used. "
        "`model.forward_features(x)` returns every token (or the feature map of a CNN) before pooling."
    )


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights, detached, on the CPU."""
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}

"""The config each command builds from what the user typed: packaged recipe <- --config <- flags <- `key=value`
overrides, plus the defaults that depend on what the user did not say (the run folder's name, the patch size
for small images).

This is the layer above the methods: it attaches every registered method's section to the shared ones, which the
schema machinery (config, config_schema, config_yaml) does not know of. `build_config` and `config_from_dict`
are the ways to a run's config, from the command line, a recipe or a checkpoint's record."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import Config
from .config_schema import apply_updates
from .config_yaml import apply_layers, read_yaml

MIN_GRID = 8  # tokens per side a default model gets on small images (MAE's 75% masking leaves 16 of 64 visible)

# flag -> the config key it sets (flags a sub-command does not have are simply absent from its namespace)
FLAG_KEYS = {
    "method": "method",
    "model": "model.name",
    "data": "data.path",
    "out": "out",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "image_size": "data.image_size",
    "max_images": "data.max_images",
    "device": "train.device",
    "num_workers": "data.num_workers",
    "pool": "eval.pool",
    "knn_k": "eval.knn_k",
    "knn_temperature": "eval.knn_temperature",
    "linear_epochs": "eval.linear_epochs",
    "max_eval_images": "eval.max_eval_images",
    "allow_config_change": "train.allow_config_change",
}


def method_sections() -> dict[str, type]:
    """Every registered method's option section: {section name: its Options dataclass}."""
    from .methods import option_sections  # torch: imported when a config is made, not for `mimkit --help`

    return option_sections()


def default_config() -> Config:
    """Every shared and every registered method section at its defaults."""
    return Config(sections={name: options() for name, options in method_sections().items()})


def build_config(files=(), overrides: dict | None = None, dotted=()) -> Config:
    """Defaults <- YAML files (in order) <- `overrides` (a nested dict) <- dotted `key=value` strings."""
    return apply_layers(default_config(), files, overrides, dotted)


def config_from_dict(d: dict) -> Config:
    """A recorded config (a checkpoint's, `to_dict`'s) on the defaults: keys added since it was written keep
    theirs, keys that are gone are named."""
    cfg = default_config()
    apply_updates(cfg, d)
    return cfg


def flag_overrides(args, **extra) -> dict:
    """The flags the user gave, as a nested override dict keyed like the config."""
    overrides: dict = {}
    given = {FLAG_KEYS[k]: v for k, v in vars(args).items() if k in FLAG_KEYS and v is not None}
    for key, value in {**given, **extra}.items():
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return overrides


def _recipe_sets_out(files) -> bool:
    return any("out" in read_yaml(f) for f in files)


def _default_out(args, files) -> bool:
    """True when neither --out, an `out=` override nor a recipe names the run folder."""
    return not args.out and not any(o.startswith("out=") for o in args.overrides) and not _recipe_sets_out(files)


def _data_name(cfg) -> str:
    """The data's name as a run folder's part: no scheme (`hf:`, `s3://`), no characters a shell or a file system
    minds (`runs/mae-imagenette-pq`, not `runs/mae-hf:imagenette-pq`)."""
    if cfg.data.path == "demo":
        return "demo"
    path = cfg.data.path.split("::")[0]
    remote = re.sub(r"^[a-z][a-z0-9+]*:(//)?", "", path)  # hf:x, s3://bucket/x
    name = Path(remote.rstrip("/")).name if remote != path else Path(path).resolve().name  # '.' -> its name
    name = re.sub(r"[-_]?\{[^}]*\}", "", name)  # shard patterns: train-{000000..000255}.tar -> train.tar
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "data"


def names_model(files, args) -> bool:
    """Whether the user chose the model: --model, a model.name / model.patch_size override, or a recipe with one."""
    if getattr(args, "model", None) or any(o.startswith(("model.name=", "model.patch_size=")) for o in args.overrides):
        return True
    return any({"name", "patch_size"} & set(read_yaml(f).get("model") or {}) for f in files)


def small_image_patch(cfg: Config, chosen: bool) -> str | None:
    """On small images the default model's own patch (16) leaves a token grid of 2x2 at 32 px: unless the user
    chose the model, take the largest patch that divides the image into at least MIN_GRID x MIN_GRID tokens.
    -> the line that says so (None: nothing changed)."""
    from .models.vit import resolve_patch_size  # torch and timm: not for `mimkit --help`
    from .runtime import is_vit

    m, size = cfg.model, cfg.data.image_size
    if chosen or not is_vit(m.name):
        return None
    own = resolve_patch_size(m.name, m.patch_size)
    if size // own >= MIN_GRID:
        return None
    patch = next((p for p in (16, 8, 4, 2, 1) if p < own and size % p == 0 and size // p >= MIN_GRID), None)
    if patch is None:
        return None
    m.patch_size = patch
    return (
        f"model {m.name} with model.patch_size={patch}: {size // patch}x{size // patch} tokens at {size} px (its "
        f"own patch {own} would give {size // own}x{size // own}); --model or model.patch_size=N chooses"
    )


def pretrain_config(args, kind: str = "pretrain"):
    files = [args.config] if args.config else []
    if not files and kind == "pretrain" and args.data in (None, "demo"):
        files = ["demo"]  # the packaged demo recipe
    cfg = build_config(files, flag_overrides(args), args.overrides)
    if _default_out(args, files):
        cfg.out = f"runs/{cfg.method if kind == 'pretrain' else kind}-{_data_name(cfg)}"
    if kind == "pretrain":
        say_first(small_image_patch(cfg, names_model(files, args)))
    return cfg


def say_first(line: str | None) -> None:
    """A choice made for the user, printed before the run's own lines (rank 0 only)."""
    if line and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # before the process group
        print(line, flush=True)


def downstream_config(args, recipe: str):
    """Config of `finetune` / `segment`: the packaged `recipe` (<recipe>-demo on the demo data) <- --config
    <- flags <- dotted overrides."""
    files = [f"{recipe}-demo" if args.data in (None, "demo") else recipe]
    if args.config:
        files.append(args.config)
    cfg = build_config(files, flag_overrides(args), args.overrides)
    if _default_out(args, files[1:]):
        source = "scratch" if args.checkpoint == "none" else Path(args.checkpoint).resolve().parent.name
        data = _data_name(cfg)
        cfg.out = f"runs/{recipe}-{source}" + ("" if source.endswith(f"-{data}") else f"-{data}")
    return cfg

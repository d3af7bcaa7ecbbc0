"""The config each command builds from what the user typed: packaged recipe <- --config <- flags <- `key=value`
overrides, plus the defaults that depend on what the user did not say (the run folder's name, the patch size
for small images).

This is the layer above the methods: it attaches every registered method's section to the shared ones, which the
schema machinery (config, config_schema, config_yaml) does not know of. `build_config` and `config_from_dict`
are the ways to a run's config, from the command line, a recipe or a checkpoint's record."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from .config import Config, ConfigError
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
    if not files and args.data in (None, "demo"):
        files = ["demo" if kind == "pretrain" else f"{kind}-demo"]  # the packaged demo recipe
    cfg = build_config(files, flag_overrides(args), args.overrides)
    if _default_out(args, files):
        cfg.out = f"runs/{cfg.method if kind == 'pretrain' else kind}-{_data_name(cfg)}"
    if kind == "pretrain":
        say_first(small_image_patch(cfg, names_model(files, args)))
    return cfg


DEMO_TOKENIZER = "tokenizer-demo"  # the packaged recipe of the demo's VQ tokenizer


def demo_tokenizer(cfg: Config, overrides: list[str]) -> Config | None:
    """BEiT and CIM read their targets from a tokenizer (`tokenizer.path`). When the user named none: on the built-in
    demo, point `cfg` at `<out>/tokenizer` and -> the config of the demo tokenizer to train there first (the
    `tokenizer-demo` recipe at the run's image size, pixels per token (the method's `generator_patch` where it sets
    one, else the patch), seed, subset and device, with the user's `tokenizer.*`
    overrides), or None when a finished one is there (a re-run reuses it); on other data, an error giving the
    command that makes one. None as well when the method needs no tokenizer or has one."""
    from .methods import method_class  # torch: not for `mimkit --help`
    from .models.vit import resolve_patch_size
    from .runtime import is_vit

    method = method_class(cfg.method)
    if not method.needs_tokenizer or cfg.tokenizer.path:
        return None
    m = cfg.model
    patch = resolve_patch_size(m.name, m.patch_size) if is_vit(m.name) else m.patch_size  # a CNN: the generator's
    # pixels per visual token where the method sets its own (CIM's cim.generator_patch), else the patch
    patch = getattr(cfg.sections.get(method.section_name()), "generator_patch", None) or patch
    if cfg.data.path != "demo":
        out = f"runs/tokenizer-{_data_name(cfg)}"
        down = f" tokenizer.downsample={patch}" if patch else ""
        raise ConfigError(
            f"method {cfg.method} needs a tokenizer: train one on this data first with `mimkit tokenizer train "
            f"--data {shlex.quote(cfg.data.path)} --image-size {cfg.data.image_size} --out {out}{down}`, then add "
            f"tokenizer.path={out} (or convert DALL-E's: `mimkit tokenizer import-dalle`)"
        )
    folder = Path(cfg.out) / "tokenizer"
    cfg.tokenizer.path = str(folder)
    if (folder / "summary.json").is_file():  # written last, after the export: a finished tokenizer run
        say_first(f"{cfg.method}: reusing the demo tokenizer in '{folder}' (tokenizer.path={folder})")
        return None
    run = {
        "out": str(folder),
        "data": {"image_size": cfg.data.image_size, "max_images": cfg.data.max_images},
        "train": {"seed": cfg.train.seed, "device": cfg.train.device, "precision": cfg.train.precision},
        "tokenizer": {"downsample": patch or 4},
    }
    tok = build_config([DEMO_TOKENIZER], run, [o for o in overrides if o.startswith("tokenizer.")])
    say_first(f"{cfg.method} reads its targets from a VQ tokenizer and none was given (tokenizer.path): training the "
              f"demo's first ({tok.train.epochs} epochs, recipe {DEMO_TOKENIZER}) into '{folder}'")  # fmt: skip
    return tok


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

"""YAML in and out of a config: recipes (a file or the name of one packaged with mimkit), dotted `key=value`
overrides (the value read as YAML), their layering onto a config, and the `config.yaml` a run records.

Registry-free like the schema: the config it layers onto already holds every section a key may name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import Config, to_dict
from .config_checks import check_across_keys
from .config_schema import apply_updates, closest_name
from .errors import ConfigError

__all__ = ["recipe_names", "packaged_recipe", "read_yaml", "parse_override", "apply_layers", "dump_yaml"]


def recipe_folder() -> Path:
    return Path(str(resources.files("mimkit") / "configs"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipe_folder().glob("*.yaml"))


def packaged_recipe(name: str) -> Path:
    return recipe_folder() / f"{name}.yaml"


def did_you_mean_recipe(name: str) -> str:
    """The end of an 'unknown recipe' message: the closest packaged name, and where the list is."""
    close = closest_name(name, recipe_names(), cutoff=0.5)
    hint = f"; did you mean '{close}'?" if close else ""
    return f"{hint} (packaged recipes: {', '.join(recipe_names())}; `mimkit recipes` says what each is)"


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        # a bare name such as 'cifar10-mae' refers to a recipe shipped with mimkit
        packaged = packaged_recipe(str(path))
        if packaged.is_file():
            p = packaged
        elif p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
            raise ConfigError(f"config file '{path}' does not exist")
        else:
            raise ConfigError(f"'{path}' is neither a config file nor a packaged recipe{did_you_mean_recipe(p.stem)}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return data


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


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def apply_layers(cfg: Config, files=(), overrides: dict | None = None, dotted=()) -> Config:
    """`cfg` <- YAML files (in order) <- `overrides` (a nested dict) <- dotted `key=value` strings, every key
    checked; then the checks across keys, before anything is written."""
    for f in files:
        apply_updates(cfg, read_yaml(f))
    if overrides:
        apply_updates(cfg, overrides)
    for text in dotted:
        key, value = parse_override(text)
        apply_updates(cfg, _nest(key, value))
    check_across_keys(cfg)
    return cfg


def dump_yaml(cfg: Config, path: str | Path, sections=None) -> None:
    """`cfg` as YAML at `path` (atomically); `sections`: the method sections to write (None: all)."""
    from .atomic import replace_text  # torch: not for the CLI's parsing, which reads recipes through this module

    replace_text(path, yaml.safe_dump(to_dict(cfg, sections), sort_keys=False))

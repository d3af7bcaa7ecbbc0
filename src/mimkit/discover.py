"""What a user can choose from, read from the code itself: the packaged recipes (`mimkit recipes`) and a method's
options with their types, defaults and the comment that explains them (`mimkit methods M`)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import yaml

from .config_schema import Range
from .config_yaml import recipe_folder, recipe_names

__all__ = ["recipe_lines", "option_lines", "type_name"]


def recipe_summary(path: Path) -> str:
    """The first sentence of the recipe's opening comment (every packaged recipe starts by saying what it is)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    # a full stop or colon before a word ends it, not the one of "et al." or "e.g." (nor before "2022")
    ends = r"(?<=[.:])(?<! al\.)(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Za-z`])"
    sentence = re.split(ends, text, maxsplit=1)[0].rstrip(".:")
    return sentence if len(sentence) <= 110 else sentence[:107].rstrip() + "..."


def recipe_command(data: dict, name: str) -> str:
    """The command a recipe is for, from the sections it sets."""
    if "finetune" in data or "finetune" in name:
        return "finetune"
    if "segment" in data or "segment" in name:
        return "segment"
    if "tokenizer" in name:
        return "tokenizer train"
    return f"pretrain --method {data.get('method', 'mae')}"


def recipe_lines() -> list[str]:
    """One line per packaged recipe: its name, the command it is for, what it is."""
    rows = []
    for name in recipe_names():
        path = recipe_folder() / f"{name}.yaml"
        data = yaml.safe_load(path.read_text()) or {}
        rows.append((name, recipe_command(data, name), recipe_summary(path)))
    wide_name = max(len(r[0]) for r in rows)
    wide_cmd = max(len(r[1]) for r in rows)
    return [f"{n:{wide_name}s}  {c:{wide_cmd}s}  {s}" for n, c, s in rows]


def type_name(tp) -> str:
    """A schema type as a user reads it: 'int >= 1', 'float | None', "'random' | 'block'"."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *marks = typing.get_args(tp)
        bounds = [m for m in marks if isinstance(m, Range)]
        text = type_name(base)
        for r in bounds:
            if r.min is not None:
                text += f" {'>' if r.min_open else '>='} {r.min:g}"
            if r.max is not None:
                text += f" <= {r.max:g}"
        return text
    if origin is typing.Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in typing.get_args(tp)) + "]"
    args = typing.get_args(tp)
    if args and type(None) in args:  # Optional: X | None
        return " | ".join(type_name(a) for a in args if a is not type(None)) + " | None"
    return getattr(tp, "__name__", str(tp))


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment beside it, or the comment lines right above it} from the dataclass's source."""
    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments, above = {}, []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "class ", "@")):
            comments[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return comments


def option_lines(cls: type, section: str) -> list[str]:
    """`section.key  type  = default  comment`, one line per field of the options dataclass `cls`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{section}.{f.name}", type_name(hints[f.name]), f"= {default!r}", comments.get(f.name, "")))
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"  {k:{widths[0]}s}  {t:{widths[1]}s}  {d:{widths[2]}s}  {c}".rstrip() for k, t, d, c in rows]

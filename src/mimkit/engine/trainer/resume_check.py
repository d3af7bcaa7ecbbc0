"""Whether a checkpoint's recorded config is the run now asked for. The default run folder is
`runs/<method>-<data>`, so a new experiment easily lands in an old one's folder: a resume whose settings differ
from the checkpoint's names every differing key and is refused unless `train.allow_config_change` says to go on.

Keys that do not change what is learned may differ freely: the budget (`train.epochs`: raise it to train on),
where and how fast it runs, what is logged and evaluated on the side."""

from __future__ import annotations

from ...errors import CheckpointError

FREE_KEYS = (
    "out",
    "train.epochs",
    "train.device",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.stop_signals",
    "train.compile",
    "train.channels_last",
    "train.allow_config_change",
    "data.num_workers",
    "data.device_cache",
    "data.device_cache_max_gb",
    "log",
    "eval",
)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE_KEYS)


def with_patch_size(flat: dict) -> dict:
    """`model.patch_size` as the encoder has it: None means the one the timm name says (16 for *_patch16_*)."""
    name, patch = flat.get("model.name"), flat.get("model.patch_size")
    if patch is None and isinstance(name, str):
        from ...models.vit import resolve_patch_size
        from ...runtime import is_vit

        if is_vit(name):
            try:
                flat = {**flat, "model.patch_size": resolve_patch_size(name, None)}
            except Exception:  # noqa: BLE001 — a name timm no longer knows: compare as recorded
                pass
    return flat


def changed_keys(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) for every key of two nested configs that differs and matters."""
    return changed_flat_keys(with_patch_size(flatten(old)), with_patch_size(flatten(new)))


def changed_flat_keys(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """`changed_keys` of two configs already flattened (and their patch sizes resolved)."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


def check_config_change(path, old_flat: dict, new_flat: dict, allowed: bool, finished: bool) -> list[str]:
    """Refuse (CheckpointError) when settings that shape the run differ from the checkpoint's, unless `allowed`.
    The configs come flattened, patch sizes resolved. -> the 'key: old -> new' lines of an allowed change, to say."""
    changes = [f"{k}: {a!r} -> {b!r}" for k, a, b in changed_flat_keys(old_flat, new_flat)]
    if changes and not allowed:
        what = "a finished run" if finished else "an unfinished run"
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise CheckpointError(
            f"'{path}' holds {what} with other settings ({shown}): use another --out for a new experiment, or "
            "--allow-config-change (train.allow_config_change=true) to continue it with these"
        )
    return changes

"""Relative position bias tables of timm `Beit` encoders on their way downstream.

BEiT, SimMIM and ConMIM pre-train with one relative position bias table shared by all blocks
(`rel_pos_bias.relative_position_bias_table`, (num_relative_distance, heads)) and fine-tune with one table per
block, each a copy of the shared one that then trains on its own (BEiT's and ConMIM's run_class_finetuning.py,
"expand the shared relative position embedding to each transformer block"). A table covers a (2h - 1) x (2w - 1)
grid of offsets plus 3 entries for the class token; another image size needs it resized, which timm's Beit
loader does with BEiT's own interpolation (`timm.layers.resize_rel_pos_bias_table`).
"""

from __future__ import annotations

import re

import torch
from timm.layers import resize_rel_pos_bias_table
from torch import nn

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BLOCK_TABLE = "blocks.{}.attn.relative_position_bias_table"
TABLE_SUFFIX = ".relative_position_bias_table"


def num_blocks(state: dict[str, torch.Tensor]) -> int:
    """The number of transformer blocks a ViT/Beit state dict holds (`blocks.<i>.` keys)."""
    ids = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def shared_to_per_layer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Beit state dict with a shared table -> a copy of it in every block's attention
    (`blocks.<i>.attn.relative_position_bias_table`), the shared entry removed; anything else unchanged. A state
    without a shared table is returned as it is. The result loads into the same Beit built with
    `use_rel_pos_bias=True, use_shared_rel_pos_bias=False`, and computes the same function until trained."""
    if SHARED_TABLE not in state:
        return state
    out = {k: v for k, v in state.items() if k != SHARED_TABLE}
    table = state[SHARED_TABLE]
    for i in range(num_blocks(state)):
        out[BLOCK_TABLE.format(i)] = table.clone()
    return out


def per_layer_model_args(model_args: dict) -> dict:
    """timm factory arguments of a Beit with a shared table -> those of the same Beit with one table per block."""
    if not model_args.get("use_shared_rel_pos_bias"):
        return model_args
    return {**model_args, "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}


def resize_tables(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Every relative position table of `state` resized to the window of the module of `model` it belongs to
    (another image size, hence another patch grid), with BEiT's interpolation as timm's Beit loader applies it
    (`checkpoint_filter_fn`); the 3 class-token entries are kept. Tables whose module is missing, or that already
    fit, are left for the caller's shape check."""
    out = dict(state)
    for key, table in state.items():
        if not key.endswith(TABLE_SUFFIX):
            continue
        try:
            module = model.get_submodule(key[: -len(TABLE_SUFFIX)])
        except AttributeError:
            continue
        target = getattr(module, "relative_position_bias_table", None)
        if not isinstance(target, torch.Tensor) or target.shape == table.shape:
            continue
        out[key] = resize_rel_pos_bias_table(table, new_window_size=module.window_size, new_bias_shape=target.shape)
    return out

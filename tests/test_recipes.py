"""Paper recipes: every packaged recipe loads, and the values docs/methods.md quotes for them ("Paper recipes") are
the values the recipes set, so the documentation cannot drift from the files."""

import re
from importlib import resources
from pathlib import Path

import pytest

from mimkit.masking import block_mask_count
from mimkit.methods import method_class
from mimkit.run_config import build_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def recipe_names() -> list[str]:
    files = (resources.files("mimkit") / "configs").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def load(name: str):
    base = ["finetune"] if "finetune" in name else ["segment"] if "segment" in name or "upernet" in name else []
    return build_config([*base, name])


def quoted_rows(heading: str) -> list[dict[str, str]]:
    """The rows of the first table after `heading` in docs/methods.md, as {column header: cell text}."""
    text = DOC.read_text()
    start = text.index(heading)
    lines = [x.strip() for x in text[start:].splitlines()]
    table = []
    for line in lines[1:]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            break
    header, rows = table[0], table[2:]
    return [dict(zip(header, row)) for row in rows]


def number(text: str) -> float:
    return float(text.replace(" ", ""))


def check_batch(cfg, cell: str) -> None:
    """'128 x 8 x 4 = 4096': per-process batch x processes x accumulation = effective batch."""
    per, procs, accum, total = (int(v) for v in re.fullmatch(r"(\d+) x (\d+) x (\d+) = (\d+)", cell).groups())
    assert cfg.train.batch_size == per and cfg.optim.accum_steps == accum and per * procs * accum == total


def check_lr(cfg, cell: str) -> None:
    """'blr 1.5e-4 / 256' (scaled by the effective batch) or 'lr 1.5e-3' (absolute)."""
    scaled = re.fullmatch(r"blr (\S+) / (\d+)", cell)
    if scaled:
        assert cfg.optim.lr is None and cfg.optim.blr == number(scaled.group(1))
        assert cfg.optim.lr_batch_divisor == int(scaled.group(2))
    else:
        assert cfg.optim.lr == number(re.fullmatch(r"lr (\S+)", cell).group(1))


def check_mask(cfg, cell: str) -> None:
    """'random 0.75' | 'block 75' (the resolved count) | 'cells 0.6 / 32 px' | 'none' (no masking: DINO)."""
    o = getattr(cfg, method_class(cfg.method).section_name())
    if cell == "none":
        assert not hasattr(o, "mask_ratio")
        return
    kind, rest = cell.split(" ", 1)
    if kind == "random":
        assert o.mask_ratio == number(rest)
    elif kind == "block":
        grid = cfg.data.image_size // cfg.model.patch_size
        assert block_mask_count(grid * grid, o.num_masking_patches, o.mask_ratio, cfg.method) == int(rest)
    else:
        ratio, px = re.fullmatch(r"(\S+) / (\d+) px", rest).groups()
        assert kind == "cells" and o.mask_ratio == number(ratio) and o.mask_patch_size == int(px)


def check_decoder(cfg, cell: str) -> None:
    """'8 x 512' (blocks x width) or a word for methods without a decoder to size."""
    sized = re.fullmatch(r"(\d+) x (\d+)", cell)
    if sized:
        o = getattr(cfg, method_class(cfg.method).section_name())
        assert (o.decoder_depth, o.decoder_dim) == (int(sized.group(1)), int(sized.group(2)))


def test_every_packaged_recipe_loads():
    names = recipe_names()
    papers = {f"imagenet-{m}-vitb" for m in ("mae", "simmim", "beit", "conmim", "cmae")}
    assert papers | {"tinyimagenet-cmae-vitb", "tinyimagenet-mae-vitb", "cifar10-conmim-sincos"} <= set(names)
    for name in names:
        load(name)  # an unknown key or a wrong type raises, naming the key


PRETRAIN_ROWS = quoted_rows("### Paper recipes")


@pytest.mark.parametrize("row", PRETRAIN_ROWS, ids=[r["recipe"] for r in PRETRAIN_ROWS])
def test_pretraining_recipes_hold_the_values_the_docs_quote(row):
    cfg = load(row["recipe"].strip("`"))
    assert cfg.method == row["method"].strip("`")
    assert cfg.train.epochs == int(row["epochs"])
    check_batch(cfg, row["batch x processes x accum"])
    check_lr(cfg, row["lr"])
    assert cfg.optim.weight_decay == number(row["weight decay"])
    assert cfg.optim.betas == tuple(number(b) for b in row["betas"].split(","))
    assert cfg.optim.warmup_epochs == number(row["warm-up"])
    assert cfg.data.crop_scale == tuple(number(b) for b in row["crop scale"].split(","))
    check_mask(cfg, row["masks"])
    check_decoder(cfg, row["decoder"])


FINETUNE_ROWS = quoted_rows("### Fine-tuning recipes")


@pytest.mark.parametrize("row", FINETUNE_ROWS, ids=[r["recipe"] for r in FINETUNE_ROWS])
def test_finetuning_recipes_hold_the_values_the_docs_quote(row):
    cfg = load(row["recipe"].strip("`"))
    assert cfg.train.epochs == int(row["epochs"])
    check_batch(cfg, row["batch x processes x accum"])
    check_lr(cfg, row["lr"])
    assert cfg.optim.warmup_epochs == number(row["warm-up"])
    assert cfg.finetune.layer_decay == number(row["layer decay"])
    assert cfg.model.drop_path == number(row["drop path"])

"""`mimkit visualize`: rows of pictures of what a trained method does, from a pre-training checkpoint or a tokenizer
folder, on images of `data` (the evaluation split when there is one; with ContrastiveCrop boxes, the training
images whose boxes the checkpoint holds)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...config import DataConfig
from ...data import load_splits
from ...data.ccrop import check_boxes
from ...data.pipeline import ViewDataset, collate, prepare_batch
from ...picture_grid import save_grid, unnormalize
from ...run_config import config_from_dict
from ..tasks.pretrain import method_from_checkpoint
from ..trainer.checkpoint import load_checkpoint


def visualize(checkpoint: str, data_path: str, out: str, num: int = 8, seed: int = 0, scale: int = 0,
              image_size: int | None = None) -> tuple[Path, int, str]:  # fmt: skip
    """-> (the PNG written, rows, what a row shows)."""
    state = {}
    if Path(checkpoint).is_dir():  # a tokenizer folder: original | reconstruction
        from ..tasks.tokenizer_training import method_from_tokenizer

        method, cfg = method_from_tokenizer(checkpoint, image_size)
    elif load_checkpoint(checkpoint).get("kind") == "tokenizer":  # a tokenizer training run's checkpoint
        from ..tasks.tokenizer_training import TokenizerTraining

        state = load_checkpoint(checkpoint)
        cfg = config_from_dict(state["config"])
        method = TokenizerTraining(cfg)
        method.load_state_dict(state["model"])
        method.eval()
    else:
        method, cfg, state = method_from_checkpoint(checkpoint)
    data = DataConfig(**{**cfg.data.__dict__, "path": data_path})
    boxes = state.get("ccrop_boxes")  # ContrastiveCrop: whole training images, with their boxes
    if boxes is not None:
        source = load_splits(data, cfg.train.seed).train  # the subset the boxes index
        check_boxes(boxes, len(source), checkpoint)
    else:
        splits = load_splits(data, seed)
        source = splits.query if splits.query is not None else splits.train
    picks = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    crop = "center" if boxes is None else "full"
    ds = ViewDataset(source, method.views, data, seed=seed, train=False, eval_crop=crop)
    batch = prepare_batch(collate([ds[i] for i in picks]), method.views, "cpu", data.mean, data.std)
    if boxes is not None:
        batch["ccrop_box"] = boxes[picks]
    torch.manual_seed(seed)
    rows = unnormalize(method.visualize(batch), data.mean, data.std)
    titles = column_titles(method.visualize.__doc__ or "", rows.shape[3] // rows.shape[2])
    path = save_grid(rows, out, scale=scale or max(1, 128 // rows.shape[2]), titles=titles)
    return path, len(picks), " | ".join(titles) if titles else f"{rows.shape[3] // rows.shape[2]} panels per row"


def column_titles(doc: str, panels: int) -> list[str] | None:
    """The column headings a method's `visualize` docstring names ("Rows of a | b (note) | c, remark"), or None
    when they do not match the picture's panels one to one."""
    text = " ".join(doc.split())
    if not text.startswith("Rows of "):
        return None
    parts = text[len("Rows of ") :].split(" | ")
    titles = [re.sub(r"\s*\(.*?\)", "", p).split(",")[0].split(":")[0].strip().rstrip(".") for p in parts]
    return titles if len(titles) == panels and all(titles) else None

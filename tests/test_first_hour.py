"""What a new user meets in the first hour: the patch size a timm name says, a tokenizer run folder taken as
tokenizer.path, picture columns with headings."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from helpers import TINY
from PIL import Image
from test_tokenizer import TOK

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.models.tokenizer import load_tokenizer
from mimkit.models.vit import create_encoder, resolve_patch_size
from mimkit.picture_grid import save_grid
from mimkit.run_config import build_config


@pytest.mark.parametrize(
    "name",
    ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_small_patch14_dinov2", "vit_tiny_r_s16_p8_224"],
)
def test_patch_size_is_the_one_timm_builds(name):
    """Unset, the patch size is what timm itself builds for the name (the last has no 'patch' in its name)."""
    built = timm.create_model(name, pretrained=False, num_classes=0, depth=1)  # one block: quicker, same patches
    assert resolve_patch_size(name, None) == built.patch_embed.patch_size[0]


def test_explicit_patch_size_wins_and_unknown_names_are_refused():
    assert resolve_patch_size("vit_small_patch16_224", 4) == 4
    with pytest.raises(ConfigError, match="model.name 'vit_nothing_224' is not a timm model"):
        resolve_patch_size("vit_nothing_224", None)


def test_encoder_of_a_patch16_name_cuts_16_px_patches():
    cfg = build_config(dotted=["model.name=vit_small_patch16_224", *TINY[2:5]]).model
    cfg.patch_size = None  # what the user gets without model.patch_size
    encoder = create_encoder(cfg, 32)
    assert encoder.patch_embed.patch_size == (16, 16) and encoder.patch_embed.num_patches == 4
    cfg.patch_size = 4
    assert create_encoder(cfg, 32).patch_embed.patch_size == (4, 4)


def test_tokenizer_path_takes_the_run_folder(tmp_path, capsys, labeled_folder):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1", *TOK]) == 0
    capsys.readouterr()
    from_run, from_folder = load_tokenizer(out), load_tokenizer(out / "tokenizer")
    assert from_run.state_dict().keys() == from_folder.state_dict().keys()
    assert all(torch.equal(v, from_folder.state_dict()[k]) for k, v in from_run.state_dict().items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer.json, nor tokenizer/tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def _grid(tmp_path, name, rows, **kwargs) -> np.ndarray:
    return np.asarray(Image.open(save_grid(rows, tmp_path / f"{name}.png", **kwargs)).convert("RGB")).astype(int)


def test_column_headings_sit_in_a_band_above_the_plain_grid(tmp_path):
    torch.manual_seed(0)
    rows = torch.rand(2, 3, 16, 3 * 16)  # 2 samples, 3 panels of 16 px
    plain = _grid(tmp_path, "plain", rows, scale=8)
    titles = ["original", "masked", "reconstruction"]
    titled = _grid(tmp_path, "titled", rows, scale=8, titles=titles)
    band = titled.shape[0] - plain.shape[0]
    assert band >= 8 and titled.shape[1] == plain.shape[1]
    assert np.array_equal(titled[band:], plain)  # the grid itself is untouched, just moved down
    heading = titled[:band]
    panel = 16 * 8
    for j in range(3):  # ink (dark pixels) over every panel, not between them
        left = 2 * 8 + j * panel
        assert (heading[:, left : left + panel] < 128).any(), titles[j]
    other = _grid(tmp_path, "other", rows, scale=8, titles=["image", "input", "output"])
    assert not np.array_equal(other[:band], heading) and np.array_equal(other[band:], plain)
    with pytest.raises(ValueError, match="5 column titles for rows 48 px wide"):
        save_grid(rows, tmp_path / "bad.png", titles=list("abcde"))

"""A run records the config it used: the shared sections and its own method's section, not every registered
method's; and a checkpoint that recorded every section (as runs did before) still resumes."""

import pytest
import torch
import yaml
from helpers import TINY

from mimkit.cli import main
from mimkit.config import to_dict
from mimkit.run_config import config_from_dict


@pytest.mark.parametrize("method, section", [("mae", "mae"), ("cmae-mao", "cmae")])
def test_pretraining_records_its_own_method_section_only(tmp_path, labeled_folder, method, section):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", method, "--data", str(labeled_folder), "--out", str(out), "--epochs", "1",
            *TINY, "train.batch_size=16", "cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2",
            "cmae.proj_hidden=32", "cmae.proj_dim=16"]  # fmt: skip
    assert main(argv) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    methods = {"mae", "beit", "simmim", "conmim", "cmae", "cmae-huang", "mocov3", "dino", "cim"}
    assert set(recorded) & methods == {section} and {"data", "model", "optim", "train"} <= set(recorded)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["config"]) == set(recorded)

    # the layout of earlier checkpoints: every method section recorded; --epochs 2 continues it without a refusal
    state["config"] = to_dict(config_from_dict(state["config"]))
    assert {"beit", "dino"} <= set(state["config"])
    torch.save(state, out / "checkpoints" / "last.pt")
    again = ["2" if i and argv[i - 1] == "--epochs" else a for i, a in enumerate(argv)]
    assert main(again) == 0
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["run"]["epoch"] == 2

"""Guards before and during a run (issue 24): a loss orders of magnitude above the run's recent level stops the
run as a non-finite one does, and the checkpoint that gave it is not kept as the newest; config values that pass
every per-key check but cannot be built or run are refused at config time, naming key and value, before anything
is written; a damaged or foreign `model.init` file is refused in mimkit's words, without torch's advice or
warnings, and never with a flag the command does not have."""

from __future__ import annotations

import pickle
import re
import shutil
import warnings

import pytest
import torch
from test_faults import TOTAL_STEPS, argv, load, metrics, run
from test_untrusted_exports import set_arch

from mimkit.cli import main
from mimkit.engine.trainer import Runtime
from mimkit.engine.trainer.window import Window
from mimkit.errors import DivergedError


def test_window_flags_a_loss_over_max_jump_times_the_recent_lowest():
    rt, window = Runtime(torch.device("cpu"), None), Window(torch.device("cpu"), max_jump=1000)
    for step, loss in enumerate([2.0, 1.5, 1.0], start=1):
        window.add(torch.tensor(loss), {"loss": torch.tensor(loss)}, step, 1)
        window.check_finite(step, None)
        window.flush(rt)
    window.add(torch.tensor(999.0), {"loss": torch.tensor(999.0)}, 4, 1)  # under 1000 x the lowest (1.0)
    window.check_finite(4, None)
    window.flush(rt)
    window.add(torch.tensor(1001.0), {"loss": torch.tensor(1001.0)}, 5, 1)
    with pytest.raises(DivergedError, match=r"loss 1e\+03 at step 5 is over train.max_loss_jump=1000") as e:
        window.check_finite(5, None)
    assert e.value.step == 5
    off = Window(torch.device("cpu"), max_jump=0)  # 0: judged on finiteness alone
    for step, loss in enumerate([1.0, 1e9], start=1):
        off.add(torch.tensor(loss), {"loss": torch.tensor(loss)}, step, 1)
        off.check_finite(step, None)
        off.flush(rt)
    assert off.state()["recent_losses"] == [1.0, 1e9]


def test_an_exploded_loss_stops_the_run_and_its_checkpoint_is_not_kept(tmp_path, capsys):
    """blr=1000: every loss stays finite (the run used to end with exit 0 and weights at a loss of 2e7); the
    loss of step 3 is 2.8e4 times step 2's, so the state of step 2 that gave it moves aside and step 1's is
    last.pt; a re-run with a sane lr trains on at the level the run started at."""
    out = tmp_path / "run"
    code, _, err = run(out, capsys, "optim.blr=1000")
    assert code == 1 and err.count("\n") == 1, err
    said = re.search(r"loss (\S+) at step (\d+) is over train\.max_loss_jump=1000 .*'([^']+)' now holds step (\d+)",
                     err)  # fmt: skip
    assert said, err
    bad, kept = int(said[2]), int(said[4])
    assert said[3] == str(out / "checkpoints" / "last.pt") and kept == bad - 2
    assert (out / "checkpoints" / f"diverged-step{bad - 1}.pt").exists()
    first = metrics(out)[0]["loss"]
    assert [r["step"] for r in metrics(out)] == list(range(1, bad))

    code, _, err = run(out, capsys, "optim.blr=1e-4")  # a changed lr is refused unless the user says so
    assert code == 2 and "optim.blr: 1000.0 -> 0.0001" in err and "--allow-config-change" in err
    code, _, err = run(out, capsys, "optim.blr=1e-4", "train.allow_config_change=true")
    assert code == 0, err
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
    assert all(r["loss"] < 2 * first for r in rows), [r["loss"] for r in rows]
    assert load(out / "checkpoints" / "last.pt")["finished"]


def test_max_loss_jump_0_judges_finiteness_alone(tmp_path, capsys):
    code, _, err = run(tmp_path / "run", capsys, "optim.blr=1000", "train.max_loss_jump=0")
    assert code == 0, err


# ---- config values that pass each key's check ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("data.crop_scale=[-1,2]", "data.crop_scale", "[-1,2]"),
        ("data.crop_ratio=[0,0]", "data.crop_ratio", "[0,0]"),
        ("data.crop_scale=[0.8,0.2]", "data.crop_scale", "[0.8,0.2]"),
        ("mae.decoder_heads=5", "mae.decoder_heads", "5"),
        ("mae.decoder_dim=34", "mae.decoder_dim", "34"),
        ("model.embed_dim=98", "model.embed_dim", "98"),
        ("model.num_heads=3", "model.num_heads", "3"),  # 32 wide
        ("model.num_heads=null", "model.num_heads", "3"),  # 32 wide, vit_tiny's own 3 heads
    ],
)
def test_values_that_do_not_fit_together_are_refused_before_anything_is_written(tmp_path, capsys, override, key,
                                                                                value):  # fmt: skip
    out = tmp_path / "run"
    code, _, err = run(out, capsys, override)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert key in err and (f"{key}={value}" in err or f"got {value}" in err), err
    assert not out.exists()


# ---- model.init messages ---------------------------------------------------------------------------------------


def init(tmp_path, capsys, source) -> tuple[int, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, said, err = run(tmp_path / "run", capsys, f"model.init={source}")
    return code, said + err + "".join(str(w.message) for w in caught)


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "raw pickle"])
def test_a_damaged_init_file_is_one_line_in_mimkits_words(tmp_path, capsys, damage):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zeroed": bytes(len(data)),
                      "raw pickle": pickle.dumps({"model": {"w": [0.0] * 10}})}[damage])  # fmt: skip
    code, text = init(tmp_path, capsys, path)
    assert code == 2 and text.count("\n") == 1 and f"model.init '{path}'" in text, text
    assert "weights_only=False" not in text and "site-packages" not in text and "issue" not in text, text
    assert len(text) < 300, text
    assert not (tmp_path / "run").exists()


def test_an_init_export_naming_a_hub_architecture_says_how_to_fix_it_in_pretrain(tmp_path, capsys):
    folder = tmp_path / "export"
    assert main(argv(tmp_path / "source", "--epochs", "1")) == 0
    shutil.copytree(tmp_path / "source" / "encoder", folder)
    set_arch("hf-hub:someone/model")(folder)
    capsys.readouterr()
    code, text = init(tmp_path, capsys, folder)
    assert code == 2 and text.count("\n") == 1 and "hf-hub:someone/model" in text, text
    assert "--allow-download" not in text and "model.init downloads nothing" in text, text

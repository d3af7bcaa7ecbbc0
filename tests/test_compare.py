"""mimkit compare: every method under one budget, one report, and a re-run that redoes nothing."""

import json

import pytest
import torch
from helpers import TINY

from mimkit.cli import main
from mimkit.cli_parser import build_parser
from mimkit.config import ConfigError
from mimkit.engine.drivers import compare, compare_report
from mimkit.engine.drivers.compare import method_list, parse_budget


def test_budget_and_method_parsing():
    assert parse_budget("3ep") == ("epochs", 3)
    assert parse_budget("90s") == ("seconds", 90)
    assert parse_budget("1.5h") == ("seconds", 5400)
    assert parse_budget("10min") == ("seconds", 600)
    for bad in ("ten", "0ep", "1.5ep", "5 parsecs"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)
    assert "tokenizer" not in method_list("all") and {
        "mae",
        "cim-respix",
        "conmim",
        "cmae-mao",
        "cmae-huang",
        "dino",
    } <= set(method_list("all"))
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['nope'\]"):
        method_list("mae,nope")
    assert method_list("mae,cmae") == ["mae", "cmae-mao"]  # the old name keeps working, as in --method


def test_compare_runs_methods_writes_report_and_resumes(tmp_path, capsys, labeled_folder, monkeypatch):
    recipe = tmp_path / "ft.yaml"
    recipe.write_text("train: {batch_size: 8, log_every: 1}\nfinetune: {randaug: rand-m9-n1}\n")
    out = tmp_path / "cmp"
    tok = ["tokenizer.vocab_size=32", "tokenizer.width=8", "tokenizer.code_dim=4", "tokenizer.res_blocks=1"]
    gen = ["cim.generator_dim=32", "cim.generator_heads=2", "cim.generator_depth=1"]
    argv = [
        "compare",
        "--methods",
        "mae,cim-revdet",
        "--data",
        str(labeled_folder),
        "--out",
        str(out),
        "--budget",
        "1ep",
        "--finetune-config",
        str(recipe),
        "--finetune-epochs",
        "1",
        *TINY,
        *tok,
        *gen,
        "eval.knn_every=1",  # a recipe's k-NN monitor reaches the methods, not the tokenizer (README's compare)
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"mae", "cim-revdet"}
    for r in [*report["methods"].values(), report["scratch"]]:
        assert all(isinstance(r[e], float) for e in ("knn", "linear", "finetune"))
    for name in ("mae", "cim-revdet", "scratch"):  # every number is the one its own command reports
        ft = json.loads((out / name / "finetune" / "finetune.json").read_text())
        row = report["scratch"] if name == "scratch" else report["methods"][name]
        assert row["finetune"] == ft["top1"]
    res = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(out / "mae" / "encoder"), "--data", str(labeled_folder),
                 "--out", str(res)]) == 0  # fmt: skip
    assert json.loads(res.read_text())["top1"] == report["methods"]["mae"]["knn"]
    assert report["methods"]["mae"]["epochs"] == 1 and report["methods"]["mae"]["steps"] == 3
    assert (out / "tokenizer" / "tokenizer" / "tokenizer.json").is_file()  # trained for cim-revdet
    tok_run = json.loads((out / "tokenizer" / "summary.json").read_text())
    assert report["tokenizer"] == {"epochs": 1, "seconds": tok_run["seconds"]} and "steps" in tok_run
    table = (out / "report.md").read_text()
    assert "| mae | 1 |" in table and "| cim-revdet | 1 |" in table and "random init (scratch)" in table
    assert f"| (VQ tokenizer for BEiT/CIM) | 1 | {tok_run['seconds']} | - |" in table
    mae = report["methods"]["mae"]  # what the budget covered, and what evaluation cost beside it
    assert mae["pretrain_seconds"] > 0 and mae["eval_seconds"] > 0 and report["scratch"]["eval_seconds"] > 0
    assert f"| mae | 1 | {mae['pretrain_seconds']} | {mae['eval_seconds']} |" in table
    assert "Budget: 1ep of pre-training per method" in table
    assert "Evaluation (k-NN, linear probe, fine-tuning) is outside the budget" in table
    assert (out / "report.png").stat().st_size > 10_000

    def must_not_run(*_, **__):
        raise AssertionError("a finished step ran again")

    for name in ("pretrain", "finetune", "FeatureEval"):
        monkeypatch.setattr(compare, name, must_not_run)
    assert main(argv) == 0
    assert json.loads((out / "report.json").read_text()) == report
    capsys.readouterr()


def test_wall_clock_budget_is_turned_into_epochs(labeled_folder):
    from mimkit.run_config import build_config

    base = build_config(dotted=[*TINY, f"data.path={labeled_folder}"])
    few = compare.method_config(base, "mae", labeled_folder / "unused", ("seconds", 0.01))
    many = compare.method_config(base, "mae", labeled_folder / "unused", ("seconds", 3600))
    assert few.train.epochs == 1 and many.train.epochs > 10


def test_tokenizer_budget_is_charged_to_the_methods_that_need_it(tmp_path, labeled_folder, monkeypatch):
    assert compare.tokenizer_budget(("seconds", 400), None) == ("seconds", 100)
    assert compare.tokenizer_budget(("seconds", 400), "30s") == ("seconds", 30)
    assert compare.tokenizer_budget(("epochs", 3), None) == ("epochs", 3)
    seen = {}
    monkeypatch.setattr(compare, "ensure_tokenizer", lambda base, out, budget: (out, {"epochs": 1, "seconds": 90.0}))
    monkeypatch.setattr(compare, "method_config", lambda base, name, out, b: seen.setdefault(name, b) and base)
    monkeypatch.setattr(compare, "run_one", lambda *a: {})
    monkeypatch.setattr(compare, "run_scratch", lambda *a: {})
    monkeypatch.setattr(compare, "write_report", lambda *a: None)
    args = build_parser().parse_args(["compare", "--methods", "mae,beit", "--data", str(labeled_folder), "--out",
                                     str(tmp_path / "cmp"), "--budget", "5min", *TINY])  # fmt: skip
    results = compare.compare_from_args(args)
    assert seen == {"mae": ("seconds", 300.0), "beit": ("seconds", 210.0)}
    assert results["tokenizer"] == {"epochs": 1, "seconds": 90.0}


def test_a_finished_run_keeps_the_epochs_it_ran(tmp_path, labeled_folder):
    """A re-run under a wall-clock budget reports the epochs the finished run had, without timing it again."""
    from mimkit.config_yaml import dump_yaml
    from mimkit.run_config import build_config

    run = tmp_path / "mae"
    run.mkdir()
    dump_yaml(build_config(dotted=[*TINY, "train.epochs=3"]), run / "config.yaml")
    assert compare.finished_budget(run) is None  # not finished: no summary yet
    (run / "summary.json").write_text("{}")
    assert compare.finished_budget(run) == ("epochs", 3)


def test_short_runs_log_enough_losses_for_a_curve(labeled_folder):
    """A GPU recipe logs every 20 steps: a 3-step compare run would draw a single dot (README's compare)."""
    from mimkit.run_config import build_config

    cfg = build_config(dotted=[*TINY, "train.log_every=20", "train.epochs=1"])
    assert compare.loss_log_every(cfg, 48) == 1  # 3 steps: log every one
    cfg.train.epochs = 400  # 1200 steps: the recipe's own interval
    assert compare.loss_log_every(cfg, 48) == 20
    cfg.train.batch_size = 1024  # more than the images: the batch the run will use (16 per step) counts
    cfg.train.epochs = 1
    assert compare.loss_log_every(cfg, 512) == 1


def test_conmim_on_an_absolute_position_encoder_is_not_the_degenerate_setup():
    from mimkit.run_config import build_config

    cfg = build_config(dotted=[*TINY, "method=conmim"])  # vit_*: absolute sin-cos positions, no centring
    note = compare.conmim_note(cfg, [])
    assert cfg.conmim.center_teacher and "center_teacher=true" in note
    cfg = build_config(dotted=[*TINY, "method=conmim", "conmim.center_teacher=false"])
    note = compare.conmim_note(cfg, ["conmim.center_teacher=false"])  # the user asked: kept, and said
    assert not cfg.conmim.center_teacher and note.startswith("warning:") and "position alone" in note
    cfg = build_config(dotted=[*TINY, "method=conmim", "model.name=beit_base_patch16_224"])  # the paper's encoder
    assert compare.conmim_note(cfg, []) is None and not cfg.conmim.center_teacher


def test_the_report_picture_names_the_data_not_the_machine_path():
    results = {"data": "/home/someone/shared/data/cifar10/", "model": "vit/4 at 16px", "budget": "7min"}
    title = compare_report.plot_title(results)
    assert title == "cifar10, vit/4 at 16px - budget 7min" and "/home" not in title


def test_seeds_give_spread_and_the_step0_row_is_the_runs_own_start(tmp_path, labeled_folder):
    """--seeds 2 at lr 1e-30: pre-training cannot move the weights (by more than 1e-29), so each seed's trained row
    must equal that seed's step-0 row exactly (the step-0 encoder is the very initialisation the run starts from),
    while the two seeds differ; the report gives mean ± sd per cell, the gain table and the k-NN curve from the
    monitor."""
    from safetensors.torch import load_file

    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "mae", "--data", str(labeled_folder), "--out", str(out), "--budget", "2ep",
            "--seeds", "2", "--evals", "knn,linear", *TINY, "optim.blr=1e-30", "optim.min_lr=0", "train.batch_size=16",
            "eval.knn_every=1"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1]
    runs, starts = report["methods"]["mae"]["seeds"], report["step0"]["mae"]["seeds"]
    for seed, run, start in zip((0, 1), runs, starts):
        trained = load_file(out / "mae" / f"seed{seed}" / "encoder" / "model.safetensors")
        initial = load_file(out / "step0" / "mae" / f"seed{seed}" / "encoder" / "model.safetensors")
        assert trained.keys() == initial.keys()
        assert all(torch.allclose(trained[k], initial[k], rtol=0, atol=1e-20) for k in trained)
        assert run["knn"] == start["knn"] and run["linear"] == start["linear"]
    first = load_file(out / "step0" / "mae" / "seed0" / "encoder" / "model.safetensors")
    second = load_file(out / "step0" / "mae" / "seed1" / "encoder" / "model.safetensors")
    assert not torch.equal(first["patch_embed.proj.weight"], second["patch_embed.proj.weight"])
    row = report["methods"]["mae"]
    assert row["knn"] == pytest.approx((runs[0]["knn"] + runs[1]["knn"]) / 2, abs=1e-4) and "knn_sd" in row
    assert len(report["scratch"]["seeds"]) == 2 and (out / "scratch" / "seed1" / "evals.json").is_file()
    table = (out / "report.md").read_text()
    assert (
        "| mae at step 0 | 0 |" in table and " ± " in table and "| mae | +0.0 ± 0.0 | no | +0.0 ± 0.0 | no |" in table
    )
    curve = compare_report.knn_curve(out, "mae", report)  # step 0, then each epoch's monitor (mean of seeds)
    assert [x for x, _ in curve] == [0.0, 0.5, 1.0] and curve[0][1] == report["step0"]["mae"]["knn"]


def test_calibration_times_the_real_step(labeled_folder, monkeypatch):
    """The budget is sized on the loop's own step: every accumulated micro-batch and the task's after_step (the
    teacher update) are inside the timed step."""
    from mimkit.engine.tasks.pretrain import PretrainTask
    from mimkit.engine.trainer import Runtime, seconds_per_step
    from mimkit.run_config import build_config

    cfg = build_config(dotted=[*TINY, f"data.path={labeled_folder}", "method=mocov3", "optim.accum_steps=2",
                               "train.batch_size=4", "train.precision=fp32"])  # fmt: skip
    task = PretrainTask(cfg, Runtime(torch.device("cpu"), None))
    calls = {"step": 0, "after_step": 0}
    step, after = task.step, task.after_step
    monkeypatch.setattr(task, "step", lambda *a: calls.__setitem__("step", calls["step"] + 1) or step(*a))
    monkeypatch.setattr(
        task, "after_step", lambda *a: calls.__setitem__("after_step", calls["after_step"] + 1) or after(*a)
    )
    assert seconds_per_step(task, steps=2) > 0
    assert calls == {"step": 6, "after_step": 3}  # a first step for one-off costs, then 2 timed; 2 micro-batches each


def test_an_interrupted_wall_clock_compare_keeps_the_epochs_it_sized(tmp_path, labeled_folder, monkeypatch):
    """Epochs sized from a wall-clock budget are recorded before any method trains; a re-run (after a kill) reuses
    them instead of timing again on a machine whose load has changed. Another budget times afresh."""
    timed = []
    monkeypatch.setattr(compare, "calibrate_epochs", lambda cfg, seconds, task: timed.append(cfg.method) or 2)
    monkeypatch.setattr(compare, "run_one", lambda *a: {})
    monkeypatch.setattr(compare, "run_step0", lambda *a: {})
    monkeypatch.setattr(compare, "run_scratch", lambda *a: {})
    monkeypatch.setattr(compare, "write_report", lambda *a: None)
    out = tmp_path / "cmp"

    def run(budget):
        args = build_parser().parse_args(["compare", "--methods", "mae,simmim", "--data", str(labeled_folder),
                                         "--out", str(out), "--budget", budget, *TINY])  # fmt: skip
        compare.compare_from_args(args)

    run("5min")
    assert timed == ["mae", "simmim"]
    assert json.loads((out / "epochs.json").read_text()) == {"budget": "5min", "epochs": {"mae": 2, "simmim": 2}}
    run("5min")
    assert timed == ["mae", "simmim"]  # not timed again
    run("10min")
    assert timed == ["mae", "simmim", "mae", "simmim"]


def test_the_report_mentions_timed_steps_only_under_a_wall_clock_budget():
    """Only a wall-clock budget times a few steps per method to size its epochs; report.md says so only then."""
    from mimkit.engine.drivers.compare_report import budget_lines

    base = {"methods": {}, "scratch": {}}
    assert "timed" not in " ".join(budget_lines({**base, "budget": "2ep", "budget_kind": "epochs"}))
    assert "few steps timed per method" in " ".join(budget_lines({**base, "budget": "45s", "budget_kind": "seconds"}))

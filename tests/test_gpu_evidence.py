"""benchmarks/gpu_evidence.py: every stage's --dry-run end to end on the CPU (what a GPU session will run, at toy
size), the stage harness's deadline and failure rules, and the CIFAR-10 pack's round trip."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import evidence  # noqa: E402
import gpu_evidence  # noqa: E402
import pack_cifar10  # noqa: E402

from mimkit.methods import METHODS  # noqa: E402

EVERY_METHOD = {m for m in METHODS if m != "tokenizer"}


def run_stage(tmp_path: Path, stage: str, *extra: str) -> tuple[int, list[dict], str, Path]:
    out = tmp_path / "out"
    argv = ["--stage", stage, "--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), *extra]
    code = gpu_evidence.main(argv)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return code, rows, (out / "summary.md").read_text(), out


def part(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["part"] == name]


def test_smoke_dry_run_runs_the_cuda_tests_and_reads_their_report(tmp_path):
    code, rows, summary, _ = run_stage(tmp_path, "smoke")
    assert code == 0, summary
    (test,) = part(rows, "cuda-tests")
    assert test["outcome"] == "passed" and "mae-vit-eager" in test["test"]
    (env,) = part(rows, "environment")
    assert env["torch"] and env["timm"] and env["cpus"] >= 1
    assert "| test | outcome | s |" in summary and "mae-vit-eager" in summary


def test_speed_dry_run_times_every_part(tmp_path):
    from throughput import train_flops_mae

    code, rows, summary, _ = run_stage(tmp_path, "speed")
    assert code == 0, summary
    assert part(rows, "matmul")[0]["tflops_measured"] > 0
    mae = part(rows, "mae")
    assert {r["name"] for r in mae} == {"mimkit", "transformers"} and all(r["img_per_s"] > 0 for r in mae)
    toy = gpu_evidence_speed_plan().mae_sizes["toy"][0]
    for r in mae:  # two independent counts: torch's flop counter over one step, throughput.py's formula for MAE
        assert r["gflop_per_img"] == round(train_flops_mae(toy) / 1e9, 3)
        assert r["gflop_counted"] == pytest.approx(r["gflop_per_img"], rel=0.02), r
    methods = part(rows, "methods-tiny")  # transformers' BEiT is built at sections.py's sizes only, not the toy one
    assert {r["name"] for r in methods} == EVERY_METHOD | {"beit, token ids given"}
    assert all(r["gflop_per_img"] > 0 and r["img_per_s"] > 0 for r in methods)
    assert [r["name"] for r in part(rows, "methods-tiny-compiled")] == ["mae"]
    assert {r["path"] for r in part(rows, "data")} >= {"device cache", "device cache, fast crops"}
    assert {r["part"] for r in rows if "skipped" in r} == {"methods-base", "methods-base-compiled", "mae-tiny-compiled"}
    for title in ("MAE beside transformers", "Every method's training step", "Data paths alone"):
        assert title in summary


def gpu_evidence_speed_plan(dry_run: bool = True):
    import gpu_evidence_speed

    return gpu_evidence_speed.make_plan(dry_run=dry_run)


def test_the_gpu_plan_weighs_every_part():
    """The real plan (never run here): every part has a time estimate and every MAE size it names exists."""
    from gpu_evidence_speed import PARTS

    plan = gpu_evidence_speed_plan(dry_run=False)
    assert set(plan.need_s) == set(PARTS)
    assert set(plan.mae_parts) == {p for p in PARTS if p.startswith("mae")}
    assert all(label in plan.mae_sizes for labels in plan.mae_parts.values() for label in labels)
    assert plan.mae_sizes["base"][0].timm_name == "vit_base_patch16_224" and plan.mae_sizes["base"][1] == 256


def test_ladder_dry_run_pretrains_probes_and_finetunes_both_arms(tmp_path):
    code, rows, summary, _ = run_stage(tmp_path, "ladder")
    assert code == 0, summary
    (probe,) = part(rows, "probe")
    assert probe["step_s"] > 0 and probe["steps_per_epoch"] == 4  # 64 images, batch 16
    (pre,) = part(rows, "mae-pretrain")
    assert 1 <= pre["epochs"] <= 2 and pre["img_per_s_end_to_end"] > 0
    for key in ("knn", "linear", "scratch_knn", "scratch_linear"):
        assert 0.0 <= pre[key] <= 1.0
    for arm in ("finetune-scratch", "finetune-mae"):
        (ft,) = part(rows, arm)
        assert 0.0 <= ft["top1"] <= 1.0 and ft["wall_s"] > 0
    assert "MAE + fine-tuning minus the identical recipe" in summary


def test_methods_dry_run_compares_every_method_and_copies_the_report(tmp_path):
    code, rows, summary, out = run_stage(tmp_path, "methods")
    assert code == 0, summary
    got = {r["method"]: r for r in part(rows, "method")}
    assert set(got) == EVERY_METHOD | {"random init"}
    assert all(0.0 <= r["knn"] <= 1.0 and 0.0 <= r["linear"] <= 1.0 for r in got.values())
    assert part(rows, "tokenizer"), "the tokenizer BEiT/CIM read is trained within the stage"
    for name in ("report.md", "report.png", "report.json", "summary.md", "results.jsonl", "stage.log"):
        assert (out / name).is_file()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_parts_that_do_not_fit_are_skipped_and_failures_recorded(tmp_path):
    ev = evidence.Evidence("speed", tmp_path / "out", tmp_path / "work", 1.0, True, ["--stage", "speed"])
    called = []
    assert evidence.attempt(ev, "late", lambda: called.append(1), need_s=3600) is None and not called

    def broken():
        raise ValueError("boom")

    assert evidence.attempt(ev, "broken", broken) is None
    ev.write_summary()
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert rows[0]["part"] == "late" and "needs about 3600 s" in rows[0]["skipped"]
    assert rows[1] == {**rows[1], "part": "broken", "error": "ValueError: boom"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Skipped" in summary and "## Failed" in summary and "ValueError: boom" in summary


def test_pack_round_trip_is_byte_exact(tmp_path, capsys):
    src = tmp_path / "cifar"
    write_images(src / "train" / "cat", 5, size=32, fmt="jpg")
    write_images(src / "test" / "dog", 3, size=32, seed=1, fmt="jpg")
    (src / ".hidden").write_text("not data")
    pack_file = tmp_path / "pack" / "cifar.npz"
    assert pack_cifar10.main([str(src), str(pack_file), "--check"]) == 0
    assert "byte for byte" in capsys.readouterr().out
    dest = tmp_path / "unpacked"
    assert pack_cifar10.unpack(pack_file, dest) == 8
    assert pack_cifar10.same_files(src, dest) == [] and not (dest / ".hidden").exists()
    (dest / "train" / "cat" / "img_0000.jpg").write_bytes(b"changed")
    assert pack_cifar10.same_files(src, dest) == ["train/cat/img_0000.jpg"]
    assert pack_cifar10.unpack(pack_file, dest) == 8  # the marker says done: nothing rewritten
    assert (dest / "train" / "cat" / "img_0000.jpg").read_bytes() == b"changed"


def test_unpack_refuses_paths_outside_the_destination(tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez_compressed(
        evil, names=np.array(["../escape.jpg"]), offsets=np.array([0, 3]), data=np.frombuffer(b"abc", np.uint8)
    )
    with pytest.raises(SystemExit, match="outside its folder"):
        pack_cifar10.unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "escape.jpg").exists()


def test_a_broken_method_costs_only_its_own_row(tmp_path, monkeypatch):
    import sections

    real = sections.method_builder

    def builder(method, *args):
        if method != "simmim":
            return real(method, *args)

        def build(_s):
            raise RuntimeError("simmim is broken here")

        return build

    monkeypatch.setattr(sections, "method_builder", builder)
    code, rows, summary, _ = run_stage(tmp_path, "speed", "--parts", "methods-tiny")
    assert code == 1
    failed = {r["part"] for r in rows if "error" in r}
    assert failed == {"methods-tiny (interleaved)", "methods-tiny simmim"}
    assert {r["name"] for r in part(rows, "methods-tiny") if "img_per_s" in r} == EVERY_METHOD - {"simmim"} | {
        "beit, token ids given"
    }
    assert "simmim is broken here" in summary

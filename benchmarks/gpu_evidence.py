"""GPU evidence for mimkit in stages that each fit one 9-minute command on one GPU (docs/gpu-evidence.md).

    python benchmarks/gpu_evidence.py --stage smoke   --out $OUT                         # pytest -m cuda + facts
    python benchmarks/gpu_evidence.py --stage speed   --out $OUT --data .gpu/cifar10.npz # throughput, MFU, data
    python benchmarks/gpu_evidence.py --stage ladder  --out $OUT --data .gpu/cifar10.npz # MAE 5 min + fine-tune
    python benchmarks/gpu_evidence.py --stage methods --out $OUT --data .gpu/cifar10.npz # every method, compare
    python benchmarks/gpu_evidence.py --stage ladder  --out /tmp/ev --dry-run            # toy size, on the CPU

Each stage writes into --out: `results.jsonl` (one JSON object per measurement, appended as it is taken, so a
stage cut short keeps what it measured), `summary.md` (tables with machine, date and command, for
docs/benchmarks.md and docs/results.md) and `stage.log` (the output of what it ran). Run folders go to --work,
outside --out: the device tool returns at most 8 files from $OUT. `--data` takes a CIFAR-10 folder or the pack
`benchmarks/pack_cifar10.py` writes (unpacked into --work once).

Every part of a stage is weighed against the stage's deadline (--minutes): a part that would not fit is skipped
and named in the summary; a part that fails is recorded with its error and the stage goes on to the next. The
exit status is 1 when a part failed, 0 otherwise (skips included).

--dry-run: every stage at toy size on the CPU (tiny models, a few steps, a generated CIFAR-like JPEG folder that
goes through pack and unpack as the real data does; torch.compile is the identity there). The test suite runs
each stage that way (tests/test_gpu_evidence.py), so a GPU session finds no crash the CPU could have found.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the sibling benchmark modules, also when imported from the tests
    sys.path.insert(0, str(BENCH))
if importlib.util.find_spec("mimkit") is None:  # the device machine: this checkout, not installed
    sys.path.insert(0, str(BENCH.parent / "src"))

from evidence import Evidence, attempt, environment_facts, past_deadline, resolve_data, run_command, torch_threads  # noqa: E402

STAGES = ("smoke", "speed", "ladder", "methods")
DEFAULT_WORK = "/tmp/mimkit-gpu-evidence"


# ------------------------------------------------------------------------------------------------ smoke
def parse_junit(path: Path) -> list[dict]:
    """pytest's JUnit XML -> [{test, outcome, seconds, message}]."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (node.get("message") or "")[:300]
                break
        rows.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                     "message": message})  # fmt: skip
    return rows


def smoke(ev: Evidence, args) -> None:
    """`pytest -m cuda` (in parallel workers when pytest-xdist is there), then the environment facts."""
    junit = ev.work / "cuda-tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", f"--junitxml={junit}"]
    env = None
    if ev.dry_run:  # the CUDA tests on the CPU (MIMKIT_CUDA_TESTS_ON_CPU), one of them: checks this harness
        cmd += ["-k", "mae-vit-eager and not cmae"]
        env = {"MIMKIT_CUDA_TESTS_ON_CPU": "1"}
    else:
        cmd += ["-n", "4"] if importlib.util.find_spec("xdist") else []  # compiling is CPU-bound: 16 cores
    cmd.append("tests/test_cuda.py")  # only it: another module's missing import must not stop the GPU tests
    rc, seconds = run_command(ev, cmd, timeout=ev.left() - 20, env=env)
    rows = parse_junit(junit) if junit.is_file() else []
    for r in rows:
        ev.record("cuda-tests", **r)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
    ev.record("cuda-tests-total", exit_status=rc, seconds=round(seconds, 1), **counts)
    body = [f"`pytest -m cuda`: exit status {rc}, {seconds:.0f} s wall; " + ", ".join(f"{n} {o}" for o, n in
            counts.items()), "", "| test | outcome | s |", "|---|---|---|"]  # fmt: skip
    body += [
        f"| {r['test']} | {r['outcome']} | {r['seconds']:.1f} |" for r in sorted(rows, key=lambda r: -r["seconds"])
    ]
    ev.section("CUDA tests", body)
    if rc != 0 or counts["failed"] or counts["error"] or not rows:
        ev.fail("cuda-tests", f"pytest exit status {rc}; {counts}; see stage.log")


# ------------------------------------------------------------------------------------------------ entry point
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--out", required=True, help="results.jsonl, summary.md, stage.log (and compare's report)")
    ap.add_argument("--data", help="CIFAR-10: a folder (train/<class>/, test/<class>/) or a pack_cifar10.py .npz")
    ap.add_argument("--work", default=DEFAULT_WORK, help="run folders and unpacked data (outside --out)")
    ap.add_argument("--dry-run", action="store_true", help="toy size on the CPU: checks the stage end to end")
    ap.add_argument("--minutes", type=float, help="the stage's deadline from its start (default 8.5; dry run 60)")
    ap.add_argument("--parts", help="speed: comma-separated parts to run (default: all, in priority order)")
    ap.add_argument("--pretrain-minutes", type=float, default=5.0, help="ladder: MAE pre-training budget")
    ap.add_argument("--finetune-epochs", type=int, default=15, help="ladder: the fixed fine-tuning recipe's epochs")
    ap.add_argument("--methods", default="all", help="methods: which methods compare pre-trains")
    ap.add_argument("--method-budget", help="methods: compare's --budget per method (default: fitted to --minutes)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    work = Path(args.work) / (args.stage + ("-dry" if args.dry_run else ""))
    minutes = args.minutes or (60.0 if args.dry_run else 8.5)  # a dry run on a busy CPU must not skip parts
    ev = Evidence(args.stage, Path(args.out), work, minutes, args.dry_run, argv)
    with contextlib.ExitStack() as stack:
        if args.dry_run:  # toy models gain nothing from threads, and on a shared CPU they wait on each other
            stack.enter_context(torch_threads(1))
        else:  # a part stuck past the deadline is stopped, so the summary is still written before the tool's kill
            signal.signal(signal.SIGALRM, past_deadline)
            signal.alarm(int(ev.left()) + 15)
            stack.callback(signal.alarm, 0)
        return run_stage(ev, args)


def run_stage(ev: Evidence, args) -> int:
    try:
        ev.facts = attempt(ev, "environment", environment_facts) or {}
        ev.record("environment", **ev.facts)
        ev.say(f"{ev.facts.get('gpu', 'no GPU')}; torch {ev.facts.get('torch')}; deadline in {ev.left():.0f} s")
        if args.stage == "smoke":
            attempt(ev, "cuda-tests", lambda: smoke(ev, args))
        else:
            data = resolve_data(ev, args.data)
            if args.stage == "speed":
                from gpu_evidence_speed import speed

                speed(ev, args, data)
            else:
                from gpu_evidence_runs import ladder, methods

                if data is None:
                    raise SystemExit(f"gpu_evidence: --stage {args.stage} needs --data (CIFAR-10 folder or pack)")
                (ladder if args.stage == "ladder" else methods)(ev, args, data)
    finally:
        ev.write_summary()
        ev.say(f"done: {len(ev.failed)} failed, {len(ev.skipped)} skipped; {ev.out / 'summary.md'}")
    return 1 if ev.failed else 0


if __name__ == "__main__":
    sys.exit(main())

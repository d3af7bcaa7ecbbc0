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
import datetime
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:  # the sibling benchmark modules, also when imported from the tests
    sys.path.insert(0, str(BENCH))
if importlib.util.find_spec("mimkit") is None:  # the device machine: this checkout, not installed
    sys.path.insert(0, str(REPO / "src"))

STAGES = ("smoke", "speed", "ladder", "methods")
DEFAULT_WORK = "/tmp/mimkit-gpu-evidence"


class Evidence:
    """One stage's deadline and outputs: results.jsonl rows, summary sections, skipped and failed parts."""

    def __init__(self, stage: str, out: Path, work: Path, minutes: float, dry_run: bool, argv: list[str]):
        self.stage, self.out, self.work, self.dry_run = stage, out, work, dry_run
        self.command = "python benchmarks/gpu_evidence.py " + shlex.join(argv)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60 * minutes
        self.started = datetime.datetime.now(datetime.timezone.utc)
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.results, self.log = out / "results.jsonl", out / "stage.log"
        for f in (self.results, self.log):
            f.write_text("")
        self.sections: dict[str, list[str]] = {}  # title -> lines; a section written again replaces itself
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.facts: dict = {}

    def left(self) -> float:
        """Seconds to the stage's deadline."""
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, part: str, **fields) -> dict:
        row = {"stage": self.stage, "part": part, **fields, "elapsed_s": round(self.elapsed(), 1)}
        with self.results.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row

    def say(self, msg: str) -> None:
        """A progress line on stdout (the device tool returns its tail) and in stage.log."""
        line = f"[{self.stage} {self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def skip(self, part: str, why: str) -> None:
        self.skipped.append(f"{part}: {why}")
        self.record(part, skipped=why)
        self.say(f"skipped {part}: {why}")

    def fail(self, part: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.failed.append(f"{part}: {text}")
        self.record(part, error=text)
        self.say(f"FAILED {part}: {text}")
        if not isinstance(error, str):
            with self.log.open("a") as f:
                traceback.print_exception(error, file=f)

    def section(self, title: str, lines: list[str]) -> None:
        self.sections[title] = lines

    def write_summary(self) -> None:
        f = self.facts
        machine = f.get("gpu") or ("CPU only" + (" (dry run)" if self.dry_run else ""))
        lines = [f"# gpu_evidence: {self.stage}" + (" (dry run)" if self.dry_run else ""), "",
                 f"- machine: {machine}; driver {f.get('driver', '-')}; {f.get('cpus')} CPU cores",
                 f"- software: torch {f.get('torch')} (CUDA {f.get('cuda')}), timm {f.get('timm')}, "
                 f"transformers {f.get('transformers')}, Python {f.get('python')}; mimkit source {f.get('mimkit_src')}",
                 f"- date: {self.started:%Y-%m-%d %H:%M} UTC; wall {self.elapsed():.0f} s",
                 f"- command: `{self.command}`", ""]  # fmt: skip
        for title, body in self.sections.items():
            lines += [f"## {title}", "", *body, ""]
        for name, items in (("Skipped", self.skipped), ("Failed", self.failed)):
            if items:
                lines += [f"## {name}", "", *[f"- {x}" for x in items], ""]
        (self.out / "summary.md").write_text("\n".join(lines))


def attempt(ev: Evidence, part: str, fn, need_s: float = 0.0):
    """fn() unless fewer than `need_s` seconds are left (skipped); a failure is recorded, not raised."""
    if ev.left() < need_s:
        ev.skip(part, f"needs about {need_s:.0f} s, {max(ev.left(), 0):.0f} s left before the stage's deadline")
        return None
    ev.say(f"{part} ...")
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 — one part's failure must not cost the others' evidence
        ev.fail(part, e)
        return None


# ------------------------------------------------------------------------------------------------ running things
def child_env(extra: dict | None = None) -> dict:
    """The environment of a child process: mimkit importable from this checkout without installing it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_command(ev: Evidence, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | str, float]:
    """Run `cmd` in the repo root with its output appended to stage.log; -> (exit status or 'timeout', seconds).
    A command still running at `timeout` is killed with its whole process group (loader workers included)."""
    with ev.log.open("a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=child_env(env),
                                start_new_session=True)  # fmt: skip
        try:
            rc: int | str = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return rc, time.perf_counter() - t


def run_cli(ev: Evidence, argv: list[str], timeout: float) -> tuple[int | str, float]:
    """`mimkit ARGV`: a child process on the real run (own CUDA context, a hard timeout); in-process on a dry run,
    where importing torch again per command would cost more than the toy run itself."""
    if not ev.dry_run:
        return run_command(ev, [sys.executable, "-m", "mimkit.cli", *argv], timeout)
    from mimkit.cli import main

    buf, t = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc: int | str = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 2
        except Exception:  # noqa: BLE001 — as a child process would: the traceback in the log, status 1
            traceback.print_exc()
            rc = 1
    with ev.log.open("a") as log:
        log.write(f"\n$ mimkit {shlex.join(argv)}\n{buf.getvalue()}")
    return rc, time.perf_counter() - t


# ------------------------------------------------------------------------------------------------ facts and data
def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest() -> str:
    """A short digest of src/mimkit's Python files: names the code version where no .git travelled."""
    h = hashlib.sha256()
    for p in sorted((REPO / "src" / "mimkit").rglob("*.py")):
        h.update(p.relative_to(REPO).as_posix().encode() + p.read_bytes())
    try:  # the device machine may have neither .git nor git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        git = f" (git {commit.stdout.strip()})" if commit.returncode == 0 else ""
    except OSError:
        git = ""
    return h.hexdigest()[:12] + git


def environment_facts() -> dict:
    import torch

    f = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
         "torch": torch.__version__, "cuda": torch.version.cuda, "mimkit_src": source_digest()}  # fmt: skip
    for pkg in ("timm", "torchvision", "transformers", "triton", "numpy", "pillow", "safetensors"):
        f[pkg] = package_version(pkg)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        f.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                 capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            q = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
            smi = subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            values = [v.strip() for v in smi[0].split(",")] if smi else []
            f.update(zip(("driver", "max_sm_clock", "power_limit"), values))
    return f


def make_toy_cifar(root: Path, classes: int = 4, train: int = 16, test: int = 4, size: int = 32) -> Path:
    """A CIFAR-10-like folder: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, small structured images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
                s = size // 2 + c * 2
                y, x = rng.integers(0, size - s, 2)
                img[y : y + s, x : x + s] = np.array([80 + 40 * c, 200 - 30 * c, 120], dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def resolve_data(ev: Evidence, data: str | None) -> Path | None:
    """--data as a folder: the data; a .npz pack: unpacked into --work once. A dry run without --data makes a toy
    CIFAR-like folder and carries it through pack and unpack, as the real data travels."""
    from pack_cifar10 import pack, unpack

    if data is None and not ev.dry_run:
        return None
    if data is None:
        src = make_toy_cifar(ev.work / "toy-src")
        info = pack(src, ev.work / "toy-cifar.npz")
        ev.record("data-files", packed=info)
        data = str(ev.work / "toy-cifar.npz")
    path = Path(data)
    if path.suffix != ".npz":
        if not path.is_dir():
            raise SystemExit(f"gpu_evidence: --data '{data}' is neither a folder nor a .npz pack")
        return path
    dest = ev.work / "data" / path.stem
    t = time.perf_counter()
    n = unpack(path, dest)
    ev.record("data-files", unpacked=str(dest), files=n, seconds=round(time.perf_counter() - t, 1))
    ev.say(f"data: {n} files from '{path}' in '{dest}' ({time.perf_counter() - t:.1f} s)")
    return dest


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


class PastDeadline(Exception):
    """Raised in the part that is running when the stage's deadline (plus a little) has passed."""


def past_deadline(signum, frame):
    raise PastDeadline("the stage's deadline passed while this part ran")


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

"""The stage harness of benchmarks/gpu_evidence.py: a stage's deadline and outputs (results.jsonl, summary.md,
stage.log), parts that are weighed against the deadline and whose failures are recorded, commands and the CLI run
with their output in the log, the machine's facts, and the CIFAR-10 data the stages train on."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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

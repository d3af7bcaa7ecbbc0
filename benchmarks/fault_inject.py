"""The fault campaign's cases of issue 24 (benchmarks/faults.py runs them): a real full disk (a 3 MiB tmpfs),
faults injected into the write system calls of a run by strace (ENOSPC, SIGKILL) at the first write of each of
its files, EIO at open, mkdir, fsync, rename, link and removal of each file a run makes durable or removes, a
device whose every fsync fails, the run lock across the export, leftover temporary folders, the loss-level
divergence guard, config values that only fail together, and model.init messages. Cases the machine cannot run
(no root for the tmpfs, no strace or ptrace) are skipped and counted."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from fault_runs import ends_like, leftovers, metrics, newest_state

# the first write of each of these (a path regex) is where a fault is injected; the probe finds its index. strace
# follows the main thread only: a fault in another process (find_library's ldconfig) or thread would change what
# the main thread writes; TensorBoard's writer thread gets its faults from inside (fault_runs.install_tensorboard_fault)
TARGETS = {
    "the run lock": r"\.mimkit\.lock\.\d+\.tmp$",
    "metrics.jsonl rewrite": r"/\.metrics\.jsonl\.\d+\.tmp$",
    "config.yaml": r"/\.config\.yaml\.\d+\.tmp$",
    "metrics.jsonl append": r"/metrics\.jsonl$",
    "a checkpoint": r"/checkpoints/\.last\.pt\.\d+\..*\.tmp$",
    "the export": r"/\.encoder\.\d+\..*\.tmp/",
    "summary.json": r"/\.summary\.json\.\d+\.tmp$",
}
WRITE = re.compile(r"^write\(\d+<([^>]*)>")
# EIO (a failing device) at the first open, mkdir, fsync, rename and link of each file a run makes durable; the label
# is the first of these patterns that the call's arguments (paths, with strace -y) match
DURABLE = {
    "a checkpoint": r"/checkpoints/\.last\.pt\.\d+\.",
    "prev.pt": r"/checkpoints/(\.)?prev\.pt",
    "the export": r"/\.encoder\.\d+\.",
    "summary.json": r"/\.summary\.json\.\d+\.",
    "config.yaml": r"/\.config\.yaml\.\d+\.",
    "metrics.jsonl rewrite": r"/\.metrics\.jsonl\.\d+\.",
    "the run lock": r"\.mimkit\.lock",
}
NAMED = {"a checkpoint": "'last.pt'", "prev.pt": "'last.pt'", "the export": "'encoder'",
         "summary.json": "'summary.json'", "config.yaml": "'config.yaml'", "metrics.jsonl rewrite": "'metrics.jsonl'",
         "the run lock": "'.mimkit.lock'"}  # fmt: skip
SYSCALLS = ("openat", "mkdir", "mkdirat", "fsync", "fdatasync", "rename", "renameat", "renameat2", "link", "linkat")
# EIO at the first removal of each temporary file (most of them are already renamed away: the call would have said
# ENOENT), of the previous export's files after the exchange, and of the run lock at the end
REMOVALS = ("unlink", "unlinkat", "rmdir")
REMOVED = {"the run lock's release": r'/\.mimkit\.lock"', **DURABLE}
CALL = re.compile(r"^(\w+)\((.*)")


class Traced:
    """One `python -m mimkit.cli` under strace, with the interface of fault_runs.Run that the checks use."""

    def __init__(self, log: Path, argv: list[str], strace: list[str]):
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with log.open("w") as f:
            self.code = subprocess.run(["strace", "-qq", *strace, sys.executable, "-m", "mimkit.cli", *argv],
                                       stdout=f, stderr=subprocess.STDOUT, env=env).returncode  # fmt: skip

    def text(self, i: int = -1) -> str:
        return self.log.read_text()

    def last_line(self) -> str:
        lines = self.text().strip().splitlines()
        return lines[-1] if lines else ""

    def tracebacks(self) -> int:
        return self.text().count("Traceback")


def strace_usable() -> bool:
    try:
        return subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


class IssueCases:
    """Mixed into faults.Campaign: uses its work, run, add, reference, copy_of_reference and argv."""

    skipped: list[str]

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        print(f"skip  {name:<36} {why}", flush=True)

    def clean_end(self, out: Path, r) -> tuple[bool, str]:
        """Exit 0, or exit 2 with one line and no traceback; no lock and no temporary file either way."""
        said = r.last_line().startswith("mimkit: error:") and not r.tracebacks()
        one_line = r.code == 0 or (r.code == 2 and said)
        left = leftovers(out) + [".mimkit.lock"] * (out / ".mimkit.lock").exists()
        return r.code in (0, 2) and one_line and not left, f"exit {r.code}, left: {left}: {r.last_line()[:130]!r}"

    # ---- a real full disk ------------------------------------------------------------------------------------
    def fulldisk(self) -> None:
        disk = self.work / "tmpfs"
        disk.mkdir(exist_ok=True)
        mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                                       capture_output=True).returncode == 0  # fmt: skip
        cases = ["full at start", "fills at a checkpoint", "fills while logging", "fills at the export"]
        if not mounted:
            for case in cases:
                self.skip(f"tmpfs: {case}", "mounting a tmpfs needs root")
            return
        try:
            for case, free_kib in zip(cases, (0, 1024, 16, 64)):
                out, ballast = disk / "run", disk / "ballast"
                shutil.rmtree(out, ignore_errors=True)
                ballast.unlink(missing_ok=True)
                if case == "fills at the export":  # a finished run without its export: the re-run exports
                    shutil.copytree(self.reference(), out)
                    shutil.rmtree(out / "encoder")
                stat = os.statvfs(disk)
                with ballast.open("wb") as f:
                    f.write(bytes(max(stat.f_bavail * stat.f_frsize - free_kib * 1024, 0)))
                r = self.run(self.argv(out))
                ok, detail = self.clean_end(out, r)
                ok = ok and r.code == 2 and "no space left" in r.last_line()
                ballast.unlink()
                good, after = ends_like(self.reference(), out, self.run(self.argv(out)))
                self.add(ok and good, f"tmpfs: {case}", f"{detail}; re-run: {after}")
        finally:
            subprocess.run(["umount", str(disk)], check=False)

    # ---- strace: ENOSPC or SIGKILL at the first write of each file -----------------------------------------
    def inject(self) -> None:
        if not strace_usable():
            for fault in ("ENOSPC", "SIGKILL"):
                for target in TARGETS:
                    self.skip(f"{fault} at {target}", "strace is missing or may not trace here")
            return
        resumed_copy = self.resumed_copy  # a resume from one step back, without the export: every file written
        first = self.first_writes(resumed_copy("inject-probe"))
        for fault, inject in (("ENOSPC", "error=ENOSPC"), ("SIGKILL", "signal=SIGKILL")):
            for target, index in first.items():
                if index is None:
                    self.add(False, f"{fault} at {target}", "the probe saw no write to it")
                    continue
                out = resumed_copy(f"inject-{fault}-{target.replace(' ', '-')}")
                strace = ["-o", "/dev/null", "-e", "trace=write", "-e", f"inject=write:{inject}:when={index}"]
                r = Traced(self.work / "logs" / f"{out.name}.log", self.argv(out), strace)
                self.judge_fault(fault, target, out, r, f"write #{index}")
            out = resumed_copy(f"inject-{fault}-TensorBoard")
            r = self.run(self.argv(out), faults={"tensorboard_fault": {"at": 3, "fault": fault}})
            self.judge_fault(fault, "TensorBoard's thread", out, r, "its write #3")

    def eio(self) -> None:
        """EIO at the first open, mkdir, fsync, rename and link of each durable file: a clean end (exit 2 and one line
        naming the file, no temporary file, no lock), then a re-run that ends like the reference."""
        if not strace_usable():
            self.skip("EIO at fsync/rename/link", "strace is missing or may not trace here")
            return
        for call, target, index, out, name in self.first_call_cases("eio", SYSCALLS, DURABLE):
            r = self.traced(out, call, f"when={index}")
            self.judge_fault("EIO", name, out, r, f"{call} #{index}", named=NAMED[target])

    def unlink(self) -> None:
        """EIO at the first removal of each file a run removes: the run's results are whole, so it ends with exit 0
        (a warning line at most), and whatever stays behind is gone after the re-run, which ends like the
        reference."""
        if not strace_usable():
            self.skip("EIO at unlink", "strace is missing or may not trace here")
            return
        for call, _, index, out, name in self.first_call_cases("unlink", REMOVALS, REMOVED):
            r = self.traced(out, call, f"when={index}")
            ok = r.code == 0 and not r.tracebacks() and r.text().count("warning:") <= 1
            detail = f"{call} #{index}: exit {r.code}, left: {leftovers(out)[:2]}: {r.last_line()[:100]!r}"
            good, after = ends_like(self.reference(), out, self.run(self.argv(out)))
            self.add(ok and good, f"EIO at {name}", f"{detail}; re-run: {after}")

    def failing(self) -> None:
        """A device that keeps failing: EIO at every fsync from the first one of a durable file on (every durable
        write fsyncs; a failing `write` would also silence the run's own error line). A clean end (exit 2, one line
        naming that file), the newest checkpoint intact; once the device works, the re-run ends like the
        reference."""
        if not strace_usable():
            self.skip("a device that keeps failing", "strace is missing or may not trace here")
            return
        for _, target, index, out, name in self.first_call_cases("failing", ("fsync",), DURABLE):
            r = self.traced(out, "fsync", f"when={index}+")
            intact = newest_state(out).endswith("loads, finite")
            self.judge_fault("EIO", f"every {name} on", out, r, f"fsync #{index}+, newest checkpoint intact: {intact}",
                             named=NAMED[target], also=intact)  # fmt: skip

    def first_call_cases(self, prefix: str, calls: tuple, labels: dict):
        """-> (call, label, index, folder, name) for the first of `calls` on each file of `labels`, each in a fresh
        resumed copy: without the export every file is written anew; with it (the export's cases only) the export
        replaces the previous folder (the exchange, renameat2)."""
        for keep in (False, True):
            first = self.first_calls(self.resumed_copy(f"{prefix}-probe-{keep}", keep_export=keep), calls, labels)
            for (call, target), index in first.items():
                if keep and target != "the export":
                    continue
                out = self.resumed_copy(f"{prefix}-{call}-{target.replace(' ', '-')}-{keep}", keep_export=keep)
                yield call, target, index, out, f"{call} of {target}" + (" (replacing one)" if keep else "")

    def traced(self, out: Path, call: str, when: str) -> Traced:
        """The command on `out` with EIO injected into `call` at `when` (strace's syntax: N, or N+ for every one
        from the N-th on)."""
        strace = ["-o", "/dev/null", "-e", f"trace={call}", "-e", f"inject={call}:error=EIO:{when}"]
        return Traced(self.work / "logs" / f"{out.name}.log", self.argv(out), strace)

    def resumed_copy(self, name: str, keep_export: bool = False) -> Path:
        """A copy of the reference run one step before its end (prev.pt as last.pt), without its export unless
        `keep_export`: the re-run writes every file again."""
        out = self.work / name
        shutil.copytree(self.reference(), out)
        (out / "checkpoints" / "prev.pt").replace(out / "checkpoints" / "last.pt")
        if not keep_export:
            shutil.rmtree(out / "encoder")
        return out

    def first_calls(self, out: Path, calls: tuple, labels: dict) -> dict[tuple[str, str], int]:
        """For each (system call of `calls`, label of `labels`), the index among that call's invocations by the main
        thread of the first one on that file, in one run of the command on `out`."""
        log = self.work / "logs" / f"{out.name}.strace"
        Traced(log.with_suffix(".log"), self.argv(out), ["-y", "-e", f"trace={','.join(calls)}", "-o", str(log)])
        counts: dict[str, int] = {}
        first: dict[tuple[str, str], int] = {}
        for match in map(CALL.match, log.read_text().splitlines()):
            if match is None or match[1] not in calls:
                continue
            counts[match[1]] = counts.get(match[1], 0) + 1
            label = next((name for name, pattern in labels.items() if re.search(pattern, match[2])), None)
            if label is not None:
                first.setdefault((match[1], label), counts[match[1]])
        return first

    def judge_fault(self, fault: str, target: str, out: Path, r, where: str, named: str | None = None,
                    also: bool = True) -> None:  # fmt: skip
        """After SIGKILL: whole metrics lines; after ENOSPC or EIO: a clean end (with `named`: exit 2, the one line
        naming that file, so a fault that missed its call does not pass); then the re-run ends like the reference."""
        ref = self.reference()
        if fault == "SIGKILL":
            kept, killed = whole_lines(out, ref), r.code in (-9, 137)
            ok, detail = killed and kept, f"killed: {killed}, left: {leftovers(out)[:2]}, whole metrics lines: {kept}"
        else:
            ok, detail = self.clean_end(out, r)
            ok = ok and (named is None or (r.code == 2 and named in r.last_line()))
        good, after = ends_like(ref, out, self.run(self.argv(out)))
        self.add(ok and good and also, f"{fault} at {target}", f"{where}: {detail}; re-run: {after}")

    def first_writes(self, out: Path) -> dict[str, int | None]:
        """For each of TARGETS, the index among the main thread's write calls of the first write to it, in one
        run of the command on `out` (a copy of the folder each case starts from: the same writes in the same
        order)."""
        log = self.work / "logs" / f"{out.name}.strace"
        Traced(log.with_suffix(".log"), self.argv(out), ["-y", "-e", "trace=write", "-o", str(log)])
        paths = [m[1] for m in map(WRITE.match, log.read_text().splitlines()) if m]
        return {target: next((i + 1 for i, path in enumerate(paths) if re.search(pattern, path)), None)
                for target, pattern in TARGETS.items()}  # fmt: skip

    # ---- the lock, leftovers -----------------------------------------------------------------------------
    def lock(self) -> None:
        out, marker = self.work / "lock-export", self.work / "lock-export-exporting"
        first = self.start(self.argv(out), faults={"slow_export": str(marker)})
        while first.proc.is_alive() and not marker.exists():
            time.sleep(0.01)
        second = self.run(self.argv(out))
        named = f"pid {first.proc.pid}" in second.last_line()
        ok, detail = ends_like(self.reference(), out, first.wait())
        self.add(second.code == 2 and named and ok, "second run during the export",
                 f"second: exit {second.code}, names the holder: {named}; first: {detail}")  # fmt: skip
        for age, name in ((0, "an empty lock, just made"), (3600, "an empty lock, an hour old")):
            out = self.copy_of_reference(f"lock-empty-{age}")
            (out / "checkpoints" / "prev.pt").replace(out / "checkpoints" / "last.pt")
            (out / ".mimkit.lock").touch()
            os.utime(out / ".mimkit.lock", (time.time() - age,) * 2)
            r = self.run(self.argv(out))
            if age:
                ok, detail = ends_like(self.reference(), out, r)
                ok = ok and "removed the unreadable run lock" in r.text()
            else:
                ok = r.code == 2 and f"'{out / '.mimkit.lock'}'" in r.last_line() and (out / ".mimkit.lock").exists()
                detail = f"exit {r.code}, lock kept: {(out / '.mimkit.lock').exists()}: {r.last_line()[:100]!r}"
            self.add(ok, name, detail)
        out = self.copy_of_reference("leftover-export")
        (out / "checkpoints" / "prev.pt").replace(out / "checkpoints" / "last.pt")
        dead = subprocess.Popen(["true"])
        dead.wait()
        for name in (".encoder.k3x_9abq", f".encoder.{dead.pid}.w1v2tmp3.tmp"):
            shutil.copytree(out / "encoder", out / name)
        ok, detail = ends_like(self.reference(), out, self.run(self.argv(out)))
        self.add(ok, "a killed export's temp folders", detail)

    # ---- guards: exploded loss, config values that only fail together, model.init messages ------------------
    def guards(self) -> None:
        out = self.work / "exploded"
        r = self.run(self.argv(out, "mae", "optim.blr=1000"))
        said = re.search(r"loss \S+ at step (\d+) is over .* now holds step (\d+)", r.last_line())
        stopped = r.code == 1 and said is not None and int(said[2]) == int(said[1]) - 2
        first = metrics(out)[0]["loss"] if metrics(out) else float("nan")
        again = self.run(self.argv(out, "mae", "train.allow_config_change=true"))  # another lr: said, then allowed
        losses = [row["loss"] for row in metrics(out)]
        sane = again.code == 0 and bool(losses) and max(losses) < 2 * first
        self.add(stopped and sane, "exploded loss (optim.blr=1000)",
                 f"exit {r.code}: {r.last_line()[15:110]!r}; re-run at the default lr: exit {again.code}, "
                 f"highest loss {max(losses or [0]):.3g} (first {first:.3g})")  # fmt: skip
        demo = self.work / "exploded-demo"  # the issue's case: the demo recipe, every step checkpointed
        argv = ["pretrain", "--out", str(demo), "--epochs", "2", "eval.final_knn=false", "train.checkpoint_every=1",
                "train.log_every=1"]  # fmt: skip
        r = self.run([*argv, "optim.blr=300"])
        said = re.search(r"now holds step (\d+)", r.last_line())
        kept = int(said[1]) if said else -1
        level = {row["step"]: row["loss"] for row in metrics(demo)}.get(kept + 1, float("inf"))
        again = self.run([*argv[:4], "1", *argv[5:], "train.allow_config_change=true"])  # 1 epoch at the recipe's lr
        losses = [row["loss"] for row in metrics(demo)]
        ok = r.code == 1 and level < 10 and again.code == 0 and max(losses) < 10
        self.add(ok, "demo at optim.blr=300", f"exit {r.code}, kept step {kept} (its loss {level:.3g}); re-run: exit "
                 f"{again.code}, highest loss {max(losses):.3g}")  # fmt: skip
        self.init_messages()

    def init_messages(self) -> None:
        sources = self.work / "init"
        sources.mkdir(exist_ok=True)
        data = (self.reference() / "checkpoints" / "last.pt").read_bytes()
        (sources / "truncated.pt").write_bytes(data[: len(data) // 2])
        (sources / "raw-pickle.pt").write_bytes(pickle.dumps({"model": {"w": [0.0] * 10}}))
        torch.save({"model": {}, "args": argparse_namespace()}, sources / "objects.pt")
        shutil.copytree(self.reference() / "encoder", sources / "hub-export", dirs_exist_ok=True)
        from test_untrusted_exports import set_arch

        set_arch("hf-hub:someone/model")(sources / "hub-export")
        for name in ("truncated.pt", "raw-pickle.pt", "objects.pt", "hub-export"):
            out = self.work / "init-run"
            r = self.run(self.argv(out, "mae", f"model.init={sources / name}"))
            text = r.text()
            foreign = [w for w in ("weights_only=False", "site-packages", "--allow-download", "file an issue")
                       if w in text]  # fmt: skip
            ok = r.code == 2 and text.count("\n") == 1 and f"'{sources / name}" in text and not foreign
            ok = ok and not out.exists() and not r.tracebacks()
            self.add(ok, f"model.init={name}", f"exit {r.code}, {len(text)} chars, foreign: {foreign}: "
                     f"{r.last_line()[15:120]!r}")  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)


def whole_lines(out: Path, ref: Path) -> bool:
    """metrics.jsonl holds whole lines, the reference's first ones (timings aside), at least up to the step the
    resumed run started from."""
    try:
        rows = metrics(out)
    except ValueError:  # a torn line
        return False
    return len(rows) >= len(metrics(ref)) - 1 and rows == metrics(ref)[: len(rows)]


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1.0)

"""The fault-injection campaign of issue 16: crashes, full disks, damaged files, a second run and hostile input
against real runs of the CLI. One line per case, then a total; exit status 1 when a case failed.

    python benchmarks/faults.py                  # 12 SIGKILLs per method (MAE, ConMIM, CMAE) + every other case
    python benchmarks/faults.py --quick          # 3 SIGKILLs per method
    python benchmarks/faults.py --kills 6 --seed 1 --work /tmp/faults --only kill,disk

Each run is `mimkit.cli.main(argv)` in a process of its own, forked from a server that imported mimkit once
(multiprocessing's forkserver), so a SIGKILL ends exactly one run; TINY settings on the demo digits (64 images,
12 epochs of 4 steps, a checkpoint after every step). Kills land during the k-th checkpoint write (its temp file
seen), 0-0.3 s after the k-th new metrics line, or 0.05-1.5 s after start; after each, the newest checkpoint must
load and be finite, and the finished re-run must equal an uninterrupted run in every checkpoint and export tensor
and in metrics.jsonl. The crafted exports are tests/test_untrusted_exports.py's, run through eval, finetune and
segment with sockets, DNS and the Hub/timm/torch downloaders replaced by counters. docs/reliability.md has a run.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts: every run alike

import torch  # noqa: E402
from helpers import TINY, write_images  # noqa: E402

from mimkit.engine.checkpoint import load_checkpoint  # noqa: E402
from mimkit.engine.logging import TIMING_KEYS  # noqa: E402

FLAGS = ["--data", "demo", "--max-images", "64", "--epochs", "12"]
COMMON = [*TINY, "eval.final_knn=false", "train.checkpoint_every=1"]
METHODS = {
    "mae": [],
    "conmim": ["conmim.proj_hidden=32", "conmim.proj_dim=16"],
    "cmae": ["cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2", "cmae.proj_hidden=64",
             "cmae.proj_dim=16"],
}  # fmt: skip
BAD_INPUTS = [("--batch-size", "0"), ("--image-size", "0"), ("optim.blr=-1",), ("data.num_workers=-1",),
              ("train.log_every=0",), ("train.checkpoint_every=-1",), ("data.bad_file_limit=-0.5",),
              ("optim.blr=nan",), ("optim.blr=inf",), ("data.bad_file_limit=nan",), ("optim.warmup_epochs=inf",),
              ("optim.clip_grad=nan",)]  # fmt: skip
FLAG_KEYS = {"--batch-size": "train.batch_size", "--image-size": "data.image_size"}
PRELOAD = ["torch", "timm", "sklearn.datasets", "torch.utils.tensorboard", "safetensors.torch", "mimkit.cli",
           "mimkit.engine.pretrain", "mimkit.engine.finetune", "mimkit.engine.segment", "mimkit.export"]  # fmt: skip


def pretrain_argv(out: Path | None, method: str = "mae", *extra: str) -> list[str]:
    """The campaign's pre-training command; flags in `extra` go before the dotted overrides (one argparse list)."""
    flags = [a for i, a in enumerate(extra) if a.startswith("--") or (i and extra[i - 1].startswith("--"))]
    where = ["--out", str(out)] if out is not None else []
    rest = [a for a in extra if a not in flags]
    return ["pretrain", "--method", method, *where, *FLAGS, *flags, *COMMON, *METHODS[method], *rest]


# ---- runs in processes of their own ---------------------------------------------------------------------------


def child(job: dict) -> None:
    """Each command of `job` with stdout+stderr in its log, under the job's faults; the exit codes and network
    attempts go to job['result']. An uncaught exception prints its traceback and counts as status 1, as under
    `python -m mimkit.cli`."""
    attempts = install_faults(job["faults"])
    from mimkit.cli import main

    codes = []
    for argv, log in job["commands"]:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2), os.close(fd)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 — exactly what the campaign counts
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        codes.append(code)
    Path(job["result"]).write_text(json.dumps({"codes": codes, "network": attempts}))
    os._exit(codes[-1])


def install_faults(faults: dict) -> list[str]:
    """A checkpoint writer that fills the disk, an export writer that does, and/or the network counted and
    refused. -> the list network attempts are appended to."""
    attempts: list[str] = []
    if "checkpoint_full_at" in faults:
        from mimkit.engine import checkpoint

        checkpoint.torch = FullDiskTorch(**faults["checkpoint_full_at"])
    if faults.get("export_full"):
        from mimkit import atomic

        def save_file(tensors, path, metadata=None):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        atomic.save_file = save_file
    if faults.get("block_network"):
        block_network(attempts)
    return attempts


class FullDiskTorch:
    """`torch` as mimkit.engine.checkpoint sees it, except that the `at`-th save copies the checkpoints in `folder`
    to `snapshot` (what must survive), writes a few bytes and fails with `code`."""

    def __init__(self, at: int, folder: str, snapshot: str, code: int = errno.ENOSPC):
        self.calls, self.at, self.folder, self.snapshot, self.code = 0, at, Path(folder), Path(snapshot), code

    def __getattr__(self, name):
        return getattr(torch, name)

    def save(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls < self.at:
            return torch.save(obj, f, *args, **kwargs)
        self.snapshot.mkdir(parents=True, exist_ok=True)
        for p in self.folder.glob("*.pt"):
            shutil.copyfile(p, self.snapshot / p.name)
        f.write(b"PK\x03\x04 partial")
        f.flush()
        raise OSError(self.code, os.strerror(self.code))


def block_network(attempts: list[str]) -> None:
    """Sockets (but Unix ones: loader workers), DNS, and the Hub/timm/torch download functions record the attempt
    and fail."""
    import socket

    import huggingface_hub
    import timm.models._factory as timm_factory
    import timm.models._hub as timm_hub

    def refuse(name, real=None):
        def blocked(*args, **kwargs):
            if real is not None and args[0].family == socket.AF_UNIX:
                return real(*args, **kwargs)
            attempts.append(name)
            raise OSError(f"network access attempted: {name}")

        return blocked

    for method in ("connect", "connect_ex"):
        setattr(socket.socket, method, refuse(f"socket.{method}", getattr(socket.socket, method)))
    targets = {
        socket: ("create_connection", "getaddrinfo"),
        torch.hub: ("download_url_to_file", "load_state_dict_from_url"),
        huggingface_hub: ("hf_hub_download", "snapshot_download", "model_info"),
        timm_factory: ("load_model_config_from_hf",),
        timm_hub: ("hf_hub_download", "download_from_hf", "load_model_config_from_hf", "load_state_dict_from_hf"),
    }
    for module, names in targets.items():
        for name in names:
            setattr(module, name, refuse(f"{module.__name__}.{name}"))


class Run:
    """One child process running `commands` one after the other; logs and result under `logs`."""

    ctx, count = None, 0

    def __init__(self, logs: Path, *commands: list[str], faults: dict | None = None):
        if Run.ctx is None:
            Run.ctx = mp.get_context("forkserver")
            Run.ctx.set_forkserver_preload(PRELOAD)
        Run.count += 1
        self.logs = [logs / f"{Run.count:04d}-{i}.log" for i in range(len(commands))]
        self.result = logs / f"{Run.count:04d}.json"
        job = {"commands": list(zip(commands, map(str, self.logs))), "faults": faults or {}, "result": str(self.result)}
        self.proc = Run.ctx.Process(target=child, args=(job,))
        self.proc.start()

    def wait(self) -> Run:
        self.proc.join()
        return self

    @property
    def code(self) -> int | None:
        return self.proc.exitcode

    def text(self, i: int = -1) -> str:
        return self.logs[i].read_text() if self.logs[i].exists() else ""

    def last_line(self) -> str:
        lines = self.text().strip().splitlines()
        return lines[-1] if lines else ""

    def outcome(self) -> dict:
        return json.loads(self.result.read_text()) if self.result.exists() else {"codes": [self.code], "network": []}

    def tracebacks(self) -> int:
        bad_codes = sum(c not in (0, 1, 2) for c in self.outcome()["codes"])
        return bad_codes + sum("Traceback" in self.text(i) for i in range(len(self.logs)))


# ---- what a run leaves ----------------------------------------------------------------------------------------


def tensors(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict | list | tuple):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders anywhere in `out` (checkpoint writes, export folders)."""
    found = [p for p in out.rglob(".*") if ".tmp" in p.name or p.name.startswith(".encoder.")]
    return sorted(str(p.relative_to(out)) for p in found)


def newest_state(out: Path) -> str:
    """The newest checkpoint: 'step N, loads, finite', 'none yet', or what is wrong with it."""
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        return "prev.pt without last.pt" if last.with_name("prev.pt").exists() else "none yet"
    try:
        state = load_checkpoint(last)
    except Exception as e:  # noqa: BLE001
        return f"unreadable: {str(e)[:80]}"
    bad = [k for k, t in tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()]
    return f"non-finite {bad[:2]}" if bad else f"step {state['run']['step']}, loads, finite"


def same_as(ref: Path, out: Path) -> tuple[bool, str]:
    """Every tensor of the final checkpoint and of the export, and metrics.jsonl, equal to `ref`'s; no duplicate
    line, no temporary file, no lock."""
    from safetensors.torch import load_file

    a, b = (torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (ref, out))
    ta, tb = dict(tensors(a)), dict(tensors(b))
    diff = sorted(set(ta) ^ set(tb)) + [k for k in ta if k in tb and not torch.equal(ta[k], tb[k])]
    ea, eb = (load_file(str(p / "encoder" / "model.safetensors")) for p in (ref, out))
    ediff = sorted(set(ea) ^ set(eb)) + [k for k in ea if k in eb and not torch.equal(ea[k], eb[k])]
    ma, mb = metrics(ref), metrics(out)
    dup = len(mb) - len({json.dumps(r, sort_keys=True) for r in mb})
    left = leftovers(out) + [".mimkit.lock"] * (out / ".mimkit.lock").exists()
    ok = not (diff or ediff or dup or left) and ma == mb and a["run"] == b["run"] and b["finished"]
    detail = (f"{len(ta) - len(diff)}/{len(ta)} checkpoint and {len(ea) - len(ediff)}/{len(ea)} export tensors "
              f"equal, metrics {'equal' if ma == mb else 'DIFFER'} ({len(mb)} lines, {dup} duplicate)")  # fmt: skip
    return ok, detail + (f", left behind: {left}" if left else "") + (f", differ: {diff[:3]}" if diff else "")


def tensorboard_points(out: Path) -> str:
    """Loss points in the run's TensorBoard files and the steps they cover (a point per step when none repeats)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for f in sorted((out / "tensorboard").glob("events*")):
        (acc := EventAccumulator(str(f))).Reload()
        steps += [e.step for e in acc.Scalars("loss")] if "loss" in acc.Tags()["scalars"] else []
    return f"TensorBoard: {len(steps)} loss points for {len(set(steps))} steps"


def ends_like(ref: Path, out: Path, run: Run) -> tuple[bool, str]:
    return same_as(ref, out) if run.code == 0 else (False, f"exit {run.code}: {run.last_line()[:150]!r}")


# ---- cases ----------------------------------------------------------------------------------------------------


class Campaign:
    def __init__(self, work: Path, rng: random.Random):
        self.work, self.rng, self.lines = work, rng, []
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, *commands: list[str], faults: dict | None = None) -> Run:
        return Run(self.work / "logs", *commands, faults=faults)

    def run(self, *commands: list[str], faults: dict | None = None) -> Run:
        return self.start(*commands, faults=faults).wait()

    def add(self, ok: bool, name: str, detail: str) -> None:
        self.lines.append((ok, name))
        print(f"{'ok  ' if ok else 'FAIL'}  {name:<36} {detail}", flush=True)

    def reference(self, method: str = "mae") -> Path:
        """The uninterrupted run (made once) every recovered run must end equal to."""
        ref = self.work / f"{method}-ref"
        if not (ref / "summary.json").exists():
            r = self.run(pretrain_argv(ref, method))
            assert r.code == 0, f"the reference run of {method} failed: {r.text()[-500:]}"
        return ref

    def copy_of_reference(self, name: str) -> Path:
        shutil.copytree(self.reference(), self.work / name)
        return self.work / name

    def kill_moment(self, run: Run, out: Path) -> str | None:
        """Block until a random moment of a random kind; None when the run ended first."""
        kind, rng, t0 = self.rng.choices(["write", "step", "start"], weights=[5, 3, 2])[0], self.rng, time.time()
        if kind == "start":
            delay = rng.uniform(0.05, 1.5)
            while time.time() - t0 < delay and run.proc.is_alive():
                time.sleep(0.005)
            return f"start+{delay:.2f}s" if run.proc.is_alive() else None
        if kind == "step":
            k, n0, delay = rng.randint(1, 3), len(metrics(out)), rng.uniform(0, 0.3)
            while run.proc.is_alive() and len(metrics(out)) < n0 + k:
                time.sleep(0.01)
            time.sleep(delay)
            return f"line {n0 + k}+{delay:.2f}s" if run.proc.is_alive() else None
        k, seen, ckpt = rng.randint(1, 3), set(), out / "checkpoints"
        while run.proc.is_alive() and len(seen) < k:
            if ckpt.is_dir():
                seen |= {n for n in os.listdir(ckpt) if n.startswith(".last.pt.") and n.endswith(".tmp")}
            time.sleep(0.0002)
        return f"write #{k}" if run.proc.is_alive() else None

    def kill(self, kills: int) -> None:
        for method in METHODS:
            ref, out, in_write = self.reference(method), self.work / f"{method}-killed", 0
            for i in range(kills):
                run = self.start(pretrain_argv(out, method))
                moment = self.kill_moment(run, out)
                if moment is None:
                    self.add(run.wait().code == 0, f"kill {method} #{i + 1}", "the run finished first: no kill")
                    break
                os.kill(run.proc.pid, signal.SIGKILL)
                run.wait()
                temp = list((out / "checkpoints").glob(".*.tmp")) if (out / "checkpoints").is_dir() else []
                in_write += bool(temp)
                newest = newest_state(out)
                ok = newest.endswith("finite") or newest == "none yet"
                self.add(ok, f"kill {method} #{i + 1} at {moment}", f"newest: {newest}; temp file left: {bool(temp)}")
            ok, detail = ends_like(ref, out, self.run(pretrain_argv(out, method)))
            detail += f"; {in_write} kills inside a checkpoint write; {tensorboard_points(out)} (not judged)"
            self.add(ok, f"resume {method} after the kills", detail)

    def disk(self) -> None:
        for at, code in ((1, errno.ENOSPC), (5, errno.ENOSPC), (5, errno.EDQUOT)):
            out, snap = self.work / f"full-{at}-{code}", self.work / f"full-{at}-{code}-before"
            fault = {"at": at, "code": code, "folder": str(out / "checkpoints"), "snapshot": str(snap)}
            r, ckpt = self.run(pretrain_argv(out), faults={"checkpoint_full_at": fault}), out / "checkpoints"
            kept = sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in snap.glob("*.pt"))
            kept = kept and all((ckpt / p.name).read_bytes() == p.read_bytes() for p in snap.glob("*.pt"))
            named = f"'{ckpt}'" in r.last_line() and ("MiB" in r.last_line() or "bytes" in r.last_line())
            ok, detail = ends_like(self.reference(), out, self.run(pretrain_argv(out)))
            detail = f"exit {r.code}, folder and size named: {named}, checkpoints as before: {kept}; re-run: {detail}"
            ok = ok and r.code == 2 and named and kept and not r.tracebacks()
            self.add(ok, f"{errno.errorcode[code]} at checkpoint {at}", detail)
        out = self.work / "full-export"
        r = self.run(pretrain_argv(out), faults={"export_full": True})
        said, left = r.last_line(), leftovers(out)
        ok, detail = ends_like(self.reference(), out, self.run(pretrain_argv(out)))
        ok = ok and r.code == 2 and f"'{out}" in said and not r.tracebacks() and not left
        self.add(ok, "ENOSPC writing the export", f"exit {r.code}: {said[:120]!r}; left: {left}; re-run: {detail}")

    def checkpoints(self) -> None:
        from test_untrusted_exports import MakesAFile

        def nan_weight(path: Path) -> None:
            state = torch.load(path, weights_only=True)
            next(iter(state["model"].values())).view(-1)[0] = float("nan")
            torch.save(state, path)

        def pickle_payload(path: Path) -> None:
            MakesAFile.marker = path.parent.parent / "pickle-ran"
            path.write_bytes(pickle.dumps({"model": MakesAFile(), "config": {}}))

        damage = {
            "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            "zeroed": lambda p: p.write_bytes(bytes(p.stat().st_size)),
            "random bytes": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
            "pickle payload": pickle_payload,
            "a NaN weight": nan_weight,
        }
        for name, hurt in damage.items():
            out = self.copy_of_reference(f"damaged-{name.replace(' ', '-')}")
            last, prev = out / "checkpoints" / "last.pt", out / "checkpoints" / "prev.pt"
            hurt(last)
            r = self.run(pretrain_argv(out))
            warned = "warning:" in r.text() and f"'{last}'" in r.text() and f"'{prev}'" in r.text()
            ok, detail = ends_like(self.reference(), out, r)
            ran = (out / "pickle-ran").exists()
            detail = f"warning naming both files: {warned}; payload run: {ran}; {detail}"
            self.add(ok and warned and not ran and not r.tracebacks(), f"last.pt damaged: {name}", detail)
        for name, files in (("last.pt damaged, no prev.pt", ["last.pt"]), ("both damaged", ["last.pt", "prev.pt"])):
            out = self.copy_of_reference(f"damaged-{len(files)}")
            if len(files) == 1:
                (out / "checkpoints" / "prev.pt").unlink()
            for f in files:
                damage["truncated"](out / "checkpoints" / f)
            r = self.run(pretrain_argv(out))
            named = all(f"'{out / 'checkpoints' / f}'" in r.last_line() for f in files) and r.text().count("\n") == 1
            detail = f"exit {r.code}, one line naming {' and '.join(files)}: {named}: {r.last_line()[:150]!r}"
            self.add(r.code == 2 and named and not r.tracebacks(), name, detail)

    def concurrent(self) -> None:
        out = self.work / "busy"
        first = self.start(pretrain_argv(out))
        while first.proc.is_alive() and not (out / "metrics.jsonl").exists():
            time.sleep(0.01)
        os.kill(first.proc.pid, signal.SIGSTOP)  # alive and holding the lock for as long as the second one tries
        second = self.run(pretrain_argv(out))
        os.kill(first.proc.pid, signal.SIGCONT)
        named = f"pid {first.proc.pid}" in second.last_line()
        ok, detail = ends_like(self.reference(), out, first.wait())
        detail = f"second: exit {second.code}, names the holder: {named}; first: {detail}"
        self.add(second.code == 2 and named and ok, "second run while the first trains", detail)
        out = self.work / "together"
        runs = [self.start(pretrain_argv(out)) for _ in range(2)]
        codes = sorted(r.wait().code for r in runs)
        ok, detail = same_as(self.reference(), out) if codes == [0, 2] else (False, "")
        self.add(ok, "two runs started together", f"exits {codes}; the one that ran: {detail}")

    def data(self) -> None:
        for percent, workers in ((1, 2), (5, 0)):
            folder = self.work / f"data-{percent}pct"
            bad = random.Random(percent).sample(write_images(folder, 400, fmt="jpg", seed=percent), 4 * percent)
            for p in bad:
                p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 5])
            out, names = self.work / f"run-{percent}pct", {p.name for p in bad}
            argv = ["pretrain", "--data", str(folder), "--out", str(out), "--epochs", "1", *TINY]
            r = self.run([*argv, "eval.final_knn=false", f"data.num_workers={workers}"])
            listed = (out / "bad_files.txt").read_text().splitlines() if (out / "bad_files.txt").exists() else []
            listed = {Path(s.split("\t")[-1]).name for s in listed}
            if percent == 1:
                ok = r.code == 0 and listed == names and f"skipped {len(bad)} unreadable" in r.text()
                detail = f"exit {r.code}; bad_files.txt lists {len(listed & names)}/{len(bad)} truncated files"
                detail += f" and {len(listed - names)} others" if listed - names else ""
            else:
                quoted = {n for n in names if n in r.last_line()}
                ok = r.code == 2 and bool(quoted) and "bad_file_limit" in r.last_line()
                detail = f"exit {r.code}; names {len(quoted)} of the truncated files: {r.last_line()[:110]!r}"
            self.add(ok and not r.tracebacks(), f"{percent}% truncated JPEGs, {workers} workers", detail)

    def exports(self) -> None:
        from test_untrusted_exports import CASES, set_arch

        labeled, tiny = self.work / "labeled", ["train.batch_size=8", "data.num_workers=0", "data.image_size=16"]
        for split, n in (("train", 24), ("val", 8)):
            for c, cls in enumerate(("a", "b")):
                write_images(labeled / split / cls, n, seed=c * 100 + (split == "val"))
        totals = [0, 0, 0]
        for case, breaks, file, key in [("untouched", lambda f: None, None, None), *CASES]:
            folder = self.work / "exports" / case / "export"
            shutil.copytree(self.reference() / "encoder", folder)
            breaks(folder)
            r = self.run(
                ["eval", "knn", "--checkpoint", str(folder), "--data", str(labeled)],
                ["finetune", "--checkpoint", str(folder), "--data", str(labeled), "--out", str(folder.parent / "ft"),
                 "--epochs", "1", *tiny],
                ["segment", "--checkpoint", str(folder), "--data", "demo", "--out", str(folder.parent / "seg"),
                 "--epochs", "1", "--max-images", "16", *tiny],
                faults={"block_network": True},
            )  # fmt: skip
            codes, net, tb = r.outcome()["codes"], len(r.outcome()["network"]), r.tracebacks()
            ran = (folder.parent / "pickle-ran").exists()
            named = file is None or all(f"'{folder / file}'" in r.text(i) and key in r.text(i) for i in range(3))
            ok = codes == ([0, 0, 0] if file is None else [2, 2, 2]) and named and not (net or tb or ran)
            totals = [totals[0] + net, totals[1] + tb, totals[2] + ran]
            detail = f"eval/finetune/segment exit {codes}, file and key named: {named}; network {net}, tracebacks {tb}"
            self.add(ok, f"export {case}", f"{detail}, payload run {ran}")
        print(f"      crafted exports: {totals[0]} network attempts, {totals[1]} tracebacks, {totals[2]} payloads run")
        folder = self.work / "exports" / "allowed" / "export"  # the counters do see an attempt when there is one
        shutil.copytree(self.reference() / "encoder", folder)
        set_arch("hf-hub:someone/model")(folder)
        argv = ["eval", "knn", "--checkpoint", str(folder), "--data", str(labeled), "--allow-download"]
        r = self.run(argv, faults={"block_network": True})
        net = r.outcome()["network"]
        detail = f"network attempts counted: {net[:2]}; exit {r.code}, tracebacks {r.tracebacks()}"
        self.add(bool(net), "control: --allow-download hf-hub:", f"{detail}: {r.last_line()[:80]!r}")

    def input(self) -> None:
        afile = self.work / "a-file"
        afile.write_text("mine")
        for extra in [*BAD_INPUTS, ("--out", str(afile))]:
            key, value = (FLAG_KEYS.get(extra[0], str(afile)), extra[1]) if len(extra) == 2 else extra[0].split("=")
            out = self.work / "bad-input"
            r = self.run(pretrain_argv(None if "--out" in extra else out, "mae", *extra))
            said = r.last_line()
            named = r.text().count("\n") == 1 and value in (said if key == value else said.split(key, 1)[-1])
            wrote = out.exists() or afile.read_text() != "mine"
            ok, detail = r.code == 2 and named and not wrote and not r.tracebacks(), f"exit {r.code}, wrote: {wrote}"
            self.add(ok, f"bad input {' '.join(extra)[-28:]}", f"{detail}, says: {said[:110]!r}")
            shutil.rmtree(out, ignore_errors=True)


SECTIONS = ["kill", "disk", "checkpoints", "concurrent", "data", "exports", "input"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs per method")
    ap.add_argument("--quick", action="store_true", help="3 SIGKILLs per method")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", help="working folder, kept (default: a temporary one, removed)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    args = ap.parse_args()
    kills = 3 if args.quick else args.kills
    work = Path(args.work or tempfile.mkdtemp(prefix="mimkit-faults-"))
    campaign, t0 = Campaign(work, random.Random(args.seed)), time.time()
    print(f"mimkit fault campaign: {kills} kills per method, seed {args.seed}, work '{work}'", flush=True)
    for section in args.only.split(","):
        getattr(campaign, section)(kills) if section == "kill" else getattr(campaign, section)()
    failed = [name for ok, name in campaign.lines if not ok]
    print(f"total: {len(campaign.lines)} cases, {len(campaign.lines) - len(failed)} ok, {len(failed)} failed "
          f"({(time.time() - t0) / 60:.1f} min)" + "".join(f"\n  failed: {n}" for n in failed), flush=True)  # fmt: skip
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

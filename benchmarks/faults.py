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
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts: every run alike

import torch  # noqa: E402
from fault_inject import IssueCases  # noqa: E402
from fault_runs import Run, ends_like, leftovers, metrics, newest_state, same_as, tensorboard_points  # noqa: E402
from helpers import TINY, write_images  # noqa: E402

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
              ("optim.clip_grad=nan",), ("data.crop_scale=[-1,2]",), ("data.crop_ratio=[0,0]",),
              ("mae.decoder_heads=5",), ("model.num_heads=3",), ("mae.decoder_dim=34",), ("model.embed_dim=98",),
              ("model.num_heads=null", "model.embed_dim=100")]  # fmt: skip
FLAG_KEYS = {"--batch-size": "train.batch_size", "--image-size": "data.image_size"}


def pretrain_argv(out: Path | None, method: str = "mae", *extra: str) -> list[str]:
    """The campaign's pre-training command; flags in `extra` go before the dotted overrides (one argparse list)."""
    flags = [a for i, a in enumerate(extra) if a.startswith("--") or (i and extra[i - 1].startswith("--"))]
    where = ["--out", str(out)] if out is not None else []
    rest = [a for a in extra if a not in flags]
    return ["pretrain", "--method", method, *where, *FLAGS, *flags, *COMMON, *METHODS[method], *rest]


# ---- cases ----------------------------------------------------------------------------------------------------


class Campaign(IssueCases):
    argv = staticmethod(pretrain_argv)

    def __init__(self, work: Path, rng: random.Random):
        self.work, self.rng, self.lines, self.skipped = work, rng, [], []
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
            flag = extra[0].startswith("--")
            key, value = (FLAG_KEYS.get(extra[0], str(afile)), extra[1]) if flag else extra[-1].split("=")
            out = self.work / "bad-input"
            r = self.run(pretrain_argv(None if "--out" in extra else out, "mae", *extra))
            said = r.last_line()
            named = r.text().count("\n") == 1 and value in (said if key == value else said.split(key, 1)[-1])
            wrote = out.exists() or afile.read_text() != "mine"
            ok, detail = r.code == 2 and named and not wrote and not r.tracebacks(), f"exit {r.code}, wrote: {wrote}"
            self.add(ok, f"bad input {' '.join(extra)[-28:]}", f"{detail}, says: {said[:110]!r}")
            shutil.rmtree(out, ignore_errors=True)


SECTIONS = ["kill", "disk", "checkpoints", "concurrent", "data", "exports", "input", "fulldisk", "inject", "eio",
            "unlink", "failing", "lock", "guards"]  # fmt: skip


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
    print(f"total: {len(campaign.lines)} cases, {len(campaign.lines) - len(failed)} ok, {len(failed)} failed, "
          f"{len(campaign.skipped)} skipped ({(time.time() - t0) / 60:.1f} min)" +
          "".join(f"\n  failed: {n}" for n in failed), flush=True)  # fmt: skip
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

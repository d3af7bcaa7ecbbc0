"""The CPU ladder (docs/results.md): every method on CIFAR-10 at 16 px under two budgets, equal wall-clock and
equal epochs, over several seeds, each beside its own step-0 encoder and the plain random-init encoder.

    python benchmarks/ladder.py --data ../shared/data/cifar10 --out runs/ladder > ladder.log 2>&1

It is `mimkit compare` twice (`--budget WALL` into OUT/wall, `--budget Nep` into OUT/epochs, the latter with the
k-NN monitor after every epoch for the learning curves), grown one seed at a time (both budgets at 2 seeds, then
both at 3, ...) so that a run cut short still has both tables. The step-0 and scratch evaluations and the VQ
tokenizer do not depend on the budget: the equal-epoch run reuses the wall-clock run's. Re-running the same
command skips everything finished (compare's own resume). OUT/ladder.md gathers both reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHARED = ("step0", "scratch", "tokenizer")  # what both budgets share: built before any step, or budget-free


def compare(args, budget: str, out: Path, seeds: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "mimkit.cli", "compare", "--methods", args.methods, "--config", args.config,
           "--data", args.data, "--out", str(out), "--budget", budget, "--seeds", str(seeds), "--evals", args.evals,
           "--max-images", str(args.max_images), f"eval.max_eval_images={args.eval_images}", *extra]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def share(src: Path, dst: Path) -> None:
    """Copy what the wall-clock run finished and the equal-epoch run can reuse (never over existing files)."""
    for name in SHARED:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True, copy_function=copy_missing)


def copy_missing(src: str, dst: str) -> None:
    if not Path(dst).exists():
        shutil.copy2(src, dst)


NAMES = {"mae": "MAE", "cmae-mao": "CMAE (Mao)", "cmae-huang": "CMAE (Huang)", "conmim": "ConMIM",
         "mocov3": "MoCo v3", "dino": "DINO", "simmim": "SimMIM", "beit": "BEiT", "cim-respix": "CIM ResPix",
         "cim-revdet": "CIM RevDet"}  # fmt: skip


def both_budgets_table(wall: dict, epochs: dict) -> list[str]:
    """One row per method from the two compare reports (report.json): top-1 mean ± sd and the paired gain over
    the method's own step-0 encoder at each budget, then the step-0 row (budget-free)."""
    from mimkit.engine.drivers.compare_report import cell, gain_cell

    def top1(row: dict, key: str) -> str:
        return cell(row, key, digits=3)  # '-' for an evaluation the run did not make (--evals)

    def gained(row: dict, start: dict, key: str) -> str:
        if key not in row or key not in start:
            return "-"
        text, clear = gain_cell(row, start, key)
        return text + (" **clear**" if clear else "")

    ep = epochs["budget"].removesuffix("ep")
    lines = ["| method | wall: epochs | wall k-NN | wall linear | k-NN gain | linear gain | "
             f"{ep} ep k-NN | {ep} ep linear | k-NN gain | linear gain | step 0 k-NN | step 0 linear |",
             "|---" * 12 + "|"]  # fmt: skip
    for name, w in wall["methods"].items():
        if name not in epochs["methods"]:
            continue
        e, start = epochs["methods"][name], wall["step0"][name]  # step 0 is budget-free: one row for both
        cells = [NAMES.get(name, name), str(w["epochs"])]
        for row, step0 in ((w, wall["step0"][name]), (e, epochs["step0"][name])):
            cells += [top1(row, "knn"), top1(row, "linear"), gained(row, step0, "knn"), gained(row, step0, "linear")]
        lines.append("| " + " | ".join(cells + [top1(start, "knn"), top1(start, "linear")]) + " |")
    s = wall["scratch"]
    lines.append(f"| random init (plain timm) | - | {top1(s, 'knn')} | {top1(s, 'linear')} |" + " |" * 8)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="CIFAR-10 as train/<class>/ + test/<class>/ (not needed with --table)")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="all")
    p.add_argument("--config", default="cifar10-ladder16")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--wall", default="40s", help="the equal wall-clock budget per method")
    p.add_argument("--epochs", type=int, default=2, help="the equal-epoch budget per method")
    p.add_argument("--max-images", type=int, default=10000, help="training images (a seeded subset per seed)")
    p.add_argument("--eval-images", type=int, default=10000, help="held-out queries (CIFAR-10 has 10,000)")
    p.add_argument("--evals", default="knn,linear")
    p.add_argument("--table", action="store_true", help="only print the two budgets' table from OUT's reports")
    args = p.parse_args()
    if not args.table and not args.data:
        p.error("--data is required (except with --table)")
    out = Path(args.out)
    wall, epochs = out / "wall", out / "epochs"
    for seeds in range(min(2, args.seeds), args.seeds + 1) if not args.table else ():
        compare(args, args.wall, wall, seeds, [])
        epochs.mkdir(parents=True, exist_ok=True)
        share(wall, epochs)
        compare(args, f"{args.epochs}ep", epochs, seeds, ["eval.knn_every=1"])
    reports = [json.loads((folder / "report.json").read_text()) for folder in (wall, epochs)]
    table = both_budgets_table(*reports)
    if args.table:
        print("\n".join(table))
        return
    parts = [f"# CPU ladder: {args.wall} and {args.epochs} epochs per method, {args.seeds} seed(s)", "", *table, ""]
    for name, folder in (("Equal wall-clock", wall), ("Equal epochs", epochs)):
        report = (folder / "report.md").read_text().split("\n", 1)[1]
        parts += [f"## {name} ({folder.name}/report.md, picture {folder.name}/report.png)", report]
    (out / "ladder.md").write_text("\n".join(parts))
    print(f"wrote {out / 'ladder.md'}")


if __name__ == "__main__":
    main()

"""Pre-training speed through the whole training loop, this tree against another commit, interleaved.

Each round runs the same `mimkit pretrain` command (the demo digits, MAE, a ViT 4x128 at 16 px, fixed steps) once
with each tree, alternating which goes first, in fresh processes; the rate is the median images/s of the logged
windows after the first (start-up excluded). On a shared, noisy machine only the ratio means anything.

    git worktree add /tmp/mimkit-old 342af5f
    python benchmarks/loop_overhead.py --other /tmp/mimkit-old --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMMAND = ["pretrain", "--data", "demo", "--max-images", "1280", "--epochs", "1", "--batch-size", "64",
           "train.log_every=4", "eval.final_knn=false", "data.num_workers=0"]  # fmt: skip


def rate(tree: Path, out: Path, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "mimkit.cli", *COMMAND, "--out", str(out)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in rows if "img_per_s" in r and "loss" in r][1:]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="the other tree (e.g. a git worktree of the previous commit)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    trees = {"this": HERE, "other": Path(args.other).resolve()}
    results: dict[str, list[float]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                results[name].append(rate(trees[name], Path(tmp) / f"{name}-{r}", args.threads))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["this"] / med["other"]
    print(f"median img/s: this {med['this']:.1f}, other {med['other']:.1f}; ratio this/other {ratio:.3f}")
    print(json.dumps({"rounds": args.rounds, "threads": args.threads, **{k: v for k, v in results.items()}}))


if __name__ == "__main__":
    main()

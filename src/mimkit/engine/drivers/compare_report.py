"""`mimkit compare`'s report: report.json (everything, per seed), report.md (the tables) and report.png (top-1
per method beside its step-0 encoder, the pre-training losses, and the k-NN curve over pre-training when the runs
monitored it)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ...atomic import replace_text
from ..tasks.pretrain import data_name
from ..trainer.logging import say


def write_report(out: Path, results: dict, evals: list[str]) -> None:
    replace_text(out / "report.json", json.dumps(results, indent=2) + "\n")
    seeds = results.get("seeds", [0])
    head = "| method | epochs | pre-train s | eval s | " + " | ".join(evals) + " |"
    lines = [f"# mimkit compare: {data_name(results['data'])}, {results['model']}, budget {results['budget']}", "",
             *budget_lines(results), *seed_lines(seeds), "", head, "|" + "---|" * (4 + len(evals))]  # fmt: skip
    rows = results["methods"]
    for name, r in rows.items():
        lines.append(table_row(name, r["epochs"], r.get("pretrain_seconds") or "-", r, evals))
        if name in results.get("step0", {}):
            lines.append(table_row(f"{name} at step 0", 0, "-", results["step0"][name], evals))
    if "tokenizer" in results:
        t = results["tokenizer"]
        lines.append(f"| (VQ tokenizer for BEiT/CIM) | {t['epochs']} | {t['seconds']} | - |" + " - |" * len(evals))
    lines.append(table_row("random init (scratch)", "-", "-", results["scratch"], evals))
    lines += [
        "",
        "k-NN and linear: top-1 of frozen features; finetune: top-1 after the last fine-tuning epoch, the",
        "identical recipe for every row. `<method> at step 0`: that method's own encoder as its run builds it (same",
        "initialisation, LayerScale and position scheme, same seed), before any step; `random init (scratch)`: a",
        "plain timm encoder of the shared architecture at random init.",
        *(
            ["Under a wall-clock budget, BEiT and CIM pre-train for the budget minus the tokenizer's seconds."]
            if "tokenizer" in results and results.get("budget_kind") == "seconds"
            else []
        ),  # fmt: skip
        *[f"{name}: {r['note']}" for name, r in rows.items() if r.get("note")],
    ]
    if results.get("step0"):
        lines += ["", *gain_table(results, evals)]
    replace_text(out / "report.md", "\n".join(lines) + "\n")
    plot_report(out, results, evals)
    say(f"report written to '{out / 'report.md'}', '{out / 'report.json'}' and '{out / 'report.png'}'")


def cell(row: dict, key: str, digits: int = 4) -> str:
    """'0.4370', or '0.4370 ± 0.0040' over several seeds (sample standard deviation), or '-'."""
    if key not in row:
        return "-"
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def table_row(name: str, epochs, pretrain_s, row: dict, evals: list[str]) -> str:
    cells = " | ".join(cell(row, e) for e in evals)
    return f"| {name} | {epochs} | {pretrain_s} | {row.get('eval_seconds', '-')} | {cells} |"


def seed_lines(seeds: list[int]) -> list[str]:
    if len(seeds) == 1:
        return [f"One seed (train.seed={seeds[0]}): no spread; `--seeds N` gives mean ± standard deviation per cell."]
    return [f"{len(seeds)} seeds (train.seed = {', '.join(map(str, seeds))}: initialisation, data order, masks and, "
            "with data.max_images, the image subset); cells are mean ± sample standard deviation."]  # fmt: skip


def per_seed(row: dict, key: str) -> list[float]:
    return [r[key] for r in row.get("seeds", [row]) if key in r]


def gain(trained: dict, start: dict, key: str) -> tuple[float, float | None, bool | None]:
    """What pre-training added to the step-0 encoder, paired by seed -> (mean gain, its sample sd or None,
    whether the mean gain exceeds twice the larger of the two rows' spreads; None with one seed)."""
    a, b = per_seed(trained, key), per_seed(start, key)
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    spread = max(statistics.stdev(a), statistics.stdev(b))
    return mean, statistics.stdev(diffs), mean > 2 * spread


def gain_cell(trained: dict, start: dict, key: str) -> tuple[str, bool | None]:
    """'+1.5' or '+1.5 ± 0.7' (top-1 points, `gain`), and whether the gain is clear (None with one seed)."""
    mean, sd, clear = gain(trained, start, key)
    return f"{100 * mean:+.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else ""), clear


def gain_table(results: dict, evals: list[str]) -> list[str]:
    """Gain over each method's own step-0 encoder, per evaluation: mean (± sd) over seeds, paired by seed; with
    several seeds, 'yes' when the mean gain is more than twice the larger spread of the two rows."""
    many = len(results.get("seeds", [0])) > 1
    lines = ["Gain over the method's own step-0 encoder (top-1 points; paired by seed" +
             ("; clear: mean gain > 2 x the larger spread of the two rows)" if many else ")"), "",
             "| method | " + " | ".join(f"{e} gain" + (" | clear" if many else "") for e in evals) + " |",
             "|---|" + "---|" * (len(evals) * (2 if many else 1))]  # fmt: skip
    for name, row in results["methods"].items():
        cells = []
        for e in evals:
            if e not in row or e not in results["step0"][name]:
                cells += ["-"] + (["-"] if many else [])
                continue
            text, clear = gain_cell(row, results["step0"][name], e)
            cells.append(text)
            if many:
                cells.append("yes" if clear else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def budget_lines(results: dict) -> list[str]:
    """What the budget covered and what it did not: pre-training (and the tokenizer) is inside it, every
    evaluation outside; under a wall-clock budget the command also times a few steps per method to size its
    epochs."""
    runs = [*results["methods"].values(), results["scratch"], *results.get("step0", {}).values()]
    pretrain_s = sum(r.get("pretrain_seconds") or 0 for r in runs) + results.get("tokenizer", {}).get("seconds", 0)
    eval_s = sum(r.get("eval_seconds", 0) for r in runs)
    per = ": means over seeds" if len(results.get("seeds", [0])) > 1 else ""
    timed = " plus the few steps timed per method to size its epochs" if results.get("budget_kind") == "seconds" else ""
    return [
        f"Budget: {results['budget']} of pre-training per method (BEiT and CIM: their tokenizer's included); "
        f"{pretrain_s:.0f} s of pre-training in all (`pre-train s`{per}; the k-NN monitor's time, with "
        "eval.knn_every, is inside it).",
        f"Evaluation (k-NN, linear probe, fine-tuning) is outside the budget: {eval_s:.0f} s in all (`eval s`); "
        f"the command's wall time is both{timed}.",
    ]


def plot_title(results: dict) -> str:
    """The data's name, not its path: a picture is shared beyond the machine it was made on."""
    return f"{data_name(results['data'])}, {results['model']} - budget {results['budget']}"


def run_dirs(out: Path, name: str, seeds: list[int]) -> list[Path]:
    return [out / name] if len(seeds) == 1 else [out / name / f"seed{s}" for s in seeds]


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x] if f.is_file() else []


def knn_curve(out: Path, name: str, results: dict) -> list[tuple[float, float]]:
    """(fraction of pre-training, k-NN top-1 mean over seeds) from the runs' k-NN monitor (eval.knn_every), with
    the step-0 encoder's k-NN at 0."""
    seeds, epochs = results.get("seeds", [0]), results["methods"][name]["epochs"]
    by_epoch: dict[int, list[float]] = {}
    for run_dir in run_dirs(out, name, seeds):
        for rec in read_metrics(run_dir):
            if "knn_top1" in rec:
                by_epoch.setdefault(rec["epoch"], []).append(rec["knn_top1"])
    if not by_epoch:
        return []
    points = [(e / epochs, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]
    start = results.get("step0", {}).get(name, {})
    return ([(0.0, start["knn"])] if "knn" in start else []) + points


def plot_report(out: Path, results: dict, evals: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*results["methods"], "scratch"]
    rows = [*results["methods"].values(), results["scratch"]]
    starts = [results.get("step0", {}).get(n, {}) for n in names]
    fig, (ax_acc, ax_loss, ax_knn) = plt.subplots(1, 3, figsize=(18, 4.8))
    width = 0.8 / max(len(evals), 1)
    for j, e in enumerate(evals):
        xs = [i + (j - (len(evals) - 1) / 2) * width for i in range(len(names))]
        ax_acc.bar(xs, [r.get(e, 0.0) for r in rows], width, yerr=[r.get(f"{e}_sd", 0.0) for r in rows], label=e)
        marks = [(x, s[e]) for x, s in zip(xs, starts) if e in s]
        if marks:
            ax_acc.scatter(*zip(*marks), marker="_", s=120, color="k", zorder=3,
                           label="step 0 (same encoder)" if j == 0 else None)  # fmt: skip
    ax_acc.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_acc.set_ylabel("top-1")
    ax_acc.set_title(plot_title(results), fontsize=8)
    ax_acc.legend(fontsize=8)
    seeds = results.get("seeds", [0])
    for name in results["methods"]:
        pts = [(p["step"], p["loss"]) for p in read_metrics(run_dirs(out, name, seeds)[0]) if "loss" in p]
        if pts:
            first, last_step = pts[0][1] or 1.0, pts[-1][0]
            ax_loss.plot([s / last_step for s, _ in pts], [v / first for _, v in pts], "o-", ms=3, label=name)
    ax_loss.set_xlabel("fraction of pre-training")
    ax_loss.set_ylabel("loss / first logged loss")
    ax_loss.set_title("pre-training loss (each method's own objective; first seed)")
    ax_loss.legend(fontsize=8)
    curves = {name: knn_curve(out, name, results) for name in results["methods"]}
    for name, pts in curves.items():
        if pts:
            ax_knn.plot(*zip(*pts), "o-", ms=3, label=name)
    if "knn" in results["scratch"]:
        ax_knn.axhline(results["scratch"]["knn"], color="k", ls=":", lw=1, label="random init (scratch)")
    ax_knn.set_xlabel("fraction of pre-training (0: the step-0 encoder)")
    ax_knn.set_ylabel("k-NN top-1 (monitor; mean over seeds)")
    ax_knn.set_title("k-NN over pre-training" if any(curves.values()) else "no k-NN curve (eval.knn_every=0)")
    ax_knn.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)

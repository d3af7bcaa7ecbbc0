"""`mimkit compare`: every method pre-trained under one encoder, data and budget, then evaluated the same way.

Layout of `--out`: `<method>/` is each method's pre-training run (the engine resumes it), `<method>/evals.json`
its evaluations (each one stored as soon as it is done), `<method>/finetune/` its fine-tuning run, `scratch/`
the random-init baseline (k-NN, linear probe, the identical fine-tuning recipe), `tokenizer/` the VQ tokenizer
that BEiT and CIM need when none is given. A re-run skips everything already finished.

Budgets: `Nep` gives every method N epochs. A wall-clock budget (`30s`, `10min`, `1h`) is turned into epochs per
method by timing a few of its training steps first, so every run completes its learning-rate schedule rather
than being cut off mid-way; the time each method actually took is reported next to its accuracy.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data import labeled_splits, load_splits
from ..eval import FeatureEval
from ..methods import METHODS, RENAMED, method_class
from ..models.vit import resolve_patch_size
from ..run_config import build_config, names_model, say_first, small_image_patch
from ..runtime import is_vit, resolve_device
from .downstream import build_model, encoder_spec
from .finetune import finetune
from .fit import fit_workers, fitted_batch
from .logging import say
from .loop import Runtime, seconds_per_step
from .pretrain import PretrainTask, data_name, pretrain
from .run import load_encoder
from .tokenizer import TokenizerTask, train_tokenizer

EVALS = ("knn", "linear", "finetune")


def parse_budget(text: str) -> tuple[str, float]:
    """'3ep' -> ('epochs', 3); '90s' / '10min' / '1.5h' -> ('seconds', ...)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ep|epochs?|s|sec|min|m|h)\s*", text)
    if not m:
        raise ConfigError(f"--budget '{text}' is not a number of epochs (e.g. 2ep) or a duration (90s, 10min, 1h)")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise ConfigError(f"--budget '{text}' must be positive")
    if unit.startswith("ep"):
        if value != int(value):
            raise ConfigError(f"--budget '{text}': epochs must be a whole number")
        return "epochs", int(value)
    return "seconds", value * {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[unit]


def method_list(text: str) -> list[str]:
    """--methods 'all' or 'a,b,...' -> registry names; a renamed method (cmae) becomes its new name, with its notice."""
    names = list(METHODS) if text == "all" else [s.strip() for s in text.split(",") if s]
    names = [method_class(m).name if m in RENAMED else m for m in names]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        known = ", ".join(METHODS)
        raise ConfigError(f"--methods: unknown method(s) {unknown or [text]} (known: {known}, or all)")
    return names


def compare_from_args(args) -> dict:
    budget = parse_budget(args.budget)
    methods = method_list(args.methods)
    evals = [e.strip() for e in args.evals.split(",") if e.strip()]
    if any(e not in EVALS for e in evals):
        raise ConfigError(f"--evals '{args.evals}': choose from {', '.join(EVALS)}")
    out = Path(args.out)
    base = base_config(args)
    labeled_splits(base.data.path, base.data, base.train.seed, base.eval.max_eval_images)  # fails early: labels?
    num_images = len(load_splits(base.data, base.train.seed, base.eval.max_eval_images).train)
    out.mkdir(parents=True, exist_ok=True)
    results = {"budget": args.budget, "data": base.data.path, "model": model_name(base), "methods": {}}
    tokenizer_seconds = 0.0
    if any(METHODS[m].needs_tokenizer for m in methods) and not base.tokenizer.path:
        tok_budget = tokenizer_budget(budget, args.tokenizer_budget)
        folder, results["tokenizer"] = ensure_tokenizer(base, out / "tokenizer", tok_budget)
        base.tokenizer.path, tokenizer_seconds = str(folder), results["tokenizer"]["seconds"]
    for name in methods:
        own = budget
        if METHODS[name].needs_tokenizer and budget[0] == "seconds":  # the tokenizer's time is part of its budget
            own = ("seconds", max(budget[1] - tokenizer_seconds, 1.0))
        own_base = copy.deepcopy(base) if name == "conmim" else base
        note = conmim_note(own_base, args.overrides) if name == "conmim" else None  # before timing its steps
        cfg = method_config(own_base, name, out / name, finished_budget(out / name) or own)
        cfg.train.log_every = loss_log_every(cfg, num_images)
        results["methods"][name] = run_one(cfg, args, evals, out / name) | ({"note": note} if note else {})
    results["scratch"] = run_scratch(base, args, evals, out / "scratch")
    write_report(out, results, evals)
    return results


LOSS_POINTS = 20  # logged losses per method at least, so that report.png has curves, not single dots


def loss_log_every(cfg: Config, num_images: int) -> int:
    """`train.log_every` for one method's run: the recipe's, or less when the run has fewer than LOSS_POINTS
    times that many steps (a 1-epoch run of a GPU recipe logging every 20 steps would draw no curve)."""
    batch = fitted_batch(cfg.train.batch_size, num_images, 1) * cfg.optim.accum_steps
    steps = cfg.train.epochs * (num_images // batch)
    return max(1, min(cfg.train.log_every, steps // LOSS_POINTS))


def conmim_note(cfg: Config, overrides: list[str]) -> str | None:
    """ConMIM on the shared encoder: with absolute positions (any vit_* model) and no centring, its loss is solved
    from position alone (the method's own warning). compare then trains mimkit's variant with
    conmim.center_teacher=true, unless the user set that key; either way the report says which ConMIM ran."""
    absolute = not cfg.model.name.startswith("beit") or cfg.model.abs_pos_embed
    if not absolute:
        return None
    if cfg.conmim.center_teacher:
        return "ConMIM ran with conmim.center_teacher=true (the shared encoder has absolute positions)"
    if not any(o.startswith("conmim.center_teacher=") for o in overrides):
        cfg.conmim.center_teacher = True
        return ("ConMIM ran as mimkit's variant, conmim.center_teacher=true: the shared encoder has absolute "
                "positions, with which the paper's objective is solved from position alone (docs/methods.md)")
    return ("warning: ConMIM ran with absolute positions and conmim.center_teacher=false, so its loss can be solved "
            "from position alone (pos_acc -> 1): its accuracies say little (docs/methods.md)")


def base_config(args) -> Config:
    """The shared pre-training config: recipe (the demo recipe on demo data) <- flags <- overrides."""
    files = [args.config] if args.config else (["demo"] if args.data == "demo" else [])
    flags = {"data": {"path": args.data}, "eval": {"final_knn": False}}
    if args.max_images:
        flags["data"]["max_images"] = args.max_images
    if args.batch_size:
        flags["train"] = {"batch_size": args.batch_size}
    if args.device:
        flags.setdefault("train", {})["device"] = args.device
    cfg = build_config(files, flags, args.overrides)
    say_first(small_image_patch(cfg, names_model(files, args)))
    fit_workers(cfg)  # the evaluations read with the base config's workers too
    return cfg


def model_name(cfg: Config) -> str:
    m = cfg.model
    sizes = ", ".join(f"{k}={getattr(m, k)}" for k in ("depth", "embed_dim", "num_heads") if getattr(m, k))
    patch = m.patch_size or resolve_patch_size(m.name, None) if is_vit(m.name) else m.patch_size
    return f"{m.name}/{patch} at {cfg.data.image_size}px" + (f" ({sizes})" if sizes else "")


def method_config(base: Config, method: str, out: Path, budget: tuple[str, float], task=PretrainTask) -> Config:
    cfg = copy.deepcopy(base)
    cfg.method, cfg.out = method, str(out)
    kind, amount = budget
    cfg.train.epochs = int(amount) if kind == "epochs" else calibrate_epochs(cfg, amount, task)
    return cfg


def finished_budget(run_dir: Path) -> tuple[str, int] | None:
    """A finished pre-training's epochs, from its config.yaml: a re-run neither times it again nor reports
    epochs it did not run."""
    if (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file():
        return "epochs", build_config([run_dir / "config.yaml"]).train.epochs
    return None


def calibrate_epochs(cfg: Config, seconds: float, task_cls=PretrainTask, steps: int = 4) -> int:
    """Epochs of `cfg`'s task that fit in `seconds`: a few of its training steps (data included) are timed."""
    device = resolve_device(cfg.train.device)
    from ..runtime import precision_and_reason

    amp, why = precision_and_reason(cfg.train.precision, device)
    task = task_cls(cfg, Runtime(device, amp, precision=why))
    per_step = seconds_per_step(task, steps)
    epochs = max(1, int(seconds / (per_step * task.batches_per_epoch())))
    say(f"{cfg.method if task_cls is PretrainTask else task.kind}: {per_step * 1000:.0f} ms per step -> "
        f"{epochs} epoch(s) fit the budget")  # fmt: skip
    return epochs


def tokenizer_budget(budget: tuple[str, float], text: str | None) -> tuple[str, float]:
    """The tokenizer's own budget: `--tokenizer-budget`, else a quarter of a wall-clock budget (BEiT and CIM
    pre-train for what is left of theirs) or the same number of epochs."""
    if text:
        return parse_budget(text)
    return ("seconds", budget[1] / 4) if budget[0] == "seconds" else budget


def ensure_tokenizer(base: Config, out: Path, budget: tuple[str, float]) -> tuple[Path, dict]:
    """A VQ tokenizer for BEiT/CIM with tokens the size of the encoder's patches, trained on the same data.
    -> (its folder, {"epochs", "seconds"} it took)."""
    folder, summary_file = out / "tokenizer", out / "summary.json"  # the tokenizer run's summary, + its time
    if not (folder / "tokenizer.json").is_file() or "seconds" not in load_json(summary_file):
        tok_base = copy.deepcopy(base)
        tok_base.tokenizer.downsample = resolve_patch_size(base.model.name, base.model.patch_size)
        tok_base.eval.knn_every = 0  # the methods' recipe may monitor k-NN; a tokenizer has no features for it
        cfg = method_config(tok_base, base.method, out, budget, task=TokenizerTask)
        say(f"training the VQ tokenizer BEiT/CIM read their targets from ({cfg.train.epochs} epoch(s)) in '{out}'")
        t0 = time.perf_counter()
        summary = train_tokenizer(cfg) or {}
        summary.update(epochs=cfg.train.epochs, seconds=round(time.perf_counter() - t0, 1))
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    summary = load_json(summary_file)
    return folder, {k: summary[k] for k in ("epochs", "seconds")}


def run_one(cfg: Config, args, evals: list[str], run_dir: Path) -> dict:
    """Pre-train (unless finished), then each missing evaluation; -> the method's results."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        say(f"== {cfg.method}: pre-training {cfg.train.epochs} epoch(s) into '{run_dir}'")
        t0 = time.perf_counter()
        summary = pretrain(cfg)
        summary["pretrain_seconds"] = round(time.perf_counter() - t0, 1)
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    summary = json.loads(summary_file.read_text())
    device = resolve_device(cfg.train.device)
    done = run_evals(
        cfg, args, evals, run_dir, str(run_dir / "encoder"), lambda: load_encoder(run_dir / "encoder", device)[0]
    )
    return {"epochs": cfg.train.epochs, "steps": summary.get("steps"),
            "pretrain_seconds": summary.get("pretrain_seconds"), **done}  # fmt: skip


def run_scratch(base: Config, args, evals: list[str], run_dir: Path) -> dict:
    """The random-init encoder under the same evaluations: the floor every method must clear."""

    def random_init():
        torch.manual_seed(base.train.seed)
        return build_model(encoder_spec("none", base), num_classes=0).to(resolve_device(base.train.device)).eval()

    run_dir.mkdir(parents=True, exist_ok=True)
    return run_evals(base, args, evals, run_dir, "none", random_init)


def run_evals(cfg: Config, args, evals: list[str], run_dir: Path, checkpoint: str, encoder_fn) -> dict:
    """The evaluations of `evals` not yet in run_dir/evals.json, each stored as soon as it is done. The probes
    share one feature extraction; `encoder_fn` builds the frozen encoder only when a probe is missing."""
    done = load_evals(run_dir)
    t0 = time.perf_counter()
    probes = [e for e in evals if e in ("knn", "linear") and e not in done]
    if probes:
        encoder = encoder_fn()
        memory, query = labeled_splits(cfg.data.path, cfg.data, cfg.train.seed, cfg.eval.max_eval_images)
        device = next(encoder.parameters()).device
        fe = FeatureEval(memory, query, cfg.data, cfg.data.image_size, device, cfg.eval)
        done.update({k: v["top1"] for k, v in fe.scores(encoder, probes, seed=cfg.train.seed).items()})
        save_evals(run_dir, add_seconds(done, t0))
    if "finetune" in evals and "finetune" not in done:
        t0 = time.perf_counter()
        done["finetune"] = run_finetune(cfg, args, checkpoint, run_dir / "finetune")
        save_evals(run_dir, add_seconds(done, t0))
    return done


def add_seconds(done: dict, t0: float) -> dict:
    """Evaluation time is outside the budget: it is summed in `eval_seconds` (over re-runs) for the report."""
    done["eval_seconds"] = round(done.get("eval_seconds", 0.0) + time.perf_counter() - t0, 1)
    return done


def run_finetune(base: Config, args, checkpoint: str, out: Path) -> float:
    """The same fine-tuning recipe for every encoder (and the scratch baseline)."""
    recipe = ["finetune", "finetune-demo" if base.data.path == "demo" else None, args.finetune_config]
    cfg = build_config([r for r in recipe if r])
    drop_path = cfg.model.drop_path  # the fine-tuning recipe's, on the pre-trained architecture
    cfg.data, cfg.model, cfg.out = copy.deepcopy(base.data), copy.deepcopy(base.model), str(out)
    cfg.model.drop_path = drop_path
    cfg.train.device, cfg.train.seed = base.train.device, base.train.seed
    if args.finetune_epochs:
        cfg.train.epochs = args.finetune_epochs
    result = finetune(cfg, checkpoint)
    return result["top1"]


def load_json(f: Path) -> dict:
    return json.loads(f.read_text()) if f.is_file() else {}


def load_evals(run_dir: Path) -> dict:
    return load_json(run_dir / "evals.json")


def save_evals(run_dir: Path, done: dict) -> None:
    tmp = run_dir / ".evals.json.tmp"
    tmp.write_text(json.dumps(done, indent=2) + "\n")
    tmp.replace(run_dir / "evals.json")


def write_report(out: Path, results: dict, evals: list[str]) -> None:
    """report.json (everything), report.md (the table), report.png (accuracies; pre-training loss curves)."""
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    head = "| method | epochs | pre-train s | eval s | " + " | ".join(evals) + " |"
    lines = [f"# mimkit compare: {results['data']}, {results['model']}, budget {results['budget']}", "",
             *budget_lines(results), "", head, "|" + "---|" * (4 + len(evals))]  # fmt: skip
    rows = dict(results["methods"])
    for name, r in rows.items():
        cells = [f"{r[e]:.4f}" if e in r else "-" for e in evals]
        lines.append(f"| {name} | {r['epochs']} | {r.get('pretrain_seconds') or '-'} | {r.get('eval_seconds', '-')} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    if "tokenizer" in results:
        t = results["tokenizer"]
        lines.append(f"| (VQ tokenizer for BEiT/CIM) | {t['epochs']} | {t['seconds']} | - |" + " - |" * len(evals))
    s = results["scratch"]
    lines.append(f"| random init (scratch) | - | - | {s.get('eval_seconds', '-')} | "
                 + " | ".join(f"{s[e]:.4f}" if e in s else "-" for e in evals) + " |")  # fmt: skip
    lines += [
        "",
        "k-NN and linear: top-1 of frozen features; finetune: top-1 after the last fine-tuning epoch, the",
        "identical recipe for every row (the scratch row fine-tunes a randomly initialised encoder).",
        *(
            ["Under a wall-clock budget, BEiT and CIM pre-train for the budget minus the tokenizer's seconds."]
            if "tokenizer" in results and parse_budget(results["budget"])[0] == "seconds"
            else []
        ),  # fmt: skip
        *[f"{name}: {r['note']}" for name, r in rows.items() if r.get("note")],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_report(out, results, evals)
    say(f"report written to '{out / 'report.md'}', '{out / 'report.json'}' and '{out / 'report.png'}'")


def budget_lines(results: dict) -> list[str]:
    """What the budget covered and what it did not: pre-training (and the tokenizer) is inside it, every
    evaluation outside; the command also times a few steps per method to size its epochs."""
    runs = [*results["methods"].values(), results["scratch"]]
    pretrain_s = sum(r.get("pretrain_seconds") or 0 for r in runs) + results.get("tokenizer", {}).get("seconds", 0)
    eval_s = sum(r.get("eval_seconds", 0) for r in runs)
    return [
        f"Budget: {results['budget']} of pre-training per method (BEiT and CIM: their tokenizer's included); "
        f"{pretrain_s:.0f} s of pre-training in all (`pre-train s`).",
        f"Evaluation (k-NN, linear probe, fine-tuning) is outside the budget: {eval_s:.0f} s in all (`eval s`); "
        "the command's wall time is both plus the few steps timed per method to size its epochs.",
    ]


def plot_title(results: dict) -> str:
    """The data's name, not its path: a picture is shared beyond the machine it was made on."""
    return f"{data_name(results['data'])}, {results['model']} - budget {results['budget']}"


def plot_report(out: Path, results: dict, evals: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*results["methods"], "scratch"]
    rows = [*results["methods"].values(), results["scratch"]]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(evals), 1)
    for j, e in enumerate(evals):
        xs = [i + (j - (len(evals) - 1) / 2) * width for i in range(len(names))]
        ax_acc.bar(xs, [r.get(e, 0.0) for r in rows], width, label=e)
    ax_acc.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_acc.set_ylabel("top-1")
    ax_acc.set_title(plot_title(results))
    ax_acc.legend()
    for name in results["methods"]:
        metrics = out / name / "metrics.jsonl"
        if not metrics.is_file():
            continue
        pts = [json.loads(x) for x in metrics.read_text().splitlines() if x]
        pts = [(p["step"], p["loss"]) for p in pts if "loss" in p]
        if pts:
            first, last_step = pts[0][1] or 1.0, pts[-1][0]
            ax_loss.plot([s / last_step for s, _ in pts], [v / first for _, v in pts], "o-", ms=3, label=name)
    ax_loss.set_xlabel("fraction of pre-training")
    ax_loss.set_ylabel("loss / first logged loss")
    ax_loss.set_title("pre-training loss (each method's own objective)")
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)

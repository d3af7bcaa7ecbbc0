"""`mimkit compare`: every method pre-trained under one encoder, data and budget, then evaluated the same way.

Layout of `--out`: `<method>/` is each method's pre-training run (the engine resumes it), `<method>/evals.json`
its evaluations (each one stored as soon as it is done), `<method>/finetune/` its fine-tuning run; `step0/<method>/`
the same method's encoder as built, before any step (its initialisation, LayerScale and position scheme: the
same-architecture floor), `scratch/` a plain timm encoder at random init, both under the identical evaluations;
`tokenizer/` the VQ tokenizer that BEiT and CIM need when none is given. With `--seeds N` each of these folders
holds `seed<k>/` per seed (train.seed, train.seed + 1, ...) and the report gives mean and spread per cell. A re-run
skips everything already finished.

Budgets: `Nep` gives every method N epochs (the papers' equal-epoch comparison). A wall-clock budget (`30s`,
`10min`, `1h`) is turned into epochs per method by timing a few of its real training steps (the loop's own step:
accumulation, clipping and teacher updates included) for every method before any trains, so every run completes
its learning-rate schedule rather than being cut off mid-way and all seeds share one epoch count; the time each
method actually took is reported next to its accuracy.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import time
from pathlib import Path

import torch

from ...atomic import replace_text
from ...config import Config, ConfigError
from ...data import labeled_splits, load_splits
from ...eval import FeatureEval
from ...methods import METHODS, RENAMED, build_method, method_class
from ...models.vit import resolve_patch_size
from ...run_config import build_config, names_model, say_first, small_image_patch
from ...runtime import is_vit, resolve_device
from ..tasks.encoders import build_model, encoder_spec, load_encoder
from ..tasks.finetune import finetune
from ..tasks.pretrain import PretrainTask, export_method, generator_patch_from_tokenizer, pretrain
from ..tasks.tokenizer_training import TokenizerTask, train_tokenizer
from ..trainer import Runtime, seconds_per_step
from ..trainer.fit import fit_workers, fitted_batch
from ..trainer.logging import say
from .compare_report import write_report

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
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give at least 1")
    out = Path(args.out)
    base = base_config(args)
    labeled_splits(base.data.path, base.data, base.train.seed, base.eval.max_eval_images)  # fails early: labels?
    num_images = len(load_splits(base.data, base.train.seed, base.eval.max_eval_images).train)
    seeds = [base.train.seed + i for i in range(args.seeds)]
    out.mkdir(parents=True, exist_ok=True)
    results = {"budget": args.budget, "budget_kind": budget[0], "data": base.data.path, "model": model_name(base),
               "seeds": seeds, "methods": {}, "step0": {}}  # fmt: skip
    tokenizer_seconds = 0.0
    if any(METHODS[m].needs_tokenizer for m in methods) and not base.tokenizer.path:
        tok_budget = tokenizer_budget(budget, args.tokenizer_budget)
        folder, results["tokenizer"] = ensure_tokenizer(base, out / "tokenizer", tok_budget)
        base.tokenizer.path, tokenizer_seconds = str(folder), results["tokenizer"]["seconds"]
    configs, notes = {}, {}
    sized = sized_epochs(out, args.budget)
    for name in methods:  # every method's epochs first: timed on the same machine state, shared by the seeds
        own = budget
        if METHODS[name].needs_tokenizer and budget[0] == "seconds":  # the tokenizer's time is part of its budget
            own = ("seconds", max(budget[1] - tokenizer_seconds, 1.0))
        own_base = copy.deepcopy(base) if name == "conmim" else base
        notes[name] = conmim_note(own_base, args.overrides) if name == "conmim" else None  # before timing
        first = seed_dir(out / name, seeds[0], seeds)
        known = ("epochs", sized[name]) if name in sized else finished_budget(first)
        configs[name] = method_config(own_base, name, first, known or own)
        configs[name].train.log_every = loss_log_every(configs[name], num_images)
        sized[name] = configs[name].train.epochs
        if budget[0] == "seconds":
            replace_text(out / "epochs.json", json.dumps({"budget": args.budget, "epochs": sized}, indent=2) + "\n")
    per_seed = {name: [] for name in methods}
    step0 = {name: [] for name in methods}
    scratch = []
    for seed in seeds:
        for name in methods:
            cfg = seeded(configs[name], seed, seed_dir(out / name, seed, seeds))
            per_seed[name].append(run_one(cfg, args, evals, Path(cfg.out)))
            step0[name].append(run_step0(cfg, args, evals, seed_dir(out / "step0" / name, seed, seeds)))
        scratch.append(run_scratch(seeded(base, seed, base.out), args, evals, seed_dir(out / "scratch", seed, seeds)))
    for name in methods:
        results["methods"][name] = summarise(per_seed[name], evals) | ({"note": notes[name]} if notes[name] else {})
        results["step0"][name] = summarise(step0[name], evals)
    results["scratch"] = summarise(scratch, evals)
    write_report(out, results, evals)
    return results


def seed_dir(folder: Path, seed: int, seeds: list[int]) -> Path:
    """One seed keeps compare's single-seed layout; several put each seed's run in `seed<k>/`."""
    return folder if len(seeds) == 1 else folder / f"seed{seed}"


def seeded(cfg: Config, seed: int, out) -> Config:
    """`cfg` with train.seed and out set for one seed's run (a copy)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seed, cfg.out = seed, str(out)
    return cfg


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
        return (
            "ConMIM ran as mimkit's variant, conmim.center_teacher=true: the shared encoder has absolute "
            "positions, with which the paper's objective is solved from position alone (docs/methods.md)"
        )
    return (
        "warning: ConMIM ran with absolute positions and conmim.center_teacher=false, so its loss can be solved "
        "from position alone (pos_acc -> 1): its accuracies say little (docs/methods.md)"
    )


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


def sized_epochs(out: Path, budget: str) -> dict[str, int]:
    """The epochs an earlier, interrupted run of the same wall-clock budget gave each method (out/epochs.json): a
    re-run keeps them rather than timing the steps again on a machine that may be busier or quieter now."""
    recorded = load_json(out / "epochs.json")
    return dict(recorded.get("epochs", {})) if recorded.get("budget") == budget else {}


def finished_budget(run_dir: Path) -> tuple[str, int] | None:
    """A finished pre-training's epochs, from its config.yaml: a re-run neither times it again nor reports
    epochs it did not run."""
    if (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file():
        return "epochs", build_config([run_dir / "config.yaml"]).train.epochs
    return None


def calibrate_epochs(cfg: Config, seconds: float, task_cls=PretrainTask, steps: int = 4) -> int:
    """Epochs of `cfg`'s task that fit in `seconds`: a few of its training steps (data included) are timed."""
    device = resolve_device(cfg.train.device)
    from ...runtime import precision_and_reason

    amp, why = precision_and_reason(cfg.train.precision, device)
    task = task_cls(cfg, Runtime(device, amp, precision=why))
    per_step = seconds_per_step(task, steps)
    steps_per_epoch = max(1, task.batches_per_epoch() // cfg.optim.accum_steps)
    epochs = max(1, int(seconds / (per_step * steps_per_epoch)))
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
        replace_text(summary_file, json.dumps(summary, indent=2) + "\n")
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
        replace_text(summary_file, json.dumps(summary, indent=2) + "\n")
    summary = json.loads(summary_file.read_text())
    device = resolve_device(cfg.train.device)
    done = run_evals(
        cfg, args, evals, run_dir, str(run_dir / "encoder"), lambda: load_encoder(run_dir / "encoder", device)[0]
    )
    return {"epochs": cfg.train.epochs, "steps": summary.get("steps"),
            "pretrain_seconds": summary.get("pretrain_seconds"), **done}  # fmt: skip


def run_scratch(base: Config, args, evals: list[str], run_dir: Path) -> dict:
    """A plain timm encoder at random init (seeded by train.seed) under the same evaluations: the floor every
    method must clear, and the same one for all."""

    def random_init():
        torch.manual_seed(base.train.seed)
        return build_model(encoder_spec("none", base), num_classes=0).to(resolve_device(base.train.device)).eval()

    run_dir.mkdir(parents=True, exist_ok=True)
    return run_evals(base, args, evals, run_dir, "none", random_init)


def run_step0(cfg: Config, args, evals: list[str], run_dir: Path) -> dict:
    """The method's own encoder as its run builds it (same seed: the very weights its pre-training starts from),
    exported and evaluated like a trained one: what pre-training added is the difference to this row."""
    encoder_dir = run_dir / "encoder"
    device = resolve_device(cfg.train.device)
    if not (encoder_dir / "config.json").is_file():
        generator_patch_from_tokenizer(cfg)
        torch.manual_seed(cfg.train.seed)  # as PretrainTask builds it
        method = build_method(cfg).eval()
        run_dir.mkdir(parents=True, exist_ok=True)
        export_method(method, cfg, encoder_dir, {"method": cfg.method, "steps": 0})
    return run_evals(cfg, args, evals, run_dir, str(encoder_dir), lambda: load_encoder(encoder_dir, device)[0])


def summarise(runs: list[dict], evals: list[str]) -> dict:
    """Per-seed results -> the row: means (the seeds' values under `seeds`), and `<eval>_sd` (sample standard
    deviation) when there are several seeds."""
    if len(runs) == 1:
        return runs[0]
    row = {"seeds": runs}
    for key in ("epochs", "steps"):
        if key in runs[0]:
            row[key] = runs[0][key]
    for key in ("pretrain_seconds", "eval_seconds", *evals):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = round(statistics.fmean(values), 4 if key in evals else 1)
            if key in evals and len(values) > 1:
                row[f"{key}_sd"] = round(statistics.stdev(values), 4)
    return row


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
    replace_text(run_dir / "evals.json", json.dumps(done, indent=2) + "\n")

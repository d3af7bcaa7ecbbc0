"""One recipe's training step at each CPU precision and kernel choice, interleaved step by step.

    OMP_NUM_THREADS=2 python benchmarks/precision_step.py demo --steps 20
    OMP_NUM_THREADS=2 python benchmarks/precision_step.py cifar10-ladder16 --steps 10 method=conmim

The method is built from a packaged recipe (plus dotted overrides) and trained on synthetic images; each variant
runs one step in turn (A B C ... A B C ...) and the best step of each is reported: on a shared machine the least
disturbed step is the closest to the machine's own speed. Variants: fp32 (fused attention, foreach AdamW), fp32 with
fused AdamW, bf16 with the fused attention, bf16 with timm's unfused attention (runtime.prepare_for_precision), and
that with fused AdamW (what train.precision=auto runs on a CPU where bf16 pays). docs/benchmarks.md has results.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import autocast

from mimkit.config_yaml import packaged_recipe
from mimkit.methods import build_method
from mimkit.run_config import build_config
from mimkit.runtime import prepare_for_precision

VARIANTS = {  # name: (autocast dtype, unfused attention, fused AdamW)
    "fp32": (None, False, False),
    "fp32, fused AdamW": (None, False, True),
    "bf16, fused attention": (torch.bfloat16, False, False),
    "bf16, unfused attention": (torch.bfloat16, True, False),
    "bf16, unfused attention, fused AdamW": (torch.bfloat16, True, True),
}


def make_step(recipe: str, overrides: list[str], dtype, unfused: bool, fused_adamw: bool):
    torch.manual_seed(0)
    cfg = build_config([packaged_recipe(recipe)], dotted=overrides)
    model = build_method(cfg).train()
    if unfused:
        prepare_for_precision(model, torch.device("cpu"), dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused_adamw)
    batch = {v.name: torch.randn(cfg.train.batch_size, 3, v.size, v.size) for v in model.views}

    def one():
        with autocast(torch.device("cpu"), dtype):
            loss = model(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(1, 100)

    return one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 untimed)")
    args = ap.parse_args()
    steppers = {name: make_step(args.recipe, args.overrides, *v) for name, v in VARIANTS.items()}
    for one in steppers.values():
        one(), one()
    times = {name: [] for name in steppers}
    for _ in range(args.steps):
        for name, one in steppers.items():
            t = time.perf_counter()
            one()
            times[name].append(time.perf_counter() - t)
    base = min(times["fp32"])
    print(f"# {args.recipe} {' '.join(args.overrides)}; threads {torch.get_num_threads()}; best of {args.steps}")
    print("| variant | ms (best) | ms (median) | vs fp32 |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ts = sorted(ts)
        print(f"| {name} | {1000 * ts[0]:.1f} | {1000 * ts[len(ts) // 2]:.1f} | {base / ts[0]:.2f}x |")


if __name__ == "__main__":
    main()

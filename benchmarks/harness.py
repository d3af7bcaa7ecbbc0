"""What the benchmark scripts share: the device and its name, autocast, timing (a mean, a best, and interleaved
rounds of whole training steps) and results appended as JSON lines, so that each script holds only its own
measurement and its table. The GPU evidence stages have their own harness on top (evidence.py)."""

from __future__ import annotations

import json
import platform
import time

import torch

from mimkit.runtime import prepare_for_precision


# ------------------------------------------------------------------------------------------------ the machine
def pick_device(choice: str = "auto") -> torch.device:
    """'auto': the GPU when there is one, else the CPU; anything else as torch names it ('cuda:1')."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's as `platform` gives it (the field the recorded JSON lines carry)."""
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()


def machine_line(name: str, *more: str) -> str:
    """The '# device ...; torch ...; threads ...' line above a script's table, with the script's own settings."""
    return "; ".join([f"# device {name}", f"torch {torch.__version__}", f"threads {torch.get_num_threads()}", *more])


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`; None is full precision (autocast off)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before their kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ timing
def mean_seconds(fn, device: torch.device, steps: int, warmup: int = 1) -> float:
    """Mean seconds per call of `fn` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call: the fastest of `repeats` timed calls after one warm-up (robust on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def make_step(build, s, batch: int, device, dtype, compile_: bool, engine_kernels: bool = False):
    """-> one() running a full training step (forward, backward, AdamW) of `build(s)` = (model, loss of images).
    `engine_kernels`: the kernel choices mimkit's loop makes for this device and precision
    (runtime.prepare_for_precision)."""
    torch.manual_seed(0)
    model, loss_fn = build(s)
    model.to(device).train()
    if engine_kernels:
        prepare_for_precision(model, device, dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    fn = torch.compile(loss_fn) if compile_ else loss_fn
    x = torch.randn(batch, 3, s.image, s.image, device=device)

    def one():
        with autocast(device, dtype):
            loss = fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def measure_many(builds: dict, s, batch: int, device, dtype, steps: int, warmup: int, compile_: bool,
                 rounds: int = 3, peers=()) -> dict:  # fmt: skip
    """Time every build in turn, `rounds` times over (A B C A B C ...), `steps` steps per turn; -> per name the
    median turn. A build may be `(build, dtype)`: that row at its own precision. Builds in `peers` run as their
    libraries ship them; the others get mimkit's kernel choices. Interleaving matters: on the 2-core VM whichever
    model ran first measured 10-15% slower than when it ran second (clock and allocator warm-up), which is larger
    than the differences being measured. A build whose library is missing is skipped, with why."""
    cuda = device.type == "cuda"
    steppers, results, times, peaks = {}, {}, {}, {}
    for name, build in builds.items():
        build, row_dtype = build if isinstance(build, tuple) else (build, dtype)
        try:
            steppers[name] = make_step(build, s, batch, device, row_dtype, compile_, build not in peers)
        except ImportError as e:
            results[name] = {"skipped": f"{e.name} not installed"}
    for one in steppers.values():
        for _ in range(warmup):
            one()
    for _ in range(rounds):
        for name, one in steppers.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(steps):
                one()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 1e9)
            times.setdefault(name, []).append(time.perf_counter() - t)
    for name, ts in times.items():
        dt = sorted(ts)[len(ts) // 2]
        results[name] = {"img_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps, "rounds": len(ts)}
        if cuda:
            results[name]["peak_mem_gb"] = peaks[name]
    return results


def measure(build, s, batch: int, device, dtype, steps: int, warmup: int, compile_: bool) -> dict:
    """One build on its own (rows read on their own, not as ratios)."""
    return measure_many({"one": build}, s, batch, device, dtype, steps, warmup, compile_, rounds=1)["one"]


# ------------------------------------------------------------------------------------------------ results
def append_jsonl(path: str | None, rows) -> None:
    """Each row as one JSON line at the end of `path` (the docs/bench/*.jsonl records); nothing when None."""
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

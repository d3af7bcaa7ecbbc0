"""Whether bf16 pays on this CPU, and the one kernel choice that makes it pay.

Many current CPUs multiply bf16 matrices several times faster than fp32 ones (Intel AMX since Sapphire Rapids;
AVX512-BF16 on AMD Zen 4 and Intel Cooper Lake). `train.precision=auto` uses bf16 on a CPU only where a short
measurement says the bf16 matrix product is clearly faster; the answer is cached per machine and torch version so
that a run pays for the measurement once. CPUs without bf16 instructions are not measured: they emulate bf16
through fp32 and are always slower.

The CPU's fused attention (`scaled_dot_product_attention`'s flash kernel) has a bf16 backward several times slower
than its fp32 one at ViT token counts, which ate the whole bf16 gain (issue 22's profile: 51% of a bf16 MAE step).
Under CPU bf16 autocast, timm's attention is switched to its unfused path (q @ k^T, softmax, @ v), whose products
run on the bf16 units and whose backward is plain matrix products (docs/benchmarks.md has the measurement).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from .atomic import replace_text
from .errors import WriteError

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 products
PAYS_AT = 1.5  # bf16/fp32 product-rate ratio from which bf16 is chosen: products are 50-70% of a CPU step


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """Measured FLOP/s of an n x n x n matrix product in `dtype` on this CPU (best of `reps`: the least disturbed
    by other work on a shared machine)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # first call: kernel selection and packing buffers
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mimkit" / "cpu-bf16.json"


def bf16_speedup() -> tuple[float | None, str]:
    """-> (bf16/fp32 matrix-product rate ratio on this CPU, or None where it has no bf16 instructions; how it was
    known). Measured once per CPU model, torch version and thread count, then read from the cache."""
    flags = cpu_flags() & set(BF16_FLAGS)
    if not flags:
        return None, "no bf16 instructions (flags amx_bf16/avx512_bf16 absent)"
    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = _cache_file()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), int | float):
        return float(table[key]), f"{'/'.join(sorted(flags))}; cached measurement"
    ratio = matmul_rate(torch.bfloat16) / matmul_rate(torch.float32)
    table[key] = round(ratio, 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps(table, indent=1))
    except (OSError, WriteError):
        pass  # an unwritable cache only costs the next run the same ~0.1 s measurement
    return ratio, f"{'/'.join(sorted(flags))}; measured now"


def auto_cpu_precision() -> tuple[torch.dtype | None, str]:
    """-> (torch.bfloat16 where bf16 pays on this CPU, else None for fp32; the reason, for the run's first line)."""
    ratio, how = bf16_speedup()
    if ratio is None:
        return None, f"fp32 (auto: this CPU has {how})"
    verdict = f"bf16 matmul {ratio:.1f}x fp32 ({how})"
    if ratio >= PAYS_AT:
        return torch.bfloat16, f"bf16 (auto: {verdict})"
    return None, f"fp32 (auto: {verdict}, below the {PAYS_AT}x that pays)"


def use_unfused_attention(model: nn.Module) -> int:
    """Switch every timm attention layer inside `model` to its unfused path (see the module docstring: the CPU's
    fused bf16 backward is slow). Numerically the same attention; -> how many layers were switched."""
    count = 0
    for m in model.modules():
        if getattr(m, "fused_attn", None) is True:
            m.fused_attn = False
            count += 1
    return count

"""The timing helper the small benchmarks share (throughput.py has its own interleaved rounds)."""

from __future__ import annotations

import time

import torch


def mean_seconds(fn, device, steps: int, warmup: int = 1) -> float:
    """Mean seconds per call of `fn` over `steps` calls after `warmup` untimed ones; CUDA work is waited for."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps

"""Where and how a run computes: device and precision resolution, and what kind of encoder a model is."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .errors import ConfigError

VIT_PREFIXES = ("vit_", "deit_", "deit3_", "beit_", "beitv2_", "eva02_")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device ('auto'/'cuda': this process's local GPU)."""
    if name == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device '{name}' asked for, but no CUDA device is available")
        index = local_rank() if name == "cuda" else int(name[5:])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    return torch.device("cpu")


def precision_and_reason(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """-> (autocast dtype or None for fp32, a short phrase for the run's first line: the choice and why). auto: bf16
    on a CUDA device that has it (else fp16); on a CPU, bf16 where its bf16 matrix products are clearly faster
    (cpu_bf16), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return (torch.bfloat16, "bf16 (auto)") if torch.cuda.is_bf16_supported() else (torch.float16, "fp16 (auto)")
        from .cpu_bf16 import auto_cpu_precision

        return auto_cpu_precision()
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name], name


def prepare_for_precision(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Kernel choices that depend on where and at what precision `model` trains: under CPU bf16, timm's unfused
    attention (the fused kernel's bf16 backward is several times slower than its fp32 one; cpu_bf16)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        from .cpu_bf16 import use_unfused_attention

        use_unfused_attention(model)


def fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel: on CUDA, and on a CPU from torch 2.4 (where it exists; 1.13x the demo's fp32 step on the
    2-core VM, whose tiny model makes the per-tensor optimizer loop a large share of the step)."""
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for `dtype` (None: a no-op context)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def is_vit(model: nn.Module | str) -> bool:
    """True for a timm ViT-family model (or its name): patch tokens, not a convolutional feature map."""
    if isinstance(model, str):
        return model.startswith(VIT_PREFIXES)
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def enable_grad_checkpointing(model: nn.Module) -> int:
    """timm's per-block gradient checkpointing on every timm model inside `model` (model.grad_checkpointing):
    activations are recomputed in the backward pass instead of kept. -> how many models it was set on."""
    count = 0
    for m in model.modules():
        if callable(getattr(m, "set_grad_checkpointing", None)) and hasattr(m, "pretrained_cfg"):
            m.set_grad_checkpointing(True)
            count += 1
    return count

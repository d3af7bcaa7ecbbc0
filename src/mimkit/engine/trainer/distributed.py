"""torchrun / SLURM / DDP helpers. The same command runs on one process or many: without a launcher's
environment variables nothing is initialised and every helper degrades to the single-process answer.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by it), or a plain `srun` of N tasks
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST): the master is the first node of the allocation and
the port `MASTER_PORT` (default 29500 + the job id's last 3 digits, so two jobs on a node do not collide).
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
from torch import nn


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[012-015,020],cpu1' -> 'gpu012'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env() -> dict[str, str]:
    """torchrun's variables, or those SLURM implies when torchrun's are absent ({} for a single process)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return {}
    if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    job = env.get("SLURM_JOB_ID", "0")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_NODELIST", "127.0.0.1")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(job[-3:] if job.isdigit() else 0)),
    }


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun or srun; -> (rank, world_size)."""
    os.environ.update(launcher_env())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def sync_batchnorm(model: nn.Module, wanted: bool) -> bool:
    """Turn `model`'s BatchNorm layers into SyncBatchNorm, in place, when `wanted` and the process group runs on
    NCCL (SyncBatchNorm has no CPU kernel). The parameters and buffers are the same tensors, so an optimizer built
    before and the state dict's keys stay valid. -> whether any layer was converted."""
    if not (wanted and is_distributed() and dist.get_backend() == "nccl"):
        return False
    batchnorm = nn.modules.batchnorm._BatchNorm
    if isinstance(model, batchnorm) or not any(isinstance(m, batchnorm) for m in model.modules()):
        return False
    nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces children, so `model` itself is kept
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def collective_device() -> torch.device:
    """Where small tensors for collectives live: the GPU for NCCL, the CPU for gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum_int(value: int, device) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()

"""InfoNCE (van den Oord et al. 2018) as MoCo v3 and CMAE use it: cosine logits / temperature, the positive of
query i is key i, cross-entropy over the batch, optionally with the keys of every process as extra negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N, d) this process's keys -> ((world * N, d) every process's keys in rank order, index of this process's
    first key). One process: (k, 0). Equal N on every rank (the sampler's batches are full). No gradient flows
    through the gathered keys (all_gather has none), so only no-gradient keys should be gathered."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), k.shape[0] * dist.get_rank()


def info_nce(
    q: torch.Tensor, k: torch.Tensor, temperature: float, gather: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) queries, (N, d) keys -> (loss, top-1 accuracy of the positives). Both are L2-normalised in float32;
    logits q_i . k_j / temperature; the positive of query i is key i of this process. gather: the keys of every
    process join as negatives (`gather_keys`; the keys must carry no gradient)."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    keys, offset = gather_keys(k) if gather else (k, 0)
    logits = q @ keys.t() / temperature  # (N, world * N)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), acc

"""Linear probe on frozen features (MAE's head: BatchNorm without affine, then a Linear layer)."""

from __future__ import annotations

import math

import torch
from torch import nn


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float | None = None,
    seed: int = 0,
) -> dict:
    """Train BN(affine=False) + Linear with SGD (momentum 0.9, no weight decay, warm-up then cosine) on cached
    features. Features are extracted once without augmentation: at the sizes mimkit runs on a CPU, this is
    the difference between seconds and hours, and is what DINO/lightly do for their offline probes.
    lr defaults to 0.1 * batch / 256 as in MAE's linear-probe recipe (which uses LARS at batch 16k)."""
    g = torch.Generator().manual_seed(seed)
    dim = train_feats.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = lr if lr is not None else 0.1 * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n = len(train_feats)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, warmup = epochs * steps_per_epoch, min(10, epochs // 10) * steps_per_epoch
    step = 0
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            cur = (
                lr * step / warmup
                if step < warmup
                else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            )
            for group in opt.param_groups:
                group["lr"] = cur
            loss = nn.functional.cross_entropy(head(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        pred = head(test_feats).argmax(1)
    return {
        "top1": (pred == test_labels).float().mean().item(),
        "epochs": epochs,
        "lr": lr,
        "train_size": n,
        "test_size": len(test_feats),
    }

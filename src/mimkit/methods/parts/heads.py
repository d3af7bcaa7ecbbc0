"""Projector and predictor MLPs of the contrastive methods."""

from __future__ import annotations

from torch import nn


def bn_mlp(
    num_layers: int,
    in_dim: int,
    hidden: int,
    out_dim: int,
    last_bn: bool = True,
    hidden_bias: bool = False,
    eps: float = 1e-5,
) -> nn.Sequential:
    """MoCo v3's MLP (moco-v3 builder.py `_build_mlp`): Linear layers with BatchNorm + ReLU between them and, when
    `last_bn`, a BatchNorm without affine after the last. The last Linear has no bias; the others have one when
    `hidden_bias` (mmselfsup's NonLinearNeck with_bias, Huang's CMAE). eps: the hidden BatchNorms'."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        bias = hidden_bias and not last
        layers.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=bias))
        if not last:
            layers += [nn.BatchNorm1d(hidden, eps=eps), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def ln_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear (LayerNorm, not BatchNorm: no batch statistics to sync or EMA)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

"""DINO's projection head (Caron et al. 2021; facebookresearch/dino vision_transformer.py `DINOHead`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


class DINOHead(nn.Module):
    """(B, D) -> (B, out_dim) logits: an MLP of `num_layers` Linear layers with GELU between them (D -> hidden ->
    ... -> bottleneck; `use_bn`: a BatchNorm before each GELU, the official --use_bn_in_head), L2 normalisation,
    then a bias-free weight-normalised Linear bottleneck -> out_dim whose norm (weight_g) is fixed at 1 when
    `norm_last_layer` (the official default: it steadies training). Linear layers are truncated-normal (std 0.02)
    with zero biases, as the official."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 2048,
        bottleneck: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [bottleneck]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1]), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # the norm of each output row (weight_g)
        g.data.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        """freeze_last_layer: no gradient reaches the last layer (DINO keeps it fixed for its first epoch; with
        no gradient the optimizer skips it, weight decay included, as the official cancelled gradients do)."""
        z = F.normalize(self.mlp(x), dim=-1)
        if freeze_last_layer:
            return F.linear(z, self.last_layer.weight.detach())
        return self.last_layer(z)

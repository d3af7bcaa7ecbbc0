"""Colour perturbation as the views state it: each `View` with a `color` spec (`mimkit.data.augment.ColorSpec`)
is perturbed on the device, every view and image drawing its own parameters from the device's global RNG (so a
resumed run perturbs as an uninterrupted one). The only place a method's views get their colour."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...data.views import View


@torch.no_grad()
def perturb_views(batch: dict, views: Sequence[View], mean: torch.Tensor, std: torch.Tensor) -> dict:
    """The batch with every view that has a `color` spec perturbed, view by view in `views`' order. A 'mean_std'
    view is un-normalised with `mean`/`std` (3,), clamped to [0, 1], perturbed and normalised again; a 'unit'
    view is perturbed as it is. Views without a spec pass through. No gradient (the pipeline's views have none)."""
    out = dict(batch)
    for view in views:
        if view.color is None:
            continue
        x = batch[view.name]
        scale = view.normalize == "mean_std"
        m, s = mean.to(x.device, torch.float32).view(1, 3, 1, 1), std.to(x.device, torch.float32).view(1, 3, 1, 1)
        with torch.autocast(x.device.type, enabled=False):
            unit = (x.float() * s + m).clamp_(0.0, 1.0) if scale else x.float()
            y = view.color.augment(x.shape[-1])(unit)
            out[view.name] = ((y - m) / s if scale else y).to(x.dtype)
    return out


class ViewColour(nn.Module):
    """`perturb_views` for a fixed tuple of views, holding the data's mean / std as (non-saved) buffers so they
    follow the method to its device. forward(batch) -> batch with the coloured views replaced."""

    def __init__(self, views: Sequence[View], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.views = tuple(views)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, batch: dict) -> dict:
        return perturb_views(batch, self.views, self.mean, self.std)

"""The method contract every pre-training method honours (see docs/design.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..data.views import View


class Method(nn.Module):
    """An `nn.Module` that owns every trainable part it needs and offers:

    - `views`: what the data pipeline delivers per image (the batch holds one tensor per view name);
    - `forward(batch) -> (loss, metrics)`: one step's scalar loss and a dict of detached scalar tensors to log;
    - `after_step(step, total_steps)`: post-optimizer work such as EMA updates;
    - `encoder`: the module that is evaluated and exported (a timm model);
    - `visualize(batch) -> (B, 3, H, W*k)`: rows of pictures a person should look at (normalised pixels);
    - `on_epoch_end(ctx) -> dict`: optional per-epoch work (held-out metrics...); the dict is logged;
    - `export(out_dir, cfg) -> Path`: writes what goes downstream (default: the timm encoder as a Hub folder).
    """

    name: str = ""
    views: tuple[View, ...] = ()
    encoder: nn.Module

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def on_epoch_end(self, ctx) -> dict:
        """ctx has epoch, step, splits, cfg and device. Return scalars to log (default: nothing)."""
        return {}

    def export(self, out_dir, cfg):
        from ..export import export_encoder

        return export_encoder(
            self.encoder,
            out_dir,
            image_size=cfg.data.image_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
            mimkit_meta={"method": cfg.method},
        )

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that must not get weight decay, beyond the 1-D ones (biases, norms)."""
        return set()

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' has no visualisation")

"""The method contract every pre-training method honours (see docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ModelConfig, TokenizerConfig
from ..data.views import View


@dataclass(frozen=True)
class SharedSettings:
    """What a method is built from besides its own options: the encoder's settings (`model`), the size and
    normalisation of the run's images, the tokenizer section (BEiT, CIM) and the run's length and seed. A method
    sees these slices of the run's config, never the whole of it."""

    model: ModelConfig
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenizer: TokenizerConfig
    epochs: int
    seed: int

    @classmethod
    def of(cls, cfg) -> SharedSettings:
        d = cfg.data
        return cls(cfg.model, d.image_size, tuple(d.mean), tuple(d.std), cfg.tokenizer, cfg.train.epochs,
                   cfg.train.seed)  # fmt: skip


@dataclass
class NoOptions:
    """A method without options of its own."""


class Method(nn.Module):
    """An `nn.Module` that owns every trainable part it needs and offers:

    - `Options`: its options dataclass, read from the config section `section` (default: the method's name) by
      `options_of(cfg)`; an instance keeps its own as `self.options`;
    - `views`: what the data pipeline delivers per image (the batch holds one tensor per view name);
    - `forward(batch) -> (loss, metrics)`: one step's scalar loss and a dict of detached scalar tensors to log;
    - `after_step(step, total_steps)`: post-optimizer work such as EMA updates;
    - `encoder`: the module that is evaluated and exported (a timm model);
    - `visualize(batch) -> (B, 3, H, W*k)`: rows of pictures a person should look at (normalised pixels);
    - `no_weight_decay()`: parameter names without weight decay beyond the 1-D ones; `lr_scale(name)`: a
      parameter's lr relative to the run's (default: the options' `lr_scale`, else 1);
    - optional, declared on the class: `needs_tokenizer` (the run needs `tokenizer.path`), `on_epoch_end(ctx)`
      (per-epoch work; the dict it returns is logged), `export_meta()` (extra keys for the export's metadata);
    - optional, for methods with an EMA teacher: `export_options()` (the encoders a run may export, the setting
      and the fallback) and `select_encoder(name)`; `engine.tasks.pretrain.choose_export` decides at the end of a run;
    - `ccrop_encoder`: the network ContrastiveCrop localises with (`data.ccrop.box_encoder`), by default `encoder`.

    These are every hook the engine and the data layer call on a method.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None  # config section of the options; None = `name`
    Options: ClassVar[type] = NoOptions
    needs_tokenizer: ClassVar[bool] = False
    views: tuple[View, ...] = ()
    encoder: nn.Module

    @classmethod
    def section_name(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def from_config(cls, cfg) -> Method:
        """The method built from a run's config: its own options section and the shared slices it reads."""
        return cls(cls.options_of(cfg), SharedSettings.of(cfg))

    @classmethod
    def options_of(cls, cfg) -> Any:
        """This method's options from `cfg` (the section registered for it)."""
        return getattr(cfg, cls.section_name())

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def on_epoch_end(self, ctx) -> dict:
        """ctx has epoch, step, splits, cfg and device. Return scalars to log (default: nothing)."""
        return {}

    def export_meta(self) -> dict:
        """Method-specific metadata stored beside the exported encoder (default: none)."""
        return {}

    def export_options(self) -> tuple[str, str, dict[str, nn.Module], str] | None:
        """(option key, its value, {name: encoder}, fallback name) when the method can export one of several
        encoders (student or EMA teacher): value 'auto' lets the run choose by measurement; None: only `encoder`."""
        return None

    def select_encoder(self, name: str) -> None:
        """Make `encoder` the one named `name` (a key of `export_options()`'s dict)."""
        raise NotImplementedError(f"method '{self.name}' exports one encoder only")

    @property
    def ccrop_encoder(self) -> nn.Module:
        """The network whose heat maps place ContrastiveCrop's boxes (default: the exported encoder)."""
        return self.encoder

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that must not get weight decay, beyond the 1-D ones (biases, norms)."""
        return set()

    def lr_scale(self, name: str) -> float:
        """The learning rate of parameter `name` relative to the run's (e.g. a separately paced generator). By
        default the method's own `<method>.lr_scale` for every parameter where its options have one (a recipe
        shared with other methods, such as the demo's, can give one method its own lr), else 1."""
        return self.option("lr_scale", 1.0)

    @property
    def sync_batchnorm(self) -> bool:
        """Whether the method's BatchNorm layers should normalise over the global batch when several processes
        train (the loop converts them to SyncBatchNorm under NCCL before wrapping in DDP). By default the
        method's own `<method>.sync_bn` where its options have one, else False (per-process statistics)."""
        return bool(self.option("sync_bn", False))

    def option(self, name: str, default):
        """The method's own option `name` where its options dataclass has one, else `default`."""
        return getattr(getattr(self, "options", None), name, default)

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' has no visualisation")

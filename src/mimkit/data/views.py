"""What a method asks the data pipeline for: named resizes of one shared crop of each image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # augment imports torch; views stays importable without it
    from .augment import ColorSpec


@dataclass(frozen=True)
class View:
    """One output of the pipeline per image. Every view of an image comes from the *same* random crop and flip,
    so patch i means the same place in all of them; views differ only in size, resampling and pixel scale.
    Views in different crop groups may also differ in crop scale (multi-crop).

    normalize: 'mean_std' for the encoder (data.mean / data.std), 'unit' for raw [0, 1] pixels (tokenizers).
    crop_group: views with the same group share one crop and flip; a view in another group gets its own,
    independent crop and flip of the same image (e.g. the two crops of a contrastive pair). Group 0 is drawn first,
    so a method with one group sees exactly the crops it would see without groups.
    color: a colour perturbation (`mimkit.data.augment.ColorSpec`, e.g. ContrastiveCrop's jitter + grayscale)
    drawn independently per view and image, on the device: the method applies it to its batch with the colour
    part, `mimkit.methods.parts.ViewColour`, the only place a view gets its colour (every method that perturbs
    colour: ConMIM, CMAE-Mao, CMAE-Huang, MoCo v3, DINO; a view may also be made on the device from another and
    never loaded, as ConMIM's teacher view and CMAE-Huang's target). None = unchanged.
    """

    name: str
    size: int
    interpolation: str = "bicubic"  # bicubic | bilinear | lanczos | nearest
    normalize: str = "mean_std"
    crop_group: int = 0
    color: ColorSpec | None = None
    scale: tuple[float, float] | None = None  # the crop's area range for this view's group; None = data.crop_scale


def group_scales(views, default) -> dict[int, tuple[float, float]]:
    """{crop group: RandomResizedCrop area range}: the `scale` its views state (they must agree), else `default`
    (data.crop_scale). Multi-crop (DINO's 2 global + several local crops) is one group per crop, each with its
    own scale and size."""
    out: dict[int, tuple[float, float]] = {}
    for v in views:
        scale = tuple(default if v.scale is None else v.scale)
        if out.setdefault(v.crop_group, scale) != scale:
            raise ValueError(
                f"views of crop group {v.crop_group} state different crop scales ({out[v.crop_group]}, {scale})"
            )
    return out

"""Multi-crop views: each crop group draws its own crop area range (`View.scale`) and size, alike in the worker
loader, the device cache and the device's fast crops; views without a scale keep `data.crop_scale`."""

import pytest
import torch
from test_device_data import assert_same_batches, random_arrays

from mimkit.config import DataConfig
from mimkit.data import View
from mimkit.data.device_crops import FastCrops
from mimkit.data.pipeline import ViewDataset
from mimkit.data.views import group_scales

GLOBAL, LOCAL = (0.5, 1.0), (0.05, 0.2)
MULTI_CROP = [View("image", 16, scale=GLOBAL), View("global2", 16, crop_group=1, scale=GLOBAL)] + [
    View(f"local{i}", 8, crop_group=2 + i, scale=LOCAL) for i in range(3)
]


def crop_areas(dataset: ViewDataset, n: int = 200) -> dict[int, torch.Tensor]:
    """{group: (n,) area fractions} of the worker loader's crops of n keys on a 32 x 32 image."""
    areas = {g: [] for g in dataset.groups}
    for i in range(n):
        for g, (box, _) in dataset.random_crops(0, i, i, 32, 32).items():
            areas[g].append((box[2] - box[0]) * (box[3] - box[1]) / 32**2)
    return {g: torch.tensor(a) for g, a in areas.items()}


def test_each_group_crops_in_its_own_scale_and_size():
    ds = ViewDataset(random_arrays(8, 32, 32), MULTI_CROP, DataConfig(crop_scale=(0.2, 1.0)), seed=0)
    areas = crop_areas(ds)
    # integer sides move an area fraction by a few hundredths at 32 px
    assert areas[0].min() >= 0.45 and areas[1].min() >= 0.45
    assert all(areas[g].max() <= 0.23 for g in (2, 3, 4))
    item = ds[(0, 0)]
    assert item["image"].shape == (3, 16, 16) and item["local2"].shape == (3, 8, 8)


def test_views_without_a_scale_are_unchanged():
    """A view list without scales draws exactly the crops it drew before views could state one."""
    cfg = DataConfig(crop_scale=(0.3, 0.9))
    plain = ViewDataset(random_arrays(8, 32, 32), [View("image", 16)], cfg, seed=4)
    stated = ViewDataset(random_arrays(8, 32, 32), [View("image", 16, scale=(0.3, 0.9))], cfg, seed=4)
    assert [plain.random_crops(1, i, i, 32, 32) for i in range(8)] == [
        stated.random_crops(1, i, i, 32, 32) for i in range(8)
    ]
    assert group_scales([View("a", 8), View("b", 8, crop_group=1, scale=LOCAL)], (0.3, 0.9)) == {
        0: (0.3, 0.9),
        1: LOCAL,
    }


def test_views_of_one_group_must_agree_on_the_scale():
    with pytest.raises(ValueError, match="crop group 0"):
        group_scales([View("a", 8, scale=GLOBAL), View("b", 4, scale=LOCAL)], (0.2, 1.0))


def test_multi_crop_device_cache_matches_worker_loader():
    ds = ViewDataset(random_arrays(16, 24, 24, seed=3), MULTI_CROP, DataConfig(), seed=2)
    assert_same_batches(ds, epochs=(0,))


def test_fast_crops_use_each_groups_scale():
    scales = group_scales(MULTI_CROP, (0.2, 1.0))
    crops = FastCrops(DataConfig(), 0, 32, 32, sorted(scales), "cpu", scales).draw(500, 0, 0)
    for g, (boxes, _) in crops.items():
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 32**2
        lo, hi = scales[g]
        assert area.min() >= lo - 0.05 and area.max() <= hi + 0.05, g

import pytest
import torch
from helpers import write_images

from mimkit.config import DataConfig
from mimkit.data import DataError, View, labeled_splits, load_splits
from mimkit.data.folder import scan_folder, seeded_subset
from mimkit.data.pipeline import EpochBatchSampler, ViewDataset, collate, train_loader


def test_scan_labeled_and_flat(tmp_path, labeled_folder):
    src = scan_folder(labeled_folder / "train")
    assert src.labeled and src.classes == ["a", "b"] and len(src) == 48
    flat = tmp_path / "flat"
    write_images(flat, 5)
    f = scan_folder(flat)
    assert not f.labeled and len(f) == 5


def test_split_folder_and_subset(labeled_folder):
    s = load_splits(DataConfig(path=str(labeled_folder), max_images=10), seed=1)
    assert len(s.train) == 10 and len(s.query) == 16 and s.memory is s.train
    again = load_splits(DataConfig(path=str(labeled_folder), max_images=10), seed=1)
    assert s.train.paths == again.train.paths  # a fixed subset for a given seed


def test_bad_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        scan_folder(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"x{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="no decodable image in"):
        load_splits(DataConfig(path=str(junk)))
    with pytest.raises(DataError, match="evaluation needs labeled images"):
        labeled_splits(str(junk), DataConfig(), 0, None)


def test_unreadable_files_are_replaced_and_reported(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 6)
    (folder / "img_0002.png").write_bytes(b"truncated")
    src = scan_folder(folder)
    ds = ViewDataset(src, [View("image", 8)], DataConfig(), seed=0)
    item = ds[(0, 2)]
    assert item["bad"] == [2] and item["image"].shape == (3, 8, 8)
    assert ds[(0, 3)]["bad"] == []


def test_views_share_one_crop(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 2, size=32)
    ds = ViewDataset(scan_folder(folder), [View("a", 32), View("b", 16, "bilinear")], DataConfig(), seed=3)
    item = ds[(1, 0)]
    small = torch.nn.functional.interpolate(item["a"][None].float(), size=16, mode="area")[0]
    assert (small - item["b"].float()).abs().mean() < 20  # same content at two sizes (not another crop)


def test_order_is_seeded_and_independent_of_workers(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 40)
    ds = ViewDataset(scan_folder(folder), [View("image", 8)], DataConfig(), seed=5)

    def batches(workers, start=0):
        sampler = EpochBatchSampler(len(ds), 8, seed=5)
        sampler.start(epoch=1, batch=start)
        return [b["image"] for b in train_loader(ds, sampler, workers, pin=False)]

    a, b = batches(0), batches(2)
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    resumed = batches(0, start=3)
    assert all(torch.equal(x, y) for x, y in zip(a[3:], resumed))


def test_sampler_shards_ranks_disjointly():
    parts = [list(EpochBatchSampler(20, 4, seed=0, rank=r, world=2)) for r in range(2)]
    ids = [[i for batch in p for _, i in batch] for p in parts]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 8


def test_demo_digits():
    s = load_splits(DataConfig(path="demo"))
    assert len(s.train) == 1297 and len(s.query) == 500 and s.train.classes[0] == "0"
    item = ViewDataset(s.train, [View("image", 16)], DataConfig(), seed=0)[(0, 0)]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    batch = collate([item, item])
    assert batch["label"].shape == (2,)


def test_subset_rejects_nonpositive(labeled_folder):
    from mimkit.config import ConfigError

    with pytest.raises(ConfigError, match="max_images"):
        seeded_subset(scan_folder(labeled_folder / "train"), 0, 0)

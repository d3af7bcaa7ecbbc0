"""Data sources beyond folders: tar shards, Arrow/Parquet (hf:), list files; `mimkit data pack`; one scan per run.

The folder source is the peer: every other source must give its images (pixels), labels, classes, seeded subsets
and training batches in the same order."""

import argparse
import json
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from helpers import write_images

from mimkit.config import DataConfig
from mimkit.data import DataError, View, labeled_splits, load_splits
from mimkit.data import folder as folder_module
from mimkit.data.folder import cached_listing, list_images, scan_folder
from mimkit.data.pack import add_parser, pack, parse_size, run
from mimkit.data.pipeline import EpochBatchSampler, ViewDataset, train_loader
from mimkit.data.sources import open_shards, read_list, split_sources
from mimkit.data.sources import tar as tar_module
from mimkit.data.sources.common import expand_braces
from mimkit.data.sources.tar import INDEX_SUFFIX

pytest.importorskip("pyarrow")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Scan caches and Arrow copies of this test go to its own folder, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_lists(root, out) -> None:
    """train.txt / val.txt naming the folder's images (relative to `out`) with their class names after a TAB."""
    out.mkdir()
    for split in ("train", "val"):
        src = scan_folder(root / split)
        lines = [f"{os.path.relpath(p, out)}\t{src.classes[y]}" for p, y in zip(src.paths, src.labels)]
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def packed(tmp_path, labeled_folder) -> dict:
    """{form: --data value} for the folder and its tar, Parquet and list forms (several shards each)."""
    pack(labeled_folder, tmp_path / "tar", shard_size="6KB", fmt="tar")
    pack(labeled_folder, tmp_path / "parquet", shard_size="6KB", fmt="parquet")
    write_lists(labeled_folder, tmp_path / "lists")
    return {
        "folder": str(labeled_folder),
        "tar": str(tmp_path / "tar"),
        "parquet": f"hf:{tmp_path / 'parquet'}",
        "list": str(tmp_path / "lists"),
    }


def pixels(source) -> list[np.ndarray]:
    return [np.asarray(source.load(i)) for i in range(len(source))]


def same_images(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


FORMS = ("tar", "parquet", "list")


def test_pack_writes_several_indexed_shards(packed, tmp_path):
    manifest = json.loads((tmp_path / "tar" / "pack.json").read_text())
    assert manifest["splits"]["train"]["images"] == 48 and manifest["splits"]["val"]["images"] == 16
    shards = manifest["splits"]["train"]["files"]
    assert len(shards) > 1 and all((tmp_path / "tar" / (s + INDEX_SUFFIX)).is_file() for s in shards)
    assert (tmp_path / "tar" / "classes.txt").read_text().split() == ["a", "b"]
    assert len(json.loads((tmp_path / "parquet" / "pack.json").read_text())["splits"]["train"]["files"]) > 1


@pytest.mark.parametrize("form", FORMS)
def test_sources_give_the_folders_images_labels_and_classes(packed, form):
    folder = load_splits(DataConfig(path=packed["folder"]), seed=0)
    other = load_splits(DataConfig(path=packed[form]), seed=0)
    for a, b in ((folder.train, other.train), (folder.query, other.query)):
        assert b.labels == a.labels and b.classes == a.classes == ["a", "b"]
        assert same_images(a, b)
    assert other.memory is other.train


@pytest.mark.parametrize("form", FORMS)
def test_seeded_subsets_and_evaluation_splits_agree(packed, form):
    cfg = dict(max_images=10)
    a = load_splits(DataConfig(path=packed["folder"], **cfg), seed=3, max_eval_images=5)
    b = load_splits(DataConfig(path=packed[form], **cfg), seed=3, max_eval_images=5)
    assert len(b.train) == 10 and b.train.labels == a.train.labels and same_images(a.train, b.train)
    assert len(b.query) == 5 and same_images(a.query, b.query)
    memory_a, query_a = labeled_splits(packed["folder"], DataConfig(), 0, 4)
    memory_b, query_b = labeled_splits(packed[form], DataConfig(), 0, 4)
    assert same_images(query_a, query_b) and memory_b.labels == memory_a.labels


def batches(source, workers: int = 0, epochs=(0, 1), batch_size: int = 8, rank: int = 0, world: int = 1):
    ds = ViewDataset(source, [View("image", 8), View("small", 4, "bilinear")], DataConfig(), seed=7)
    sampler = EpochBatchSampler(len(ds), batch_size, seed=7, rank=rank, world=world)
    out = []
    for epoch in epochs:
        sampler.start(epoch)
        out.extend(train_loader(ds, sampler, workers, pin=False))
    return out


@pytest.mark.parametrize("form,workers", [("tar", 0), ("tar", 2), ("parquet", 0), ("parquet", 2), ("list", 0)])
def test_pretraining_batches_equal_the_folders(packed, form, workers):
    want = batches(split_sources(packed["folder"])[0])
    got = batches(split_sources(packed[form])[0], workers)
    assert len(got) == len(want) == 12
    for x, y in zip(want, got):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["small"], y["small"])
        assert torch.equal(x["label"], y["label"])


def test_sources_survive_pickling(packed):
    """A spawned DataLoader worker receives the source pickled: descriptors and memory maps are reopened."""
    for form in ("tar", "parquet"):
        src = split_sources(packed[form])[0].subset([5, 1, 30])
        src.load(0)  # opens a descriptor / map first
        again = pickle.loads(pickle.dumps(src))
        assert same_images(src, again) and again.labels == src.labels


def _two_process_worker(rank: int, store: str, shards: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:  # rank 1 never scans a folder nor reads a shard index: rank 0's must reach it
        folder_module.list_images = lambda root: (_ for _ in ()).throw(AssertionError("rank 1 scanned"))
        tar_module.shard_index = lambda url: (_ for _ in ()).throw(AssertionError("rank 1 read an index"))
    listing = scan_folder(folder).paths
    source = split_sources(shards)[0]
    mine = batches(source, batch_size=4, rank=rank, world=2)
    gathered = [None, None]
    dist.all_gather_object(gathered, [(b["image"], b["label"]) for b in mine])
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump({"batches": gathered, "listing": listing}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_over_shards_see_the_global_batches_of_one(packed, tmp_path, labeled_folder):
    """2 gloo processes x 4 images = the 8-image batches of 1 process, image for image: the sampler deals
    the permutation round-robin, so the global batch interleaves the ranks' batches."""
    out = tmp_path / "two.pkl"
    args = (str(tmp_path / "store"), packed["tar"] + "/train-*.tar", str(labeled_folder / "train"), str(out))
    torch.multiprocessing.spawn(_two_process_worker, args=args, nprocs=2, join=True)
    result = pickle.loads(out.read_bytes())
    one = batches(split_sources(packed["tar"])[0])
    per_rank = result["batches"]
    assert len(one) == len(per_rank[0]) == len(per_rank[1]) == 12
    for step, want in enumerate(one):
        (img0, lab0), (img1, lab1) = per_rank[0][step], per_rank[1][step]
        images = torch.stack([img0, img1], dim=1).flatten(0, 1)  # rank 0's k-th, rank 1's k-th, ...
        assert torch.equal(images, want["image"])
        assert torch.equal(torch.stack([lab0, lab1], dim=1).flatten(), want["label"])
    assert result["listing"] == list_images(labeled_folder / "train")


def test_unreadable_member_is_replaced_and_counted_as_in_a_folder(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 6)
    (folder / "img_0002.png").write_bytes(b"truncated")
    pack(folder, tmp_path / "shards", fmt="tar")
    pack(folder, tmp_path / "tables", fmt="parquet")
    for spec in (str(folder), str(tmp_path / "shards"), f"hf:{tmp_path / 'tables'}"):
        ds = ViewDataset(split_sources(spec)[0], [View("image", 8)], DataConfig(), seed=0)
        assert ds[(0, 2)]["bad"] == [2] and ds[(0, 3)]["bad"] == []


def test_index_is_built_on_first_open_and_rebuilt_when_stale(packed, tmp_path):
    shard = tmp_path / "tar" / "train-000000.tar"
    index = tmp_path / "tar" / ("train-000000.tar" + INDEX_SUFFIX)
    before = json.loads(index.read_text())
    index.unlink()
    src = open_shards(str(shard))
    assert json.loads(index.read_text()) == before and len(src) == len(before["offsets"])
    index.write_text(json.dumps({**before, "bytes": 1}))  # the shard was rewritten since
    open_shards(str(shard))
    assert json.loads(index.read_text()) == before


def test_brace_patterns_and_shard_urls(packed, tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..9}") == ["a-8", "a-9", "b-8", "b-9"]
    n = len(json.loads((tmp_path / "tar" / "pack.json").read_text())["splits"]["train"]["files"])
    pattern = f"{tmp_path}/tar/train-{{000000..{n - 1:06d}}}.tar"
    whole = split_sources(packed["tar"])[0]
    for spec in (pattern, f"file://{pattern}"):
        src, evaluate = split_sources(spec)
        assert evaluate is None and src.labels == whole.labels and same_images(src, whole)


def test_list_file_labels_and_relative_paths(tmp_path):
    write_images(tmp_path / "img", 3)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "classes.txt").write_text("cat\ndog\n")
    lst = tmp_path / "lists" / "all.txt"
    lst.write_text("# comment\n../img/img_0000.png 1\n\n../img/img_0001.png 0\n" + f"{tmp_path}/img/img_0002.png 1\n")
    src = read_list(str(lst))
    assert src.labels == [1, 0, 1] and src.classes == ["cat", "dog"]
    assert same_images(src, scan_folder(tmp_path / "img"))
    lst.write_text("../img/img_0000.png\n../img/img_0001.png\n")
    assert not split_sources(str(lst))[0].labeled
    lst.write_text("../img/img_0000.png 1\n../img/img_0001.png\n")
    with pytest.raises(DataError, match="img_0001.png' breaks the rule that every line, or none, has a label"):
        read_list(str(lst))


def test_bad_inputs_name_the_file(packed, tmp_path):
    with pytest.raises(DataError, match="train-000099.tar' does not exist"):
        open_shards(f"{tmp_path}/tar/train-{{000000,000099}}.tar")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match="junk.tar' cannot be read as a tar file"):
        split_sources(str(tmp_path / "junk.tar"))
    good = tmp_path / "tar" / "train-000000.tar"
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:3000])  # truncated mid-member
    with pytest.raises(DataError, match="cut.tar"):
        open_shards(str(tmp_path / "cut.tar"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": [0, 1], "name": ["x", "y"]}), tmp_path / "noimage.parquet")
    with pytest.raises(DataError, match="noimage.parquet' has no image column"):
        load_splits(DataConfig(path=f"hf:{tmp_path / 'noimage.parquet'}"))
    (tmp_path / "lists" / "train.txt").write_text("gone.jpg\t0\n")
    with pytest.raises(DataError, match="missing file.*gone.jpg"):
        load_splits(DataConfig(path=packed["list"]))


def test_hf_save_to_disk_layout(packed, tmp_path):
    """A DatasetDict as `datasets.save_to_disk` writes it: Arrow stream files listed in each split's state.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "saved"
    for split in ("train", "validation"):
        name = "train" if split == "train" else "val"
        tables = [pq.read_table(tmp_path / "parquet" / f) for f in sorted(os.listdir(tmp_path / "parquet"))
                  if f.startswith(name) and f.endswith(".parquet")]  # fmt: skip
        table = pa.concat_tables(tables)
        (root / split).mkdir(parents=True)
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=7)  # several record batches
        (root / split / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
        )
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    a = load_splits(DataConfig(path=packed["folder"]), seed=0)
    b = load_splits(DataConfig(path=f"hf:{root}"), seed=0)
    assert b.train.classes == ["a", "b"] and b.train.labels == a.train.labels and same_images(a.train, b.train)
    assert same_images(a.query, b.query)


def test_pack_is_deterministic_and_cli_runs(labeled_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    for out in ("one", "two"):
        args = parser.parse_args(["pack", "--data", str(labeled_folder), "--out", str(tmp_path / out), "--shard-size",
                                  "6KB"])  # fmt: skip
        assert run(args) == 0
    assert "pre-train with --data" in capsys.readouterr().out
    for f in sorted(os.listdir(tmp_path / "one")):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    with pytest.raises(DataError, match="not empty"):
        pack(labeled_folder, tmp_path / "one")
    assert parse_size("1.5KiB") == 1536 and parse_size("2MB") == 2_000_000
    with pytest.raises(DataError, match="shard-size"):
        parse_size("lots")
    with tarfile.open(tmp_path / "one" / "train-000000.tar") as tar:
        assert tar.getnames()[:2] == ["a/img_0000.png", "a/img_0000.cls"]


def test_scan_cache_spares_the_walk_until_the_folder_changes(labeled_folder, monkeypatch):
    root = labeled_folder / "train"
    past = time.time() - 60  # older than the racy window: the listing may be cached
    for d in (root, root / "a", root / "b"):
        os.utime(d, (past, past))
    first = cached_listing(root)
    assert first == list_images(root)
    with monkeypatch.context() as m:
        m.setattr(folder_module, "list_images", lambda r: pytest.fail("walked again"))
        assert cached_listing(root) == first
    write_images(root / "a", 1, seed=9, fmt="jpg")  # a new file changes a/'s mtime
    assert len(cached_listing(root)) == len(first) + 1


def test_remote_shards_read_by_ranged_reads(packed, tmp_path):
    """An fsspec filesystem that is not local (memory://, standing in for s3:// or https://): shards found in a
    folder URL, their indexes built and kept in the user cache, images fetched by ranged reads."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in sorted(os.listdir(tmp_path / "tar")):
        if f.endswith(".tar") or f == "classes.txt":  # no index files: they are built on first open
            fs.pipe(f"/remote/{f}", (tmp_path / "tar" / f).read_bytes())
    train, evaluate = split_sources("memory://remote")
    local_train, local_eval = split_sources(packed["tar"])
    assert train.classes == ["a", "b"] and train.labels == local_train.labels and same_images(train, local_train)
    assert evaluate.name == "memory://remote/val" and same_images(evaluate, local_eval)
    assert len(os.listdir(tmp_path / "cache" / "mimkit" / "tar-index")) == len(train.urls) + len(evaluate.urls)
    assert train.describe(0).startswith("memory://") and train.describe(0).endswith("/train-000000.tar:a/img_0000")

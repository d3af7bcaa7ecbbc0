"""Images/s of each data source through the same Pillow decode, and how fast a 1,000,000-path list is ready.

    python benchmarks/sources.py                                  # 2,000 imagenette160 images, 5 rounds
    python benchmarks/sources.py --data ../shared/data/imagenette160 --images 2000 --rounds 5 --jsonl out.jsonl

Part 1: a fixed subset of the folder (`--images`, every class alike) is copied into a temporary folder, packed
with `mimkit data pack` into tar shards and into Parquet, and named by a list file. Each source then delivers
every image in one seeded random order (random access, as the training sampler reads): `read` fetches the encoded
bytes only, `decode` is `source.load` (Pillow decode + RGB), the path the training loader takes. Within a round
the sources take turns every 50 images, so machine noise hits them alike; the median round is reported, with its
ratio to the folder.
The files are in the page cache after the first round (reported apart): this measures each source's own cost,
not the disk.

Part 2: a list of 1,000,000 paths (ImageNet-sized: 1,000 folders of 1,000 names): the scan cache read back
(`folder.cached_listing` on a folder whose walk has been cached), a list file parsed (`read_list`, existence check
off: the files are not there), and the broadcast from rank 0 to rank 1 (`folder.rank_zero_computes`, 2 gloo
processes). Results are for docs/data-sources.md, never for assertions in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import append_jsonl

from mimkit.data import folder as folder_module
from mimkit.data.folder import scan_folder, seeded_subset
from mimkit.data.pack import pack
from mimkit.data.sources import read_list, split_sources

MILLION = 1_000_000


def copy_subset(data: Path, images: int, out: Path) -> None:
    """A seeded subset of `data`'s training images (its train/ when split) copied to out/<class>/<file>."""
    source = scan_folder(data / "train" if (data / "train").is_dir() else data)
    subset = seeded_subset(source, images, seed=0)
    for p in subset.paths:
        rel = Path(p).relative_to(source.name)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, out / rel)


def make_sources(work: Path) -> dict:
    folder = work / "folder"
    pack(folder, work / "tar", shard_size="8MB", fmt="tar")
    pack(folder, work / "parquet", shard_size="8MB", fmt="parquet")
    src = scan_folder(folder)
    lines = [f"{os.path.relpath(p, work)}\t{src.classes[y]}" for p, y in zip(src.paths, src.labels)]
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    specs = {"folder": str(folder), "tar": str(work / "tar"), "parquet": f"hf:{work / 'parquet'}"}
    specs["list"] = str(work / "list.txt")
    return {name: split_sources(spec)[0] for name, spec in specs.items()}


def seconds(source, indices: list[int], decode: bool) -> float:
    start = time.perf_counter()
    for i in indices:
        if decode:
            source.load(i)
        else:
            f = source.open(i)
            f.read() if hasattr(f, "read") else Path(f).read_bytes()
    return time.perf_counter() - start


def throughput(sources: dict, rounds: int, chunk: int = 50) -> list[dict]:
    """Median images/s over `rounds` (a first round, files entering the page cache, is reported apart). Within a
    round the sources take turns every `chunk` images, the first turn rotating, so machine noise hits all alike."""
    names = list(sources)
    n = len(sources[names[0]])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    rates: dict = {(name, m): [] for name in names for m in ("read", "decode")}
    first = {}
    for r in range(rounds + 1):
        for mode in ("read", "decode"):
            spent = dict.fromkeys(names, 0.0)
            for k, at in enumerate(range(0, n, chunk)):
                for name in names[k % len(names) :] + names[: k % len(names)]:
                    spent[name] += seconds(sources[name], order[at : at + chunk], mode == "decode")
            for name in names:
                if r == 0:
                    first[(name, mode)] = n / spent[name]  # files entering the page cache: reported apart
                else:
                    rates[(name, mode)].append(n / spent[name])
    rows = []
    for (name, mode), values in rates.items():
        median = statistics.median(values)
        base = statistics.median(rates[("folder", mode)])
        rows.append({"source": name, "mode": mode, "images": n, "img_per_s": round(median, 1),
                     "vs_folder": round(median / base, 2), "first_round": round(first[(name, mode)], 1)})  # fmt: skip
    return rows


def million_paths(work: Path) -> list[str]:
    """1,000 folders x 1,000 names under work/big (the folders exist, empty; the names are the cache's)."""
    root = work / "big"
    for c in range(1000):
        (root / f"n{c:08d}").mkdir(parents=True)
    return [str(root / f"n{c:08d}" / f"n{c:08d}_{i:06d}.JPEG") for c in range(1000) for i in range(1000)]


def cache_read_seconds(work: Path, paths: list[str]) -> float:
    """The scan cache of a 1M-image folder read back (written once by the real code, the walk stubbed)."""
    root = work / "big"
    past = time.time() - 60  # older than the cache's racy window
    for d in [root, *root.iterdir()]:
        os.utime(d, (past, past))
    real = folder_module.list_images
    folder_module.list_images = lambda r: paths  # the walk that would have found them
    try:
        assert folder_module.cached_listing(root) == paths
    finally:
        folder_module.list_images = real
    folder_module.list_images = lambda r: (_ for _ in ()).throw(RuntimeError("walked: the cache was not used"))
    try:
        start = time.perf_counter()
        got = folder_module.cached_listing(root)
        seconds = time.perf_counter() - start
    finally:
        folder_module.list_images = real
    assert len(got) == MILLION
    return seconds


def list_parse_seconds(work: Path, paths: list[str]) -> float:
    lst = work / "million.txt"
    lst.write_text("".join(f"{p} {i % 1000}\n" for i, p in enumerate(paths)))
    start = time.perf_counter()
    src = read_list(str(lst), check_files=False)
    seconds = time.perf_counter() - start
    assert len(src) == MILLION
    return seconds


def _broadcast_worker(rank: int, store: str, cache_home: str, root: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["XDG_CACHE_HOME"] = cache_home
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:
        folder_module.list_images = lambda r: (_ for _ in ()).throw(RuntimeError("rank 1 walked"))
    dist.barrier()
    start = time.perf_counter()
    paths = folder_module.shared_listing(Path(root))
    seconds = time.perf_counter() - start
    if rank == 1:
        Path(out).write_text(json.dumps({"seconds": seconds, "paths": len(paths)}))
    dist.barrier()
    dist.destroy_process_group()


def broadcast_seconds(work: Path) -> float:
    """Rank 0 reads the cached 1M listing and broadcasts it; rank 1's wait, from the same barrier."""
    out = work / "broadcast.json"
    args = (str(work / "store"), os.environ["XDG_CACHE_HOME"], str(work / "big"), str(out))
    torch.multiprocessing.spawn(_broadcast_worker, args=args, nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["paths"] == MILLION
    return result["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/imagenette160"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--jsonl", help="append the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # no trace in the user's cache
        copy_subset(Path(args.data), args.images, work / "folder")
        start = time.perf_counter()
        sources = make_sources(work)
        print(f"packed {args.images} images into tar and Parquet, list written: {time.perf_counter() - start:.1f} s")
        rows = throughput(sources, args.rounds)
        paths = million_paths(work)
        rows.append(
            {"source": "1M paths", "mode": "scan cache read", "seconds": round(cache_read_seconds(work, paths), 2)}
        )
        rows.append(
            {"source": "1M paths", "mode": "list file parse", "seconds": round(list_parse_seconds(work, paths), 2)}
        )
        rows.append(
            {"source": "1M paths", "mode": "rank 0 -> 1 broadcast (gloo)", "seconds": round(broadcast_seconds(work), 2)}
        )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"machine: {machine}")
    for r in rows:
        r["machine"] = machine
        if "img_per_s" in r:
            print(f"{r['source']:8s} {r['mode']:6s} {r['img_per_s']:9.1f} img/s  x{r['vs_folder']:.2f} of folder"
                  f"  (first round {r['first_round']:.1f})")  # fmt: skip
        else:
            print(f"{r['source']:8s} {r['mode']:30s} {r['seconds']:.2f} s")
    append_jsonl(args.jsonl, rows)


if __name__ == "__main__":
    main()

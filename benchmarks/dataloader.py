"""Images/s of each training data path alone (no model): what the input pipeline can feed a training step.

    python benchmarks/dataloader.py                                   # the demo digits at 32 px
    python benchmarks/dataloader.py --data ../shared/data/cifar10 --max-images 5000 --workers 0,1,2
    python benchmarks/dataloader.py --data /path/to/imagenette --image-size 128 --views beit --jsonl dl.jsonl

Paths, each producing the float batches `prepare_batch` gives the training loop, on the training device:
  - Pillow worker loader (`data.device_cache=false`): decode + crop + resize per image in DataLoader workers.
  - device cache (`data.device_cache=true`, mimkit.data.device_cache): images decoded once (build time reported
    apart), then crops and resizes batched on the device; on CPU, and on CUDA when available. The `fast crops` rows
    (`data.device_crops=fast`) draw the crop boxes on the device too, instead of one host generator per image.
  - GPU JPEG decoding (`torchvision.io.decode_jpeg(device='cuda')`), batched, decode only (no crop): the
    alternative for datasets too large to cache. PNG folders are re-encoded as JPEG (quality 90) in memory first.
Steady state is timed: the first batch (worker start-up, first prefetch) is reported as start-up. Results are
for benchmarks/README.md and docs/benchmarks.md, never for assertions in the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import platform
import time
from itertools import count

import torch
from harness import append_jsonl, sync

from mimkit.config import DataConfig
from mimkit.data import View, load_splits
from mimkit.data.device_cache import DeviceCache
from mimkit.data.pipeline import EpochBatchSampler, ViewDataset, prepare_batch, train_loader

VIEWS = {  # which method's views to render
    "mae": lambda s: (View("image", s),),
    "beit": lambda s: (View("image", s), View("tokens", s // 2, "lanczos", normalize="unit")),
    "cmae": lambda s: (View("image", s), View("target", s, crop_group=1)),
}


def epochs(loader, sampler: EpochBatchSampler):
    """Batches of epoch 0, 1, ... (re-iterating the loader, as the training loop does)."""
    for epoch in count():
        sampler.start(epoch)
        yield from loader


def timed(batches, args, device, start: float, prepare=None) -> dict:
    """Start-up (first batch) and steady-state images/s over args.batches further batches."""
    first = next(batches)
    if prepare is not None:
        first = prepare(first)
    sync(device)
    startup = time.perf_counter() - start
    t = time.perf_counter()
    for _ in range(args.batches):
        b = next(batches)
        if prepare is not None:
            b = prepare(b)
    sync(device)
    dt = time.perf_counter() - t
    return {"img_per_s": args.batches * args.batch_size / dt, "ms_per_batch": 1000 * dt / args.batches,
            "startup_s": startup}  # fmt: skip


def pillow_loader(dataset: ViewDataset, args, workers: int, device: torch.device) -> dict:
    cfg = dataset.cfg
    start = time.perf_counter()
    sampler = EpochBatchSampler(len(dataset), args.batch_size, seed=0)
    loader = train_loader(dataset, sampler, workers, pin=device.type == "cuda")
    batches = epochs(loader, sampler)
    res = timed(batches, args, device, start, lambda b: prepare_batch(b, dataset.views, device, cfg.mean, cfg.std))
    batches.close()  # shuts the persistent workers down
    return res


def device_cache(dataset: ViewDataset, args, device: torch.device, crops: str = "exact") -> dict:
    dataset.cfg = dataclasses.replace(dataset.cfg, device_crops=crops)
    start = time.perf_counter()
    cache = DeviceCache(dataset, device)
    sync(device)
    build = time.perf_counter() - start
    sampler = EpochBatchSampler(len(dataset), args.batch_size, seed=0)
    res = timed(epochs(cache.loader(sampler, dataset.cfg.mean, dataset.cfg.std), sampler), args, device,
                time.perf_counter())  # fmt: skip
    gb = cache.images.numel() / 1e9
    return {**res, "build_s": build, "cache_gb": gb, "cache_hw": [cache.height, cache.width]}


def jpeg_bytes(source, n: int) -> tuple[list[torch.Tensor], bool]:
    """Up to n images as JPEG file bytes (uint8 tensors), from any source (folder, tar shards, Parquet): the stored
    bytes when every one is a JPEG, else each image re-encoded at quality 90; -> (data, re-encoded?)."""
    from mimkit.data.gpu_decode import read_bytes

    raw = [read_bytes(source, i) for i in range(min(n, len(source)))]
    if raw and all(b[:2] == b"\xff\xd8" for b in raw):
        return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw], False
    data = []
    for i in range(len(raw)):
        buf = io.BytesIO()
        source.load(i).save(buf, format="JPEG", quality=90)
        data.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return data, True


def gpu_jpeg(source, args) -> dict:
    from torchvision.io import decode_jpeg

    data, reencoded = jpeg_bytes(source, args.batch_size * min(args.batches + 1, 64))
    chunks = [data[i : i + args.batch_size] for i in range(0, len(data) - args.batch_size + 1, args.batch_size)]
    start = time.perf_counter()
    decode_jpeg(chunks[0], device="cuda")
    torch.cuda.synchronize()
    startup = time.perf_counter() - start
    t = time.perf_counter()
    for k in range(args.batches):
        decode_jpeg(chunks[k % len(chunks)], device="cuda")
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"img_per_s": args.batches * args.batch_size / dt, "ms_per_batch": 1000 * dt / args.batches,
            "startup_s": startup, "reencoded_jpeg": reencoded}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo", help="an image folder (as for `mimkit pretrain --data`) or 'demo'")
    ap.add_argument("--max-images", type=int, help="a seeded subset of the training images")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--views", default="mae", choices=sorted(VIEWS))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per path (after one untimed)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated num_workers for the Pillow loader")
    ap.add_argument("--device-cache-size", type=int, default=0, help="data.device_cache_size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--jsonl", help="append one JSON line per result to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = DataConfig(path=args.data, image_size=args.image_size, max_images=args.max_images,
                     device_cache_size=args.device_cache_size)  # fmt: skip
    source = load_splits(cfg, seed=0, max_eval_images=1).train
    views = VIEWS[args.views](args.image_size)
    dataset = ViewDataset(source, views, cfg, seed=0)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"# data '{args.data}': {len(source)} images; views {args.views} at {args.image_size} px; batch "
          f"{args.batch_size} x {args.batches} timed; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"CPU {cpu}" + (f"; GPU {gpu}" if gpu else ""))  # fmt: skip
    rows: list[tuple[str, str, dict]] = []
    cpu_dev = torch.device("cpu")
    for w in (int(x) for x in args.workers.split(",")):
        rows.append((f"Pillow loader, {w} worker(s)", "cpu", pillow_loader(dataset, args, w, cpu_dev)))
    if gpu:
        w = max(int(x) for x in args.workers.split(","))
        rows.append(
            (f"Pillow loader, {w} worker(s) -> cuda", "cuda", pillow_loader(dataset, args, w, torch.device("cuda")))
        )
    rows.append(("device cache", "cpu", device_cache(dataset, args, cpu_dev)))
    rows.append(("device cache, fast crops", "cpu", device_cache(dataset, args, cpu_dev, "fast")))
    if gpu:
        rows.append(("device cache", "cuda", device_cache(dataset, args, torch.device("cuda"))))
        rows.append(("device cache, fast crops", "cuda", device_cache(dataset, args, torch.device("cuda"), "fast")))
        rows.append(("GPU JPEG decode only (decode_jpeg)", "cuda", gpu_jpeg(source, args)))
    else:
        print("# no CUDA device: device cache on CUDA and GPU JPEG decoding skipped")

    print("\n| path | device | img/s | ms/batch | start-up s | cache build s | cache GB |")
    print("|---|---|---|---|---|---|---|")
    for name, dev, r in rows:
        build = f"{r['build_s']:.2f}" if "build_s" in r else "-"
        gb = f"{r['cache_gb']:.3f}" if "cache_gb" in r else "-"
        cells = [name, dev, f"{r['img_per_s']:.0f}", f"{r['ms_per_batch']:.1f}", f"{r['startup_s']:.2f}", build, gb]
        print("| " + " | ".join(cells) + " |")
    setting = {"images": len(source), "image_size": args.image_size, "views": args.views, "batch": args.batch_size,
               "batches": args.batches, "threads": torch.get_num_threads(), "cpu": cpu, "gpu": gpu}  # fmt: skip
    append_jsonl(args.jsonl, [{"bench": "dataloader", "path": name, "device": dev, "data": args.data, **setting, **r}
                              for name, dev, r in rows])  # fmt: skip


if __name__ == "__main__":
    main()

"""Per-core JPEG decode + crop throughput at 224 px, and what `data.decode=gpu` leaves on the CPU.

    python benchmarks/decode.py                        # 120 imagenette160 images at two sizes, 3 rounds (~1 min)
    python benchmarks/decode.py --images 200 --rounds 5 --jsonl docs/bench/cpu.jsonl

A seeded subset of Imagenette-160's training JPEGs is re-encoded (quality 90, Pillow's default 4:2:0) at 224x224
and at 500x375 (ImageNet's typical size) in a temporary folder: upscaled from 160 px, so smoother than real
photographs of that size, which decode somewhat slower. One thread (`torch.set_num_threads(1)`), no loader
workers: each row is what one core does per image.
- `pillow worker`: `ViewDataset[(epoch, index)]`, the worker loader's whole item (`data.decode=cpu`): Pillow
  decode, RandomResizedCrop box, bicubic resize to 224 with the box, flip, to a tensor;
- `pillow decode`: `ImageSource.load` alone (read + decode + RGB);
- `torchvision decode`: the file's bytes read and decoded by `torchvision.io.decode_jpeg` (CPU, lists of 30);
- `gpu-path worker`: `gpu_decode.EncodedDataset[(epoch, index)]`, what a worker still does per image with
  `data.decode=gpu` (read the bytes, parse the header, draw the crop box).
Within a round the rows take turns every 30 images, so machine noise hits them alike; the median round is
reported, and ratios to `pillow worker` beside the rates (on a shared machine trust the ratios over the rates).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import PIL
import torch
from harness import append_jsonl
from PIL import Image

from mimkit.config import DataConfig
from mimkit.data.folder import scan_folder, seeded_subset
from mimkit.data.gpu_decode import EncodedDataset, decode_jpeg
from mimkit.data.pipeline import ViewDataset
from mimkit.data.views import View

TARGETS = {"A100-class, MAE ViT-B": 2000, "H200, MAE ViT-B": 7000}  # img/s one GPU trains at (see docs)
SIZES = {"224x224": (224, 224), "500x375": (500, 375)}


def make_jpegs(data: Path, images: int, size: tuple[int, int], out: Path) -> list[str]:
    """`images` seeded training JPEGs of `data` resized (bicubic) to `size` and saved at quality 90 in `out`."""
    source = seeded_subset(scan_folder(data / "train" if (data / "train").is_dir() else data), images, seed=0)
    out.mkdir(parents=True)
    paths = []
    for i in range(len(source)):
        p = out / f"{i:05d}.jpg"
        source.load(i).resize(size, Image.Resampling.BICUBIC).save(p, quality=90)
        paths.append(str(p))
    return paths


def rows_for(folder: Path) -> dict:
    """{row name: fn(indices) doing one image's work per index}."""
    source = scan_folder(folder)
    cfg = DataConfig(crop_scale=(0.2, 1.0))
    views = (View("image", 224),)
    worker = ViewDataset(source, views, cfg, seed=0)
    encoded = EncodedDataset(ViewDataset(source, views, cfg, seed=0))

    def tv_decode(indices):
        data = []
        for i in indices:
            with open(source.paths[i], "rb") as f:
                data.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
        decode_jpeg(data, "cpu")

    return {
        "pillow worker": lambda ix: [worker[(0, i)] for i in ix],
        "pillow decode": lambda ix: [source.load(i) for i in ix],
        "torchvision decode": tv_decode,
        "gpu-path worker": lambda ix: [encoded[(0, i)] for i in ix],
    }


def one_round(rows: dict, n: int, chunk: int) -> dict:
    """Seconds per row over all n images, the rows taking turns every `chunk` images."""
    spent = dict.fromkeys(rows, 0.0)
    for start in range(0, n, chunk):
        ix = list(range(start, min(n, start + chunk)))
        for name, fn in rows.items():
            t = time.perf_counter()
            fn(ix)
            spent[name] += time.perf_counter() - t
    return spent


def measure(folder: Path, n: int, rounds: int, chunk: int) -> dict:
    rows = rows_for(folder)
    one_round(rows, min(n, chunk), chunk)  # warm-up: page cache, imports, first-call costs
    results = [one_round(rows, n, chunk) for _ in range(rounds)]
    return {name: n / statistics.median(r[name] for r in results) for name in rows}


def report(size: str, rates: dict) -> list[dict]:
    base = rates["pillow worker"]
    out = []
    print(f"\n{size} JPEGs, one core:")
    for name, rate in rates.items():
        need = "  ".join(f"{t / rate:5.1f} cores for {k}" for k, t in TARGETS.items())
        print(f"  {name:20s} {rate:8.0f} img/s  ({rate / base:4.2f}x)   {need}")
        cores = {f"cores_for_{v}": round(v / rate, 2) for v in TARGETS.values()}
        out.append({"bench": "decode", "size": size, "row": name, "img_per_s": round(rate, 1), **cores})
        out[-1]["ratio"] = round(rate / base, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/imagenette160"))
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=30)
    p.add_argument("--jsonl", help="append the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, Pillow {PIL.__version__}; "
          f"{args.images} images, {args.rounds} rounds (median), 1 thread")  # fmt: skip
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, wh in SIZES.items():
            folder = Path(tmp) / size
            make_jpegs(Path(args.data), args.images, wh, folder)
            lines += report(size, measure(folder, args.images, args.rounds, args.chunk))
    append_jsonl(args.jsonl, [{**line, "images": args.images, "rounds": args.rounds} for line in lines])


if __name__ == "__main__":
    main()

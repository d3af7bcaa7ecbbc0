"""Throughput of the strong (teacher) perturbation of ConMIM: mimkit's batched op against per-image torchvision.

    python benchmarks/augment.py                          # 32 px x 256 and 224 px x 64, on this machine
    python benchmarks/augment.py --device cuda --json docs/bench/augment-gpu.jsonl

Same perturbation in all rows: colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur
p 0.1 (sigma 0.1-2 px), solarize p 0.2.
- **mimkit batched**: `mimkit.data.augment.ColorAugment` on a (B, 3, H, W) float batch, on the device;
- **torchvision v2, per image, uint8 tensor**: a `transforms.v2.Compose` called on each image, as a Dataset would;
- **torchvision v2, per image, PIL**: the same on PIL images (what PIL-based pipelines such as ConMIM's do),
  including the PIL -> tensor conversion.
Per-image rows run in this process (one worker); a DataLoader divides their cost by its worker count, at the price of
those CPU cores. Results are for docs/benchmarks.md, never for assertions.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from harness import append_jsonl, best_seconds, device_name, machine_line
from PIL import Image

from mimkit.data.augment import ColorAugment, blur_kernel_size


def torchvision_pipeline(size: int):
    from torchvision.transforms import v2

    k = blur_kernel_size(2.0, size, size)
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.1),
            v2.RandomSolarize(threshold=128, p=0.2),
        ]
    )


def measure(size: int, batch: int, device, repeats: int) -> dict:
    """img/s of the three ways to perturb `batch` random images of `size` px."""
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    pil = [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in u8]
    x = u8.to(device).float().div_(255)
    aug, tv, cpu = ColorAugment(), torchvision_pipeline(size), torch.device("cpu")
    return {
        "mimkit_batched": batch / best_seconds(lambda: aug(x), device, repeats),
        "tv2_uint8_per_image": batch / best_seconds(lambda: [tv(im) for im in u8], cpu, repeats),
        "tv2_pil_per_image": batch / best_seconds(lambda: [TF.pil_to_tensor(tv(im)) for im in pil], cpu, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="32x256,224x64", help="SIZExBATCH, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls; the fastest counts")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = device_name(device)
    print(machine_line(name, f"repeats {args.repeats}"))
    print("| images | mimkit batched | torchvision v2 per image (uint8) | torchvision v2 per image (PIL) |  (img/s)")
    print("|---|---|---|---|")
    for spec in args.configs.split(","):
        size, batch = (int(v) for v in spec.split("x"))
        res = measure(size, batch, device, args.repeats)
        print(f"| {size} px x {batch} | {res['mimkit_batched']:.0f} | {res['tv2_uint8_per_image']:.0f} | "
              f"{res['tv2_pil_per_image']:.0f} |")  # fmt: skip
        rec = {"bench": "augment", "size": size, "batch": batch, "device": name, "mimkit_device": str(device)}
        append_jsonl(args.json, [{**rec, "threads": torch.get_num_threads(), **res}])


if __name__ == "__main__":
    main()

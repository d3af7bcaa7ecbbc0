"""Image-tokenizer throughput: encode (image -> token ids) and decode (ids -> image), images per second.

    python benchmarks/tokenizer.py                      # CPU or the GPU, every configuration below
    python benchmarks/tokenizer.py --only dalle --json docs/bench/cpu.jsonl

Configurations: mimkit's VQ-VAE at 32 px (8x8 tokens; the cifar10-tokenizer recipe, and the wider default of
`TokenizerConfig`), with its training step (forward, backward, AdamW) for reference, and DALL-E's dVAE
architecture at full size (8192 tokens, n_hid 256, random weights: same cost as the official ones) at 112 px
(14x14 tokens, BEiT/CIM's use). Tokenizers compute in float32 by design (token ids must not depend on the
caller's precision), so there is no precision flag. Synthetic images; results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os

import torch
from harness import append_jsonl, autocast, device_name, machine_line, mean_seconds, pick_device

from mimkit.models.tokenizer import DalleTokenizer, VQTokenizer

CONFIGS = {
    "vq-recipe": ("VQ-VAE w32 r1 c16, 512 codes @32", lambda: VQTokenizer(512, 4, 32, 16, 1, 32), 32, 256, 1024),
    "vq-default": ("VQ-VAE w64 r2 c16, 512 codes @32", lambda: VQTokenizer(512, 4, 64, 16, 2, 32), 32, 256, 1024),
    "dalle": ("DALL-E dVAE n_hid 256, 8192 codes @112", lambda: DalleTokenizer(image_size=112), 112, 16, 128),
}


def measure(name: str, device, steps: int, warmup: int, train: bool) -> dict:
    label, build, size, batch_cpu, batch_gpu = CONFIGS[name]
    batch = batch_gpu if device.type == "cuda" else batch_cpu
    torch.manual_seed(0)
    tok = build().to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    with torch.no_grad():
        ids = tok.encode(x)
        enc = mean_seconds(lambda: tok.encode(x), device, steps, warmup)
        dec = mean_seconds(lambda: tok.decode(ids), device, steps, warmup)
    res = {"config": name, "label": label, "batch": batch, "grid": ids.shape[-1], "vocab": tok.vocab_size}
    res.update(encode_img_per_s=batch / enc, decode_img_per_s=batch / dec)
    if train and isinstance(tok, VQTokenizer):
        tok.train()
        opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)

        def step(dtype=None):
            with autocast(device, dtype):
                out = tok.forward_train(x)
                loss = (out["recon"] - x).pow(2).mean() + 0.25 * out["commit"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        res["train_fp32_img_per_s"] = batch / mean_seconds(step, device, steps, warmup)
        if device.type == "cpu":  # the CPU run of docs/results.md used bf16 autocast for the convolutions
            bf16 = mean_seconds(lambda: step(torch.bfloat16), device, steps, warmup)
            res["train_bf16_img_per_s"] = batch / bf16
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=0, help="timed calls (default 5 on CPU, 30 on GPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls (default 1 on CPU, 5 on GPU)")
    ap.add_argument("--no-train", action="store_true", help="skip the VQ-VAE training step")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    steps, warmup = args.steps or (30 if gpu else 5), args.warmup or (5 if gpu else 1)
    name = device_name(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(machine_line(name, f"load {load:.1f}", "float32", f"steps {steps} (+{warmup} warm-up)"))
    print("| tokenizer | batch | tokens | encode img/s | decode img/s | train img/s (fp32 / bf16) |")
    print("|---|---|---|---|---|---|")
    for cfg in args.only.split(","):
        r = measure(cfg, device, steps, warmup, not args.no_train)
        tr = "/".join(f"{r[k]:.0f}" for k in ("train_fp32_img_per_s", "train_bf16_img_per_s") if k in r) or "-"
        grid = f"{r['grid']}x{r['grid']} of {r['vocab']}"
        rates = f"{r['encode_img_per_s']:.1f} | {r['decode_img_per_s']:.1f}"
        print(f"| {r['label']} | {r['batch']} | {grid} | {rates} | {tr} |")
        rec = {"bench": "tokenizer", "device": name, "threads": torch.get_num_threads(), "load": load}
        append_jsonl(args.json, [{**rec, **r}])


if __name__ == "__main__":
    main()

"""Where a CIM training step spends its time: tokenize, generator, corrupt+decode, enhancer, optimizer.

    python benchmarks/cim_breakdown.py                          # ViT-Tiny/4 @32 with a VQ tokenizer (8x8 tokens)
    python benchmarks/cim_breakdown.py --sizes tiny,base,r50    # + ViT-Base/16 and ResNet-50 @224 with DALL-E's dVAE

Tokenizers are randomly initialised (timing does not depend on the weights). Each part is timed on its own
(forward, plus backward where the part trains), then the whole step; the sum of the parts is close to the step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from harness import append_jsonl, autocast, device_name, machine_line, mean_seconds, pick_device

from mimkit.methods import build_method
from mimkit.models.tokenizer import DalleTokenizer, VQTokenizer, save_tokenizer
from mimkit.run_config import build_config

SIZES = {
    # name: (model overrides, tokenizer factory, batch on CPU, batch on GPU)
    "tiny": (["model.name=vit_tiny_patch16_224", "model.patch_size=4", "data.image_size=32"],
             lambda: VQTokenizer(vocab_size=512, downsample=4, image_size=32), 32, 512),
    "base": (["model.name=vit_base_patch16_224", "model.patch_size=16", "data.image_size=224"],
             lambda: DalleTokenizer(image_size=112), 4, 128),
    "r50": (["model.name=resnet50", "model.patch_size=16", "data.image_size=224", "cim.cnn_output_stride=16"],
            lambda: DalleTokenizer(image_size=112), 4, 128),
}  # fmt: skip
GENERATOR = ["cim.generator_depth=4", "cim.generator_dim=384", "cim.generator_heads=6"]


def run(size: str, method: str, device, steps: int, dtype, tmp: Path) -> dict:
    overrides, make_tok, b_cpu, b_gpu = SIZES[size]
    tok_dir = save_tokenizer(make_tok(), tmp / f"tok-{size}")
    cfg = build_config(dotted=[*overrides, *GENERATOR, f"method={method}", f"tokenizer.path={tok_dir}"])
    torch.manual_seed(0)
    m = build_method(cfg).to(device).train()
    batch_size = b_gpu if device.type == "cuda" else b_cpu
    s = cfg.data.image_size
    tok_size = m.views[1].size
    batch = {"image": torch.randn(batch_size, 3, s, s, device=device),
             "tokens": torch.rand(batch_size, 3, tok_size, tok_size, device=device)}  # fmt: skip
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    ids = m.generator.targets(batch["tokens"])
    mask = m.mask(batch_size, device)
    with torch.no_grad(), autocast(device, dtype):
        logits = m.generator.predict(m.generator.encode(batch["image"], mask), mask)
        _, replaced, corrupted = m.corrupt(ids, mask, logits)

    def generator():
        with autocast(device, dtype):
            g = m.generator.predict(m.generator.encode(batch["image"], mask), mask)
            loss = m.generator.loss(g, ids[mask])
        loss.backward()

    def enhancer():
        with autocast(device, dtype):
            loss = m.enhancer_loss(m.enhance(corrupted), batch["image"], replaced)
        loss.backward()

    def step():
        with autocast(device, dtype):
            loss, _ = m(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    parts = {
        "tokenize": mean_seconds(lambda: m.generator.targets(batch["tokens"]), device, steps),
        "generator": mean_seconds(generator, device, steps),
        "corrupt+decode": mean_seconds(lambda: m.corrupt(ids, mask, logits), device, steps),
        "enhancer": mean_seconds(enhancer, device, steps),
        "step": mean_seconds(step, device, steps),
    }
    return {"size": size, "method": method, "batch": batch_size,
            **{k: round(1000 * v, 1) for k, v in parts.items()},
            "img_per_s": batch_size / parts["step"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny")
    ap.add_argument("--methods", default="cim-respix,cim-revdet")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    device = pick_device()
    dtype = {"fp32": None, "bf16": torch.bfloat16}.get(
        args.precision, torch.bfloat16 if device.type == "cuda" else None
    )
    gpu = device_name(device) if device.type == "cuda" else "cpu"
    print(machine_line(gpu, f"precision {'bf16' if dtype else 'fp32'}", "ms per call"))
    print("| size | method | batch | tokenize | generator | corrupt+decode | enhancer | step | img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for method in args.methods.split(","):
                r = run(size, method, device, args.steps, dtype, Path(tmp))
                print(f"| {size} | {method} | {r['batch']} | {r['tokenize']} | {r['generator']} | "
                      f"{r['corrupt+decode']} | {r['enhancer']} | {r['step']} | {r['img_per_s']:.1f} |")  # fmt: skip
                append_jsonl(args.json, [{**r, "device": str(device)}])


if __name__ == "__main__":
    main()

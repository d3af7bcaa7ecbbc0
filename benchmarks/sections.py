"""Sections of benchmarks/throughput.py that time every registered method and the downstream steps.

    python benchmarks/throughput.py --methods all --sizes tiny          # every method's full training step
    python benchmarks/throughput.py --methods downstream --sizes tiny   # fine-tuning and segmentation steps

Every method is built exactly as `mimkit pretrain` builds it (`build_method` on a config), and timed on a
synthetic batch of the views it asks for. BEiT and CIM get a randomly initialised tokenizer of the right grid
(the VQ-VAE at 32 px, DALL-E's dVAE architecture at 224 px): timing does not depend on the weights.
transformers' BeitForMaskedImageModeling is the peer for BEiT.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from harness import append_jsonl, measure, measure_many

from mimkit.methods import METHODS, build_method
from mimkit.run_config import build_config

MODEL = {
    "tiny": ["model.name=vit_tiny_patch16_224", "model.patch_size=4", "data.image_size=32"],
    "base": ["model.name=vit_base_patch16_224", "model.patch_size=16", "data.image_size=224"],
}
BATCH = {"tiny": (64, 1024), "base": (8, 128)}  # (CPU, GPU)


def setting(size: str, key: str) -> str:
    """The value MODEL[size] sets `key` to ('data.image_size' -> '32')."""
    return next(o.split("=", 1)[1] for o in MODEL[size] if o.startswith(f"{key}="))


def image_size(size: str) -> int:
    return int(setting(size, "data.image_size"))


def model_title(size: str) -> str:
    """'vit_tiny_patch16_224/4': the timm name and the patch."""
    return f"{setting(size, 'model.name')}/{setting(size, 'model.patch_size')}"


def tokenizer_dir(size: str, tmp: Path) -> Path:
    from mimkit.models.tokenizer import DalleTokenizer, VQTokenizer, save_tokenizer

    folder = tmp / f"tok-{size}"
    if not folder.exists():
        tok = VQTokenizer(vocab_size=512, downsample=4, image_size=32) if size == "tiny" else DalleTokenizer(112)
        save_tokenizer(tok, folder)
    return folder


def method_builder(method: str, size: str, batch: int, device, tmp: Path):
    """-> a `build(s)` for harness.measure_many: the method module and a step that ignores the measure's input
    and uses a batch of the method's own views."""

    def build(_s):
        overrides = [*MODEL[size], f"method={method}"]
        if method in ("beit", "cim-respix", "cim-revdet"):
            overrides.append(f"tokenizer.path={tokenizer_dir(size, tmp)}")
        cfg = build_config(dotted=overrides)
        m = build_method(cfg)
        views = {v.name: v for v in m.views}
        data = {
            n: (torch.rand if v.normalize == "unit" else torch.randn)(batch, 3, v.size, v.size, device=device)
            for n, v in views.items()
        }

        def step(_x):
            m.after_step(1, 100)  # EMA updates etc. of the previous step, inside the timing
            return m(data)[0]

        return m, step

    return build


def mimkit_beit_ids_given(size: str, batch: int, device, tmp: Path):
    """mimkit's BEiT step with the visual-token ids computed once beforehand: what transformers' model is
    timed on (it takes labels), so the two rows compare the same work; the tokenizer's cost is the difference
    to the plain `beit` row."""

    def build(s):
        m, step = method_builder("beit", size, batch, device, tmp)(s)
        with torch.no_grad():
            v = next(v for v in m.views if v.normalize == "unit")
            ids = m.targets(torch.rand(batch, 3, v.size, v.size, device=device))
        m.targets = lambda _images: ids
        return m, step

    return build


def transformers_beit(size: str, batch: int, device):
    """transformers' BEiT pre-training (blockwise-masked visual-token prediction) at mimkit's sizes."""
    from transformers import BeitConfig, BeitForMaskedImageModeling

    image, patch, dim, heads = (32, 4, 192, 3) if size == "tiny" else (224, 16, 768, 12)
    cfg = BeitConfig(
        image_size=image,
        patch_size=patch,
        hidden_size=dim,
        num_hidden_layers=12,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        vocab_size=512 if size == "tiny" else 8192,
        use_shared_relative_position_bias=True,
        use_mask_token=True,
        layer_scale_init_value=0.1,
    )
    n = (image // patch) ** 2

    def build(_s):
        model = BeitForMaskedImageModeling(cfg)
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(batch, n, generator=g).argsort(1) < int(0.4 * n)
        labels = torch.randint(0, cfg.vocab_size, (int(mask.sum()),), generator=g)  # masked positions only
        mask, labels = mask.to(device), labels.to(device)

        def step(x):
            return model(pixel_values=x, bool_masked_pos=mask, labels=labels).loss

        return model, step

    return build


def every_method_section(args, device, dtype, steps: int, warmup: int, name: str) -> None:
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            batch = args.batch_size or BATCH[size][gpu]
            print(f"\n## Every method, {model_title(size)} at {image_size(size)} px, batch {batch}, default settings")
            print("| method | img/s | ms/step | ratio vs mimkit MAE |" + (" peak GB |" if gpu else ""))
            print("|---|---|---|---|" + ("---|" if gpu else ""))
            s = SimpleNamespace(image=image_size(size))
            timing = (s, batch, device, dtype, steps, warmup, args.compile)
            builders = {m: method_builder(m, size, batch, device, Path(tmp)) for m in METHODS if m != "tokenizer"}
            builders["beit, token ids given"] = mimkit_beit_ids_given(size, batch, device, Path(tmp))
            builders["beit (transformers)"] = transformers_beit(size, batch, device)
            only = set(args.only.split(",")) if args.only else set(builders)
            chosen = {k: b for k, b in builders.items() if k in only or k == "mae"}
            rows = measure_many(chosen, *timing, rounds=args.rounds)
            for label in [k for k, r in rows.items() if "skipped" in r]:
                print(f"| {label} | skipped ({rows.pop(label)['skipped']}) |")
            ref = rows["mae"]["img_per_s"]
            for method, r in rows.items():
                row = f"| {method} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['img_per_s'] / ref:.2f}x |"
                print(row + (f" {r.get('peak_mem_gb', 0):.1f} |" if gpu else ""))
            append_jsonl(args.json, [{"section": "every_method", "size": size, "method": method, "batch": batch,
                                      "device": name, "compile": args.compile, "precision": args.precision, **r}
                                     for method, r in rows.items()])  # fmt: skip


def finetune_builder(size: str, batch: int, device):
    """A fine-tuning step as `mimkit finetune` runs it: mixup/cutmix, soft-target CE, layer-decay AdamW (the
    optimizer of the timing loop is plain AdamW; the parameter groups change nothing in its cost)."""
    from mimkit.engine.tasks.encoders import encoder_spec
    from mimkit.engine.tasks.finetune import build_classifier, mixup_and_criterion

    def build(_s):
        cfg = build_config(["finetune"], dotted=MODEL[size])
        model = build_classifier(encoder_spec("none", cfg), cfg, num_classes=10 if size == "tiny" else 1000)
        mixup, criterion = mixup_and_criterion(cfg, model.num_classes)
        labels = torch.randint(0, model.num_classes, (batch,)).to(device)  # once, not in the timed step

        def step(x):
            images, targets = mixup(x, labels)
            return criterion(model(images), targets)

        return model, step

    return build


def segment_builder(size: str, batch: int, head: str, device):
    """A segmentation step as `mimkit segment` runs it: multi-level features, the head, pixel cross-entropy
    over the crop (ADE20K's 150 classes at 224 px; 11 at 32 px)."""
    from mimkit.engine.tasks.encoders import encoder_spec
    from mimkit.engine.tasks.segment import build_segmenter, seg_loss

    def build(s):
        k = 11 if size == "tiny" else 150
        cfg = build_config(["segment"], dotted=[*MODEL[size], f"segment.num_classes={k}", f"segment.head={head}"])
        model = build_segmenter(encoder_spec("none", cfg), cfg)
        target = torch.randint(0, k, (batch, s.image, s.image)).to(device)  # once, not in the timed step

        def step(x):
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            return seg_loss(logits, target, 255)

        return model, step

    return build


def downstream_section(args, device, dtype, steps: int, warmup: int, name: str) -> None:
    gpu = device.type == "cuda"
    for size in args.sizes.split(","):
        batch = args.batch_size or BATCH[size][gpu]
        s = SimpleNamespace(image=image_size(size))
        print(f"\n## Downstream steps, {model_title(size)}, batch {batch}")
        print("| step | img/s | ms/step |" + (" peak GB |" if gpu else ""))
        print("|---|---|---|" + ("---|" if gpu else ""))
        timing = (s, batch, device, dtype, steps, warmup, args.compile)
        rows = {
            "fine-tune (mixup, drop path 0.1)": measure(finetune_builder(size, batch, device), *timing),
            "segment, light head": measure(segment_builder(size, batch, "light", device), *timing),
            "segment, UperNet": measure(segment_builder(size, batch, "upernet", device), *timing),
        }
        for label, r in rows.items():
            print(
                f"| {label} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} |"
                + (f" {r.get('peak_mem_gb', 0):.1f} |" if gpu else "")
            )
        append_jsonl(args.json, [{"section": "downstream", "size": size, "step": label, "batch": batch, "device": name,
                                  **r} for label, r in rows.items()])  # fmt: skip

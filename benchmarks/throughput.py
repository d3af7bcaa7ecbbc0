"""Training throughput of one pre-training step (forward, backward, AdamW) — mimkit against its peers.

    python benchmarks/throughput.py                       # ViT-Tiny/4 at 32 px, batch 128, on this machine
    python benchmarks/throughput.py --sizes tiny,base     # also ViT-Base/16 at 224 px
    python benchmarks/throughput.py --precision bf16 --compile
    python benchmarks/throughput.py --methods conmim --sizes tiny,base   # ConMIM (own implementation), MAE for scale
    python benchmarks/throughput.py --methods all,downstream   # every method; fine-tuning and segmentation steps

Each configuration is run side by side in one process: mimkit's MAE, transformers' ViTMAEForPreTraining and
lightly's MAE blocks (MaskedVisionTransformerTIMM + MAEDecoderTIMM) at the same encoder, decoder, batch and mask
ratio, on synthetic images (data loading is measured separately). Peers that are not installed are skipped.
On a GPU, model-FLOPs utilisation is printed too, with the FLOP count stated (see `train_flops_mae`).
Results are for benchmarks/README.md and docs/benchmarks.md, never for assertions in the test suite.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

import torch
from harness import append_jsonl, autocast, mean_seconds, measure_many, pick_device
from torch import nn

from mimkit.cpu_bf16 import auto_cpu_precision, cpu_flags, cpu_name, matmul_rate
from mimkit.methods.cmae import CMAE
from mimkit.methods.mae import MAE
from mimkit.run_config import default_config


@dataclass
class Size:
    name: str
    timm_name: str
    image: int
    patch: int
    dim: int
    depth: int
    heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    batch_cpu: int
    batch_gpu: int


SIZES = {
    "tiny": Size("ViT-Tiny/4 @32, dec 4x192", "vit_tiny_patch16_224", 32, 4, 192, 12, 3, 192, 4, 3, 128, 1024),
    "base": Size("ViT-Base/16 @224, dec 8x512", "vit_base_patch16_224", 224, 16, 768, 12, 12, 512, 8, 16, 16, 256),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def train_flops_mae(s: Size, mask_ratio: float = 0.75) -> float:
    """Training FLOPs per image = 3 x forward, forward counted as 2 x MACs of the matrix products:
    blocks 24*N*D^2 + 4*N^2*D (encoder on 1 + visible tokens, decoder on 1 + all), patch embedding over all
    patches, decoder embedding and prediction. Element-wise work and the optimizer are not counted."""
    n = (s.image // s.patch) ** 2
    k = int(n * (1 - mask_ratio))

    def blocks(tokens, dim, depth):
        return depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim)

    pix = s.patch**2 * 3
    fwd = blocks(k + 1, s.dim, s.depth) + 2 * n * pix * s.dim
    fwd += 2 * (k + 1) * s.dim * s.dec_dim + blocks(n + 1, s.dec_dim, s.dec_depth) + 2 * n * s.dec_dim * pix
    return 3.0 * fwd


# ------------------------------------------------------------------------------------------------ models
def mimkit_mae(s: Size) -> tuple[nn.Module, callable]:
    cfg = default_config()
    cfg.data.image_size, cfg.model.name, cfg.model.patch_size = s.image, s.timm_name, s.patch
    cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads = s.dec_dim, s.dec_depth, s.dec_heads
    model = MAE.from_config(cfg)
    return model, lambda x: model({"image": x})[0]


def transformers_mae(s: Size):
    import transformers

    hf_cfg = transformers.ViTMAEConfig(
        image_size=s.image, patch_size=s.patch, hidden_size=s.dim, num_hidden_layers=s.depth,
        num_attention_heads=s.heads, intermediate_size=4 * s.dim, decoder_hidden_size=s.dec_dim,
        decoder_num_hidden_layers=s.dec_depth, decoder_num_attention_heads=s.dec_heads,
        decoder_intermediate_size=4 * s.dec_dim, mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.ViTMAEForPreTraining(hf_cfg)
    return model, lambda x: model(pixel_values=x).loss


def lightly_mae(s: Size):
    """lightly's MAE building blocks wired as its documentation shows, with the same loss (norm-pix MSE)."""
    import timm
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

    vit = timm.create_model(s.timm_name, img_size=s.image, patch_size=s.patch, num_classes=0)
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MAEDecoderTIMM(
        num_patches=vit.patch_embed.num_patches, patch_size=s.patch, embed_dim=s.dim, decoder_embed_dim=s.dec_dim,
        decoder_depth=s.dec_depth, decoder_num_heads=s.dec_heads, mlp_ratio=4.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
    )  # fmt: skip
    model = nn.ModuleDict({"backbone": backbone, "decoder": decoder})
    seq_len = backbone.sequence_length

    def step(x):
        b = x.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=0.75, device=x.device)
        encoded = backbone.encode(images=x, idx_keep=idx_keep)
        tokens = utils.repeat_token(decoder.mask_token, (b, seq_len))
        tokens = utils.set_at_index(tokens, idx_keep, decoder.embed(encoded).type_as(tokens))
        pred = decoder.predict(utils.get_at_index(decoder.decode(tokens), idx_mask))
        target = utils.get_at_index(utils.patchify(x, s.patch), idx_mask - 1)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        return nn.functional.mse_loss(pred.float(), target)

    return model, step


IMPLS = {"mimkit": mimkit_mae, "transformers": transformers_mae, "lightly": lightly_mae}
PEER_BUILDS = {transformers_mae, lightly_mae}  # run as their libraries ship; mimkit's rows get the loop's kernels


# ------------------------------------------------------------------------------------------------ CMAE
CMAE_DECODER = {"tiny": (128, 2, 4), "base": (256, 4, 8)}  # (dim, depth, heads), slimmer than MAE's decoders
CMAE_VARIANTS = {  # loss weights (rec, contrast, pos): the full method, then each task alone on top of MAE
    "CMAE (all three tasks)": (1.0, 0.1, 0.1),
    "rec only (slim decoder)": (1.0, 0.0, 0.0),
    "rec + contrastive": (1.0, 0.1, 0.0),
    "rec + position": (1.0, 0.0, 0.1),
}


def mimkit_cmae(s: Size, size_name: str, weights: tuple[float, float, float]):
    """mimkit's CMAE with two crops (here: the image and its mirror) and the EMA update inside the step."""
    cfg = default_config()
    cfg.method = "cmae"
    cfg.data.image_size, cfg.model.name, cfg.model.patch_size = s.image, s.timm_name, s.patch
    o = cfg.cmae
    o.decoder_dim, o.decoder_depth, o.decoder_heads = CMAE_DECODER[size_name]
    o.rec_weight, o.contrast_weight, o.pos_weight = weights
    model = CMAE.from_config(cfg)

    def step(x):
        model.after_step(1, 100)  # the EMA update of the previous step (same cost, kept inside the timing)
        return model({"image": x, "target": x.flip(-1)})[0]

    return model, step


@torch.no_grad()
def measure_box_pass(s: Size, batch: int, device, dtype, steps: int) -> float:
    """Images/s of ContrastiveCrop's box re-estimation: encoder forward (eval) + heat map + boxes, no data loading."""
    from mimkit.data.ccrop import boxes_from_heatmaps, feature_heatmap

    cfg = default_config()
    cfg.data.image_size, cfg.model.name, cfg.model.patch_size = s.image, s.timm_name, s.patch
    encoder = MAE.from_config(cfg).encoder.to(device).eval()
    x = torch.randn(batch, 3, s.image, s.image, device=device)

    def one():
        with autocast(device, dtype):
            boxes_from_heatmaps(feature_heatmap(encoder, x), s.image, 0.1).cpu()

    return batch / mean_seconds(one, device, steps)


def cmae_section(args, device, dtype, steps: int, warmup: int, name: str) -> None:
    """CMAE rows per size: MAE (its own decoder) for reference, CMAE and its task ablations, the box pass."""
    gpu = device.type == "cuda"
    for size_name in args.sizes.split(","):
        s = SIZES[size_name]
        batch = args.batch_size or (s.batch_gpu if gpu else s.batch_cpu)
        dec = "x".join(str(v) for v in CMAE_DECODER[size_name][1::-1])
        print(f"\n## CMAE {s.name.split(',')[0]}, decoder {dec}, batch {batch}, mask 0.75")
        print("| variant | img/s | ms/step | ratio vs mimkit MAE |" + (" peak GB |" if gpu else ""))
        timing = (s, batch, device, dtype, steps, warmup, args.compile)
        builds = {"MAE (mimkit, decoder of the MAE table)": IMPLS["mimkit"]}
        for label, weights in CMAE_VARIANTS.items():
            builds[label] = functools.partial(mimkit_cmae, size_name=size_name, weights=weights)
        rows = measure_many(builds, *timing, rounds=args.rounds)  # interleaved: the ratios are the point
        ref = rows["MAE (mimkit, decoder of the MAE table)"]["img_per_s"]
        for label, r in rows.items():
            row = f"| {label} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['img_per_s'] / ref:.2f}x |"
            print(row + (f" {r.get('peak_mem_gb', 0):.1f} |" if gpu else ""))
        box = measure_box_pass(s, batch, device, dtype, steps)
        print(f"| ContrastiveCrop box pass (eval forward + heat map + boxes) | {box:.1f} | - | - |")
        recs = [{"section": "cmae", "size": size_name, "variant": label, "batch": batch, "device": name,
                 "compile": args.compile, "precision": args.precision, **r} for label, r in rows.items()]  # fmt: skip
        recs.append({"section": "cmae", "size": size_name, "variant": "ccrop box pass", "batch": batch, "device": name,
                     "precision": args.precision, "img_per_s": box})  # fmt: skip
        append_jsonl(args.json, recs)


# ------------------------------------------------------------------------------------------------ ConMIM
CONMIM_PROJ = {"tiny": (1024, 256), "base": (4096, 256)}  # projector (hidden, out): the recipe's / the paper's


def train_flops_conmim(s: Size, hidden: int, out: int) -> float:
    """Training FLOPs per image, counted as in `train_flops_mae`: the student (encoder on 1 + all tokens,
    projector on every token, the N x N logits) forward + backward = 3x, plus the teacher forward (encoder and
    projector) = 1x. The on-device perturbation, masks and EMA are element-wise and not counted."""
    n = (s.image // s.patch) ** 2
    enc = s.depth * (24 * (n + 1) * s.dim**2 + 4 * (n + 1) ** 2 * s.dim) + 2 * n * s.patch**2 * 3 * s.dim
    proj = 2 * (n + 1) * (s.dim * hidden + hidden * hidden + hidden * out)
    return 3.0 * (enc + proj + 2 * n * n * out) + enc + proj


def mimkit_conmim(s: Size, size_name: str, perturb: bool = True):
    """mimkit's ConMIM step: on-device strong perturbation, teacher forward, masked student, loss, EMA update."""
    from mimkit.methods.conmim import ConMIM

    cfg = default_config()
    cfg.method = "conmim"
    cfg.data.image_size, cfg.model.name, cfg.model.patch_size = s.image, s.timm_name, s.patch
    cfg.conmim.proj_hidden, cfg.conmim.proj_dim = CONMIM_PROJ[size_name]
    if not perturb:
        cfg.conmim.jitter_p = cfg.conmim.grayscale_p = cfg.conmim.blur_p = cfg.conmim.solarize_p = 0.0
    model = ConMIM.from_config(cfg)

    def step(x):
        model.after_step(1, 100)  # the EMA update of the previous step (same cost, kept inside the timing)
        return model({"image": x})[0]

    return model, step


def conmim_section(args, device, dtype, steps: int, warmup: int, name: str) -> None:
    """ConMIM rows per size (own implementation only: no peer library implements it), MAE for reference."""
    gpu = device.type == "cuda"
    for size_name in args.sizes.split(","):
        s = SIZES[size_name]
        batch = args.batch_size or (s.batch_gpu if gpu else s.batch_cpu)
        hidden, out = CONMIM_PROJ[size_name]
        flops = train_flops_conmim(s, hidden, out)
        print(f"\n## ConMIM {s.name.split(',')[0]}, projector {hidden}-{hidden}-{out}, block mask 0.4, batch {batch}; "
              f"{flops / 1e9:.2f} train GFLOP/img")  # fmt: skip
        print("| variant | img/s | ms/step | ratio vs mimkit MAE |" + (" MFU | peak GB |" if gpu else ""))
        timing = (s, batch, device, dtype, steps, warmup, args.compile)
        builds = {
            "MAE (mimkit, as in the MAE table)": IMPLS["mimkit"],
            "ConMIM (full step)": functools.partial(mimkit_conmim, size_name=size_name),
            "ConMIM without the teacher's perturbation": functools.partial(
                mimkit_conmim, size_name=size_name, perturb=False
            ),
        }
        rows = measure_many(builds, *timing, rounds=args.rounds)  # interleaved: the ratios are the point
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if gpu else None
        ref = rows["MAE (mimkit, as in the MAE table)"]["img_per_s"]
        for label, r in rows.items():
            row = f"| {label} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['img_per_s'] / ref:.2f}x |"
            if gpu:
                mfu = f"{100 * r['img_per_s'] * flops / peak:.1f}%" if peak and label.startswith("ConMIM") else "-"
                row += f" {mfu} | {r.get('peak_mem_gb', 0):.1f} |"
            print(row)
        append_jsonl(args.json, [{"section": "conmim", "size": size_name, "variant": label, "batch": batch,
                                  "device": name, "compile": args.compile, "precision": args.precision,
                                  "train_gflop_per_img": flops / 1e9, **r} for label, r in rows.items()])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny")
    ap.add_argument("--impls", default="mimkit,transformers,lightly")
    ap.add_argument("--batch-size", type=int, help="default: per size, smaller on CPU")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 10 on CPU, 30 on GPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps (default 2 on CPU, 10 on GPU)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median is reported")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp32,bf16"],
                    help="auto: bf16 on a GPU; on a CPU the MAE table times fp32 and bf16 side by side and the other "
                    "sections use what train.precision=auto picks")  # fmt: skip
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument("--methods", default="mae",
                    help="sections: mae (the peer comparison), conmim, all (every method), downstream")  # fmt: skip
    ap.add_argument("--only", help="rows of the 'all' section to time (mae is always timed, as the reference)")
    ap.add_argument("--cmae", action="store_true", help="also time CMAE, its task ablations and the box pass")
    args = ap.parse_args()

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    auto_cpu = None if gpu or args.precision != "auto" else auto_cpu_precision()
    if args.precision == "auto":  # the other sections: one precision, the one a training run would use
        dtype, table_precisions = (torch.bfloat16, ["bf16"]) if gpu else (auto_cpu[0], ["fp32", "bf16"])
    else:
        table_precisions = args.precision.split(",")
        dtype = PRECISIONS[table_precisions[-1]]
    steps, warmup = args.steps or (30 if gpu else 10), args.warmup or (10 if gpu else 2)
    name = torch.cuda.get_device_name() if gpu else cpu_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if gpu else None
    print(f"# device {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"precision {args.precision}{f' (train.precision=auto picks {auto_cpu[1]})' if auto_cpu else ''}; "
          f"compile {args.compile}; steps {steps} (+{warmup} warm-up)")  # fmt: skip
    rates = {}
    if not gpu:  # the machine's limit, measured: each row's fraction of it stands for the GPU's MFU
        rates = {p: matmul_rate(d, n=2048, reps=5) for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
        print(f"# CPU flags: {flags or 'none of avx2/avx512/bf16/amx'}; measured 2048^3 matmul: fp32 "
              f"{rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s "
              f"({rates['bf16'] / rates['fp32']:.2f}x)")  # fmt: skip
    for size_name in args.sizes.split(",") if "mae" in args.methods.split(",") else []:
        s = SIZES[size_name]
        batch = args.batch_size or (s.batch_gpu if gpu else s.batch_cpu)
        flops = train_flops_mae(s)
        print(f"\n## MAE {s.name}, batch {batch}, mask 0.75; {flops / 1e9:.2f} train GFLOP/img")
        print("| impl | precision | img/s | ms/step | vs transformers' best | vs mimkit fp32 |"
              + (" MFU | peak GB |" if gpu else " % of the matmul rate |"))  # fmt: skip
        builds = {(impl, p): (IMPLS[impl], PRECISIONS[p]) for impl in args.impls.split(",") for p in table_precisions}
        results = measure_many(builds, s, batch, device, dtype, steps, warmup, args.compile, args.rounds, PEER_BUILDS)
        for key in [k for k, r in results.items() if "skipped" in r]:
            print(f"| {key[0]} | {key[1]} | skipped ({results.pop(key)['skipped']}) |")
        ref = max((r["img_per_s"] for k, r in results.items() if k[0] == "transformers"), default=None)
        fp32 = results.get(("mimkit", "fp32"), {}).get("img_per_s")
        for (impl, prec), r in results.items():
            ratio = f"{r['img_per_s'] / ref:.2f}x" if ref else "-"
            own = f"{r['img_per_s'] / fp32:.2f}x" if fp32 else "-"
            row = f"| {impl} | {prec} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {ratio} | {own} |"
            if gpu:
                mfu = f"{100 * r['img_per_s'] * flops / peak:.1f}%" if peak else "-"
                row += f" {mfu} | {r.get('peak_mem_gb', 0):.1f} |"
            else:
                row += f" {100 * r['img_per_s'] * flops / rates[prec]:.0f}% |"
            print(row)
            rec = {"size": size_name, "impl": impl, "batch": batch, "device": name, "compile": args.compile,
                   "precision": prec, "train_gflop_per_img": flops / 1e9, **r}  # fmt: skip
            append_jsonl(args.json, [{**rec, "matmul_gflops": rates[prec] / 1e9} if rates else rec])
    if args.cmae:
        cmae_section(args, device, dtype, steps, warmup, name)
    if "conmim" in args.methods.split(","):
        conmim_section(args, device, dtype, steps, warmup, name)
    if "all" in args.methods.split(","):
        from sections import every_method_section

        every_method_section(args, device, dtype, steps, warmup, name)
    if "downstream" in args.methods.split(","):
        from sections import downstream_section

        downstream_section(args, device, dtype, steps, warmup, name)


if __name__ == "__main__":
    main()

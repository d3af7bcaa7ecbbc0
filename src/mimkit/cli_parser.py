"""mimkit's argument parser: the sub-commands, their flags and the `key=value` overrides, which may come anywhere on
the line. `mimkit.cli` runs what it parses.

Every flag that sets a config key is named after the key's last part (`--batch-size` is `train.batch_size`,
`--knn-k` is `eval.knn_k`); any key can also be given as a dotted `key=value` override.
"""

from __future__ import annotations

import argparse


def _run_flags(p, *, out_default: str, config_example: str, override_example: str) -> None:
    """The data, budget and override flags of every command that trains."""
    p.add_argument("--config", help=f"a recipe YAML file or a packaged recipe's name (e.g. {config_example})")
    p.add_argument(
        "--data",
        help="a folder of images (class sub-folders optional; train/ + val|test/ used when "
        "present), a list file, tar shards, hf:PATH, or 'demo'",
    )
    p.add_argument("--out", help=f"run folder; re-running with the same --out resumes (default {out_default})")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="train.batch_size, per process")
    p.add_argument("--image-size", type=int, help="data.image_size")
    p.add_argument("--max-images", type=int, help="data.max_images: a fixed, seeded subset of the training images")
    p.add_argument("--device", help="train.device: auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--allow-config-change",
        action="store_const",
        const=True,
        help="train.allow_config_change: resume --out although its checkpoint has other settings (named either way)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {override_example}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked and corrupted image modeling on timm backbones."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pretrain",
        help="pre-train an encoder (no arguments: the built-in demo)",
        description="Pre-train an encoder with a masked image modeling method. With no arguments, runs "
        "the built-in demo (scikit-learn's digits, a small ViT, MAE, CPU, a few minutes). Re-running the "
        "same command with the same --out resumes from its last checkpoint.",
    )
    p.add_argument("--method", help="method (default mae; `mimkit methods` lists them)")
    p.add_argument("--model", help="model.name: a timm name, e.g. vit_small_patch16_224 (its patch size is used)")
    _run_flags(
        p,
        out_default="runs/<method>-<data name>",
        config_example="cifar10-mae",
        override_example="mae.mask_ratio=0.6 optim.blr=1e-3",
    )

    p = sub.add_parser(
        "eval",
        help="k-NN or linear-probe evaluation of an encoder on labeled images",
        description="Score a frozen encoder: k-NN (DINO's weighted vote) or a linear probe (BN + linear) "
        "on features of the labeled train split, tested on the val/test split.",
    )
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (.pt) or an exported encoder folder")
    p.add_argument("--data", required=True, help="labeled data (train/ + val|test/, or class sub-folders) or demo")
    p.add_argument("--out", help="also write the result as JSON to this file")
    p.add_argument("--image-size", type=int, help="default: the size the encoder was trained at")
    p.add_argument("--pool", choices=["avg", "cls"], help="eval.pool: ViT feature, mean patch token or class token")
    p.add_argument("--max-images", type=int, help="data.max_images: subset of the train split (memory / probe set)")
    p.add_argument("--max-eval-images", type=int, help="eval.max_eval_images: subset of the evaluation split")
    p.add_argument("--knn-k", type=int, help="eval.knn_k (default 20)")
    p.add_argument("--knn-temperature", type=float, help="eval.knn_temperature (default 0.07)")
    p.add_argument("--linear-epochs", type=int, help="eval.linear_epochs (default 90)")
    p.add_argument("--num-workers", type=int, help="data.num_workers (default 2)")
    p.add_argument("--device", help="train.device: auto, cpu, cuda or cuda:N")
    p.add_argument("--allow-download", action="store_true", help="let an export name an hf-hub: architecture")

    p = sub.add_parser("export", help="write a checkpoint's encoder as a timm Hub folder (config.json + safetensors)")
    p.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (.pt)")
    p.add_argument("--out", required=True, help="the export folder to write")

    p = sub.add_parser("visualize", help="a picture of what the method does (e.g. original | masked | reconstruction)")
    p.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (.pt) or a tokenizer folder")
    p.add_argument("--data", required=True, help="images to show (the val/test split when there is one)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--image-size", type=int, help="tokenizer folders: input size (default: the tokenizer's own)")
    p.add_argument("--num", type=int, default=8, help="number of images (rows)")
    p.add_argument("--scale", type=int, default=0, help="enlarge by this factor (default: to about 128 px rows)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("tokenizer", help="train an image tokenizer, or import DALL-E's dVAE (targets for BEiT/CIM)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser(
        "train",
        help="train a VQ-VAE tokenizer on a folder of images",
        description="Train mimkit's VQ-VAE image tokenizer (EMA codebook, dead-code restarts) with the "
        "training loop: same data and budget flags as `mimkit pretrain`, resumable. Reports held-out "
        "reconstruction PSNR and codebook usage; writes the tokenizer to <out>/tokenizer (pass "
        "tokenizer.path=<out> to BEiT/CIM). With no --data: the built-in demo's tokenizer (recipe tokenizer-demo), "
        "which `mimkit pretrain --method beit` on the demo also trains by itself.",
    )
    _run_flags(
        t,
        out_default="runs/tokenizer-<data name>",
        config_example="cifar10-tokenizer",
        override_example="tokenizer.vocab_size=1024 tokenizer.downsample=8",
    )
    i = tsub.add_parser("import-dalle", help="convert OpenAI's DALL-E dVAE weights (encoder.pkl, decoder.pkl)")
    i.add_argument("--encoder", required=True, help="the official encoder.pkl")
    i.add_argument("--decoder", required=True, help="the official decoder.pkl")
    i.add_argument("--out", required=True, help="tokenizer folder to write (tokenizer.json + model.safetensors)")
    i.add_argument("--trust-pickle", action="store_true", help="required: the official files are Python pickles")
    i.add_argument("--image-size", type=int, default=112, help="input size it is used at (BEiT/CIM: 112 -> 14x14)")

    for name, recipe, what, example in (
        (
            "finetune",
            "cifar10-finetune",
            "end-to-end fine-tuning of an encoder on labeled images (top-1)",
            "finetune.layer_decay=0.65 optim.blr=1e-3",
        ),
        (
            "segment",
            "camvid-segment",
            "semantic segmentation fine-tuning on images/ + masks/ folders (mIoU)",
            "segment.head=upernet segment.ignore_index=11",
        ),
    ):
        p = sub.add_parser(name, help=what, description=DOWNSTREAM[name])
        p.add_argument(
            "--checkpoint",
            required=True,
            help="an exported encoder folder, a pre-training checkpoint (.pt), or none (random init: the "
            "scratch baseline)",
        )
        p.add_argument("--model", help="model.name; with none: the architecture (else checked against the checkpoint)")
        p.add_argument("--allow-download", action="store_true", help="let an export name an hf-hub: architecture")
        _run_flags(p, out_default=f"runs/{name}-<encoder>-<data name>", config_example=recipe, override_example=example)

    p = sub.add_parser(
        "compare",
        help="pre-train several methods under one budget, then evaluate each (k-NN, linear, fine-tune)",
        description="Pre-train each method with the same encoder, data and budget, "
        "evaluate every encoder with k-NN, a linear probe and fine-tuning (plus the from-scratch "
        "fine-tuning baseline), and write report.md, report.json and report.png into --out. Re-running "
        "the same command skips what is finished.",
    )
    p.add_argument("--methods", default="all", help="comma-separated method names, or all (see `mimkit methods`)")
    p.add_argument("--data", required=True, help="a labeled folder (train/ + val|test/) or demo")
    p.add_argument("--out", required=True, help="report folder (one run folder per method inside)")
    p.add_argument("--budget", default="2ep", help="per method: epochs (e.g. 2ep) or wall-clock (e.g. 10min, 1h)")
    p.add_argument("--config", help="pre-training recipe shared by every method (YAML file or packaged name)")
    p.add_argument("--finetune-config", help="fine-tuning recipe (default: the packaged one for the data)")
    p.add_argument(
        "--tokenizer-budget",
        help="the VQ tokenizer's budget when BEiT/CIM need one (default: a quarter "
        "of a wall-clock budget, charged to BEiT and CIM; or the same epochs)",
    )
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default: the recipe's)")
    p.add_argument("--evals", default="knn,linear,finetune", help="which evaluations to run")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per method and baseline, at train.seed, train.seed + 1, ...: mean and spread per cell",
    )
    p.add_argument("--max-images", type=int, help="data.max_images: a fixed, seeded subset of the training images")
    p.add_argument("--batch-size", type=int, help="train.batch_size, per process")
    p.add_argument("--device", help="train.device: auto, cpu, cuda or cuda:N")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pre-training overrides for every method")

    from .data.pack import add_parser as add_pack_parser

    d = sub.add_parser("data", help="prepare data: pack a folder into tar shards or Parquet files")
    add_pack_parser(d.add_subparsers(dest="data_command", required=True))
    p = sub.add_parser("methods", help="list the registered methods, or one method's options with their defaults")
    p.add_argument("name", nargs="?", help="a method: list its options (type, default, what it does)")
    sub.add_parser("recipes", help="list the packaged recipes (--config NAME) and what each is")
    return parser


DOWNSTREAM = {
    "finetune": "Fine-tune an encoder end to end with the recipe of MAE/BEiT/CIM (layer-wise lr decay, drop path, "
    "mixup/cutmix, RandAugment, label smoothing, random erasing, warm-up + cosine, optional weight EMA with "
    "train.ema=true), built from timm. --checkpoint none trains the same architecture from scratch with the identical "
    "recipe. Writes <out>/finetune.json with the last (headline) and best top-1.",
    "segment": "Fine-tune an encoder for semantic segmentation with a light head (default) or UperNet on the "
    "encoder's multi-level features. Data: a folder with train/ and val|test/, each holding images/ and masks/ of "
    "the same file stems. Writes <out>/segment.json with mIoU and per-class IoU.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come before, between or after the options: argparse stops collecting the
    # positional ones at the first option, so the later ones come back here
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args

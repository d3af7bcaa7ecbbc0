"""mimkit command line: argparse sub-commands -> a typed config -> one call below. Nothing else lives here.

Every flag that sets a config key is named after the key's last part (`--batch-size` is `train.batch_size`,
`--knn-k` is `eval.knn_k`); any key can also be given as a dotted `key=value` override.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import MimkitError, TrainingError, WriteError, write_advice, write_failure
from .run_config import build_config, demo_tokenizer, downstream_config, flag_overrides, pretrain_config

EXIT_BAD_INPUT = 2


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


# -------------------------------------------------------------------------------------------- commands
def cmd_pretrain(args) -> int:
    from .engine.tasks.pretrain import pretrain

    cfg = pretrain_config(args)
    tokenizer = demo_tokenizer(cfg, args.overrides)  # BEiT/CIM on the demo without tokenizer.path: train it first
    if tokenizer is not None:
        from .engine.tasks.tokenizer_training import train_tokenizer

        train_tokenizer(tokenizer)
    pretrain(cfg)
    return 0


def cmd_tokenizer(args) -> int:
    if args.tokenizer_command == "train":
        from .engine.tasks.tokenizer_training import train_tokenizer

        args.overrides = ["eval.final_knn=false", *args.overrides]  # judged by PSNR and codebook usage, not k-NN
        train_tokenizer(pretrain_config(args, kind="tokenizer"))
        return 0
    from .errors import ConfigError
    from .models.tokenizer import save_tokenizer
    from .models.tokenizer.dalle_import import WHY_TRUST, convert_dalle

    if not args.trust_pickle:
        raise ConfigError(f"'{args.encoder}' and '{args.decoder}' {WHY_TRUST}")
    tok = convert_dalle(args.encoder, args.decoder, image_size=args.image_size)
    source = {"encoder": Path(args.encoder).name, "decoder": Path(args.decoder).name}
    out = save_tokenizer(tok, args.out, meta={"source": "openai/DALL-E dVAE", **source})
    print(
        f"wrote the DALL-E tokenizer to '{out}': {tok.vocab_size} tokens, {tok.grid()}x{tok.grid()} grid at "
        f"{tok.image_size} px (config: tokenizer.path={out})"
    )
    return 0


def cmd_eval(args) -> int:
    from .data import labeled_splits
    from .engine.tasks.encoders import load_encoder
    from .eval import FeatureEval
    from .runtime import resolve_device

    cfg = build_config([], flag_overrides(args))
    device = resolve_device(cfg.train.device)
    encoder, info = load_encoder(args.checkpoint, device, allow_download=args.allow_download)
    cfg.data.mean, cfg.data.std = tuple(info["mean"]), tuple(info["std"])
    size = args.image_size or info["image_size"]
    max_eval = args.max_eval_images  # the full split unless asked (eval.max_eval_images is the monitor's)
    memory, query = labeled_splits(args.data, cfg.data, 0, max_eval)
    res = FeatureEval(memory, query, cfg.data, size, device, cfg.eval).scores(encoder, (args.protocol,))
    res = res[args.protocol]
    res.update(
        protocol=args.protocol,
        checkpoint=str(args.checkpoint),
        data=args.data,
        pool=cfg.eval.pool,
        method=info.get("method"),
    )
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_finetune(args) -> int:
    from .engine.tasks.finetune import finetune

    finetune(downstream_config(args, "finetune"), args.checkpoint, args.model, args.image_size, args.allow_download)
    return 0


def cmd_segment(args) -> int:
    from .engine.tasks.segment import segment

    segment(downstream_config(args, "segment"), args.checkpoint, args.model, args.image_size, args.allow_download)
    return 0


def cmd_compare(args) -> int:
    from .engine.drivers.compare import compare_from_args

    compare_from_args(args)
    return 0


def cmd_export(args) -> int:
    from .engine.tasks.pretrain import data_name, export_method, method_from_checkpoint, reapply_export_choice

    method, cfg, state = method_from_checkpoint(args.checkpoint)
    card = {"method": cfg.method, "data": data_name(cfg.data.path), "epochs": state["run"]["epoch"],
            "steps": state["run"]["step"]}  # fmt: skip
    summary_file = Path(args.checkpoint).parent.parent / "summary.json"  # the run's final k-NN and export choice
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if "knn" in summary:
        card["knn"] = summary["knn"]
    which = reapply_export_choice(method, summary, state["run"]["step"])
    out = export_method(method, cfg, args.out, card)
    print(f"exported {which or 'the ' + cfg.method + ' encoder'} to '{out}'; load it with "
          f"timm.create_model('local-dir:{out}', pretrained=True)")  # fmt: skip
    return 0


def cmd_visualize(args) -> int:
    from .engine.drivers.visualize import visualize

    path, rows, what = visualize(args.checkpoint, args.data, args.out, args.num, args.seed, args.scale, args.image_size)
    print(f"wrote '{path}' ({rows} images; {what})")
    return 0


def cmd_data(args) -> int:
    from .data.pack import run

    return run(args)


def cmd_methods(args) -> int:
    from .discover import option_lines
    from .methods import METHODS, method_class

    if args.name is None:
        for name, cls in METHODS.items():
            print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        print("`mimkit methods NAME` lists a method's options with types and defaults (set as e.g. mae.mask_ratio=0.6)")
        return 0
    cls = method_class(args.name)
    section = cls.section_name()
    lines = option_lines(cls.Options, section)
    print(f"{args.name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    print(
        f"options (set as {section}.key=value; shared sections: model, data, optim, train, eval, tokenizer):"
        if lines
        else "no options of its own (shared sections: model, data, optim, train, eval, tokenizer)"
    )
    print("\n".join(lines))
    return 0


def cmd_recipes(args) -> int:
    from .discover import recipe_lines

    print("\n".join(recipe_lines()))
    print("use one with --config NAME; keys are overridden by flags and key=value; src/mimkit/configs/ holds them")
    return 0


COMMANDS = {
    "pretrain": cmd_pretrain,
    "eval": cmd_eval,
    "export": cmd_export,
    "visualize": cmd_visualize,
    "tokenizer": cmd_tokenizer,
    "finetune": cmd_finetune,
    "segment": cmd_segment,
    "compare": cmd_compare,
    "data": cmd_data,
    "methods": cmd_methods,
    "recipes": cmd_recipes,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MimkitError as e:
        advice = ""  # a refused write outside a training loop (the run lock, an export) says what to do here
        if isinstance(e, WriteError) and not e.advised:
            advice = f"; {write_advice(e.reason)} and re-run the same command"
        print(f"mimkit: error: {e}{advice}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as e:
        print(f"mimkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mimkit: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # a refused write that does not say what it keeps: still one line, not a traceback
        reason = write_failure(e)
        if reason is None:
            raise
        where = next((f" '{x.filename}'" for x in (e, e.__context__) if getattr(x, "filename", None)), "")
        print(f"mimkit: error: cannot write{where}: {reason}; {write_advice(reason)} and re-run the same command",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

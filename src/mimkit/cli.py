"""mimkit command line: argparse sub-commands -> typed config -> the layers below. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, DataConfig, build_config

EXIT_BAD_INPUT = 2


def _pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train an encoder (no arguments: the built-in demo)",
        description="Pre-train an encoder with a masked image modeling method. With no arguments, runs the "
        "built-in demo (scikit-learn's digits, a small ViT, MAE, CPU, a few minutes). Re-running the same "
        "command with the same --out resumes from its last checkpoint.",
    )
    p.add_argument("--method", help="mae (see `mimkit methods`)")
    p.add_argument("--model", help="timm ViT name, e.g. vit_tiny_patch16_224 (patch size: model.patch_size=N)")
    _run_flags(p, example="mae.mask_ratio=0.6")


def _run_flags(p, example: str) -> None:
    """The data, budget and override flags of every command that runs the training engine."""
    p.add_argument("--config", help="a recipe YAML file, or the name of a packaged recipe (e.g. cifar10-mae)")
    p.add_argument(
        "--data",
        help="a folder of images (class sub-folders optional; train/ + val|test/ split used when present) or 'demo'",
    )
    p.add_argument("--out", help="run folder (default runs/<method>-<data name>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--image-size", type=int)
    p.add_argument("--max-images", type=int, help="a fixed, seeded subset of the training images")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {example}")


def _tokenizer_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train an image tokenizer, or import DALL-E's dVAE (targets for BEiT/CIM)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser(
        "train",
        help="train a VQ-VAE tokenizer on a folder of images",
        description="Train mimkit's VQ-VAE image tokenizer (EMA codebook, dead-code restarts) with the pre-training "
        "engine: same data and budget flags as `mimkit pretrain`, resumable. Reports held-out reconstruction PSNR "
        "and codebook usage; writes the tokenizer folder to <out>/tokenizer.",
    )
    _run_flags(t, example="tokenizer.vocab_size=1024 tokenizer.downsample=8")
    t.set_defaults(method="tokenizer", model=None)
    i = tsub.add_parser("import-dalle", help="convert OpenAI's DALL-E dVAE weights (encoder.pkl, decoder.pkl)")
    i.add_argument("--encoder", required=True, help="the official encoder.pkl")
    i.add_argument("--decoder", required=True, help="the official decoder.pkl")
    i.add_argument("--out", required=True, help="tokenizer folder to write (tokenizer.json + model.safetensors)")
    i.add_argument("--trust-pickle", action="store_true", help="required: the official files are Python pickles")
    i.add_argument("--image-size", type=int, default=112, help="input size it is used at (BEiT/CIM: 112 -> 14x14)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="k-NN or linear-probe evaluation of an encoder on labeled images")
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.pt) or an exported encoder folder")
    p.add_argument("--data", required=True, help="labeled folder (train/ + val|test/, or class sub-folders) or demo")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--image-size", type=int, help="default: the size the encoder was trained at")
    p.add_argument("--pool", choices=["avg", "cls"], default="avg", help="ViT feature: mean patch token or class token")
    p.add_argument("--max-images", type=int, help="subset of the training split (the k-NN memory / probe train set)")
    p.add_argument("--max-eval-images", type=int, help="subset of the evaluation split")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--epochs", type=int, default=90, help="linear probe epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the encoder as a timm Hub folder (config.json + model.safetensors)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")


def _visualize_parser(sub) -> None:
    p = sub.add_parser("visualize", help="a picture of what the method does (e.g. original | masked | reconstruction)")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.pt) or a tokenizer folder")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--image-size", type=int, help="tokenizer folders: input size (default: the tokenizer's own)")
    p.add_argument("--num", type=int, default=8, help="number of images (rows)")
    p.add_argument("--scale", type=int, default=0, help="enlarge by this factor (default: to about 128 px rows)")
    p.add_argument("--seed", type=int, default=0)


def _downstream_parser(sub, name: str, help: str, description: str, example: str) -> None:
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="an exported encoder folder, a training checkpoint (.pt), or none (random init: the scratch baseline)",
    )
    p.add_argument("--model", help="timm name; with none: the architecture (else checked against the checkpoint)")
    _run_flags(p, example=example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked and corrupted image modeling on timm backbones."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    _visualize_parser(sub)
    _tokenizer_parser(sub)
    _downstream_parser(
        sub,
        "finetune",
        help="end-to-end fine-tuning of an encoder on labeled images (top-1 on the val/test split)",
        description="Fine-tune an encoder end to end with the recipe of MAE/BEiT/CIM (layer-wise lr decay, drop "
        "path, mixup/cutmix, RandAugment, label smoothing, random erasing, warm-up + cosine, optional EMA), built "
        "from timm. --checkpoint none trains the same architecture from scratch with the identical recipe. Writes "
        "<out>/finetune.json with the last (headline) and best top-1.",
        example="finetune.layer_decay=0.65 optim.blr=1e-3",
    )
    _downstream_parser(
        sub,
        "segment",
        help="semantic segmentation fine-tuning on images/ + masks/ folders (mIoU, per-class IoU)",
        description="Fine-tune an encoder for semantic segmentation with a light head (default) or UperNet on "
        "the encoder's multi-level features. Data: a folder with train/ and val|test/, each holding images/ and "
        "masks/ of the same file stems. Writes <out>/segment.json with mIoU and per-class IoU.",
        example="segment.head=upernet segment.ignore_index=11",
    )
    _compare_parser(sub)
    sub.add_parser("methods", help="list the registered methods")
    return parser


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="pre-train several methods under one budget, then evaluate each (k-NN, linear, fine-tune)",
        description="Pre-train each method with the same encoder, data and budget, evaluate every encoder with "
        "k-NN, a linear probe and fine-tuning (plus the from-scratch fine-tuning baseline), and write report.md, "
        "report.json and report.png into --out. Re-running the same command skips what is finished.",
    )
    p.add_argument("--methods", default="all", help="comma-separated method names, or all (see `mimkit methods`)")
    p.add_argument("--data", required=True, help="a labeled folder (train/ + val|test/) or demo")
    p.add_argument("--out", required=True, help="report folder (one run folder per method inside)")
    p.add_argument("--budget", default="2ep", help="per method: epochs (e.g. 2ep) or wall-clock (e.g. 10min, 1h)")
    p.add_argument("--config", help="pre-training recipe shared by every method (YAML file or packaged name)")
    p.add_argument("--finetune-config", help="fine-tuning recipe (default: the packaged one for the data)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default: the recipe's)")
    p.add_argument("--evals", default="knn,linear,finetune", help="which evaluations to run")
    p.add_argument("--max-images", type=int, help="a fixed, seeded subset of the training images")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pre-training overrides for every method")


def _nested(flags: dict) -> dict:
    """{'a.b': 1, 'c': None} -> {'a': {'b': 1}}: flags the user did not give are left out."""
    overrides: dict = {}
    for key, value in flags.items():
        if value is None:
            continue
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return overrides


def _run_flag_overrides(args, **extra) -> dict:
    """The run flags the user gave (data, budget, model, device) as a nested override dict."""
    flags = {
        "data.path": args.data,
        "out": args.out,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "data.image_size": args.image_size,
        "model.name": args.model,
        "data.max_images": args.max_images,
        "train.device": args.device,
        **extra,
    }
    return _nested(flags)


def _default_out(args, files) -> bool:
    """True when neither --out, an `out=` override nor a recipe names the run folder."""
    return not args.out and not any(o.startswith("out=") for o in args.overrides) and not _recipe_sets_out(files)


def _data_name(cfg) -> str:
    return "demo" if cfg.data.path == "demo" else Path(cfg.data.path).resolve().name


def downstream_config(args, recipe: str):
    """Config of `finetune` / `segment`: the packaged `recipe` (<recipe>-demo on the demo data) <- --config
    <- flags <- dotted overrides."""
    files = [f"{recipe}-demo" if args.data in (None, "demo") else recipe]
    if args.config:
        files.append(args.config)
    cfg = build_config(files, _run_flag_overrides(args), args.overrides)
    if _default_out(args, files[1:]):
        source = "scratch" if args.checkpoint == "none" else Path(args.checkpoint).resolve().parent.name
        data = _data_name(cfg)
        cfg.out = f"runs/{recipe}-{source}" + ("" if source.endswith(f"-{data}") else f"-{data}")
    return cfg


def pretrain_config(args):
    files = [args.config] if args.config else []
    if not files and (args.data in (None, "demo")):
        files = ["demo"]  # the packaged demo recipe
    cfg = build_config(files, _run_flag_overrides(args, method=args.method), args.overrides)
    if _default_out(args, files):
        cfg.out = f"runs/{cfg.method}-{_data_name(cfg)}"
    return cfg


def _recipe_sets_out(files) -> bool:
    from .config import read_yaml

    return any("out" in read_yaml(f) for f in files)


def cmd_pretrain(args) -> int:
    from .engine.run import pretrain_and_report

    cfg = pretrain_config(args)
    pretrain_and_report(cfg)
    return 0


def cmd_tokenizer(args) -> int:
    if args.tokenizer_command == "train":
        from .engine.run import pretrain_and_report

        cfg = pretrain_config(args)
        cfg.eval.final_knn = False  # a tokenizer is judged by held-out PSNR and codebook usage, not k-NN
        pretrain_and_report(cfg)
        return 0
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
    import torch

    from .data import labeled_splits
    from .engine.run import load_encoder
    from .engine.train import resolve_device
    from .eval import extract, knn_accuracy, linear_probe

    device = resolve_device(args.device)
    encoder, info = load_encoder(args.checkpoint, device)
    size = args.image_size or info["image_size"]
    data = DataConfig(
        path=args.data,
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        num_workers=args.workers,
        max_images=args.max_images,
    )
    memory, query = labeled_splits(args.data, data, 0, args.max_eval_images)
    tr, ytr = extract(encoder, memory, data, size, device, args.pool)
    te, yte = extract(encoder, query, data, size, device, args.pool)
    if args.protocol == "knn":
        res = knn_accuracy(tr, ytr, te, yte, len(memory.classes), args.k, args.temperature)
    else:
        torch.manual_seed(0)
        res = linear_probe(tr, ytr, te, yte, len(memory.classes), epochs=args.epochs)
    res.update(
        {
            "protocol": args.protocol,
            "checkpoint": str(args.checkpoint),
            "data": args.data,
            "pool": args.pool,
            "method": info.get("method"),
        }
    )
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_finetune(args) -> int:
    from .engine.finetune import finetune

    cfg = downstream_config(args, "finetune")
    finetune(cfg, args.checkpoint, model_flag=args.model, image_size=args.image_size)
    return 0


def cmd_segment(args) -> int:
    from .engine.segment import segment

    cfg = downstream_config(args, "segment")
    segment(cfg, args.checkpoint, model_flag=args.model, image_size=args.image_size)
    return 0


def cmd_compare(args) -> int:
    from .engine.compare import compare_from_args

    compare_from_args(args)
    return 0


def cmd_export(args) -> int:
    from .engine.train import method_from_checkpoint

    method, cfg, _ = method_from_checkpoint(args.checkpoint)
    out = method.export(args.out, cfg)
    print(
        f"exported the {cfg.method} encoder to '{out}'; load it with "
        f"timm.create_model('local-dir:{out}', pretrained=True)"
    )
    return 0


def cmd_visualize(args) -> int:
    import torch

    from .data import load_splits
    from .data.pipeline import ViewDataset, collate, prepare_batch
    from .engine.train import method_from_checkpoint
    from .viz import save_grid, unnormalize

    state = {}
    if Path(args.checkpoint).is_dir():  # a tokenizer folder: original | reconstruction
        from .methods.tokenizer import method_from_tokenizer

        method, cfg = method_from_tokenizer(args.checkpoint, args.image_size)
    else:
        method, cfg, state = method_from_checkpoint(args.checkpoint)
    data = DataConfig(**{**cfg.data.__dict__, "path": args.data})
    boxes = state.get("ccrop_boxes")  # ContrastiveCrop: whole training images, with their current boxes
    if boxes is not None:
        from .data.ccrop import check_boxes

        source = load_splits(data, cfg.train.seed).train  # the subset the boxes index
        check_boxes(boxes, len(source), args.checkpoint)
    else:
        splits = load_splits(data, args.seed)
        source = splits.query if splits.query is not None else splits.train
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(source), generator=g)[: args.num].tolist()
    crop = "center" if boxes is None else "full"
    ds = ViewDataset(source, method.views, data, seed=args.seed, train=False, eval_crop=crop)
    batch = prepare_batch(collate([ds[i] for i in picks]), method.views, "cpu", data.mean, data.std)
    if boxes is not None:
        batch["ccrop_box"] = boxes[picks]
    torch.manual_seed(args.seed)
    rows = unnormalize(method.visualize(batch), data.mean, data.std)
    scale = args.scale or max(1, 128 // rows.shape[2])
    path = save_grid(rows, args.out, scale=scale)
    print(f"wrote '{path}' ({len(picks)} rows; {cfg.method}: {method.visualize.__doc__.strip().splitlines()[0]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            from .methods import METHODS

            for name, cls in METHODS.items():
                print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
            return 0
        commands = {"pretrain": cmd_pretrain, "eval": cmd_eval, "export": cmd_export, "visualize": cmd_visualize}
        commands.update(tokenizer=cmd_tokenizer, finetune=cmd_finetune, segment=cmd_segment, compare=cmd_compare)
        return commands[args.command](args)
    except ConfigError as e:
        print(f"mimkit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        from .engine.train import TrainingError

        if isinstance(e, TrainingError):
            print(f"mimkit: error: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("mimkit: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""mimkit command line: the parsed sub-command (`cli_parser.py`) -> a typed config -> one call below, and every
refusal as one line with exit status 2. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_parser import parse_args
from .errors import MimkitError, TrainingError, WriteError, write_advice, write_failure
from .run_config import build_config, demo_tokenizer, downstream_config, flag_overrides, pretrain_config

EXIT_BAD_INPUT = 2


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

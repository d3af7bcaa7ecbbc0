"""What happens around the loop: the end-of-run export and report, and loading encoders back for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..export import load_exported, read_export
from ..methods import build_method
from . import distributed as D
from .logging import say
from .train import method_from_checkpoint, monitor_knn, pretrain


def pretrain_and_report(cfg: Config) -> dict:
    """Pre-train, export the encoder to out/encoder, and on labeled data compare k-NN accuracy of the trained
    encoder with the same encoder at random initialisation. -> the summary written to out/summary.json."""
    try:
        result = pretrain(cfg)
        summary = {}
        if result["main"]:
            summary = report(cfg, result)
        D.barrier()
        return summary
    finally:
        D.shutdown()


def report(cfg: Config, result: dict) -> dict:
    out, method, splits, device = result["out"], result["method"], result["splits"], result["device"]
    method.eval()
    if cfg.method == "tokenizer":  # a tokenizer folder, not a timm encoder; held-out PSNR instead of k-NN
        metrics = method.final_report(splits, cfg, device)  # prints the psnr line
        tok_dir = method.export(out / "tokenizer", cfg)
        summary = {"method": cfg.method, "steps": result["steps"], "tokenizer": str(tok_dir), **metrics}
        say(f"tokenizer exported to '{tok_dir}' (mimkit.models.tokenizer.load_tokenizer('{tok_dir}'))")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    enc_dir = method.export(out / "encoder", cfg)
    summary = {"method": cfg.method, "steps": result["steps"], "encoder": str(enc_dir)}
    say(f"encoder exported to '{enc_dir}' (timm.create_model('local-dir:{enc_dir}', pretrained=True))")
    if cfg.eval.final_knn and splits.query is not None:
        trained = monitor_knn(method, splits, cfg, device)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.train.seed)
            random_init = build_method(cfg).to(device).eval()
        baseline = monitor_knn(random_init, splits, cfg, device)
        summary["knn_top1"] = trained["top1"]
        summary["knn_top1_random_init"] = baseline["top1"]
        say(f"k-NN top-1 (k={cfg.eval.knn_k}, {len(splits.memory)} memory / {len(splits.query)} query images):")
        say(f"  pre-trained encoder  {trained['top1']:.4f}")
        say(f"  random-init encoder  {baseline['top1']:.4f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_encoder(path: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    """An encoder from a training checkpoint (.pt) or an export folder -> (encoder, preprocessing info with
    image_size, mean, std, method)."""
    p = Path(path)
    if p.is_dir():
        info = {k: v for k, v in read_export(p).items() if k in ("image_size", "mean", "std", "method")}
        return load_exported(p).to(device).eval(), info
    method, cfg, _ = method_from_checkpoint(p, device)
    info = {
        "image_size": cfg.data.image_size,
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "method": cfg.method,
        "config": cfg,
    }
    return method.encoder.eval(), info

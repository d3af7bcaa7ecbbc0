"""Probes of a finished digits demo (docs/results.md, "Built-in demos"): where its features are, and for CIM how
visible the corruption is.

    python benchmarks/demo_probe.py layers runs/simmim-demo/encoder runs/mae-demo/encoder
    python benchmarks/demo_probe.py cim runs/cim-revdet-demo/checkpoints/last.pt

`layers`: k-NN top-1 (k=20; memory the 1,297 training digits, queries the 500 held-out ones) of an exported encoder's
mean patch token after each block (the last before the final norm), so a weak final score can be told from weak
features throughout. `cim`: for a CIM checkpoint, (1) the enhancer's k-NN on the real digits and on the same digits
through the tokenizer (the only images it sees in training), (2) on 512 training digits with the run's generator,
how much each token's decoded patch changes when it is replaced and when it is kept (mean |difference| in [0, 1]
pixels), and how often the RevDet detector calls each kind "replaced".
"""

from __future__ import annotations

import sys

import timm
import torch
import torch.nn.functional as F

from mimkit.data import load_digits_sources
from mimkit.data.pipeline import ViewDataset, collate, prepare_batch
from mimkit.data.views import View
from mimkit.engine.tasks.pretrain import method_from_checkpoint
from mimkit.eval.knn import knn_accuracy
from mimkit.run_config import build_config


def digits(views, data, n: int | None = None) -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """The demo's fixed split as prepared batches (train, labels, test, labels) for `views`."""
    out = []
    for src in load_digits_sources(seed=0):
        ds = ViewDataset(src, views, data, seed=0, train=False)
        items = [ds[i] for i in range(n or len(ds))]
        out += [
            prepare_batch(collate(items), views, "cpu", data.mean, data.std),
            torch.tensor(src.labels[: len(items)]),
        ]
    return tuple(out)


def knn(train_feats, train_labels, test_feats, test_labels) -> float:
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, 10)["top1"]


@torch.no_grad()
def layers(paths: list[str]) -> None:
    data = build_config(["demo"]).data
    train, ytr, test, yte = digits([View("image", data.image_size)], data)
    for path in paths:
        enc = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        per_block = [
            [
                t.mean(1)
                for t in enc.forward_intermediates(b["image"], norm=False, intermediates_only=True, output_fmt="NLC")
            ]  # fmt: skip
            for b in (train, test)
        ]
        scores = [knn(a, ytr, q, yte) for a, q in zip(*per_block)]
        print(path, "k-NN after each block:", " ".join(f"{s:.3f}" for s in scores))


@torch.no_grad()
def cim(path: str) -> None:
    m, cfg, _ = method_from_checkpoint(path)
    train, ytr, test, yte = digits(m.views, cfg.data)

    def decode(ids):
        return m.generator.tokenizer.decode(ids.view(-1, *m.grid)).float()

    def features(x):
        return m.enhancer.forward_features(x)[:, m.enhancer.num_prefix_tokens :].mean(1)

    for kind in ("real", "through the tokenizer"):
        f = [features(b["image"] if kind == "real" else m.to_encoder_space(decode(m.generator.targets(b["tokens"]))))
             for b in (train, test)]  # fmt: skip
        print(f"enhancer k-NN, {kind} digits: {knn(f[0], ytr, f[1], yte):.3f}")
    batch = {k: v[:512] for k, v in train.items()}
    torch.manual_seed(0)
    ids = m.generator.targets(batch["tokens"])
    mask = m.mask(ids.shape[0], "cpu")
    corrupted, replaced, _ = m.corrupt(ids, mask, m.generate(batch["image"], mask))
    pixels = decode(corrupted)
    change = F.avg_pool2d((pixels - decode(ids)).abs().mean(1, keepdim=True), pixels.shape[-1] // m.grid[0]).flatten(1)
    r, k = change[replaced], change[~replaced]
    print(f"{replaced.float().mean():.3f} of tokens replaced; mean patch change: replaced {r.mean():.3f}, "
          f"kept {k.mean():.3f}; replaced but changed < 0.05: {(r < 0.05).float().mean():.3f}, "
          f"kept but changed >= 0.05: {(k >= 0.05).float().mean():.3f}")  # fmt: skip
    if m.objective.name == "revdet":
        said = m.enhance(m.to_encoder_space(pixels)) > 0
        visible, invisible = said[replaced & (change >= 0.1)], said[replaced & (change < 0.05)]
        print(f"detector: accuracy {(said == replaced).float().mean():.3f} (all 'kept': "
              f"{1 - replaced.float().mean():.3f}); says 'replaced' for replaced tokens changed >= 0.1: "
              f"{visible.float().mean():.3f}, changed < 0.05: {invisible.float().mean():.3f}; for kept tokens: "
              f"{said[~replaced].float().mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("layers", "cim"):
        sys.exit(__doc__)
    layers(sys.argv[2:]) if sys.argv[1] == "layers" else cim(sys.argv[2])

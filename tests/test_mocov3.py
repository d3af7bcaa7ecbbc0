"""MoCo v3: the loss against the paper's pseudo-code (one process and two), the cosine momentum update, the frozen
patch projection, one run through the CLI with a strict timm export, and bad options naming their key."""

import json
import math

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TINY
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.methods import build_method
from mimkit.methods.mocov3 import MoCoV3, contrastive_loss
from mimkit.run_config import build_config

SMALL = ["mocov3.proj_hidden=32", "mocov3.proj_dim=16", "mocov3.pred_hidden=32"]


def build(*extra) -> MoCoV3:
    torch.manual_seed(0)
    return build_method(build_config([], None, [*TINY, "method=mocov3", *SMALL, *extra]))


def crops(b=8, size=16):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(b, 3, size, size, generator=g), "target": torch.rand(b, 3, size, size, generator=g)}


def ctr_paper(q, k, tau, first_label=0):
    """Algorithm 1 of the paper, one query at a time: q, k L2-normalised, logits q_i . k_j / tau, the positive of
    query i is key first_label + i, cross-entropy averaged over the queries, times 2 * tau."""
    q = [row / row.norm() for row in q.double()]
    k = [row / row.norm() for row in k.double()]
    total = 0.0
    for i, qi in enumerate(q):
        logits = [float(qi @ kj) / tau for kj in k]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[first_label + i]
    return 2 * tau * total / len(q)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_loss_is_the_papers_pseudo_code(tau):
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (3 * torch.randn(6, 8, generator=g) for _ in range(4))
    loss, acc = contrastive_loss(q1, k2, tau)
    assert loss.item() == pytest.approx(ctr_paper(q1, k2, tau), rel=1e-5)
    m = build(f"mocov3.temperature={tau}")
    total, _ = m.loss(q1, q2, k1, k2)
    assert total.item() == pytest.approx(ctr_paper(q1, k2, tau) + ctr_paper(q2, k1, tau), rel=1e-5)
    _, acc = contrastive_loss(q1, q1 * 2.0, tau)  # each query's own direction is its key: all positives found
    assert acc.item() == 1.0


def test_keys_of_every_process_are_the_negatives(monkeypatch):
    """As rank r of 2 processes with half the batch each: the queries meet all 8 keys, gathered in rank order, with
    the labels offset by r (the official code), so the mean over ranks is the one-process loss of the whole batch.
    torch.distributed's answers are stood in for (a real gloo pair costs ~20 s of CPU to start)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    keys_of_rank = F.normalize(k, dim=1).chunk(2)
    losses = []
    for rank in range(2):

        def all_gather(parts, mine, rank=rank):
            assert torch.allclose(mine, keys_of_rank[rank]) and len(parts) == 2
            for part, theirs in zip(parts, keys_of_rank):
                part.copy_(theirs)

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "all_gather", all_gather)
        loss = contrastive_loss(q[4 * rank : 4 * rank + 4], k[4 * rank : 4 * rank + 4], 0.2)[0].item()
        assert loss == pytest.approx(ctr_paper(q[4 * rank : 4 * rank + 4], k, 0.2, 4 * rank), rel=1e-5)
        losses.append(loss)
    monkeypatch.undo()
    assert sum(losses) / 2 == pytest.approx(contrastive_loss(q, k, 0.2)[0].item(), rel=1e-5)


def test_momentum_update_follows_the_cosine_schedule():
    m = build("mocov3.momentum_rule=fixed")
    base = dict(m.base.named_parameters())
    for step, total in [(0, 100), (25, 100), (50, 100), (100, 100)]:
        rate = 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2  # the paper's m: 0.99 -> 1 by a cosine
        with torch.no_grad():
            for p in m.base.parameters():
                p.add_(torch.randn_like(p))
        before = {n: p.clone() for n, p in m.momentum.module.named_parameters()}
        m.after_step(step, total)
        for n, p in m.momentum.module.named_parameters():
            torch.testing.assert_close(p, rate * before[n] + (1 - rate) * base[n], rtol=1e-6, atol=1e-6)
    assert rate == 1.0 and any(not torch.equal(before[n], base[n]) for n in before)


def test_frozen_patch_projection_gets_no_gradient():
    for freeze in (True, False):
        m = build(f"mocov3.freeze_patch_embed={str(freeze).lower()}").train()
        loss, metrics = m(crops())
        loss.backward()
        assert {"loss", "contrast_acc"} <= metrics.keys()
        grads = [m.encoder.patch_embed.proj.weight.grad, m.encoder.patch_embed.proj.bias.grad]
        assert all(g is None for g in grads) == freeze
        assert m.encoder.blocks[0].attn.qkv.weight.grad is not None and m.predictor[0].weight.grad is not None
        assert all(p.grad is None and not p.requires_grad for p in m.momentum.parameters())
        assert not m.momentum.module["vit"].training and m.momentum.module["proj"].training  # keys: batch-statistics BN


def test_cli_pretrain_exports_a_timm_encoder(tmp_path, labeled_folder):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "mocov3", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1"]
    assert main([*argv, *TINY, *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mocov3" and summary["steps"] == 3 and "knn_top1_random_init" in summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "contrast_acc"} <= set(r) for r in rows)
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)  # strict
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    base = {k[len("base.vit.") :]: v for k, v in state.items() if k.startswith("base.vit.")}
    assert base.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    init = build()  # the run's initialisation (seed 0): the patch projection never moved, the blocks did
    assert torch.equal(model.patch_embed.proj.weight, init.encoder.patch_embed.proj.weight)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, init.encoder.blocks[0].attn.qkv.weight)
    png = tmp_path / "viz.png"
    ckpt = out / "checkpoints" / "last.pt"
    argv = ["visualize", "--checkpoint", str(ckpt), "--data", str(labeled_folder), "--out", str(png), "--num", "2"]
    assert main(argv) == 0
    w, h = Image.open(png).size
    assert w > 1.5 * h  # 2 rows of crop 1 | view 1 | crop 2 | view 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("mocov3.temperature=0", "mocov3.temperature must be > 0, got 0"),
        ("mocov3.momentum=1.5", "mocov3.momentum must be in [0, 1], got 1.5"),
        ("mocov3.blur_p=[1.5, 0.1]", "mocov3.blur_p[0] must be in [0, 1], got 1.5"),
        ("mocov3.solarize_p=0.2", "config key 'mocov3.solarize_p' expects a list of 2 values"),
        ("mocov3.blur_sigma=[2.0, 1.0]", "mocov3.blur_sigma must be 0 < low <= high, got [2.0, 1.0]"),
        ("mocov3.jitter=[0.4, 0.4, 0.2, 0.7]", "mocov3.jitter must be >= 0 with a hue strength <= 0.5"),
        ("mocov3.proj_dim=0", "mocov3.proj_dim must be >= 1, got 0"),
        ("mocov3.tau=0.2", "unknown config key 'mocov3.tau'"),
    ],
)
def test_bad_options_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        build(override)
    assert message in str(e.value)


def test_bad_option_exits_2_from_the_cli(tmp_path, capsys, labeled_folder):
    argv = ["pretrain", "--method", "mocov3", "--data", str(labeled_folder), "--out", str(tmp_path / "bad"), *TINY]
    argv.append("mocov3.blur_sigma=[0, 1]")
    assert main(argv) == 2
    assert "mocov3.blur_sigma must be 0 < low <= high, got [0.0, 1.0]" in capsys.readouterr().err

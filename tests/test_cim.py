"""CIM: labels are 'id changed', no gradient from the enhancer into the generator, sliding-window targets, shapes
for ViT and CNN enhancers, end to end through the CLI with a timm-loadable enhancer."""

import json

import pytest
import timm
import torch
from helpers import TINY, make_tokenizer

from mimkit.cli import main
from mimkit.config import ConfigError, build_config
from mimkit.methods import build_method
from mimkit.methods.cim import sliding_window_targets, window_stats

GEN = ["cim.generator_dim=32", "cim.generator_depth=1", "cim.generator_heads=2"]
RESNET = ["model.name=resnet18", "model.patch_size=4", "cim.cnn_output_stride=8"]


@pytest.fixture
def tok(tmp_path):
    return make_tokenizer(tmp_path / "tok")


def cim(method, tok, *extra):
    return build_method(build_config(dotted=[*TINY, *GEN, f"method={method}", f"tokenizer.path={tok}", *extra]))


def batch(n=3):
    return {"image": torch.randn(n, 3, 16, 16), "tokens": torch.rand(n, 3, 16, 16)}


def test_labels_are_id_changed_not_masked(tok):
    m = cim("cim-revdet", tok)
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    logits = torch.full((12, 64), -1e4)
    logits[torch.arange(12), ids[mask]] = 0.0  # the generator is sure of the original id at every masked slot...
    logits[0] = -1e4
    logits[0, (ids[0, 0] + 1) % 64] = 0.0  # ...except the first, where it is sure of another one
    corrupted, replaced, img = m.corrupt(ids, mask, logits)
    assert torch.equal(replaced, corrupted != ids)
    assert replaced.sum() == 1 and replaced[0, 0]  # masked but resampled to the original: label 0
    assert img.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("method", ["cim-respix", "cim-revdet"])
def test_enhancer_loss_does_not_reach_the_generator(tok, method):
    torch.manual_seed(0)
    m = cim(method, tok)
    b = batch()
    ids = m.generator.targets(b["tokens"])
    mask = m.mask(3, "cpu")
    logits = m.generator.predict(m.generator.encode(b["image"], mask), mask)
    _, replaced, corrupted = m.corrupt(ids, mask, logits)
    assert not corrupted.requires_grad
    m.enhancer_loss(m.enhance(corrupted), b["image"], replaced).backward()
    assert all(p.grad is None for p in m.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.enhancer.parameters())
    assert all(p.grad is None for p in m.generator.tokenizer.parameters())


def test_sliding_window_targets_standardise_each_window():
    x = torch.randn(2, 3, 20, 20) * 3 + 1
    k = 5
    mean, var = window_stats(x, k)
    t = sliding_window_targets(x, k)
    for b, c, i, j in [(0, 0, 10, 10), (1, 2, 3, 17), (0, 1, 0, 0)]:  # interior, near and at the border
        win = x[b, c, max(0, i - 2) : i + 3, max(0, j - 2) : j + 3]
        torch.testing.assert_close(mean[b, c, i, j], win.mean(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var[b, c, i, j], win.var(unbiased=False), rtol=1e-4, atol=1e-4)
        z = (win - mean[b, c, i, j]) / (var[b, c, i, j] + 1e-6).sqrt()  # the window in its own statistics
        torch.testing.assert_close(z.mean(), torch.tensor(0.0), rtol=0, atol=1e-4)
        torch.testing.assert_close(z.var(unbiased=False), torch.tensor(1.0), rtol=0, atol=1e-3)
        expect = (x[b, c, i, j] - win.mean()) / (win.var(unbiased=False) + 1e-6).sqrt()
        torch.testing.assert_close(t[b, c, i, j], expect, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("enhancer", [[], RESNET], ids=["vit", "resnet"])
@pytest.mark.parametrize("method", ["cim-respix", "cim-revdet"])
def test_shapes_for_vit_and_cnn_enhancers(tok, method, enhancer):
    m = cim(method, tok, *enhancer)
    b = batch(2)
    loss, metrics = m(b)
    loss.backward()
    out = m.enhance(b["image"])
    assert out.shape == ((2, 16) if method == "cim-revdet" else (2, 3, 16, 16))
    assert {"gen_loss", "enh_loss", "gen_acc", "replaced_frac"} <= set(metrics)
    assert m.visualize(b).shape == (2, 3, 16, 64)


def test_bad_settings_are_named(tok, tmp_path):
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_method(build_config(dotted=[*TINY, *GEN, "method=cim-revdet"]))
    with pytest.raises(ConfigError, match="cim.vocab_size 100 != the tokenizer's codebook size 64"):
        cim("cim-revdet", tok, "cim.vocab_size=100")
    coarse = make_tokenizer(tmp_path / "coarse", image_size=32, downsample=16)  # 2x2 tokens at 32 px
    with pytest.raises(ConfigError, match="gives a 4x4 feature map at 32 px, which does not fit the 2x2 token grid"):
        cim("cim-revdet", coarse, *RESNET, "cim.generator_patch=16", "data.image_size=32")
    with pytest.raises(ConfigError, match="cim.temperature must be > 0"):
        cim("cim-revdet", tok, "cim.temperature=0")


@pytest.mark.parametrize("enhancer", [[], RESNET], ids=["vit", "resnet"])
def test_cli_end_to_end_exports_the_enhancer(tmp_path, labeled_folder, tok, enhancer, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1", "--method", "cim-revdet"]
    assert main([*argv, *TINY, *GEN, *enhancer, f"tokenizer.path={tok}", "cim.eval_images=8"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout_revdet_acc" in r and "heldout_all_original_acc" in r for r in rows)
    model = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True)
    assert type(model).__name__ == ("ResNet" if enhancer else "VisionTransformer")
    png = tmp_path / "cim.png"
    ckpt = out / "checkpoints" / "last.pt"
    assert main(["visualize", "--checkpoint", str(ckpt), "--data", str(labeled_folder), "--out", str(png)]) == 0
    capsys.readouterr()

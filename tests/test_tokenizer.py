"""Image tokenizers: contract shapes and grid alignment, folders, grid checks, codebook upkeep, PSNR, and
`mimkit tokenizer train` end to end (with resume) on a tiny labeled folder."""

import json
import math

import pytest
import torch
from helpers import TINY

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.models.tokenizer import (
    DalleTokenizer,
    VQTokenizer,
    aligned_input_size,
    check_grid,
    codebook_stats,
    load_tokenizer,
    map_pixels,
    psnr,
    save_tokenizer,
    unmap_pixels,
)
from mimkit.models.tokenizer.vqvae import EMACodebook


def tiny_vq(**kw):
    args = dict(vocab_size=16, downsample=4, width=8, code_dim=4, res_blocks=1, image_size=16)
    torch.manual_seed(0)
    return VQTokenizer(**{**args, **kw})


def tiny_dalle(image_size=32):
    torch.manual_seed(0)
    return DalleTokenizer(vocab_size=32, n_hid=16, n_blk_per_group=1, n_init=8, image_size=image_size)


@pytest.mark.parametrize(
    "make, size, grid",
    [
        (lambda: tiny_vq(), 16, 4),
        (lambda: tiny_vq(downsample=8, image_size=32), 32, 4),
        (lambda: tiny_vq(downsample=2, image_size=8), 8, 4),
        (lambda: tiny_dalle(), 32, 4),
    ],
)
def test_contract_shapes_and_grid(make, size, grid):
    tok = make()
    x = torch.rand(2, 3, size, size)
    logits = tok.logits(x)
    assert logits.shape == (2, tok.vocab_size, grid, grid)
    ids = tok.encode(x)
    assert ids.dtype == torch.long and ids.shape == (2, grid, grid)
    assert torch.equal(ids, logits.argmax(1))
    img = tok.decode(ids)
    assert img.shape == (2, 3, size, size) and img.min() >= 0 and img.max() <= 1
    assert tok.grid() == grid and size == grid * tok.downsample
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's precision does not change the tokens
        assert torch.equal(tok.encode(x), ids) and tok.decode(ids).dtype == torch.float32


def test_token_grid_lines_up_with_vit_patches():
    # DALL-E at 112 px for a ViT-*/16 at 224: 14x14 tokens, one per patch; the trainable one: 32 px / 4 -> 8x8
    dalle = DalleTokenizer(vocab_size=32, n_hid=16, n_blk_per_group=1, n_init=8, image_size=112)
    assert check_grid(dalle, 224, 16) == 14 and aligned_input_size(dalle, 224, 16) == 112
    assert dalle.encode(torch.rand(1, 3, 112, 112)).shape == (1, 14, 14)
    vq = tiny_vq(image_size=32)
    assert check_grid(vq, 32, 4) == 8 and vq.encode(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8)


@pytest.mark.parametrize("make, size, margin", [(lambda: tiny_vq(image_size=96), 96, 5), (tiny_dalle, 160, 7)])
def test_shifting_the_image_by_one_patch_shifts_the_tokens_by_one(make, size, margin):
    """Token (i, j) sits on patch (i, j): away from the borders, moving the image by `downsample` pixels moves
    the logits by exactly one token (the encoders are convolutional with stride = downsample)."""
    tok = make()
    d = tok.downsample
    x = torch.rand(1, 3, size + d, size + d)
    a = tok.logits(x[:, :, :size, :size])
    b = tok.logits(x[:, :, d:, d:])  # the same picture moved up-left by one patch
    inner = slice(margin, size // d - margin)
    shifted = slice(margin + 1, size // d - margin + 1)
    assert torch.allclose(b[:, :, inner, inner], a[:, :, shifted, shifted], atol=1e-4, rtol=1e-4)


def test_check_grid_names_both_grids():
    vq = tiny_vq(image_size=32)  # 8x8 tokens
    with pytest.raises(ConfigError, match=r"tokenizer grid 8x8 != encoder grid 14x14") as e:
        check_grid(vq, 224, 16)
    assert "set model.patch_size=28 (one patch per token) or data.image_size=128" in str(e.value)
    with pytest.raises(ConfigError, match=r"8x8 != encoder grid 2x2") as e:  # a patch16 name at 32 px
        check_grid(vq, 32, 16)
    assert "set model.patch_size=4 (one patch per token)" in str(e.value)  # the fix, not "feed it 8 px images"
    assert check_grid(vq, 224, 16, tokenizer_size=56) == 14
    with pytest.raises(ConfigError, match="not a multiple of its downsampling 4"):
        check_grid(vq, 224, 16, tokenizer_size=30)


def test_bad_tokenizer_settings():
    with pytest.raises(ConfigError, match="tokenizer.downsample must be a power of 2"):
        tiny_vq(downsample=3, image_size=18)
    with pytest.raises(ConfigError, match="image size 30 is not a multiple of tokenizer.downsample 4"):
        tiny_vq(image_size=30)
    with pytest.raises(ValueError, match="not a multiple of its downsampling 4"):
        tiny_vq().encode(torch.rand(1, 3, 18, 18))


@pytest.mark.parametrize("make", [tiny_vq, tiny_dalle])
def test_save_load_round_trip(tmp_path, make):
    tok = make()
    x = torch.rand(2, 3, tok.image_size, tok.image_size)
    out = save_tokenizer(tok, tmp_path / "tok", meta={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "tokenizer.json"]
    cfg = json.loads((out / "tokenizer.json").read_text())
    assert cfg["kind"] == tok.kind and cfg["grid"] == tok.grid() and cfg["mimkit"]["note"] == "test"
    back = load_tokenizer(out)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size and back.downsample == tok.downsample
    assert torch.equal(back.logits(x), tok.logits(x))
    ids = back.encode(x)
    assert torch.equal(back.decode(ids), tok.decode(ids))
    # frozen: no gradients, and eval mode even after a parent module calls .train()
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    parent = torch.nn.Sequential(back).train()
    assert not parent[0].training


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"tokenizer path '{tmp_path / 'nope'}' does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a tokenizer folder .no tokenizer.json."):
        load_tokenizer(tmp_path / "empty")
    out = save_tokenizer(tiny_vq(), tmp_path / "tok")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="model.safetensors' does not fit the tokenizer"):
        load_tokenizer(out)


def test_pixel_mapping():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(map_pixels(x).flatten(), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(unmap_pixels(map_pixels(x)), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_psnr_matches_a_hand_computation():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.empty(2, 3, 4, 4)
    y[0] = 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    y[1] = 0.01  # MSE 1e-4 -> 40 dB
    assert torch.allclose(psnr(y, x), torch.tensor([20.0, 40.0]))
    assert math.isclose(psnr(y, x).mean().item(), 30.0, rel_tol=1e-6)
    assert math.isclose(psnr(y[:1] * 255, x[:1], max_value=255.0).item(), 20.0, rel_tol=1e-6)
    half = torch.zeros(1, 1, 2, 2)
    half[..., 0, 0] = 1.0  # MSE 1/4 -> 10 log10(4) dB
    assert math.isclose(psnr(half, torch.zeros(1, 1, 2, 2)).item(), 10 * math.log10(4), rel_tol=1e-6)


def test_codebook_stats_by_hand():
    s = codebook_stats(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert math.isclose(s["perplexity"], 2.0) and s["usage"] == 0.5 and s["dead_codes"] == 2
    s = codebook_stats(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert math.isclose(s["perplexity"], 4.0) and s["usage"] == 1.0 and s["dead_codes"] == 0


def test_dead_code_restart_moves_dead_codes():
    torch.manual_seed(0)
    cb = EMACodebook(vocab_size=8, dim=2, decay=0.9)
    cb.init_from(torch.randn(100, 2))
    z = torch.randn(64, 2) * 0.01 + 5.0  # every vector lands on the code nearest to (5, 5)
    ids = cb.distances(z).argmin(1)
    cb.update(z, ids)
    cb.recent = z
    used = set(ids.tolist())
    assert len(used) == 1
    before = cb.embed.clone()
    moved = cb.restart_dead()
    assert moved == 7
    dead = [i for i in range(8) if i not in used]
    for i in dead:  # each dead code now sits on one of the recent encoder outputs
        assert (cb.embed[i] - z).norm(dim=1).min() < 1e-6 and not torch.equal(cb.embed[i], before[i])
    for i in used:
        assert torch.equal(cb.embed[i], before[i])
    assert cb.usage.sum() == 0  # a new usage window starts
    assert len(set(cb.distances(z + 0.001 * torch.randn_like(z)).argmin(1).tolist())) > 1  # codes compete again


def test_ema_update_moves_codes_to_their_assignments():
    torch.manual_seed(0)
    cb = EMACodebook(vocab_size=4, dim=2, decay=0.5)
    cb.init_from(torch.randn(16, 2))
    z = torch.full((10, 2), 3.0)
    ids = torch.zeros(10, dtype=torch.long)
    for _ in range(30):
        cb.update(z, ids)
    assert torch.allclose(cb.embed[0], torch.tensor([3.0, 3.0]), atol=1e-3)


TOK = [
    "data.image_size=16",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
    "tokenizer.vocab_size=32",
    "tokenizer.width=8",
    "tokenizer.code_dim=4",
    "tokenizer.res_blocks=1",
    "tokenizer.restart_every=2",
    "optim.lr=1e-3",
]


def test_tokenizer_train_cli_end_to_end_and_resume(tmp_path, capsys, labeled_folder):
    out = tmp_path / "run"
    argv = ["tokenizer", "train", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1", *TOK]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "psnr" in printed and "tokenizer exported to" in printed and "k-NN" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tokenizer" and summary["steps"] == 3 and summary["psnr"] > 0
    assert summary["eval_images"] == 16 and "held-out" in summary["eval_source"]
    assert "knn_top1" not in summary
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert all("perplexity" in x and "usage" in x and "recon_mse" in x for x in steps)
    epoch_end = [x for x in lines if "psnr" in x]
    assert len(epoch_end) == 1 and {"dead_codes", "eval_perplexity", "codes_restarted"} <= set(epoch_end[0])
    assert math.isclose(epoch_end[0]["psnr"], summary["psnr"], rel_tol=1e-5)

    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == 32 and tok.grid() == 4
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"] and state["method"] == "tokenizer"

    # resume: the same command with more epochs continues from step 3
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "at step 3" in printed
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6

    # original | reconstruction, from the checkpoint and from the exported folder
    from PIL import Image

    for source in (out / "checkpoints" / "last.pt", out / "tokenizer"):
        png = tmp_path / "viz.png"
        argv = ["visualize", "--checkpoint", str(source), "--data", str(labeled_folder), "--out", str(png)]
        assert main([*argv, "--num", "3"]) == 0
        w, h = Image.open(png).size
        assert w > h / 3 * 1.5  # two panels side by side per row
    capsys.readouterr()


def test_tokenizer_train_resumed_mid_epoch_matches_uninterrupted(tmp_path, capsys, labeled_folder, monkeypatch):
    """Stopped at step 5 (checkpoint of step 4, after a dead-code restart), re-run -> the metrics and weights of
    an uninterrupted run: the codebook statistics and the restart RNG travel in the checkpoint."""
    from mimkit.engine.tasks.tokenizer_training import TokenizerTraining

    args = ["tokenizer", "train", "--data", str(labeled_folder), "--epochs", "2", *TOK, "train.checkpoint_every=1"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0

    original = TokenizerTraining.after_step

    def stop_at_5(self, step, total_steps):
        original(self, step, total_steps)
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(TokenizerTraining, "after_step", stop_at_5)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(TokenizerTraining, "after_step", original)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["run"]["step"] == 4
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    capsys.readouterr()

    def metrics(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]

    assert metrics("full") == metrics("cut")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_tokenizer_sizes_is_refused(tmp_path, capsys, labeled_folder):
    out = tmp_path / "run"
    argv = ["tokenizer", "train", "--data", str(labeled_folder), "--out", str(out), "--epochs", "1", *TOK]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "train.epochs=2", "tokenizer.vocab_size=64"]) == 2
    assert "tokenizer.vocab_size: 32 -> 64" in capsys.readouterr().err  # another experiment: refused by name
    assert main([*argv, "train.epochs=2", "tokenizer.vocab_size=64", "train.allow_config_change=true"]) == 2
    err = capsys.readouterr().err  # even when asked to go on: the weights cannot fit
    assert "the checkpoint's tokenizer does not fit this run's tokenizer.* settings" in err and "size mismatch" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["tokenizer.downsample=3"], "tokenizer.downsample must be a power of 2"),
        (["tokenizer.downsample=32"], "image size 16 is not a multiple of tokenizer.downsample 32"),
        (["eval.knn_every=1"], "a tokenizer has no features for k-NN"),
        (["tokenizer.vocab_sise=3"], "unknown config key 'tokenizer.vocab_sise'"),
    ],
)
def test_bad_tokenizer_train_input(tmp_path, capsys, labeled_folder, extra, message):
    out = tmp_path / "run"
    code = main(["tokenizer", "train", "--data", str(labeled_folder), "--out", str(out), *TOK, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_import_dalle_refuses_without_trust_and_names_files(tmp_path, capsys):
    enc, dec = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    argv = ["tokenizer", "import-dalle", "--encoder", str(enc), "--decoder", str(dec), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"'{enc}' and '{dec}' are Python pickles" in err and "--trust-pickle" in err
    assert main([*argv, "--trust-pickle"]) == 2
    assert f"DALL-E encoder file '{enc}' does not exist" in capsys.readouterr().err
    enc.write_bytes(b"this is not a pickle")
    dec.write_bytes(b"nor is this")
    assert main([*argv, "--trust-pickle"]) == 2
    assert f"'{enc}' is not a DALL-E encoder file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_visualize_tokenizer_path_that_does_not_exist(tmp_path, capsys, labeled_folder):
    missing = tmp_path / "no-tokenizer"
    missing.mkdir()
    argv = ["visualize", "--checkpoint", str(missing), "--data", str(labeled_folder), "--out", str(tmp_path / "v.png")]
    assert main(argv) == 2
    assert f"tokenizer path '{missing}' is not a tokenizer folder" in capsys.readouterr().err


def test_beit_on_the_demo_trains_the_demo_tokenizer_first_and_reuses_it(tmp_path, capsys):
    out = tmp_path / "beit-demo"
    tiny = [t for t in TOK if not t.startswith(("optim.", "tokenizer.restart"))]  # the pre-training's optim
    argv = ["pretrain", "--method", "beit", "--out", str(out), "--max-images", "32", "--epochs", "1", *TINY, *tiny,
            "tokenizer.eval_images=16", "beit.min_block_patches=2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"training the demo's first (20 epochs, recipe tokenizer-demo) into '{out / 'tokenizer'}'" in printed
    tok = json.loads((out / "tokenizer" / "summary.json").read_text())
    assert tok["vocab_size"] == 32 and tok["steps"] > 0  # the user's tokenizer.* overrides reach it
    summary = json.loads((out / "summary.json").read_text())
    assert "knn_top1" in summary and summary["method"] == "beit"
    assert f"path: {out / 'tokenizer'}" in (out / "config.yaml").read_text()
    assert main(argv) == 0  # a re-run reuses the finished tokenizer (and reports the finished run again)
    printed = capsys.readouterr().out
    assert f"beit: reusing the demo tokenizer in '{out / 'tokenizer'}'" in printed and "psnr" not in printed


def test_the_demo_tokenizer_has_the_methods_pixels_per_token(tmp_path):
    """The demo's CIM sets cim.generator_patch=2 (2x2 visual tokens per 4 px patch): the tokenizer it trains first
    downsamples by 2; CIM with the option at the patch, and BEiT (no such option), by the patch."""
    from mimkit.run_config import build_config, demo_tokenizer

    for method, extra, downsample in [("cim-revdet", [], 2), ("cim-respix", ["cim.generator_patch=4"], 4),
                                      ("beit", [], 4)]:  # fmt: skip
        cfg = build_config(["demo"], {"out": str(tmp_path / method)}, [f"method={method}", *extra])
        assert demo_tokenizer(cfg, []).tokenizer.downsample == downsample, method


@pytest.mark.parametrize("method", ["beit", "cim-respix"])
def test_tokenizer_methods_on_user_data_name_the_command(tmp_path, capsys, labeled_folder, method):
    out = tmp_path / "run"
    code = main(["pretrain", "--method", method, "--data", str(labeled_folder), "--out", str(out), *TINY])
    err = capsys.readouterr().err
    command = f"`mimkit tokenizer train --data {labeled_folder} --image-size 16 --out runs/tokenizer-data "
    assert code == 2 and err.count("\n") == 1 and command + "tokenizer.downsample=4`" in err
    assert "tokenizer.path=runs/tokenizer-data " in err and not out.exists()

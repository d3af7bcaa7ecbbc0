"""CIM: labels are 'id changed', no gradient from the enhancer into the generator, sliding-window targets, shapes
for ViT and CNN enhancers, end to end through the CLI with a timm-loadable enhancer."""

import copy
import json

import pytest
import timm
import torch
from helpers import TINY, make_tokenizer
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.engine.trainer.optim import build_optimizer, set_lr
from mimkit.methods import build_method
from mimkit.methods.cim import sliding_window_targets, window_stats
from mimkit.run_config import build_config

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


@pytest.mark.parametrize("method", ["cim-respix", "cim-revdet"])
def test_visual_tokens_finer_than_the_vit_patch(tmp_path, method):
    """cim.generator_patch=2 under a patch-4 ViT: 8x8 visual tokens (the tokenizer's grid), RevDet one logit per
    visual token (4 per patch token), ResPix still every pixel."""
    fine = make_tokenizer(tmp_path / "fine", downsample=2)
    m = cim(method, fine, "cim.generator_patch=2", "cim.mask_ratio=0.5")
    b = batch(2)
    loss, metrics = m(b)
    loss.backward()
    assert m.grid == (8, 8) and m.generator.encoder.patch_embed.patch_size == (2, 2)
    assert m.enhance(b["image"]).shape == ((2, 64) if method == "cim-revdet" else (2, 3, 16, 16))
    assert m.visualize(b).shape == (2, 3, 16, 64)
    with pytest.raises(ConfigError, match="cim.generator_patch 3 does not divide the ViT enhancer's patch 4"):
        cim(method, fine, "cim.generator_patch=3", "data.image_size=24")


def test_a_patch_token_answers_for_the_visual_tokens_inside_it():
    """RevDet's logits from 2x2 patch tokens with 2x2 visual tokens each land on the 4x4 visual grid in raster
    order: the value planted for visual token (row, col) comes out at index row * 4 + col."""
    from mimkit.methods.cim import CIMOptions, RevDet

    objective = RevDet(CIMOptions(), patch=4, grid=(2, 2), tokens_per_side=2)
    planted = torch.empty(1, 4, 4)
    for token in range(4):  # patch tokens in raster order, each with its 2x2 visual tokens in raster order
        for sub in range(4):
            row, col = (token // 2) * 2 + sub // 2, (token % 2) * 2 + sub % 2
            planted[0, token, sub] = row * 4 + col
    assert objective.grid == (4, 4)
    assert torch.equal(objective.from_tokens(planted), torch.arange(16.0).view(1, 16))


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


# ---- objectives, generator, lr multiplier, options, recipes ------------------------------------------------------
def independent_window_targets(imgs, window, eps=1e-6):
    """ResPix's targets pixel by pixel: (x - mean) / sqrt(var + eps) over the window centred on the pixel, per
    channel, with the biased variance of the pixels of the window that lie inside the image."""
    r = window // 2
    out = torch.empty_like(imgs)
    h, w = imgs.shape[-2:]
    for i in range(h):
        for j in range(w):
            win = imgs[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].flatten(2)
            mean, var = win.mean(-1), win.var(-1, unbiased=False)
            out[:, :, i, j] = (imgs[:, :, i, j] - mean) / (var + eps).sqrt()
    return out


@pytest.mark.parametrize("method", ["cim-respix", "cim-revdet"])
def test_objective_losses_follow_the_papers_definitions(tok, method):
    """One training step's logged losses equal the generator's masked cross-entropy and the enhancer's loss
    re-derived here from the paper's definitions (RevDet: BCE of 'token id changed' over all tokens; ResPix: MSE of
    every pixel against its sliding-window normalised original), on the same masks and samples."""
    torch.manual_seed(0)
    m = cim(method, tok)
    b = batch()
    torch.manual_seed(1)
    loss, metrics = m(b)
    torch.manual_seed(1)  # the same mask and samples, step by step
    ids = m.generator.targets(b["tokens"])
    mask = m.mask(3, "cpu")
    logits = m.generate(b["image"], mask)
    corrupted, _, corrupted_imgs = m.corrupt(ids, mask, logits)
    out = m.enhance(corrupted_imgs).detach().double()
    log_p = logits.detach().double().log_softmax(-1)
    gen_ce = -log_p[torch.arange(len(log_p)), ids[mask]].mean()
    if method == "cim-revdet":
        y = (corrupted != ids).double()
        p = torch.sigmoid(out)
        enh = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    else:
        enh = (out - independent_window_targets(b["image"].double(), m.options.window)).pow(2).mean()
    torch.testing.assert_close(metrics["gen_loss"].double(), gen_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["enh_loss"].double(), enh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach().double(), gen_ce + enh, rtol=1e-4, atol=1e-6)


def test_the_generator_is_a_small_beit_with_shared_bias_and_layer_scale(tok):
    cfg = build_config(dotted=[*TINY, *GEN, "method=cim-revdet", f"tokenizer.path={tok}", "model.layer_scale=0.5",
                               "model.drop_path=0.2", "model.rel_pos_bias=per_layer"])  # fmt: skip
    enhancer_model = copy.deepcopy(cfg.model)
    m = build_method(cfg)
    gen = m.generator.encoder
    assert isinstance(gen, Beit) and gen.pos_embed is None
    assert gen.rel_pos_bias is not None  # one table for all blocks...
    assert all(blk.attn.relative_position_bias_table is None for blk in gen.blocks)  # ...none per block
    assert (len(gen.blocks), gen.embed_dim, gen.blocks[0].attn.num_heads) == (1, 32, 2)
    for blk in gen.blocks:  # LayerScale at cim.generator_layer_scale, not the enhancer's model.layer_scale
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)
        assert isinstance(blk.drop_path1, torch.nn.Identity)  # no stochastic depth from model.drop_path
    assert cfg.model == enhancer_model  # the run's config is read, never changed
    old = cim("cim-revdet", tok, "cim.generator=vit").generator.encoder  # the former generator, as an option
    assert isinstance(old, VisionTransformer) and not old.pos_embed.requires_grad  # fixed sin-cos positions
    assert isinstance(old.blocks[0].ls1, torch.nn.Identity)  # no LayerScale


def groups_of(opt, m):
    """{parameter name: (lr, lr_scale)} over the optimizer's groups."""
    names = {id(p): n for n, p in m.named_parameters()}
    return {names[id(p)]: (g["lr"], g.get("lr_scale", 1.0)) for g in opt.param_groups for p in g["params"]}


def first_step(tok, *extra, enh_weight=1.0):
    """CIM-ResPix from seeded weights, one AdamW step at lr 1e-3 built as the engine builds it (with the method's
    lr_scale) on L_gen + enh_weight * L_enh -> the method, the optimizer, each trainable parameter's change and
    its gradient."""
    torch.manual_seed(0)
    cfg = build_config(dotted=[*TINY, *GEN, "method=cim-respix", f"tokenizer.path={tok}", *extra])
    m = build_method(cfg)
    opt = build_optimizer(m, cfg.optim, 1e-3, m.no_weight_decay(), torch.device("cpu"), lr_scale=m.lr_scale)
    set_lr(opt, 1e-3)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    b = batch()
    ids = m.generator.targets(b["tokens"])
    mask = m.mask(3, "cpu")
    logits = m.generate(b["image"], mask)
    gen_loss = m.generator.loss(logits, ids[mask])
    _, replaced, corrupted = m.corrupt(ids, mask, logits.detach())
    enh_loss = m.enhancer_loss(m.enhance(corrupted), b["image"], replaced)
    (gen_loss + enh_weight * enh_loss).backward()
    opt.step()
    change = {n: p.detach() - before[n] for n, p in m.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in m.named_parameters() if p.requires_grad}
    return m, opt, change, grads


def test_vit_enhancer_starts_as_maes_encoder(tok):
    """The default `cim.enhancer_init=mae` is facebookresearch/mae's `initialize_weights` on the enhancer (xavier-
    uniform Linear weights, zero biases, unit LayerNorm, the patch conv xavier as a Linear, class token N(0, 0.02));
    `timm` keeps timm's trunc-normal 0.02; a beit_* enhancer is never re-initialised."""

    def xavier_std(w):
        fan_out, fan_in = w.shape[0], w[0].numel()
        return (2.0 / (fan_in + fan_out)) ** 0.5

    torch.manual_seed(0)
    vit = cim("cim-revdet", tok, "model.embed_dim=64").enhancer
    linears = [m for m in vit.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4  # qkv, proj, fc1, fc2 per block
    for w in [lin.weight for lin in linears] + [vit.patch_embed.proj.weight]:
        bound = 3.0**0.5 * xavier_std(w)
        assert w.abs().max() <= bound + 1e-6 and abs(w.std().item() / xavier_std(w) - 1) < 0.1
    assert all(torch.all(lin.bias == 0) for lin in linears if lin.bias is not None)
    assert abs(vit.cls_token.std().item() / 0.02 - 1) < 0.35
    assert not vit.pos_embed.requires_grad  # the fixed sin-cos table is kept

    timm_init = cim("cim-revdet", tok, "model.embed_dim=64", "cim.enhancer_init=timm").enhancer
    assert timm_init.blocks[0].attn.qkv.weight.std() < 0.025  # timm's 0.02, not xavier's ~0.09 at 64 -> 192
    beit = cim("cim-revdet", tok, "model.name=beit_base_patch16_224", "model.embed_dim=64").enhancer
    assert isinstance(beit, Beit) and beit.blocks[0].attn.qkv.weight.std() < 0.025


def test_generator_lr_scale_is_a_real_knob(tok):
    """cim.generator_lr_scale puts every trainable generator parameter into groups at that multiple of the lr (the
    enhancer's stay at the run's lr), so the generator's AdamW step is that much smaller; a constant weight on the
    enhancer's loss (the former cim.enhancer_weight) leaves every step as it was: Adam divides it out."""
    m, opt, scaled, _ = first_step(tok, "cim.generator_lr_scale=0.25")
    groups = groups_of(opt, m)
    assert set(groups) == set(scaled)  # every trainable parameter once; the frozen tokenizer in none
    assert not any(n.startswith("generator.tokenizer.") for n in groups)
    for n, (lr, scale) in groups.items():
        expect = 0.25 if n.startswith("generator.") else 1.0
        assert scale == expect and lr == pytest.approx(1e-3 * expect), n
    m1, opt1, plain, grads = first_step(tok)
    assert all(scale == 1.0 for _, scale in groups_of(opt1, m1).values())
    for n in plain:
        expect = plain[n] * (0.25 if n.startswith("generator.") else 1.0)
        torch.testing.assert_close(scaled[n], expect, rtol=1e-3, atol=1e-7, msg=n)
    assert any(plain[n].abs().max() > 1e-4 for n in plain if n.startswith("generator."))  # it did move
    _, _, weighted, _ = first_step(tok, enh_weight=50.0)
    for n in plain:  # up to Adam's eps (1e-8), which only matters where a gradient is near 0
        sure = grads[n].abs() > 1e-4
        torch.testing.assert_close(weighted[n][sure], plain[n][sure], rtol=1e-3, atol=1e-7, msg=n)
    assert sum(int((grads[n].abs() > 1e-4).sum()) for n in plain if n.startswith(("enhancer.", "head."))) > 1000


def test_bad_cim_options_are_config_errors_naming_the_key(tok):
    cases = {
        "cim.enhancer_weight=50": "cim.enhancer_weight' was renamed: use 'cim.generator_lr_scale",
        "cim.generator_lr_scale=0": "cim.generator_lr_scale must be > 0",
        "cim.generator=electra": "cim.generator must be 'beit' or 'vit'",
        "cim.generator_layer_scale=-0.1": "cim.generator_layer_scale must be >= 0",
        "cim.mask_ratio=0.99": "cim.mask_ratio 0.99 leaves no masked or no visible patch of 16",
        "cim.window=4": "cim.window must be a positive odd number, got 4",
        "cim.generator_patch=8": "cim.generator_patch 8 does not divide the ViT enhancer's patch 4",
        "cim.sample=top_k": "cim.sample must be 'softmax' or 'argmax'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            cim("cim-respix", tok, override)


@pytest.mark.parametrize("recipe", ["imagenet-cim-vitb", "imagenet-cim-resnet50"])
def test_imagenet_recipes_hold_the_values_the_docs_quote(tmp_path, recipe):
    """The values docs/methods.md quotes for CIM's ImageNet recipes, and the geometry they build with a tokenizer
    of DALL-E's shape (downsampling 8 at 112 px): 14x14 tokens of 16 px for the 224 px enhancer."""
    cfg = build_config(files=[recipe])
    assert cfg.method == "cim-respix" and cfg.data.image_size == 224
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (300, 1.5e-3, 0.05, 10)
    o = cfg.cim
    assert (o.mask_mode, o.mask_ratio, o.generator, o.generator_depth) == ("random", 0.5, "beit", 4)
    assert cfg.train.batch_size * 8 == 2048 and cfg.tokenizer.path is None
    dalle_shaped = make_tokenizer(tmp_path / "tok", image_size=112, vocab_size=64, downsample=8)
    small = ["cim.generator_depth=1"] + (["model.depth=1"] if cfg.model.name.startswith("vit_") else [])  # widths kept
    m = build_method(build_config(files=[recipe], dotted=[f"tokenizer.path={dalle_shaped}", *small]))
    assert m.grid == (14, 14) and m.patch == 16 and [v.size for v in m.views] == [224, 112]
    assert isinstance(m.generator.encoder, Beit) and m.generator.encoder.embed_dim == cfg.cim.generator_dim

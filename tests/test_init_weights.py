"""model.init: pre-training starts from an export, a checkpoint file or an official MAE checkpoint (encoder and
decoder); strict by default, every failure a ConfigError naming the file and the first bad key."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from helpers import TINY

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.data import load_splits
from mimkit.data.pipeline import EpochBatchSampler, ViewDataset, collate, prepare_batch
from mimkit.engine.tasks.pretrain import PretrainTask, method_from_checkpoint, pretrain
from mimkit.methods import build_method
from mimkit.models.init_weights import describe_init, load_initial_weights
from mimkit.run_config import build_config
from mimkit.safe_load import read_weights

RUN = ["--data", "demo", "--max-images", "64", "--epochs", "1", *TINY, "eval.final_knn=false"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The exporting run: a tiny MAE pre-training through the CLI (4 steps), its encoder exported."""
    out = tmp_path_factory.mktemp("init") / "a"
    assert main(["pretrain", "--out", str(out), *RUN]) == 0
    return out


def config(*extra):
    return build_config(["demo"], {"data": {"max_images": 64}, "train": {"epochs": 1}}, [*TINY, *extra])


def fixed_batch(cfg, method, n: int = 16) -> dict:
    """The first n training images (epoch 0 crops), normalised as the pipeline does."""
    ds = ViewDataset(load_splits(cfg.data, cfg.train.seed).train, method.views, cfg.data, seed=cfg.train.seed)
    raw = collate([ds[(0, i)] for i in range(n)])
    return prepare_batch(raw, method.views, "cpu", cfg.data.mean, cfg.data.std)


def loss_of(method, batch, noise) -> float:
    with torch.no_grad():
        return method.eval()(batch, noise=noise)[0].item()


def test_checkpoint_continues_where_the_run_stopped(run_a):
    """The run's checkpoint carries encoder and decoder: the loaded method's loss on a batch and mask is the
    exporting run's final model's loss on them (a method at other random weights gives another loss)."""
    original, cfg, _ = method_from_checkpoint(run_a / "checkpoints" / "last.pt")
    torch.manual_seed(123)  # other initial weights than run A's
    loaded = build_method(config())
    batch = fixed_batch(cfg, loaded)
    noise = torch.rand(16, loaded.num_patches, generator=torch.Generator().manual_seed(5))
    before = loss_of(loaded, batch, noise)
    report = load_initial_weights(loaded, str(run_a / "checkpoints" / "last.pt"))
    assert report["kind"] == "mimkit-checkpoint" and not report["missing"] and not report["unexpected"]
    assert len(report["loaded"]) == len(original.encoder.state_dict()) + len(original.decoder.state_dict())
    expected = loss_of(original, batch, noise)
    assert loss_of(loaded, batch, noise) == pytest.approx(expected, rel=1e-6)
    assert abs(before - expected) > 1e-3


def test_export_loads_the_encoder_exactly(run_a):
    """An export holds the encoder alone: every tensor loads, and the masked encoding equals the run's."""
    original, cfg, _ = method_from_checkpoint(run_a / "checkpoints" / "last.pt")
    torch.manual_seed(123)
    loaded = build_method(config())
    report = load_initial_weights(loaded, str(run_a / "encoder"))
    assert report["kind"] == "export" and "mae" in report["about"] and not report["missing"]
    exported = read_weights(run_a / "encoder" / "model.safetensors")
    assert all(torch.equal(loaded.encoder.state_dict()[k], v) for k, v in exported.items())
    imgs = fixed_batch(cfg, loaded)["image"]
    ids_keep = original.mask(16, "cpu", torch.rand(16, loaded.num_patches))[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode(imgs, ids_keep), original.encode(imgs, ids_keep))


class InitTask(PretrainTask):
    """PretrainTask with model.init applied right after the method is built (the engine's place for it)."""

    def __init__(self, cfg, rt):
        def build(c):
            method = build_method(c)
            load_initial_weights(method, c.model.init, c.model.init_strict)
            return method

        super().__init__(cfg, rt, build=build)


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_second_run_first_step_loss(run_a, tmp_path, source):
    """A second pre-training with model.init and a tiny lr: its first logged loss is that of run A's weights
    (plus, from an export, the decoder this run initialises itself) on its first batch and mask."""
    spec = run_a / ("checkpoints/last.pt" if source == "checkpoint" else "encoder")
    cfg = config(f"model.init={spec}", "optim.lr=1e-9", "train.epochs=1", "train.precision=fp32")  # as loss_of
    cfg.out = str(tmp_path / "b")
    pretrain(cfg, task_cls=InitTask)
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    if source == "checkpoint":
        reference = method_from_checkpoint(run_a / "checkpoints" / "last.pt")[0]
    else:  # what run B built at its seed, with run A's exported encoder
        torch.manual_seed(cfg.train.seed)
        reference = build_method(cfg)
        reference.encoder.load_state_dict(read_weights(spec / "model.safetensors"))
    ds = ViewDataset(load_splits(cfg.data, cfg.train.seed).train, reference.views, cfg.data, seed=cfg.train.seed)
    keys = next(iter(EpochBatchSampler(len(ds), cfg.train.batch_size, cfg.train.seed)))
    batch = prepare_batch(collate([ds[k] for k in keys]), reference.views, "cpu", cfg.data.mean, cfg.data.std)
    # the engine seeds the masks with seed * 1000 + rank + 1 after building the method
    noise = torch.rand(
        len(keys), reference.num_patches, generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + 1)
    )
    assert first["loss"] == pytest.approx(loss_of(reference, batch, noise), abs=2e-6)


# ------------------------------------------------------------------------------------------ official MAE
def _hf_block_to_official(hf: dict, src: str, dst: str) -> dict:
    """One transformers ViT layer (separate q/k/v; 4.x or 5.x names) -> a timm Block as MAE's code names it."""
    new = f"{src}.attention.q_proj.weight" in hf
    q, k, v, o = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj") if new else
                  ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                   "attention.output.dense"))  # fmt: skip
    fc1, fc2 = ("mlp.fc1", "mlp.fc2") if new else ("intermediate.dense", "output.dense")
    out = {}
    for p in ("weight", "bias"):
        out[f"{dst}.attn.qkv.{p}"] = torch.cat([hf[f"{src}.{n}.{p}"] for n in (q, k, v)])
        for theirs, ours in ((o, "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                             (fc1, "mlp.fc1"), (fc2, "mlp.fc2")):  # fmt: skip
            out[f"{dst}.{ours}.{p}"] = hf[f"{src}.{theirs}.{p}"]
    return out


def official_mae_state(hf: dict, depth: int, dec_depth: int) -> dict:
    """transformers' ViTMAEForPreTraining weights under facebookresearch/mae's models_mae.py names."""
    layers = "vit.layers" if any(k.startswith("vit.layers.") for k in hf) else "vit.encoder.layer"
    out = {
        "cls_token": hf["vit.embeddings.cls_token"],
        "pos_embed": hf["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["vit.layernorm.weight"],
        "norm.bias": hf["vit.layernorm.bias"],
        "mask_token": hf["decoder.mask_token"],
        "decoder_pos_embed": hf["decoder.decoder_pos_embed"],
    }
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = hf[f"decoder.{name}.{p}"]
    for i in range(depth):
        out.update(_hf_block_to_official(hf, f"{layers}.{i}", f"blocks.{i}"))
    for i in range(dec_depth):
        out.update(_hf_block_to_official(hf, f"decoder.decoder_layers.{i}", f"decoder_blocks.{i}"))
    return out


@pytest.fixture
def official_mae(tmp_path):
    """An official-layout MAE checkpoint ({'model': ...}) whose weights come from transformers' ViTMAE, and that
    model (the peer): 16 px, patch 4, 32 wide, 2 + 1 blocks."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    hf_cfg = transformers.ViTMAEConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=128, mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6, qkv_bias=True,
        hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.ViTMAEForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # away from the initial values, so every tensor matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": official_mae_state(hf.state_dict(), 2, 1)}, path)
    return path, hf


def mae_config(method: str = "mae"):
    return build_config(overrides={"method": method}, dotted=[*TINY, "mae.mask_ratio=0.75", "mae.decoder_heads=2"])


def test_official_mae_checkpoint_loads_encoder_and_decoder(official_mae):
    """Loaded from MAE's names, mimkit's MAE gives transformers' loss on the same images and mask."""
    path, hf = official_mae
    method = build_method(mae_config())
    report = load_initial_weights(method, str(path))
    assert report["kind"] == "mae-official" and not report["missing"] and not report["unexpected"]
    assert any(k.startswith("decoder.blocks.0.") for k in report["loaded"])
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    with torch.no_grad():
        ours = method.eval()({"image": imgs}, noise=noise)[0]
        theirs = hf(pixel_values=imgs, noise=noise).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert any("tensors from mae-official" in line for line in describe_init(report))


def test_official_mae_into_a_method_without_its_decoder(official_mae):
    """SimMIM takes the encoder (without its default LayerScale, which MAE's blocks lack: strict names it); the
    decoder keys are reported as skipped, not an error."""
    path, hf = official_mae
    with pytest.raises(ConfigError, match=r"missing key 'blocks\.0\.ls1\.gamma'"):
        load_initial_weights(build_method(mae_config("simmim")), str(path))
    cfg = mae_config("simmim")
    cfg.model.layer_scale = 0.0
    method = build_method(cfg)
    report = load_initial_weights(method, str(path))
    assert not report["missing"] and report["skipped"] and all(k.startswith("decoder.") for k in report["skipped"])
    assert torch.equal(method.encoder.state_dict()["blocks.1.mlp.fc2.weight"],
                       hf.state_dict()[[k for k in hf.state_dict() if k.endswith("1.mlp.fc2.weight")][0]])  # fmt: skip


def test_official_decoder_of_another_size_is_refused_with_its_size(official_mae):
    path, _ = official_mae
    cfg = mae_config()
    cfg.mae.decoder_dim = 64
    with pytest.raises(
        ConfigError,
        match=r"mae_visualize_tiny\.pth.*decoder: key 'mask_token'.*mae\.decoder_depth=1 mae\.decoder_dim=32",
    ):
        load_initial_weights(build_method(cfg), str(path))


# ------------------------------------------------------------------------------------------ timm files, strictness
def encoder_state(seed: int = 3) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_method(mae_config()).encoder.state_dict().items()}


def test_timm_checkpoint_file_forms(tmp_path):
    """.safetensors, and .pth under 'state_dict' with DDP prefixes and a classifier head (dropped, reported)."""
    from safetensors.torch import save_file

    state = encoder_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.head.weight"], wrapped["module.head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        method = build_method(mae_config())
        report = load_initial_weights(method, str(tmp_path / name))
        assert report["kind"] == "timm-checkpoint" and not report["missing"]
        assert all(torch.equal(method.encoder.state_dict()[k], v) for k, v in state.items())
    assert [s.split()[0] for s in report["skipped"]] == ["encoder.head.weight", "encoder.head.bias"]


def test_strict_errors_name_the_file_and_the_key(tmp_path):
    state = encoder_state()
    extra = {**state, "blocks.0.attn.gate": torch.ones(3)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"extra\.pt.*unexpected key 'blocks\.0\.attn\.gate'"):
        load_initial_weights(build_method(mae_config()), str(tmp_path / "extra.pt"))
    lacking = {k: v for k, v in state.items() if k != "norm.weight"}
    torch.save(lacking, tmp_path / "lacking.pt")
    with pytest.raises(ConfigError, match=r"lacking\.pt.*missing key 'norm\.weight'"):
        load_initial_weights(build_method(mae_config()), str(tmp_path / "lacking.pt"))
    bad = {**state, "blocks.1.norm1.weight": torch.full((32,), float("nan"))}
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ConfigError, match=r"nan\.pt.*'blocks\.1\.norm1\.weight' holds NaN"):
        load_initial_weights(build_method(mae_config()), str(tmp_path / "nan.pt"))

    method = build_method(mae_config())  # not strict: what fits loads, the rest is reported
    report = load_initial_weights(method, str(tmp_path / "lacking.pt"), strict=False)
    assert report["missing"] == ["encoder.norm.weight"] and torch.equal(
        method.encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"]
    )
    assert any("missing (1): encoder.norm.weight" in line for line in describe_init(report))


def test_refusals_download_pickles_and_missing_paths(tmp_path):
    method = build_method(mae_config())
    with pytest.raises(ConfigError, match="hf-hub:timm/vit_tiny.*does not allow"):
        load_initial_weights(method, "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    torch.save({"model": encoder_state(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "train.pth")
    with pytest.raises(ConfigError, match=r"train\.pth.*weights_only=True"):
        load_initial_weights(method, str(tmp_path / "train.pth"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_initial_weights(method, str(tmp_path / "nowhere"))


def test_run_folder_points_to_its_export_and_checkpoint(run_a):
    with pytest.raises(ConfigError, match=r"run folder.*encoder.*last\.pt"):
        load_initial_weights(build_method(config()), str(run_a))


def test_position_table_of_another_grid_is_resampled_as_timm_does(run_a):
    """Run A's export (16 px, 4x4 grid) into a 32 px encoder (8x8): the table timm's own loader makes."""
    import timm

    cfg = config("data.image_size=32")
    method = build_method(cfg)
    report = load_initial_weights(method, str(run_a / "encoder"))
    assert report["resampled"] == ["encoder.pos_embed (4x4 -> 8x8)"]
    weights = run_a / "encoder" / "model.safetensors"
    sizes = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    overlay = {"file": str(weights)}
    peer = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **sizes
    )
    torch.testing.assert_close(method.encoder.pos_embed, peer.pos_embed)
    assert torch.equal(method.encoder.blocks[1].mlp.fc1.weight, peer.blocks[1].mlp.fc1.weight)

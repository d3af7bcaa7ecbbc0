"""Fine-tuning: encoders load exactly into timm classifiers, timm's recipe parts are wired, runs resume."""

import json

import pytest
import timm
import torch
import yaml
from helpers import TINY

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.engine.tasks.encoders import build_model, encoder_spec
from mimkit.engine.tasks.finetune import build_classifier, build_finetune_optimizer, mixup_and_criterion
from mimkit.export import export_encoder
from mimkit.models.vit import create_encoder
from mimkit.run_config import build_config

FT_TINY = ["data.num_workers=0", "train.batch_size=8", "train.log_every=1", "finetune.randaug=rand-m9-n1"]


@pytest.fixture
def exported(tmp_path):
    cfg = build_config(dotted=TINY)
    torch.manual_seed(0)
    enc = create_encoder(cfg.model, cfg.data.image_size)
    folder = export_encoder(enc, tmp_path / "enc", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                            mimkit_meta={"method": "mae"})  # fmt: skip
    return enc, folder, cfg


def test_exported_encoder_loads_into_a_classifier_exactly(exported):
    enc, folder, cfg = exported
    spec = encoder_spec(str(folder), cfg)
    assert spec.method == "mae" and spec.image_size == 16 and spec.mean == (0.5, 0.5, 0.5)
    model = build_model(spec, num_classes=5, global_pool="avg")
    got = model.state_dict()
    for k, v in enc.state_dict().items():
        if not k.startswith("norm."):  # avg pooling replaces the final norm by fc_norm (MAE's fine-tuning)
            assert torch.equal(got[k], v), k
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert model(x).shape == (2, 5)
    # the class-token head keeps the final norm, so its features are the encoder's own
    token = build_model(spec, num_classes=0, global_pool="token").eval()
    enc.eval()
    assert torch.allclose(token(x), enc.forward_features(x)[:, 0], atol=1e-6)


def test_other_image_size_resamples_position_embeddings(exported):
    _, folder, cfg = exported
    model = build_model(encoder_spec(str(folder), cfg), image_size=32, num_classes=3)
    assert model.pos_embed.shape[1] == 1 + 8 * 8 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_mismatched_checkpoint_is_refused_naming_the_file(exported, tmp_path):
    enc, folder, cfg = exported
    with pytest.raises(ConfigError, match=f"'{folder}' holds a vit_tiny_patch16_224.*resnet18"):
        encoder_spec(str(folder), cfg, model_flag="resnet18")
    cfg_json = json.loads((folder / "config.json").read_text())
    cfg_json["model_args"]["depth"] = 3  # weights of 2 blocks, architecture of 3
    (folder / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ConfigError, match=f"encoder checkpoint '{folder}' does not fit.*missing.*blocks.2"):
        build_model(encoder_spec(str(folder), cfg), num_classes=2)
    with pytest.raises(ConfigError, match="does not exist"):
        encoder_spec(str(tmp_path / "nothing"), cfg)


def test_scratch_spec_is_the_pretraining_architecture():
    cfg = build_config(dotted=TINY)
    spec = encoder_spec("none", cfg)
    assert spec.state is None and spec.model_args["depth"] == 2 and spec.model_args["embed_dim"] == 32
    model = build_model(spec, num_classes=4)
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.")) == sum(
        p.numel() for n, p in create_encoder(cfg.model, 16).named_parameters() if n.startswith("blocks.")
    )


def test_layer_decay_groups_scale_lr_by_depth():
    cfg = build_config(["finetune"], dotted=[*TINY, "finetune.layer_decay=0.5"])
    model = build_classifier(encoder_spec("none", cfg), cfg, num_classes=3)
    opt = build_finetune_optimizer(model, cfg, 1e-3, torch.device("cpu"))
    scale = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[p.data_ptr()] = g["lr_scale"]
    named = dict(model.named_parameters())
    # 2 blocks -> 4 layer ids: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, head 1
    assert scale[named["patch_embed.proj.weight"].data_ptr()] == pytest.approx(0.125)
    assert scale[named["blocks.0.attn.qkv.weight"].data_ptr()] == pytest.approx(0.25)
    assert scale[named["blocks.1.mlp.fc1.weight"].data_ptr()] == pytest.approx(0.5)
    assert scale[named["head.weight"].data_ptr()] == pytest.approx(1.0)
    no_decay = {p.data_ptr() for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert named["pos_embed"].data_ptr() in no_decay and named["blocks.0.norm1.weight"].data_ptr() in no_decay


def test_mixup_uses_soft_targets_and_smoothing():
    cfg = build_config(["finetune"])
    mixup, criterion = mixup_and_criterion(cfg, num_classes=4)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, soft = mixup(x, y)
    assert soft.shape == (4, 4) and torch.allclose(soft.sum(1), torch.ones(4))
    assert isinstance(criterion, timm.loss.SoftTargetCrossEntropy)
    cfg = build_config(["finetune"], dotted=["finetune.mixup=0", "finetune.cutmix=0"])
    mixup, criterion = mixup_and_criterion(cfg, num_classes=4)
    assert mixup is None and isinstance(criterion, timm.loss.LabelSmoothingCrossEntropy)


def test_cli_finetune_pretrained_and_scratch_then_resume(tmp_path, capsys, labeled_folder, exported):
    _, folder, _ = exported
    out = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(folder), "--data", str(labeled_folder), "--out", str(out), "--epochs", "2"]
    assert main([*argv, *FT_TINY]) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert set(res) >= {"top1", "top1_best", "best_epoch", "history", "recipe"} and res["pretrain_method"] == "mae"
    assert [h["epoch"] for h in res["history"]] == [1, 2] and res["top1"] == res["history"][-1]["top1"]
    assert res["image_size"] == 16 and res["num_classes"] == 2 and res["train_images"] == 48
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert main([*argv, *FT_TINY]) == 0  # finished: nothing retrained, the same report
    assert json.loads((out / "finetune.json").read_text())["history"] == res["history"]
    assert (out / "metrics.jsonl").read_text().splitlines() == lines
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["run"]["epoch"] == 2 and state["kind"] == "finetune"
    recorded = yaml.safe_load((out / "config.yaml").read_text())  # what this run used: no pre-training method
    assert "finetune" in recorded and not {"mae", "beit", "conmim", "dino"} & set(recorded) == set(state["config"])

    scratch = tmp_path / "scratch"
    argv = ["finetune", "--checkpoint", "none", "--data", str(labeled_folder), "--out", str(scratch), "--epochs", "1"]
    assert main([*argv, *FT_TINY, *TINY[:5], "train.ema=true"]) == 0
    res = json.loads((scratch / "finetune.json").read_text())
    assert res["pretrain_method"] == "none (random init)" and "top1_ema" in res
    capsys.readouterr()


def test_cli_finetune_bad_input(tmp_path, capsys, labeled_folder, exported):
    _, folder, _ = exported
    base = ["finetune", "--data", str(labeled_folder), "--out", str(tmp_path / "o"), "--checkpoint", str(folder)]
    assert main([*base, "--model", "resnet50", *FT_TINY]) == 2
    assert f"'{folder}' holds a vit_tiny_patch16_224" in capsys.readouterr().err
    assert main([*base, *FT_TINY, "finetune.global_pool=max"]) == 2
    assert "finetune.global_pool must be 'avg' or 'token', got 'max'" in capsys.readouterr().err
    assert main([*base, *FT_TINY, "train.batch_size=7"]) == 2
    assert "even train.batch_size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- a shared relative position table goes downstream as BEiT's and ConMIM's fine-tuning take it ----
BEIT_ARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 0.1,
             "use_abs_pos_emb": False, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False, "num_classes": 0,
             "global_pool": "token"}  # fmt: skip


@pytest.fixture
def shared_beit(tmp_path):
    """A timm Beit with one shared relative position table (BEiT/ConMIM pre-training), table not zero, exported."""
    torch.manual_seed(0)
    enc = timm.create_model("beit_base_patch16_224", pretrained=False, **BEIT_ARGS).eval()
    with torch.no_grad():
        enc.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)
    folder = export_encoder(enc, tmp_path / "beit", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return enc, encoder_spec(str(folder), build_config(dotted=TINY))


def test_shared_relative_position_table_becomes_one_per_block_with_the_same_function(shared_beit):
    enc, spec = shared_beit
    model = build_model(spec, num_classes=0, global_pool="token").eval()
    assert model.rel_pos_bias is None and all(b.attn.relative_position_bias_table is not None for b in model.blocks)
    for block in model.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, enc.rel_pos_bias.relative_position_bias_table)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), enc.forward_features(x), rtol=1e-5, atol=1e-5)
    kept = build_model(spec, rel_pos="shared", num_classes=0, global_pool="token")
    assert kept.rel_pos_bias is not None and kept.blocks[0].attn.relative_position_bias_table is None


def test_per_block_tables_are_resized_for_another_image_size_as_timms_loader_does(shared_beit):
    from timm.models.beit import checkpoint_filter_fn

    from mimkit.models.rel_pos import shared_to_per_layer

    enc, spec = shared_beit
    model = build_model(spec, image_size=32, num_classes=3)  # 4x4 patches -> 8x8: 7x7 + 3 -> 15x15 + 3 offsets
    table = model.blocks[1].attn.relative_position_bias_table
    assert table.shape == (15 * 15 + 3, 2) and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    # timm's own loader, given the per-block tables, resizes them to the same values
    per_block = timm.create_model("beit_base_patch16_224", pretrained=False,
                                  **{**BEIT_ARGS, "img_size": 32, "use_shared_rel_pos_bias": False,
                                     "use_rel_pos_bias": True})  # fmt: skip
    timm_state = checkpoint_filter_fn(shared_to_per_layer(enc.state_dict()), per_block)
    torch.testing.assert_close(table, timm_state["blocks.1.attn.relative_position_bias_table"])
    # the class-token entries are kept as they were
    torch.testing.assert_close(table[-3:], enc.rel_pos_bias.relative_position_bias_table[-3:])


def test_head_init_is_beits_scaled_trunc_normal():
    from mimkit.engine.tasks.encoders import init_head

    torch.manual_seed(0)
    head = torch.nn.Linear(768, 1000)
    init_head(head)  # trunc-normal 0.02 (uncut) x 1e-3 = N(0, 2e-5): MAE's head distribution too
    assert head.weight.std().item() == pytest.approx(0.02 * 1e-3, rel=0.01) and not head.bias.any()
    init_head(head, init_scale=1.0)
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.01)

"""The first hour, round 3 (issues 23 and 25): options in any order, recipes and method options that can be
found, small images and small machines, a run folder that is not silently reused, and messages that name the
real fix."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from helpers import TINY, make_tokenizer, write_images

from mimkit.cli import main, parse_args
from mimkit.config import ConfigError
from mimkit.config_yaml import recipe_names
from mimkit.engine.trainer.fit import fit_workers, fitted_batch
from mimkit.engine.trainer.resume_check import changed_keys
from mimkit.methods import METHODS
from mimkit.run_config import build_config, pretrain_config


def test_options_and_overrides_in_any_order():
    args = parse_args(["pretrain", "--data", "demo", "train.log_every=5", "--epochs", "1", "optim.blr=1e-4"])
    assert args.epochs == 1 and args.overrides == ["train.log_every=5", "optim.blr=1e-4"]
    cfg = pretrain_config(args)
    assert cfg.train.log_every == 5 and cfg.optim.blr == 1e-4 and cfg.train.epochs == 1
    with pytest.raises(SystemExit) as e:  # still refused: an unknown option, or a stray word that is no override
        parse_args(["pretrain", "--data", "demo", "--epochs", "1", "--bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["export", "--checkpoint", "a.pt", "--out", "b", "x=1"])  # export takes no overrides


def test_recipes_are_listed_and_a_misspelt_one_gets_the_list(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = recipe_names()
    assert {"cifar10-mae", "demo", "imagenet-cim-resnet50"} <= set(names)
    for name in names:  # one line each: name, the command it is for, what it is
        (line,) = [x for x in lines if x.split()[0] == name]
        assert len(line.split()) > 3
    assert any(x.startswith("cifar10-mae ") and "pretrain --method mae" in x and "ViT-Tiny/4" in x for x in lines)
    assert any(
        x.startswith("cifar10-cmae-huang ") and x.endswith("et al. on CIFAR-10 (32 px) with a ViT-Tiny/4, for one GPU")
        for x in lines
    )  # not cut at "al."
    with pytest.raises(ConfigError, match=r"'cifar10-mea' is neither a config file nor a packaged recipe; did you "
                                          r"mean 'cifar10-mae'\? \(packaged recipes: ade20k-upernet"):  # fmt: skip
        build_config(["cifar10-mea"])
    with pytest.raises(ConfigError, match="config file 'no/such.yaml' does not exist$"):
        build_config(["no/such.yaml"])


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_lists_each_option_with_type_and_default(name, capsys):
    assert main(["methods", name]) == 0
    text = capsys.readouterr().out
    cls = METHODS[name]
    section = cls.section_name()
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        (line,) = [x for x in text.splitlines() if x.split() and x.split()[0] == f"{section}.{f.name}"]
        assert f"= {default!r}" in line, line
    if name == "cim-respix":
        assert "'random' | 'block'" in text and "int >= 1 | None" in text  # choices and types


def test_small_images_get_an_8x8_grid_unless_a_model_is_named(capsys, tmp_path):
    cfg = pretrain_config(parse_args(["pretrain", "--data", str(tmp_path), "--image-size", "32"]))
    assert cfg.model.patch_size == 4
    first = capsys.readouterr().out.splitlines()[0]
    assert "model.patch_size=4: 8x8 tokens at 32 px" in first and "would give 2x2" in first
    named = pretrain_config(parse_args(["pretrain", "--data", str(tmp_path), "--image-size", "32",
                                        "--model", "vit_tiny_patch16_224"]))  # fmt: skip
    assert named.model.patch_size is None  # the user's choice stands
    big = pretrain_config(parse_args(["pretrain", "--data", str(tmp_path), "--image-size", "224"]))
    assert big.model.patch_size is None  # 14x14 already
    recipe = pretrain_config(parse_args(["pretrain", "--config", "cifar10-mae", "--data", str(tmp_path)]))
    assert recipe.model.patch_size == 4 and "tokens at" not in capsys.readouterr().out  # the recipe's own


def test_run_folder_names_carry_no_scheme_or_colon():
    assert pretrain_config(parse_args(["pretrain", "--data", "hf:imagenette-pq"])).out == "runs/mae-imagenette-pq"
    url = pretrain_config(parse_args(["pretrain", "--data", "s3://bucket/train-{000000..000255}.tar"])).out
    assert url == "runs/mae-train.tar"


def test_gpu_recipes_shrink_to_the_data_and_the_machine(monkeypatch, capsys):
    assert fitted_batch(1024, 512, 1) == 128 and fitted_batch(1024, 512, 2) == 64  # 4 steps per epoch
    assert fitted_batch(64, 512, 1) == 64 and fitted_batch(512, 512, 1) == 512  # fits: untouched
    cfg = build_config(["cifar10-mae"])
    monkeypatch.setattr("mimkit.engine.trainer.fit.machine_cores", lambda: 2)
    fit_workers(cfg)
    assert cfg.data.num_workers == 2
    said = capsys.readouterr().out.strip()
    assert said == "data.num_workers 8 is more than the 2 CPU core(s) this process has: using 2"


def test_gpu_recipe_with_max_images_runs_with_a_fitted_batch(tmp_path, labeled_folder, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--config", "cifar10-mae", "--data", str(labeled_folder), "--max-images", "32", "--out",
            str(out), "--epochs", "1", *TINY[:5], *TINY[5:8], "eval.knn_every=0", "eval.final_knn=false",
            "data.device_cache=false"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "train.batch_size 1024 x 1 process(es) is more than the 32 training images: using 8" in text
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"] == 8  # what the run used


def _tiny_run(data, out, *extra) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY, "eval.final_knn=false",
            *extra]  # fmt: skip


def test_a_resume_with_other_settings_names_them_and_refuses(tmp_path, labeled_folder, capsys):
    out = tmp_path / "run"
    assert main(_tiny_run(labeled_folder, out)) == 0
    assert main(_tiny_run(labeled_folder, out, "mae.mask_ratio=0.6", "optim.blr=1e-3")) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'checkpoints' / 'last.pt'}' holds a finished run with other settings" in err
    assert "mae.mask_ratio: 0.75 -> 0.6" in err and "optim.blr: 0.00015 -> 0.001" in err
    assert "--allow-config-change" in err
    assert main(_tiny_run(labeled_folder, out, "--epochs", "2", "train.log_every=2")) == 0  # budget, logging: free
    assert "nothing to train" not in capsys.readouterr().out
    assert main(_tiny_run(labeled_folder, out, "--epochs", "3", "mae.mask_ratio=0.6", "--allow-config-change")) == 0
    assert "with changed settings (train.allow_config_change): mae.mask_ratio: 0.75 -> 0.6" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["mae"]["mask_ratio"] == 0.6


def test_patch_size_is_compared_as_the_encoder_has_it():
    named = {"model": {"name": "vit_tiny_patch16_224", "patch_size": None}}
    assert changed_keys(named, {"model": {"name": "vit_tiny_patch16_224", "patch_size": 16}}) == []
    assert changed_keys(named, {"model": {"name": "vit_tiny_patch16_224", "patch_size": 4}}) == [
        ("model.patch_size", 16, 4)  # not None: the checkpoint's encoder cut 16 px patches
    ]


def test_cnn_cim_takes_its_generator_patch_from_the_tokenizer(tmp_path, capsys):
    from mimkit.engine.tasks.pretrain import generator_patch_from_tokenizer

    tok = make_tokenizer(tmp_path / "tok", image_size=16, downsample=4)  # 4x4 tokens over 16 px
    cfg = build_config(dotted=["method=cim-respix", "model.name=resnet18", "data.image_size=16",
                               f"tokenizer.path={tok}"])  # fmt: skip
    generator_patch_from_tokenizer(cfg)
    assert cfg.cim.generator_patch == 4
    assert "cim.generator_patch=4: the tokenizer's 4x4 tokens over 16 px images" in capsys.readouterr().out
    cfg = build_config(dotted=["method=cim-respix", "model.name=resnet18", "data.image_size=16",
                               f"tokenizer.path={tok}", "cim.generator_patch=2"])  # fmt: skip
    generator_patch_from_tokenizer(cfg)
    assert cfg.cim.generator_patch == 2  # the user's value stands


def test_a_run_stopped_for_bad_files_lists_them(tmp_path):
    data = tmp_path / "imgs"
    paths = write_images(data, 32)
    for p in paths[:6]:
        p.write_bytes(b"not a png")
    out = tmp_path / "run"
    assert main(_tiny_run(data, out, "data.bad_file_limit=0.01")) == 2
    listed = (out / "bad_files.txt").read_text()
    assert listed.count("epoch 1\t") > 1 and "img_000" in listed

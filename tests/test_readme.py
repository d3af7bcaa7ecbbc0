"""The README as a tested contract: every command of its ```bash blocks runs, in README order, at toy size.

A command is run as written after the substitutions of TOY (data paths, budgets, the 8-GPU launcher) and with
the toy sizes of `toy_args` appended (`key=value` overrides win over flags and recipes): tiny images, a one-block
ViT, one epoch. Commands that create what later ones read (runs/mae-demo, runs/mine, runs/tok-cifar10, ...) run
first, as a reader would run them. A new README command that is neither runnable nor listed in NOT_RUN fails.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import write_images
from test_segment import write_pairs

from mimkit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# README text -> what the test runs instead (plain substring replacements, in this order)
TOY = {
    "torchrun --nproc_per_node 8 -m mimkit.cli": "mimkit",  # one process here; torchrun itself: tests/test_ddp.py
    "'s3://bucket/train-{000000..000255}.tar'": "'imagenette-tar/train-{000000..000000}.tar'",  # the shard pattern
    "../shared/data/cifar10": "toy/cifar10",
    "/data/cifar10": "toy/cifar10",
    "../shared/data/imagenette160": "toy/imagenette",
    "/data/imagenette2-160": "toy/imagenette",
    "/path/to/images": "toy/imagenette/train",
    "/path/to/labeled": "toy/cifar10",
    "/data/camvid": "toy/camvid",
    "--budget 1h": "--budget 1ep",
    "--model resnet50": "--model resnet18",  # the same CNN path (timm ResNet, dilated to stride 8), a quarter the work
    " ...": "",  # the README's "and your other options"
}
NOT_RUN = {
    'pip install -e ".[dev]"': "installs the package: CI does it before the tests",
    "python -m pytest -q": "runs the tests, this one included",
}
TINY_VIT = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2"]
TINY_PARTS = [
    "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
    "cim.generator_dim=32", "cim.generator_heads=2", "cim.generator_depth=1", "cim.eval_images=16",
    "conmim.proj_hidden=64", "conmim.proj_dim=32", "conmim.mask_bank=0",
    "cmae.proj_hidden=64", "cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2",
    "mocov3.proj_hidden=64", "mocov3.proj_dim=32", "mocov3.pred_hidden=64",
    "tokenizer.vocab_size=32", "tokenizer.width=8", "tokenizer.code_dim=4", "tokenizer.res_blocks=1",
    "tokenizer.eval_images=16",
]  # fmt: skip
TINY_RUN = ["train.epochs=1", "data.max_images=32", "train.batch_size=8", "data.num_workers=0",
            "data.device_cache=false", "eval.max_eval_images=16", "eval.linear_epochs=2", "log.tensorboard=false",
            "segment.base_size=32", "data.device_crops=exact"]  # fmt: skip


def readme_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks: continuation lines joined, trailing `# comments` dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def toy_command(command: str) -> str:
    for readme, toy in TOY.items():
        command = command.replace(readme, toy)
    return command


def toy_args(argv: list[str]) -> list[str]:
    """The toy sizes each sub-command takes."""
    command = argv[0]
    if command == "eval":
        return ["--max-images", "32", "--max-eval-images", "16", "--linear-epochs", "2", "--num-workers", "0"]
    if command == "visualize":
        return ["--num", "2"]
    if command in ("export", "data"):
        return []
    cnn = "--model" in argv and not argv[argv.index("--model") + 1].startswith("vit")
    from_checkpoint = command in ("finetune", "segment") and argv[argv.index("--checkpoint") + 1] != "none"
    model = [] if cnn or from_checkpoint else TINY_VIT
    extra = ["--finetune-epochs", "1"] if command == "compare" else []
    return [*extra, *TINY_RUN, *model, *TINY_PARTS]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The toy data the README's paths map to, in a folder the commands run in (their runs/ land there)."""
    root = tmp_path_factory.mktemp("readme")
    for split, n in (("train", 16), ("test", 8)):
        for c in ("a", "b"):
            write_images(root / "toy/cifar10" / split / c, n, size=32, seed=len(c) + n)
    for split, n in (("train", 16), ("val", 8)):
        for c in ("a", "b"):
            write_images(root / "toy/imagenette" / split / c, n, size=48, seed=len(c) + n, fmt="jpg")
    write_pairs(root / "toy/camvid/train", 8, size=32, seed=0, ignore=11)
    write_pairs(root / "toy/camvid/val", 4, size=32, seed=1, ignore=11)
    images = sorted((root / "toy/imagenette/train").rglob("*.jpg"))
    (root / "train.txt").write_text("".join(f"{p}\n" for p in images))  # `--data train.txt`: one path per line
    return root


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_the_commands_this_test_maps():
    assert len(COMMANDS) >= 25 and all(c.startswith(("mimkit", "torchrun", *NOT_RUN)) for c in COMMANDS), COMMANDS
    assert all(c in COMMANDS for c in NOT_RUN)  # a stale entry is a README change this test has not followed
    assert not [k for k in TOY if k not in README.read_text() and k != " ..."]  # nor a stale substitution


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c[:60] for c in COMMANDS])
def test_readme_command_runs(command, workspace, monkeypatch, capsys):
    if command in NOT_RUN:
        pytest.skip(NOT_RUN[command])
    monkeypatch.chdir(workspace)
    argv = shlex.split(toy_command(command))[1:]
    assert main([*argv, *toy_args(argv)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if argv[:2] == ["pretrain", "--data"] and argv[2].startswith("hf:"):
        assert "runs/mae-imagenette-pq" in out  # the default run folder of an hf: source has no colon
    if argv[0] == "compare":
        report = (workspace / argv[argv.index("--out") + 1] / "report.md").read_text()
        assert "| conmim |" in report and "center_teacher=true" in report  # not the degenerate ConMIM
        assert "outside the budget" in report

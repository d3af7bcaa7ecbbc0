"""The GPU code paths, on a GPU: `pytest -m cuda` (skipped without a CUDA device).

Every run goes through the command line (`mimkit.cli.main`) with tiny models on a tiny JPEG folder, in bf16 on
the device: one step of every registered method (ViT encoders, and ResNet-18 enhancers for CIM), eager and
compiled; the device cache with host-drawn and device-drawn crops; the compiled step against the eager one;
a checkpoint written on CUDA resumed on CUDA; the export of a CUDA run loaded by timm on the CPU.

Exact resume on a GPU needs deterministic kernels: the resume test turns on `torch.use_deterministic_algorithms`
(cuBLAS then needs CUBLAS_WORKSPACE_CONFIG, set below before CUDA starts) and the math attention kernel, whose
backward has no atomics (flash attention's has). What it checks is the run state (weights, optimizer, CUDA
generator, sampler and device-crop positions), not kernel determinism.

MIMKIT_CUDA_TESTS_ON_CPU=1 runs the same tests on the CPU: a check of the tests themselves before a GPU session
spends its minutes on them (compiled cases take minutes there: Inductor builds C++ kernels).
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (resume test); before CUDA init

import contextlib
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY, make_tokenizer, write_images
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.methods import METHODS

ON_CPU = os.environ.get("MIMKIT_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
NO_DEVICE = not ON_CPU and not torch.cuda.is_available()


def cuda_test(fn):
    """In the `cuda` subset; skipped where no CUDA device is."""
    return pytest.mark.cuda(pytest.mark.skipif(NO_DEVICE, reason="no CUDA device (pytest -m cuda on a GPU)")(fn))


GEN = ["cim.generator_dim=32", "cim.generator_depth=1", "cim.generator_heads=2", "cim.eval_images=8"]
OPTIONS = {  # shrink what TINY does not reach; methods not named here run with TINY alone
    "simmim": ["simmim.mask_patch_size=8"],
    "cmae-huang": ["cmae-huang.decoder_dim=32", "cmae-huang.decoder_depth=1", "cmae-huang.decoder_heads=2"],
    "dino": ["dino.out_dim=64", "dino.head_hidden=32", "dino.head_bottleneck=16", "dino.local_crops=2"],
    "cmae-mao": [
        "cmae.decoder_dim=32",
        "cmae.decoder_depth=1",
        "cmae.decoder_heads=2",
        "cmae.proj_hidden=64",
        "cmae.proj_dim=16",
    ],  # fmt: skip
    "conmim": ["conmim.proj_hidden=32", "conmim.proj_dim=16"],
    "cim-respix": GEN,
    "cim-revdet": GEN,
}
RESNET = ["model.name=resnet18", "cim.cnn_output_stride=8"]
CASES = [(m, "vit") for m in METHODS if m != "tokenizer"] + [  # the tokenizer: its own test
    (m, "resnet18") for m in ("cim-respix", "cim-revdet")
]
TIMING = ("img_per_s", "time")  # differ between runs by nature


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/{a,b}/ 32 JPEGs each, test/{a,b}/ 8 each, 16 px (CIFAR-10's layout and format, smaller)."""
    root = tmp_path_factory.mktemp("data")
    for split, n in (("train", 32), ("test", 8)):
        for c, cls in enumerate(("a", "b")):
            write_images(root / split / cls, n, seed=c * 10 + (split == "test"), fmt="jpg")
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def method_args(method: str, encoder: str, tokenizer: Path) -> list[str]:
    extra = [f"method={method}", f"tokenizer.path={tokenizer}", *OPTIONS.get(method, [])]
    return extra + (RESNET if encoder == "resnet18" else [])


def pretrain(out: Path, data: Path, *extra: str, epochs: int = 1, images: int = 32, expect: int = 0) -> list[dict]:
    """`mimkit pretrain` of a tiny model on the device (bf16 unless `extra` says otherwise); -> metrics rows."""
    flags = ["--data", str(data), "--out", str(out), "--epochs", str(epochs), "--max-images", str(images)]
    device = [f"train.device={DEVICE}", "train.precision=bf16", "eval.final_knn=false"]
    assert main(["pretrain", *flags, *TINY, "model.depth=1", *device, *extra]) == expect
    return metrics(out)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows if "loss" in r]


def assert_finite_losses(rows: list[dict], steps: int) -> None:
    values = losses(rows)
    assert len(values) == steps, f"expected {steps} logged steps, got {len(values)}"
    assert all(math.isfinite(v) for v in values), values


def assert_loads_into_timm_on_cpu(encoder_dir: Path, image_size: int = 16) -> None:
    model = timm.create_model(f"local-dir:{encoder_dir}", pretrained=True).eval()  # strict load
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.randn(2, 3, image_size, image_size))
    assert torch.isfinite(out).all()


@contextlib.contextmanager
def compiled_like_eager():
    """Inductor calls torch's RNG instead of its own, so a compiled step draws eager's masks (tests/test_compile)."""
    import torch._inductor.config as inductor_config

    try:
        with inductor_config.patch(fallback_random=True):
            yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def deterministic_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@cuda_test
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("method", "encoder"), CASES, ids=[f"{m}-{e}" for m, e in CASES])
def test_one_step_of_every_method_in_bf16(tmp_path, data, tokenizer, method, encoder, compiled, capsys):
    out = tmp_path / "run"
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = pretrain(out, data, *method_args(method, encoder, tokenizer), f"train.compile={str(compiled).lower()}")
    if DEVICE == "cuda":  # the run used the GPU (a silent fall-back to the CPU would pass everything else)
        assert torch.cuda.max_memory_allocated() > 0
    assert_finite_losses(rows, steps=2)
    assert_loads_into_timm_on_cpu(out / "encoder")
    if not compiled:  # the CUDA checkpoint, exported again on the CPU, gives the CUDA run's export exactly
        again = tmp_path / "again"
        assert main(["export", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out", str(again)]) == 0
        a, b = load_file(out / "encoder" / "model.safetensors"), load_file(again / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()


DEVICE_DATA = {  # (method, crops, extra): the packaged CIFAR-10 recipes' data paths, on the device
    "mae-exact": ("mae", "exact", []),
    "mae-fast": ("mae", "fast", []),
    "mae-fast-compiled": ("mae", "fast", ["train.compile=true"]),  # the ladder's path
    "conmim-fast-maskbank": ("conmim", "fast", ["conmim.mask_bank=8"]),
    "cmae-fast-ccrop": (
        "cmae",
        "fast",
        ["data.crop_mode=ccrop", "data.ccrop_warmup_epochs=1", "data.ccrop_interval=1"],
    ),  # fmt: skip
}


@cuda_test
@pytest.mark.parametrize("case", list(DEVICE_DATA))
def test_device_cache_gives_finite_losses(tmp_path, data, tokenizer, case, capsys):
    method, crops, extra = DEVICE_DATA[case]
    cache = ["data.device_cache=true", f"data.device_crops={crops}"]
    epochs = 2  # ContrastiveCrop: boxes estimated on the device after epoch 1, used in epoch 2
    rows = pretrain(tmp_path / "run", data, *method_args(method, "vit", tokenizer), *cache, *extra, epochs=epochs)
    assert_finite_losses(rows, steps=2 * epochs)
    if "data.crop_mode=ccrop" in extra:
        assert any("ccrop_box_area" in r for r in rows)
    capsys.readouterr()


@cuda_test
@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 1e-4), ("bf16", 2e-2)])
def test_compiled_mae_matches_eager(tmp_path, data, precision, rtol, capsys):
    """Same seed, same masks (fallback_random): the first step's loss agrees at kernel precision; the second,
    after one AdamW step whose first update is sign-like, a little less tightly."""
    args = ("method=mae", f"train.precision={precision}")
    eager = losses(pretrain(tmp_path / "eager", data, *args))
    with compiled_like_eager():
        compiled = losses(pretrain(tmp_path / "compiled", data, *args, "train.compile=true"))
    assert len(eager) == len(compiled) == 2
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=10 * rtol, atol=0)
    capsys.readouterr()


@cuda_test
def test_cuda_checkpoint_resumes_exactly(tmp_path, data, monkeypatch, capsys):
    """Interrupted right after its first mid-epoch checkpoint, re-run with the same command: the metrics and the
    exported weights equal an uninterrupted run's. Device cache with device-drawn crops, masks drawn on the device."""
    args = ("method=mae", "data.device_cache=true", "data.device_crops=fast", "train.checkpoint_every=3")
    kw = {"epochs": 2, "images": 64}  # 4 steps per epoch: the checkpoint at step 3 is mid-epoch
    real_replace, fired = os.replace, []

    def replace_then_interrupt(src, dst, *a, **k):  # the checkpoint is in place before the interrupt
        real_replace(src, dst, *a, **k)
        if Path(dst).name == "last.pt" and not fired:
            fired.append(dst)
            raise KeyboardInterrupt

    with deterministic_kernels():
        full = pretrain(tmp_path / "full", data, *args, **kw)
        monkeypatch.setattr(os, "replace", replace_then_interrupt)
        cut_rows = pretrain(tmp_path / "cut", data, *args, **kw, expect=130)
        monkeypatch.setattr(os, "replace", real_replace)
        assert fired and 0 < len(losses(cut_rows)) < len(losses(full)), "the interrupt must land mid-run"
        resumed = pretrain(tmp_path / "cut", data, *args, **kw)
    assert "resum" in capsys.readouterr().out.lower()  # a re-run from scratch would give the same numbers
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in full]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in resumed] == strip
    a = load_file(tmp_path / "full" / "encoder" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "encoder" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@cuda_test
def test_tokenizer_trains_on_the_device(tmp_path, data, capsys):
    """The VQ tokenizer `mimkit compare` trains for BEiT/CIM (float32 inside, bf16 autocast around it)."""
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--max-images", "32",
            "data.image_size=16", "data.num_workers=0", "train.batch_size=16", "train.log_every=1",
            f"train.device={DEVICE}", "train.precision=bf16", "tokenizer.vocab_size=32", "tokenizer.width=8",
            "tokenizer.code_dim=4", "tokenizer.res_blocks=1", "tokenizer.eval_images=8"]  # fmt: skip
    assert main(argv) == 0
    assert_finite_losses(metrics(out), steps=2)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()

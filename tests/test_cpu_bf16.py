"""CPU bf16: train.precision=auto chooses by the CPU's flags and a cached measurement; the unfused attention that
the bf16 path uses computes the same attention; a bf16 step's loss and gradients stay close to fp32's."""

import json

import pytest
import torch

from mimkit import cpu_bf16
from mimkit.methods.mae import MAE
from mimkit.models.vit import create_vit
from mimkit.run_config import default_config
from mimkit.runtime import precision_and_reason, prepare_for_precision

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "mimkit" / "cpu-bf16.json"


def test_auto_is_fp32_without_bf16_instructions_and_measures_nothing(cache, monkeypatch):
    monkeypatch.setattr(cpu_bf16, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(cpu_bf16, "matmul_rate", lambda *a, **k: pytest.fail("measured a CPU without bf16"))
    dtype, why = precision_and_reason("auto", CPU)
    assert dtype is None and why.startswith("fp32 (auto:") and "no bf16 instructions" in why
    assert not cache.exists()


@pytest.mark.parametrize(("bf16_rate", "expected"), [(6.0, torch.bfloat16), (1.2, None)])
def test_auto_follows_the_measured_ratio_and_caches_it(cache, monkeypatch, bf16_rate, expected):
    monkeypatch.setattr(cpu_bf16, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    rates = {torch.bfloat16: bf16_rate, torch.float32: 1.0}
    calls = []
    monkeypatch.setattr(cpu_bf16, "matmul_rate", lambda dtype, **k: calls.append(dtype) or rates[dtype])
    dtype, why = precision_and_reason("auto", CPU)
    assert dtype == expected and f"bf16 matmul {bf16_rate:.1f}x fp32" in why and "measured now" in why
    assert why.startswith("bf16 (auto:" if expected else "fp32 (auto:")
    (value,) = json.loads(cache.read_text()).values()
    assert value == bf16_rate
    n = len(calls)
    dtype_again, why_again = precision_and_reason("auto", CPU)  # the second run reads the cache
    assert dtype_again == expected and "cached" in why_again and len(calls) == n


def test_forced_precisions_are_not_measured(cache, monkeypatch):
    monkeypatch.setattr(cpu_bf16, "matmul_rate", lambda *a, **k: pytest.fail("measured a forced precision"))
    assert precision_and_reason("fp32", CPU) == (None, "fp32")
    assert precision_and_reason("bf16", CPU) == (torch.bfloat16, "bf16")


def test_matmul_rate_is_a_positive_rate():
    assert cpu_bf16.matmul_rate(torch.float32, n=64, reps=1) > 0


def test_unfused_attention_computes_the_same_attention():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 16, 4, depth=2, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    fused = vit(x)
    assert cpu_bf16.use_unfused_attention(vit) == 2
    assert all(not blk.attn.fused_attn for blk in vit.blocks)
    torch.testing.assert_close(vit(x), fused, rtol=1e-5, atol=1e-5)


def test_prepare_switches_attention_only_under_cpu_bf16():
    vit = create_vit("vit_tiny_patch16_224", 16, 4, depth=1, embed_dim=32, num_heads=2)
    prepare_for_precision(vit, CPU, None)
    assert vit.blocks[0].attn.fused_attn
    prepare_for_precision(vit, CPU, torch.bfloat16)
    assert not vit.blocks[0].attn.fused_attn


def test_bf16_step_stays_close_to_fp32():
    """One MAE step on fixed images and masks: the bf16 path (autocast + unfused attention) gives the fp32 loss
    within bf16's resolution and gradients pointing the same way."""
    cfg = default_config()
    cfg.data.image_size, cfg.model.patch_size = 16, 4
    cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads = 2, 64, 2
    cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads = 32, 1, 2
    torch.manual_seed(0)
    model = MAE.from_config(cfg)
    x = torch.randn(8, 3, 16, 16)

    def loss_and_grad(dtype):
        model.zero_grad()
        torch.manual_seed(1)  # the same masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model({"image": x})[0]
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss32, grad32 = loss_and_grad(None)
    prepare_for_precision(model, CPU, torch.bfloat16)
    loss16, grad16 = loss_and_grad(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and gradients stay fp32
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99

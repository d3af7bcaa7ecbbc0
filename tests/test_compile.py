"""`train.compile`: the compiled method (torch.compile of the module, as engine/trainer/loop.py does) computes
eager's loss and gradients.

Masks: Inductor lowers `torch.rand` to its own generator, so a compiled step draws other MAE masks than an eager
one from the same seed (both deterministic per seed; on a tiny MAE the losses then differ by about 1%). With
`fallback_random` the compiled graph calls torch's RNG and sees eager's masks, which is what lets us compare.

Cost: Inductor builds C++ kernels on CPU: about 15 s with a warm Inductor cache, over a minute cold on a busy
2-core machine (one compiler run per graph, forward and backward).
"""

import pytest
import torch
from helpers import TINY

from mimkit.methods import build_method
from mimkit.run_config import build_config


def compile_unavailable() -> str | None:
    """Why torch.compile (Inductor on CPU) cannot run here, or None."""
    from torch._dynamo.eval_frame import is_inductor_supported

    if not is_inductor_supported():
        return "torch.compile (Dynamo/Inductor) is not supported on this Python/platform"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 — whatever the search raises means no usable compiler
        return f"Inductor found no C++ compiler for CPU kernels ({e})"
    return None


def loss_and_grads(method, step, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One training step's loss and parameter gradients, the masks drawn from a fixed seed."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss, _ = step({"image": images})
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable() is not None, reason=compile_unavailable() or "")
def test_compiled_mae_matches_eager():
    import torch._inductor.config as inductor_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        cfg = build_config(dotted=[*TINY, "model.depth=1", "mae.decoder_depth=1", "data.image_size=16"])
        torch.manual_seed(0)
        method = build_method(cfg)
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        loss, grads = loss_and_grads(method, method, images)
        with inductor_config.patch(fallback_random=True):
            c_loss, c_grads = loss_and_grads(method, torch.compile(method), images)
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
    torch.testing.assert_close(c_loss, loss, rtol=1e-4, atol=1e-5)
    assert c_grads.keys() == grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

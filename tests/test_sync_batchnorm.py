"""BatchNorm over the global batch: a method declares it (`<method>.sync_bn`: MoCo v3, Huang's CMAE and DINO, whose
official code converts; ConMIM's reference does not), the training loop converts before wrapping in DDP, only on
NCCL (SyncBatchNorm has no CPU kernel), in place, keeping the parameters an optimizer already holds."""

import pytest
import torch
from helpers import TINY, sgd_steps
from torch import nn

from mimkit.engine.trainer import distributed as D
from mimkit.methods import build_method
from mimkit.run_config import build_config

SMALL = {
    "mocov3": ["mocov3.proj_hidden=32", "mocov3.pred_hidden=32", "mocov3.proj_dim=16"],
    "cmae-huang": ["cmae-huang.proj_hidden=32", "cmae-huang.proj_dim=16"],
    "dino": [
        "dino.out_dim=64",
        "dino.head_hidden=32",
        "dino.head_bottleneck=16",
        "dino.local_crops=2",
        "dino.head_bn=true",
    ],  # fmt: skip
    "conmim": ["conmim.proj_hidden=32", "conmim.proj_dim=16", "conmim.center_teacher=true"],
    "mae": [],
}


def build(method: str, *extra: str):
    return build_method(build_config([], None, [*TINY, f"method={method}", *SMALL[method], *extra]))


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize(("method", "wanted"), [("mocov3", True), ("cmae-huang", True), ("dino", True),
                                                ("conmim", False), ("mae", False)])  # fmt: skip
def test_each_method_declares_what_its_official_code_does(method, wanted):
    assert build(method).sync_batchnorm is wanted
    if wanted:
        assert build(method, f"{method}.sync_bn=false").sync_batchnorm is False


@pytest.fixture
def nccl(monkeypatch):
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")


@pytest.mark.parametrize("method", ["mocov3", "cmae-huang", "dino"])
def test_the_loop_converts_in_place_student_and_teacher(nccl, method):
    m = build(method)
    params = [id(p) for p in m.parameters()]
    keys = list(m.state_dict())
    n = len(batchnorms(m))
    assert n >= 2  # the online network's and the momentum network's
    assert D.sync_batchnorm(m, m.sync_batchnorm)
    assert len(batchnorms(m)) == n and all(isinstance(b, nn.SyncBatchNorm) for b in batchnorms(m))
    assert [id(p) for p in m.parameters()] == params  # an optimizer built before still trains them
    assert list(m.state_dict()) == keys  # checkpoints resume across world sizes
    m.after_step(1, 10)  # the teacher still follows the student by parameter name


def test_nothing_is_converted_unless_wanted_on_nccl(monkeypatch):
    m = build("mocov3")
    assert not D.sync_batchnorm(m, True)  # one process: nothing to synchronise
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "gloo")
    assert not D.sync_batchnorm(m, True)  # gloo: CPU tensors, which SyncBatchNorm cannot normalise
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    assert not D.sync_batchnorm(m, False)
    assert not any(isinstance(b, nn.SyncBatchNorm) for b in batchnorms(m))
    assert not D.sync_batchnorm(build("mae"), True)  # no BatchNorm at all


def test_pretrain_task_passes_the_methods_choice_to_the_loop(labeled_folder):
    from mimkit.engine.tasks.pretrain import PretrainTask
    from mimkit.engine.trainer import Runtime

    for method, wanted in (("mocov3", True), ("mae", False)):
        cfg = build_config(dotted=[*TINY, *SMALL[method], f"data.path={labeled_folder}", f"method={method}"])
        assert PretrainTask(cfg, Runtime(torch.device("cpu"), None)).sync_batchnorm is wanted


@pytest.mark.parametrize("method", ["mocov3", "dino"])
def test_converted_training_steps_give_the_same_losses(nccl, method):
    """One process (no process group: SyncBatchNorm normalises like BatchNorm): two steps with their optimizer and
    teacher update, converted after the optimizer was built, give the unconverted run's losses."""
    cfg = build_config([], None, [*TINY, f"method={method}", *SMALL[method]])
    runs = []
    for convert in (False, True):
        torch.manual_seed(0)
        m = build_method(cfg)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        assert D.sync_batchnorm(m, m.sync_batchnorm and convert) is convert
        runs.append(sgd_steps(m, cfg.data, 2, opt=opt, reseed=10))
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)

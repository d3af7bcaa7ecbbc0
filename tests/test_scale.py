"""What large runs need: gradient checkpointing gives the plain forward's gradients, W&B continues one run across
resumes, SLURM's node list names the master."""

import sys
import types

import pytest
import torch
from helpers import TINY

from mimkit.engine.trainer.distributed import first_host, launcher_env
from mimkit.methods import build_method
from mimkit.run_config import build_config
from mimkit.runtime import enable_grad_checkpointing


@pytest.mark.parametrize("method, name", [("mae", "vit_tiny_patch16_224"), ("simmim", "beit_base_patch16_224")])
def test_grad_checkpointing_gives_equal_gradients(method, name, monkeypatch):
    import mimkit.models.vit as V

    used = []
    for fn in ("checkpoint", "checkpoint_seq"):  # the checkpointed path must really run
        real = getattr(V, fn)
        monkeypatch.setattr(V, fn, lambda *a, _real=real, **k: used.append(1) or _real(*a, **k))
    cfg = build_config(dotted=[*TINY, f"method={method}", f"model.name={name}", "model.depth=3"])
    torch.manual_seed(0)
    plain = build_method(cfg)
    checkpointed = build_method(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    assert enable_grad_checkpointing(checkpointed) >= 1
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for m in (plain, checkpointed):
        torch.manual_seed(1)  # the same masks
        loss, _ = m({"image": x})
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert used and grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_wandb_run_id_survives_resume(tmp_path, monkeypatch):
    """A fake `wandb` module records calls: both runs use the checkpoint's run id with resume='allow', offline."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    from mimkit.cli import main

    argv = ["pretrain", "--data", "demo", "--max-images", "32", "--out", str(tmp_path / "r"), *TINY,
            "log.wandb=true", "eval.final_knn=false"]  # fmt: skip
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "2"]) == 0  # resumes the finished run for one more epoch
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["mode"] == "offline"
    assert inits[1]["resume"] == "allow" and inits[0]["config"]["log"]["wandb"] is True
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 4]


def test_slurm_node_list_and_variables(monkeypatch):
    assert first_host("gpu[012-015,020],cpu1") == "gpu012" and first_host("node7") == "node7"
    for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[04-05]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = launcher_env()
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu04", "MASTER_PORT": "29956"}
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun's variables win
    assert launcher_env() == {}

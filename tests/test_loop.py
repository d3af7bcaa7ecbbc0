"""The one training loop on a task small enough to check by hand: accumulation equals one big batch (also across
processes with DDP's no_sync, under torchrun's and SLURM's variables), the non-finite guard never writes a bad
state, the run lock refuses a second run, a corrupt last.pt falls back to prev.pt."""

import os
import socket

import pytest
import torch
from torch import nn

from mimkit.data.pipeline import EpochBatchSampler
from mimkit.engine.trainer import Runtime, Task, train
from mimkit.errors import CheckpointError, TrainingError
from mimkit.run_config import build_config


class ToyTask(Task):
    """Least squares on 128 fixed points, SGD: its trajectory depends only on the batches and the schedule."""

    kind = "toy"

    def __init__(self, cfg, rt, poison_step: int | None = None):
        super().__init__(cfg, rt)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(128, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(128, 1, generator=g)
        torch.manual_seed(0)
        self.model = nn.Linear(8, 1)
        self.batch_size = cfg.train.batch_size
        self.sampler = EpochBatchSampler(128, self.batch_size, cfg.train.seed, rt.rank, rt.world)
        self.poison_step, self.steps = poison_step, 0

    def describe(self, *args) -> str:
        return "toy"

    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    def batches(self, epoch, start):
        self.sampler.start(epoch, start)
        for keys in self.sampler:
            idx = [i for _, i in keys]
            yield self.x[idx], self.y[idx]

    def build_optimizer(self, lr):
        return torch.optim.SGD(self.model.parameters(), lr=lr)

    def step(self, model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if self.poison_step is not None and self.steps == self.poison_step:
            loss = loss * float("inf")
        self.steps += 1
        return loss, {"loss": loss.detach()}, []


def toy_config(out, *extra):
    return build_config(dotted=[f"out={out}", "train.epochs=2", "optim.lr=0.05", "optim.warmup_epochs=0",
                                "train.log_every=1", "train.device=cpu", "train.stop_signals=", *extra])  # fmt: skip


def run_toy(out, *extra, rt=None, **kwargs) -> nn.Module:
    cfg = toy_config(out, *extra)
    task = ToyTask(cfg, rt or Runtime(torch.device("cpu"), None), **kwargs)
    train(task)
    return task.model


def test_accumulation_equals_one_big_batch(tmp_path):
    big = run_toy(tmp_path / "big", "train.batch_size=64")
    small = run_toy(tmp_path / "accum", "train.batch_size=16", "optim.accum_steps=4")
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(big.weight, run_toy(tmp_path / "one", "train.batch_size=16").weight, atol=1e-3)


def _ddp_worker(rank: int, out: str, port: int, launcher: str, result: str) -> None:
    env = {"torchrun": {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"},
           "slurm": {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                     "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "7"}}[launcher]  # fmt: skip
    os.environ.update(env, MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from mimkit.engine.trainer import distributed as D
    from mimkit.engine.trainer import start_runtime

    # fp32 as the 1-process reference (a Runtime without autocast): the test is about arithmetic, not precision
    cfg = toy_config(out, "train.batch_size=16", "optim.accum_steps=2", "train.precision=fp32")
    rt = start_runtime(cfg)
    assert rt.world == 2 and rt.rank == rank
    task = ToyTask(cfg, rt)
    train(task)
    if rank == 0:
        torch.save(task.model.state_dict(), result)
    D.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_processes_with_accumulation_equal_one_big_batch(tmp_path, launcher):
    """2 processes x 2 micro-batches of 16 (DDP, no_sync on the first) == 1 process x 64; the process group comes
    from torchrun's variables or, without them, from SLURM's."""
    big = run_toy(tmp_path / "big", "train.batch_size=64")
    result = str(tmp_path / "ddp.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "ddp"), free_port(), launcher, result), nprocs=2)
    state = torch.load(result, weights_only=True)
    assert torch.allclose(state["weight"], big.weight, atol=1e-6) and torch.allclose(state["bias"], big.bias, atol=1e-6)
    assert not (tmp_path / "ddp" / ".mimkit.lock").exists()


def test_non_finite_loss_is_never_applied_or_saved(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss at step 3;.*now holds step 1"):
        run_toy(out, "train.batch_size=16", "train.checkpoint_every=1", poison_step=2)
    # the state the diverged update started from moved aside (it may be what overflows); the one before is last.pt
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["run"]["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    aside = torch.load(out / "checkpoints" / "diverged-step2.pt", weights_only=True)
    assert aside["run"]["step"] == 2 and all(torch.isfinite(v).all() for v in aside["model"].values())


def test_second_run_into_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".mimkit.lock").write_text(f'{{"pid": 1, "host": "{socket.gethostname()}"}}')  # pid 1 is alive
    with pytest.raises(CheckpointError, match="another run \\(pid 1"):
        run_toy(out, "train.batch_size=16")
    (out / ".mimkit.lock").write_text(f'{{"pid": 999999999, "host": "{socket.gethostname()}"}}')  # gone: stale
    run_toy(out, "train.batch_size=16")
    assert not (out / ".mimkit.lock").exists()


def test_corrupt_last_falls_back_to_previous_and_stale_temp_files_go(tmp_path, capsys):
    out = tmp_path / "run"
    whole = run_toy(tmp_path / "whole", "train.batch_size=16", "train.epochs=3")
    run_toy(out, "train.batch_size=16", "train.epochs=3")  # last.pt: epoch 3, prev.pt: epoch 2
    ckpt = out / "checkpoints"
    assert (ckpt / "prev.pt").exists()
    (ckpt / "last.pt").write_bytes(b"\0" * 100)  # zeroed
    (ckpt / ".last.pt.abc.tmp").write_bytes(b"junk")  # what a kill during a write leaves
    resumed = run_toy(out, "train.batch_size=16", "train.epochs=3")
    assert "resuming from the previous checkpoint" in capsys.readouterr().out
    assert not (ckpt / ".last.pt.abc.tmp").exists()
    assert torch.allclose(resumed.weight, whole.weight, atol=1e-6)


def test_epoch_snapshots_keep_the_newest_n(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "train.batch_size=16", "train.epochs=3", "train.keep_checkpoints=2", "train.checkpoint_every=3")
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("epoch-*.pt")) == ["epoch-2.pt", "epoch-3.pt"]
    for e in (2, 3):
        state = torch.load(ckpt / f"epoch-{e}.pt", weights_only=True)
        assert state["run"]["epoch"] == e and state["run"]["batch"] == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_the_run_says_its_precision_and_why(tmp_path, capsys, precision):
    from mimkit.engine.trainer import start_runtime

    cfg = toy_config(tmp_path / "run", "train.batch_size=16", f"train.precision={precision}")
    rt = start_runtime(cfg)
    train(ToyTask(cfg, rt))
    described = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy")]
    assert described and described[0].endswith(f"; precision {rt.precision}")
    assert rt.precision.startswith(precision if precision != "auto" else ("bf16 (auto:", "fp32 (auto:"))


class DecayingToyTask(ToyTask):
    """The toy with AdamW in two groups (the weight decays, the bias not), recording each step's weight decay."""

    def build_optimizer(self, lr):
        groups = [{"params": [self.model.weight], "weight_decay": self.cfg.optim.weight_decay},
                  {"params": [self.model.bias], "weight_decay": 0.0}]  # fmt: skip
        self.seen, self.optimizer = [], torch.optim.AdamW(groups, lr=lr)
        return self.optimizer

    def after_step(self, step, total):
        self.seen.append((step, total, [g["weight_decay"] for g in self.optimizer.param_groups]))


def test_weight_decay_schedule_is_dinos_cosine_on_the_decaying_groups_only(tmp_path):
    from mimkit.engine.trainer.optim import weight_decay_at

    cfg = toy_config(tmp_path / "wd", "train.batch_size=16", "optim.weight_decay=0.1", "optim.weight_decay_end=0.5")
    task = DecayingToyTask(cfg, Runtime(torch.device("cpu"), None))
    train(task)
    steps = [s for s, _, _ in task.seen]
    assert steps == list(range(1, 17)) and all(t == 16 for _, t, _ in task.seen)
    first, last = task.seen[0][2], task.seen[-1][2]
    assert first[0] == pytest.approx(0.1) and first[1] == 0.0  # DINO: weight_decay at the first step
    assert last[1] == 0.0 and 0.49 < last[0] < 0.5
    for step, total, (wd, bias_wd) in task.seen:
        assert wd == pytest.approx(weight_decay_at(step - 1, total, 0.1, 0.5)) and bias_wd == 0.0
    assert weight_decay_at(8, 16, 0.1, 0.5) == pytest.approx(0.3)  # half-way: the mean of the two ends
    # without weight_decay_end the optimizer's values are left as built
    plain = DecayingToyTask(toy_config(tmp_path / "plain", "train.batch_size=16", "optim.weight_decay=0.1"),
                            Runtime(torch.device("cpu"), None))  # fmt: skip
    train(plain)
    assert all(g == [0.1, 0.0] for _, _, g in plain.seen)


def test_weight_decay_schedule_without_decaying_groups_is_a_config_error(tmp_path):
    from mimkit.config import ConfigError
    from mimkit.engine.trainer.optim import param_groups

    cfg = toy_config(tmp_path / "wd0", "train.batch_size=16", "optim.weight_decay=0", "optim.weight_decay_end=0.5")
    with pytest.raises(ConfigError, match="optim.weight_decay_end"):
        train(DecayingToyTask(cfg, Runtime(torch.device("cpu"), None)))
    # mimkit's own groups say which decay, so a schedule may start at 0 there
    groups = param_groups(nn.Linear(4, 2), 0.0, set())
    assert [(g["weight_decay"], g["decays"]) for g in groups] == [(0.0, True), (0.0, False)]


def test_weight_decay_schedule_turned_off_on_resume_goes_back_to_the_constant(tmp_path):
    """A run resumed without optim.weight_decay_end continues at optim.weight_decay, not at the schedule's last
    value that the optimizer state carries."""
    out = tmp_path / "run"
    rt = Runtime(torch.device("cpu"), None)
    train(DecayingToyTask(toy_config(out, "train.batch_size=16", "train.epochs=1", "optim.weight_decay=0.1",
                                     "optim.weight_decay_end=0.5"), rt))  # fmt: skip
    again = ["train.batch_size=16", "train.epochs=2", "optim.weight_decay=0.1", "train.allow_config_change=true"]
    task = DecayingToyTask(toy_config(out, *again), rt)
    train(task)
    assert len(task.seen) == 8 and all(g[0] == pytest.approx(0.1) and g[1] == 0.0 for _, _, g in task.seen)

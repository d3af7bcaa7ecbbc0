"""ConMIM, CMAE-Mao and MoCo v3 on the shared parts (`parts.MomentumTeacher`, `parts.ViewColour`): a few training
steps give the losses of the code before the move, ConMIM's teacher view is the colour perturbation it made itself
before, and pre-training checkpoints of the old layout (teachers without `.module.`) still load."""

import pytest
import torch
from helpers import TINY, sgd_steps

from mimkit.data.augment import ColorAugment, scale_sigma
from mimkit.methods import build_method
from mimkit.run_config import build_config

CMAE_DECODER = ["cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2"]
# the budget momentum rule pinned: the default of all three when BEFORE was recorded (ConMIM's is `fixed` since)
SMALL = {
    "conmim": ["conmim.proj_hidden=32", "conmim.proj_dim=16", "conmim.momentum_rule=budget"],
    "cmae-mao": [*CMAE_DECODER, "cmae.proj_hidden=32", "cmae.proj_dim=16", "cmae.momentum_rule=budget"],
    "mocov3": ["mocov3.proj_hidden=32", "mocov3.proj_dim=16", "mocov3.pred_hidden=32", "mocov3.momentum_rule=budget"],
}
# the losses of `train_losses` run on the code before the move (commit eb3e075: private teacher copies updated by
# mimkit.ema.ema_update, ConMIM's own ColorAugment on a [0, 1] view), CPU, float32
BEFORE = {
    "conmim": [5.593072891235352, 7.18376350402832, 5.971843242645264],
    "cmae-mao": [2.384798288345337, 2.148097276687622, 1.9743940830230713],
    "mocov3": [2.344618797302246, 2.0798230171203613, 2.4362876415252686],
}
# the teachers that moved into a MomentumTeacher, and where each exportable encoder's weights were before the move
OLD_TEACHERS = {"conmim": ["teacher"], "cmae-mao": ["target_vit", "target_projector"], "mocov3": ["momentum"]}
EXPORTED = {
    "conmim": {"student": "student.vit.", "teacher": "teacher.vit."},
    "cmae-mao": {"student": "encoder.", "teacher": "target_vit."},
    "mocov3": {"student": "base.vit.", "teacher": "momentum.vit."},
}


def build(method: str, *extra: str):
    cfg = build_config([], None, [*TINY, f"method={method}", *SMALL[method], *extra])
    torch.manual_seed(0)
    return build_method(cfg), cfg


def train_losses(method: str, steps: int = 3) -> list[float]:
    """`steps` SGD steps on fixed uint8 crops made into the method's views as the pipeline does ('unit' views in
    [0, 1], the others normalised), the teacher updated after each (step of 10) -> the losses."""
    m, cfg = build(method)
    assert all(v.size == 16 for v in m.views)  # the crops BEFORE was recorded with
    return sgd_steps(m, cfg.data, steps)


@pytest.mark.parametrize("method", ["conmim", "cmae-mao", "mocov3"])
def test_losses_are_those_before_the_move(method):
    torch.manual_seed(0)
    assert train_losses(method) == pytest.approx(BEFORE[method], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("strong", [False, True])
def test_conmim_teacher_view_is_its_former_colour_augment(strong):
    """The teacher's view through `ViewColour` is what ConMIM made itself before: `ColorAugment` with its options
    (blur sigmas scaled from 224 px to the image) on the [0, 1] image, then normalised, from the same RNG draws."""
    every = ["conmim.blur_p=1", "conmim.solarize_p=1", "conmim.grayscale_p=0.5"] if strong else []
    m, cfg = build("conmim", *every)
    o = m.options
    x = torch.rand(8, 3, 16, 16)
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    torch.manual_seed(3)
    new = m.perturb((x - mean) / std)
    torch.manual_seed(3)
    sigma = scale_sigma(o.blur_sigma, 16)
    old = ColorAugment(o.jitter, o.jitter_p, o.grayscale_p, o.blur_p, sigma, o.solarize_p)(x)
    torch.testing.assert_close(new, (old - mean) / std, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(new, (x - mean) / std)  # it did perturb


def old_layout(state: dict, teachers: list[str]) -> dict:
    """A state dict as the code before the move saved it: each teacher's weights right under its name."""
    prefixes = tuple(f"{t}.module." for t in teachers)
    return {(k.replace(".module.", ".", 1) if k.startswith(prefixes) else k): v for k, v in state.items()}


@pytest.mark.parametrize("method", ["conmim", "cmae-mao", "mocov3"])
def test_old_layout_checkpoints_load_and_export_the_same_encoders(method):
    """A state dict with the keys of before loads (strictly) into the method, and each encoder it can export is the
    one the old keys held, under timm's names."""
    trained, _ = build(method)
    for step in (1, 2):  # the teacher moves away from the student
        with torch.no_grad():
            for p in trained.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        trained.after_step(step, 10)
    old = old_layout(trained.state_dict(), OLD_TEACHERS[method])
    assert not any(".module." in k for k in old)
    fresh, _ = build(method)
    with torch.no_grad():
        for t in [*fresh.parameters(), *fresh.buffers()]:
            t.zero_()
    fresh.load_state_dict(old)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())
    for name in ("student", "teacher"):  # CMAE-Mao's choice of the teacher swaps it in: the student comes first
        fresh.select_encoder(name)
        prefix = EXPORTED[method][name]
        want = {k[len(prefix) :]: v for k, v in old.items() if k.startswith(prefix)}
        got = fresh.encoder.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items()), name

"""k-NN (and a linear probe at the start and the end) of a teacher method's student, EMA teacher and step-0
encoder during one pre-training run, through mimkit's own loop and evaluation (docs/methods.md, the ConMIM
diagnosis). Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/teacher_probe.py OUT [RECIPE ...] [-- key=value ... [+linear]]

RECIPE defaults to the digits demo; `method=` defaults to conmim; PROBE_EVERY (environment, default 8) sets the
epochs between measurements. Prints one `PROBE {json}` line per measurement."""

from __future__ import annotations

import copy
import json
import os
import sys

from mimkit.engine.tasks.pretrain import PretrainTask
from mimkit.engine.trainer import start_runtime, train
from mimkit.engine.trainer.logging import say
from mimkit.run_config import build_config


def encoders(method) -> dict:
    """{'student': online ViT, 'teacher': EMA ViT} of ConMIM, MoCo v3 or CMAE."""
    options = method.export_options()
    if options is None:
        raise SystemExit(f"method '{method.name}' has no EMA teacher to probe")
    return dict(options[2])


class Probe(PretrainTask):
    def __init__(self, cfg, rt, every: int, linear: bool):
        super().__init__(cfg, rt)
        self.every, self.linear = every, linear
        self.step0 = copy.deepcopy(encoders(self.module)["student"]).eval()
        self.measure(0)

    def measure(self, epoch: int) -> None:
        fe, row = self.feature_eval(), {"epoch": epoch}
        ends = epoch in (0, self.cfg.train.epochs)
        found = encoders(self.module) | ({"step0": self.step0} if ends else {})
        for name, enc in found.items():
            was = enc.training
            scores = fe.scores(enc, ("knn", "linear") if self.linear and ends else ("knn",))
            enc.train(was)
            row[name] = round(scores["knn"]["top1"], 4)
            if "linear" in scores:
                row[f"{name}_linear"] = round(scores["linear"]["top1"], 4)
        say("PROBE " + json.dumps(row))

    def end_epoch(self, epoch, step, last):
        logged = super().end_epoch(epoch, step, last)
        if epoch % self.every == 0 or last:
            self.measure(epoch)
        return logged


def main(argv: list[str]) -> None:
    out, rest = argv[0], argv[1:]
    cut = rest.index("--") if "--" in rest else len(rest)
    recipes, overrides = rest[:cut] or ["demo"], rest[cut + 1 :]
    linear = "+linear" in overrides
    overrides = [o for o in overrides if o != "+linear"]
    if not any(o.startswith("method=") for o in overrides):
        overrides.insert(0, "method=conmim")
    cfg = build_config(recipes, {"out": out}, overrides)
    cfg.eval.final_knn = False
    rt = start_runtime(cfg)
    train(Probe(cfg, rt, int(os.environ.get("PROBE_EVERY", "8")), linear))


if __name__ == "__main__":
    main(sys.argv[1:])

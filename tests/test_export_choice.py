"""`mimkit export --checkpoint` exports the encoder the run exported (student or EMA teacher), not whichever sits
in the method's `encoder` slot after loading."""

import json

import pytest
import torch
from helpers import TINY

from mimkit.cli import main
from mimkit.safe_load import load_exported

CASES = {
    # an explicit setting: the teacher, which the loaded method does not hold as `encoder`
    "cmae-mao": ["cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2", "cmae.proj_hidden=64"]
    + ["cmae.proj_dim=16", "cmae.export_encoder=teacher"],
    # 'auto': the run measures both and records its choice in summary.json
    "conmim": ["conmim.proj_hidden=32", "conmim.proj_dim=16"],
}
STUDENT = {"cmae-mao": "encoder.", "conmim": "student.vit."}  # where the online ViT sits in the checkpoint


@pytest.mark.parametrize("method", sorted(CASES))
def test_export_from_checkpoint_matches_the_runs_export(tmp_path, capsys, labeled_folder, method):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", method, "--data", str(labeled_folder), "--out", str(out), "--epochs", "1"]
    assert main([*argv, *TINY, "optim.blr=1e-2", *CASES[method]]) == 0
    chosen = json.loads((out / "summary.json").read_text())["exported_encoder"]
    assert chosen in ("student", "teacher")
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out", str(again)]) == 0
    assert f"exported the {chosen} encoder (" in capsys.readouterr().out
    run_export, re_export = load_exported(out / "encoder").state_dict(), load_exported(again).state_dict()
    assert run_export.keys() == re_export.keys()
    assert all(torch.equal(run_export[k], re_export[k]) for k in run_export)
    assert json.loads((again / "config.json").read_text())["mimkit"]["encoder"] == chosen
    # the student and the teacher differ after a step, so the check above can tell them apart
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    student = state[STUDENT[method] + "blocks.0.attn.qkv.weight"]
    assert (chosen == "student") == torch.equal(re_export["blocks.0.attn.qkv.weight"], student)


def test_auto_follows_the_runs_recorded_choice_only_at_its_last_step():
    """Under 'auto', the non-fallback choice recorded for the checkpoint's step is applied; a summary of another
    step (an earlier checkpoint, a run resumed past it) or none gives the fallback."""
    from mimkit.engine.tasks.pretrain import reapply_export_choice
    from mimkit.methods import build_method
    from mimkit.run_config import build_config

    def conmim():  # the fallback under auto is the teacher
        return build_method(build_config([], None, [*TINY, "method=conmim", *CASES["conmim"]]))

    m = conmim()
    assert "the student encoder" in reapply_export_choice(m, {"exported_encoder": "student", "steps": 7}, 7)
    assert m.export_meta()["encoder"] == "student"
    for summary, step in (({"exported_encoder": "student", "steps": 7}, 5), ({}, 7)):
        m = conmim()
        assert "the teacher encoder" in reapply_export_choice(m, summary, step)
        assert m.export_meta()["encoder"] == "teacher"

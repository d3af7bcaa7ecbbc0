"""The export's model card (README.md): written with the weights in one atomic folder write, names the method and
the run, and its timm snippet runs as written and gives the features mimkit evaluates."""

from __future__ import annotations

import re

import torch
from helpers import TINY

from mimkit.export import export_encoder, write_model_card
from mimkit.methods import build_method
from mimkit.models.vit import pool_features
from mimkit.run_config import build_config

INFO = {"method": "mae", "data": "demo", "train_images": 64, "epochs": 3, "steps": 12, "effective_batch": 16}


def tiny_encoder():
    torch.manual_seed(0)
    return build_method(build_config(overrides={"method": "mae"}, dotted=TINY)).encoder.eval()


def export(encoder, folder, card=INFO):
    return export_encoder(encoder, folder, image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
                          mimkit_meta={"method": "mae"}, global_pool="avg", card=card)  # fmt: skip


def snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_card_names_the_run_and_its_snippet_loads_the_model(tmp_path, monkeypatch):
    encoder = tiny_encoder()
    folder = export(encoder, tmp_path / "encoder")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert (
        "pre-trained with mae" in card
        and "| training images | 64 |" in card
        and "| epochs | 3 |" in card
        and "| effective batch | 16 |" in card
    )
    assert "mean (0.5, 0.4, 0.3)" in card and "global_pool='avg'" in card and "hf-hub:USER/NAME" in card
    assert "No evaluation was recorded" in card

    monkeypatch.chdir(tmp_path.parent)  # the snippet runs as written, from anywhere
    scope: dict = {}
    exec(snippet(card), scope)  # noqa: S102 — the card's own code, written by the test above
    model, x = scope["model"], scope["transform"](scope["image"]).unsqueeze(0)
    assert type(model).__name__ == "VisionTransformer" and scope["features"].shape == (1, 32)
    with torch.no_grad():  # the mean patch token after the final norm: the feature mimkit's k-NN uses
        expected = pool_features(encoder, encoder.forward_features(x), "avg")
    torch.testing.assert_close(scope["features"], expected)


def test_card_rewritten_with_results_and_folder_stays_whole(tmp_path):
    encoder = tiny_encoder()
    folder = export(encoder, tmp_path / "encoder")
    knn = {"top1": 0.8912, "top1_random_init": 0.6061, "k": 20, "memory": 1297, "query": 500}
    write_model_card(folder, {**INFO, "knn": knn, "metrics": {"final loss": 0.41234}, "repo_id": "me/mae-demo"})
    card = (folder / "README.md").read_text()
    assert "**0.8912**" in card and "random initialisation: 0.6061" in card and "k=20, memory=1297, query=500" in card
    assert "- final loss: 0.4123" in card and 'hf-hub:me/mae-demo"' in card
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["encoder"]  # no temporary file or folder left beside it

    export(encoder, folder, card=None)  # without a card: the folder is replaced by weights and config alone
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

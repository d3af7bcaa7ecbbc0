"""Export folders are untrusted input: a crafted one never reaches the network, never runs code, and every way
of breaking it ends in a ConfigError (CLI exit 2) naming the file and the first bad key."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import socket

import pytest
import timm
import torch
from helpers import TINY, write_images
from safetensors.torch import load_file, save_file

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.engine.tasks.encoders import build_model, encoder_spec
from mimkit.run_config import build_config
from mimkit.safe_load import load_exported, read_export

CONFIG, WEIGHTS = "config.json", "model.safetensors"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(export folder of a real 1-epoch MAE pre-training, the labeled folder it was trained on)."""
    root = tmp_path_factory.mktemp("pretrained")
    data = root / "data"
    for split, n in (("train", 24), ("val", 8)):
        for c, cls in enumerate(("a", "b")):
            write_images(data / split / cls, n, seed=c * 100 + (split == "val"))
    run = root / "run"
    argv = ["pretrain", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY, "eval.final_knn=false"]
    assert main(argv) == 0
    return run / "encoder", data


@pytest.fixture
def network(monkeypatch):
    """Every way out of the process (sockets, DNS, the Hub client, timm's and torch's downloaders) records the
    attempt and fails; the test ends by checking that there was none."""
    attempts = []

    def refuse(name):
        def blocked(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network access attempted: {name}")

        return blocked

    for method in ("connect", "connect_ex"):
        real, blocked = getattr(socket.socket, method), refuse(f"socket.{method}")

        def connect(sock, *args, _real=real, _blocked=blocked):  # data-loader workers talk over Unix sockets
            return (_real if sock.family == socket.AF_UNIX else _blocked)(sock, *args)

        monkeypatch.setattr(socket.socket, method, connect)
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    import huggingface_hub
    import timm.models._factory as timm_factory
    import timm.models._hub as timm_hub

    for module, names in (
        (huggingface_hub, ("hf_hub_download", "snapshot_download", "model_info")),
        (timm_hub, ("hf_hub_download", "download_from_hf", "load_model_config_from_hf", "load_state_dict_from_hf")),
        (timm_factory, ("load_model_config_from_hf",)),
        (torch.hub, ("download_url_to_file", "load_state_dict_from_url")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"), raising=False)
    yield attempts
    assert attempts == [], f"network attempts: {attempts}"


@pytest.fixture
def timm_builds(monkeypatch):
    """The (name, pretrained) of every timm.create_model call."""
    calls = []
    real = timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    return calls


def edit_config(folder, change):
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_weights(folder, change):
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, str(folder / WEIGHTS))


def set_arch(name):
    return lambda folder: edit_config(folder, lambda c: c.update(architecture=name))


def drop(*keys):
    """Delete config keys given as 'a' or 'a.b'."""

    def change(config):
        for key in keys:
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = node[p]
            del node[leaf]

    return lambda folder: edit_config(folder, change)


def reshape(key):
    return lambda folder: edit_weights(folder, lambda s: s.update({key: s[key].reshape(-1)[:-1].clone()}))


def poison(key, value):
    return lambda folder: edit_weights(folder, lambda s: s[key].view(-1).__setitem__(0, value))


def all_nan(folder):
    edit_weights(folder, lambda s: [v.fill_(float("nan")) for v in s.values()])


def drop_weights(pattern):
    return lambda folder: edit_weights(folder, lambda s: [s.pop(k) for k in list(s) if re.match(pattern, k)])


def int_weights(key):
    return lambda folder: edit_weights(folder, lambda s: s.update({key: s[key].to(torch.int64)}))


def write_bytes(name, data):
    return lambda folder: (folder / name).write_bytes(data(folder))


class MakesAFile:
    """A pickle that creates `marker` when unpickled: the stand-in for code an attacker wants run."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_as_weights(folder):
    MakesAFile.marker = folder.parent / "pickle-ran"
    (folder / WEIGHTS).write_bytes(pickle.dumps({"blocks.0.attn.qkv.weight": MakesAFile()}))


# (case id, how to break the export, file named, key named): every message must name both
CASES = [
    ("hf-hub", set_arch("hf-hub:someone/model"), CONFIG, "hf-hub:someone/model"),
    ("url", set_arch("https://example.com/vit.safetensors"), CONFIG, "https://example.com/vit.safetensors"),
    ("local-dir", set_arch("local-dir:/tmp/other"), CONFIG, "local-dir:/tmp/other"),
    ("repo-id", set_arch("someone/vit_tiny_patch16_224"), CONFIG, "someone/vit_tiny_patch16_224"),
    ("unknown", set_arch("vit_does_not_exist_patch16"), CONFIG, "vit_does_not_exist_patch16"),
    ("not-json", write_bytes(CONFIG, lambda f: b"{architecture: vit"), CONFIG, "JSON"),
    ("json-list", write_bytes(CONFIG, lambda f: b"[1, 2]"), CONFIG, "JSON object"),
    ("no-arch", drop("architecture"), CONFIG, "architecture"),
    ("no-pretrained-cfg", drop("pretrained_cfg"), CONFIG, "pretrained_cfg"),
    ("no-mean", drop("pretrained_cfg.mean"), CONFIG, "pretrained_cfg.mean"),
    ("bad-std", lambda f: edit_config(f, lambda c: c["pretrained_cfg"].update(std=[0, 1, 1])), CONFIG, "std"),
    ("bad-size", lambda f: edit_config(f, lambda c: c["pretrained_cfg"].update(input_size="x")), CONFIG, "input_size"),
    (
        "arg-fetches",
        lambda f: edit_config(f, lambda c: c["model_args"].update(pretrained_cfg_overlay={"hf_hub_id": "a/b"})),
        CONFIG,
        "model_args.pretrained_cfg_overlay",
    ),  # fmt: skip
    (
        "arg-loads",
        lambda f: edit_config(f, lambda c: c["model_args"].update(checkpoint_path="/x.pth")),
        CONFIG,
        "model_args.checkpoint_path",
    ),  # fmt: skip
    ("arg-unknown", lambda f: edit_config(f, lambda c: c["model_args"].update(evil=1)), CONFIG, "evil"),
    ("shape", reshape("blocks.0.attn.qkv.weight"), WEIGHTS, "blocks.0.attn.qkv.weight"),
    ("arch-args", lambda f: edit_config(f, lambda c: c["model_args"].update(embed_dim=48)), WEIGHTS, "cls_token"),
    ("missing-block", drop_weights(r"blocks\.1\."), WEIGHTS, "blocks.1."),
    ("int-dtype", int_weights("blocks.0.norm1.weight"), WEIGHTS, "blocks.0.norm1.weight"),
    ("nan", poison("blocks.1.mlp.fc2.bias", float("nan")), WEIGHTS, "blocks.1.mlp.fc2.bias"),
    ("inf", poison("pos_embed", float("-inf")), WEIGHTS, "pos_embed"),
    ("all-nan", all_nan, WEIGHTS, "NaN"),
    ("garbage", write_bytes(WEIGHTS, lambda f: bytes(range(256)) * 64), WEIGHTS, "safetensors"),
    ("truncated", write_bytes(WEIGHTS, lambda f: (f / WEIGHTS).read_bytes()[:5000]), WEIGHTS, "safetensors"),
    ("empty", write_bytes(WEIGHTS, lambda f: b""), WEIGHTS, "safetensors"),
    ("pickle", pickle_as_weights, WEIGHTS, "safetensors"),
]


@pytest.fixture
def crafted(pretrained, tmp_path, request):
    """A copy of the real export broken the way the case says -> (folder, file named, key named, data)."""
    _, breaks, file, key = request.param
    export, data = pretrained
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    breaks(folder)
    return folder, str(folder / file), key, data


def assert_names(message, file, key):
    assert f"'{file}'" in message, message
    assert key in message, message


@pytest.mark.parametrize("crafted", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_crafted_export_is_refused_everywhere(crafted, network, timm_builds, capsys, tmp_path):
    folder, file, key, data = crafted
    cfg = build_config(dotted=TINY)
    with pytest.raises(ConfigError) as refused:  # eval, compare, visualize: load_encoder's two calls
        read_export(folder)
        load_exported(folder)
    assert_names(str(refused.value), file, key)
    with pytest.raises(ConfigError) as refused:  # finetune, segment
        build_model(encoder_spec(str(folder), cfg), num_classes=2, global_pool="avg")
    assert_names(str(refused.value), file, key)

    assert main(["eval", "knn", "--checkpoint", str(folder), "--data", str(data)]) == 2
    assert_names(capsys.readouterr().err, file, key)
    out = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(folder), "--data", str(data), "--out", str(out), "--epochs", "1"]
    assert main([*argv, "data.num_workers=0", "train.batch_size=8"]) == 2
    assert_names(capsys.readouterr().err, file, key)

    assert all(pretrained is False and ":" not in name for name, pretrained in timm_builds), timm_builds
    assert not (folder.parent / "pickle-ran").exists()


def test_missing_half_the_keys_names_one_of_them(pretrained, tmp_path, network):
    export, _ = pretrained
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    keys = list(load_file(str(folder / WEIGHTS)))
    dropped = keys[::2]
    edit_weights(folder, lambda s: [s.pop(k) for k in dropped])
    with pytest.raises(ConfigError, match=f"'{folder / WEIGHTS}' does not fit") as refused:
        load_exported(folder)
    named = re.search(r"missing key '([^']+)' and (\d+) more", str(refused.value))
    assert named and named[1] in dropped and int(named[2]) == len(dropped) - 1


def test_real_export_loads_offline_and_ignores_download_fields(pretrained, tmp_path, network, timm_builds, capsys):
    """The export's own tensors, built with pretrained=False; hf_hub_id / url / file in its pretrained_cfg are
    never followed."""
    export, data = pretrained
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    lure = {"hf_hub_id": "someone/model", "url": "https://example.com/w.pth", "file": "/etc/passwd", "source": "hf-hub"}
    edit_config(folder, lambda c: c["pretrained_cfg"].update(lure))
    model = load_exported(folder)
    saved = load_file(str(export / WEIGHTS))
    got = model.state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], v) for k, v in saved.items())
    assert model.pretrained_cfg["input_size"] == (3, 16, 16) and "example.com" not in str(model.pretrained_cfg)
    assert timm_builds == [("vit_tiny_patch16_224", False)]
    assert main(["eval", "knn", "--checkpoint", str(folder), "--data", str(data)]) == 0
    assert '"top1"' in capsys.readouterr().out
    spec = encoder_spec(str(folder), build_config(dotted=TINY))
    assert torch.equal(build_model(spec, num_classes=0).blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])


def test_allow_download_lifts_the_architecture_check(pretrained, tmp_path, network):
    export, _ = pretrained
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    set_arch("hf-hub:someone/model")(folder)
    with pytest.raises(ConfigError, match="--allow-download"):
        read_export(folder)
    assert read_export(folder, allow_download=True)["architecture"] == "hf-hub:someone/model"


def test_near_miss_architecture_gets_a_suggestion(pretrained, tmp_path):
    export, _ = pretrained
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    set_arch("vit_tiny_patch16_244")(folder)
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_patch16_224'"):
        read_export(folder)

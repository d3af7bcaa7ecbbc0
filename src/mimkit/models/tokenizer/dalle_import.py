"""Convert OpenAI's DALL-E dVAE weight files (`encoder.pkl`, `decoder.pkl`) into a `DalleTokenizer`.

Those files are `torch.save` pickles of whole `dall_e.Encoder` / `dall_e.Decoder` objects, and unpickling a file
can run any code it names. So loading them needs the caller's explicit trust (`--trust-pickle`), and even then
mimkit unpickles them with an allow-list: PyTorch's tensor rebuilders, the torch.nn layers the dVAE is made of,
and DALL-E's own classes, which are replaced by inert stand-ins (so the `DALL-E` package is not needed). A file
naming anything else is refused as not being what it claims.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ...config import ConfigError
from .dalle import DalleTokenizer

WHY_TRUST = (
    "are Python pickles, and loading a pickle can run arbitrary code; mimkit loads them with an allow-list of "
    "PyTorch and DALL-E classes, but pass --trust-pickle only for files from a source you trust (OpenAI's "
    "https://cdn.openai.com/dall-e/encoder.pkl and decoder.pkl)"
)
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("torch", "device"),
    ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}


class PickledModule(nn.Module):
    """Inert stand-in for a class of the `dall_e` package: keeps the pickled attributes, parameters and
    sub-modules (so `state_dict()` works) and runs nothing."""

    pickled_class = ""


_STANDINS: dict[str, type[PickledModule]] = {}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "dall_e" or module.startswith("dall_e."):
            key = f"{module}.{name}"
            if key not in _STANDINS:
                _STANDINS[key] = type(name, (PickledModule,), {"pickled_class": key})
            return _STANDINS[key]
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("torch.nn.modules."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        raise pickle.UnpicklingError(f"it references '{module}.{name}', which no DALL-E dVAE file contains")


class _PickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler class and a load function."""

    Unpickler = _Unpickler

    @staticmethod
    def load(file, **kwargs):
        return _Unpickler(file, **kwargs).load()


def load_dalle_pickle(path: str | Path, expect: str) -> PickledModule:
    """The pickled dall_e `expect` ('Encoder' or 'Decoder') object in `path`; ConfigError naming the file else."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DALL-E {expect.lower()} file '{p}' does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", pickle_module=_PickleModule, weights_only=False)
    except Exception as e:  # noqa: BLE001 — not a pickle, a truncated zip, a foreign class...
        raise ConfigError(f"'{p}' is not a DALL-E {expect.lower()} file: {e}") from None
    found = getattr(obj, "pickled_class", None) or f"{type(obj).__module__}.{type(obj).__qualname__}"
    if found != f"dall_e.{expect.lower()}.{expect}":
        raise ConfigError(f"'{p}' is not a DALL-E {expect.lower()} file: it holds a {found}, not a dall_e.{expect}")
    return obj


def _rename(key: str) -> str:
    """Official parameter name -> DalleEncoder/DalleDecoder name (blocks.group_2.block_1.res_path.conv_3.w ->
    groups.1.0.path.2.weight)."""
    key = re.sub(r"\.w$", ".weight", key)
    key = re.sub(r"\.b$", ".bias", key)
    key = key.replace("blocks.input.", "stem.").replace("blocks.output.conv.", "head.")
    key = re.sub(r"blocks\.group_(\d+)\.block_(\d+)\.", lambda m: f"groups.{int(m[1]) - 1}.{int(m[2]) - 1}.", key)
    key = key.replace(".id_path.", ".skip.")
    return re.sub(r"\.res_path\.conv_(\d+)\.", lambda m: f".path.{int(m[1]) - 1}.", key)


def _hparam(obj: PickledModule, name: str, path: Path) -> int:
    value = obj.__dict__.get(name)
    if not isinstance(value, int):
        raise ConfigError(f"'{path}' is not a DALL-E file: its object has no integer '{name}' setting")
    return value


def convert_dalle(encoder_path: str | Path, decoder_path: str | Path, image_size: int = 112) -> DalleTokenizer:
    """Build a DalleTokenizer from the official encoder and decoder pickles (loaded with an allow-list)."""
    enc = load_dalle_pickle(encoder_path, "Encoder")
    dec = load_dalle_pickle(decoder_path, "Decoder")
    ep, dp = Path(encoder_path), Path(decoder_path)
    vocab, n_hid, blocks = (_hparam(enc, k, ep) for k in ("vocab_size", "n_hid", "n_blk_per_group"))
    if _hparam(enc, "input_channels", ep) != 3 or _hparam(dec, "output_channels", dp) != 3:
        raise ConfigError(f"'{ep}' / '{dp}': mimkit's DALL-E tokenizer takes RGB images (3 channels in and out)")
    for name, mine in (("vocab_size", vocab), ("n_hid", n_hid), ("n_blk_per_group", blocks)):
        theirs = _hparam(dec, name, dp)
        if theirs != mine:
            raise ConfigError(f"DALL-E files do not match: encoder '{ep}' has {name}={mine}, decoder '{dp}' {theirs}")
    if image_size % 8:
        raise ConfigError(f"--image-size {image_size} is not a multiple of the dVAE's downsampling 8")
    tok = DalleTokenizer(vocab, n_hid, blocks, _hparam(dec, "n_init", dp), image_size)
    for part, obj, path in ((tok.encoder, enc, ep), (tok.decoder, dec, dp)):
        state = {_rename(k): v.detach().float() for k, v in obj.state_dict().items()}
        expected = part.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                f"'{path}' does not have the DALL-E layout: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        bad = [k for k in expected if expected[k].shape != state[k].shape]
        if bad:
            k = bad[0]
            raise ConfigError(f"'{path}': '{k}' has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
        part.load_state_dict(state)
    return tok.freeze()

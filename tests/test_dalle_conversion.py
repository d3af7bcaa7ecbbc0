"""`mimkit tokenizer import-dalle` against OpenAI's own `DALL-E` package (pip `DALL-E==0.1`, in the dev extra):
randomly initialised official encoder/decoder, pickled as the official files are, converted, give equal logits
and equal decoded images; files that are not what they claim are refused naming the file."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from mimkit.cli import main
from mimkit.models.tokenizer import DalleTokenizer, load_tokenizer

dall_e = pytest.importorskip(
    "dall_e", reason="the DALL-E package (pip install 'DALL-E==0.1', dev extra) is not installed"
)


def official_pair(blocks: int, seed: int = 0):
    """Small official models (the package requires n_hid >= 64, vocab >= 512), every parameter random (biases
    included: the package initialises them to zero, which would hide a bias mix-up)."""
    torch.manual_seed(seed)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=blocks, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=blocks, vocab_size=512)
    for m in (enc, dec):
        for p in m.parameters():
            if p.ndim == 1:
                p.data.normal_(0, 0.1)
    return enc, dec


def convert(tmp_path, enc, dec, capsys, image_size=32):
    torch.save(enc, tmp_path / "encoder.pkl")  # how the official encoder.pkl / decoder.pkl were written
    torch.save(dec, tmp_path / "decoder.pkl")
    out = tmp_path / "dalle"
    argv = ["tokenizer", "import-dalle", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder"]
    code = main([*argv, str(tmp_path / "decoder.pkl"), "--out", str(out), "--trust-pickle"])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "wrote the DALL-E tokenizer" in text.out
    return load_tokenizer(out)


@pytest.mark.parametrize("blocks", [1, 2])
def test_converted_dalle_gives_the_official_outputs(tmp_path, capsys, blocks):
    enc, dec = official_pair(blocks)
    tok = convert(tmp_path, enc, dec, capsys)
    assert isinstance(tok, DalleTokenizer) and tok.vocab_size == 512 and tok.downsample == 8
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = enc(dall_e.map_pixels(x))
        got = tok.logits(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
        ids = tok.encode(x)
        assert torch.equal(ids, want.argmax(1))
        one_hot = F.one_hot(ids, 512).permute(0, 3, 1, 2).float()
        stats = dec(one_hot).float()
        assert torch.allclose(tok.decode_stats(ids), stats, rtol=1e-5, atol=1e-5)
        want_img = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))
        got_img = tok.decode(ids)
        assert got_img.shape == (3, 3, 32, 32)
        assert torch.allclose(got_img, want_img, rtol=1e-5, atol=1e-6), (got_img - want_img).abs().max()


def test_swapped_or_foreign_files_are_refused(tmp_path, capsys):
    enc, dec = official_pair(1)
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    torch.save(enc.state_dict(), tmp_path / "state_dict.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:  # a pickle that would run a command when loaded
        pickle.dump(_Evil(), f)
    base = ["tokenizer", "import-dalle", "--out", str(tmp_path / "o"), "--trust-pickle"]
    cases = [
        ("decoder.pkl", "decoder.pkl", "holds a dall_e.decoder.Decoder, not a dall_e.Encoder"),
        ("encoder.pkl", "encoder.pkl", "holds a dall_e.encoder.Encoder, not a dall_e.Decoder"),
        ("state_dict.pt", "decoder.pkl", "holds a collections.OrderedDict, not a dall_e.Encoder"),
        ("evil.pkl", "decoder.pkl", "which no DALL-E dVAE file contains"),
    ]
    for e, d, message in cases:
        argv = [*base, "--encoder", str(tmp_path / e), "--decoder", str(tmp_path / d)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        bad = e if "Encoder" in message or e == "evil.pkl" else d
        assert f"'{tmp_path / bad}'" in err
    assert not (tmp_path / "o").exists()

    other = dall_e.Decoder(n_init=32, n_hid=128, n_blk_per_group=1, vocab_size=512)
    torch.save(other, tmp_path / "decoder_other.pkl")
    argv = [*base, "--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder_other.pkl")]
    assert main(argv) == 2
    assert "DALL-E files do not match" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))

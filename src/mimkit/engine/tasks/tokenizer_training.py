"""Training an image tokenizer (`mimkit tokenizer train`): a VQ-VAE with an EMA codebook, through the engine loop.

Loss: mean squared error of the reconstruction in [0, 1] pixels + `tokenizer.commitment` x ||z - sg(code)||^2;
the codebook follows its assignments by EMA and codes unused for `tokenizer.restart_every` steps are restarted on
recent encoder outputs. At each epoch end: PSNR and codebook usage on held-out images (the labeled evaluation
split when the data has one, e.g. CIFAR-10's test/; otherwise a fixed subset of the training images, reported as
such). The export is a tokenizer folder (`mimkit.models.tokenizer.save_tokenizer`), not a timm encoder.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ...atomic import replace_text
from ...config import Config, ConfigError
from ...data import Splits
from ...data.folder import seeded_subset
from ...data.pipeline import ViewDataset, eval_loader, prepare_batch
from ...data.views import View
from ...methods.base import Method
from ...models.tokenizer import ImageTokenizer, VQTokenizer, codebook_stats, load_tokenizer, psnr, save_tokenizer
from ...models.tokenizer.vqvae import code_counts
from ..trainer import Runtime
from ..trainer.logging import say
from .pretrain import PretrainTask, pretrain


class TokenizerTraining(Method):
    """Image tokenizer (VQ-VAE, EMA codebook, dead-code restarts): images -> grids of discrete tokens. Not a
    pre-training method (its `encoder` is no timm model, and it is not in the registry); it honours the method
    contract so that the pre-training task can train it."""

    name = "tokenizer"

    def __init__(self, cfg: Config, tokenizer: ImageTokenizer | None = None):
        super().__init__()
        t = cfg.tokenizer
        if cfg.eval.knn_every:
            raise ConfigError("eval.knn_every: a tokenizer has no features for k-NN; set eval.knn_every=0")
        if t.restart_every < 0 or t.eval_images < 1:
            raise ConfigError("tokenizer.restart_every must be >= 0 and tokenizer.eval_images >= 1")
        self.options = t
        self.mean, self.std = cfg.data.mean, cfg.data.std
        self.views = (View("image", cfg.data.image_size, normalize="unit"),)
        if tokenizer is None:
            tokenizer = VQTokenizer(
                vocab_size=t.vocab_size,
                downsample=t.downsample,
                width=t.width,
                code_dim=t.code_dim,
                res_blocks=t.res_blocks,
                image_size=cfg.data.image_size,
                ema_decay=t.ema_decay,
            )
        self.encoder = tokenizer  # the contract's `encoder`: what is exported
        self.register_buffer("restarted", torch.tensor(0))  # codes restarted since the last epoch end
        self.last_eval: dict = {}

    @property
    def tokenizer(self) -> ImageTokenizer:
        return self.encoder

    # ---- steps -------------------------------------------------------------------------------------------
    def loss(self, recon: torch.Tensor, x: torch.Tensor, commit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) x2 in [0, 1], scalar -> (loss, reconstruction MSE)."""
        mse = F.mse_loss(recon, x)
        return mse + self.options.commitment * commit, mse

    def usage(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, h, w) ids -> perplexity of the batch's code distribution and the fraction of codes it uses."""
        counts = code_counts(ids, self.encoder.vocab_size)
        p = counts / counts.sum()
        return {
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()),
            "usage": (counts > 0).float().mean(),
        }

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        if not isinstance(self.encoder, VQTokenizer):
            raise ConfigError(f"only mimkit's VQ-VAE tokenizer trains; this one is a {self.encoder.kind} tokenizer")
        x = batch["image"]
        out = self.encoder.forward_train(x)
        loss, mse = self.loss(out["recon"], x, out["commit"])
        metrics = {"loss": loss.detach(), "recon_mse": mse.detach(), "commit": out["commit"].detach()}
        metrics.update(self.usage(out["ids"]))
        return loss, metrics

    def restart_dead_codes(self) -> None:
        if isinstance(self.encoder, VQTokenizer):
            self.restarted += self.encoder.codebook.restart_dead()

    def after_step(self, step: int, total_steps: int) -> None:
        if self.options.restart_every and step % self.options.restart_every == 0:
            self.restart_dead_codes()

    def on_epoch_end(self, ctx) -> dict:
        if not self.options.restart_every:
            self.restart_dead_codes()
        restarted = int(self.restarted)
        self.restarted.zero_()
        if not ctx.main:
            return {}
        m = self.evaluate(ctx.splits, ctx.cfg, ctx.device)
        print(f"epoch {ctx.epoch}: {describe(m)}; {restarted} dead codes restarted", flush=True)
        logged = {k: v for k, v in m.items() if isinstance(v, int | float) and k != "vocab_size"}
        return logged | {"codes_restarted": restarted}

    @torch.no_grad()
    def evaluate(self, splits: Splits, cfg: Config, device) -> dict:
        """PSNR (mean over images of the per-image value, reconstructions clamped to [0, 1] against the 8-bit
        originals) and codebook usage on up to `tokenizer.eval_images` centre-cropped held-out images."""
        held_out = splits.query is not None
        source = seeded_subset(splits.query if held_out else splits.train, self.options.eval_images, cfg.train.seed)
        loader = eval_loader(ViewDataset(source, self.views, cfg.data, cfg.train.seed, train=False),
                             cfg.train.batch_size, cfg.data.num_workers)  # fmt: skip
        was_training = self.training
        self.eval()
        counts = torch.zeros(self.encoder.vocab_size, device=device)
        total, n = torch.zeros((), device=device), 0
        for batch in loader:
            x = prepare_batch(batch, self.views, device, self.mean, self.std)["image"]
            ids = self.encoder.encode(x)
            total += psnr(self.encoder.decode(ids), x).sum()
            counts += code_counts(ids, self.encoder.vocab_size)
            n += x.shape[0]
        self.train(was_training)
        stats = codebook_stats(counts.cpu())
        self.last_eval = {
            "psnr": float(total) / max(n, 1),
            "eval_perplexity": stats["perplexity"],
            "eval_usage": stats["usage"],
            "dead_codes": stats["dead_codes"],
            "eval_images": n,
            "eval_source": f"{'held-out' if held_out else 'training (no held-out split)'} images of '{source.name}'",
            "vocab_size": self.encoder.vocab_size,
        }
        return self.last_eval

    def final_report(self, splits: Splits, cfg: Config, device) -> dict:
        """The held-out metrics of the final model (computed when this process did not train), printed."""
        m = self.last_eval or self.evaluate(splits, cfg, device)
        print(describe(m), flush=True)
        return dict(m)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint from other tokenizer.* sizes (same --out, new settings) is a clear error, not a traceback."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ConfigError(
                f"the checkpoint's tokenizer does not fit this run's tokenizer.* settings ({first}); "
                "use another --out or the same settings"
            ) from None

    def export_folder(self, out_dir, cfg):
        meta = {"method": self.name, "data": cfg.data.path, "image_size": cfg.data.image_size}
        if self.last_eval:
            meta.update(psnr=self.last_eval["psnr"], eval_usage=self.last_eval["eval_usage"])
        return save_tokenizer(self.encoder, out_dir, meta=meta)

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of original | tokenizer reconstruction (normalised with data.mean/std for the caller)."""
        x = batch["image"]
        rows = torch.cat([x, self.encoder.reconstruct(x)], dim=3)
        m = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (rows - m) / s


def describe(m: dict) -> str:
    return (
        f"psnr {m['psnr']:.2f} dB on {m['eval_images']} {m['eval_source']}; codebook perplexity "
        f"{m['eval_perplexity']:.1f} of {m['vocab_size']}, usage {100 * m['eval_usage']:.1f}%, "
        f"{m['dead_codes']} dead codes"
    )


def method_from_tokenizer(path, image_size: int | None = None) -> tuple[TokenizerTraining, Config]:
    """A tokenizer folder as a (frozen) method, for `mimkit visualize`; images at `image_size` (default: its own)."""
    tok = load_tokenizer(path)
    cfg = Config()
    cfg.method, cfg.tokenizer.path = "tokenizer", str(path)
    cfg.data.image_size = image_size or tok.image_size
    if cfg.data.image_size % tok.downsample:
        raise ConfigError(f"--image-size {cfg.data.image_size} is not a multiple of the tokenizer's {tok.downsample}")
    return TokenizerTraining(cfg, tokenizer=tok).eval(), cfg


class TokenizerTask(PretrainTask):
    """`mimkit tokenizer train`: the pre-training task over a TokenizerTraining module. Judged by held-out PSNR
    and codebook usage; the export is a tokenizer folder, `<out>/tokenizer` (what tokenizer.path takes)."""

    kind = "tokenizer"
    resume_keys = ("data.image_size",)  # other tokenizer.* sizes: TokenizerTraining.load_state_dict says so

    def __init__(self, cfg: Config, rt: Runtime):
        super().__init__(cfg, rt, build=TokenizerTraining)

    def identity(self) -> dict:
        return {}

    def method_sections(self) -> tuple[str, ...]:
        return ()  # the tokenizer's own settings are the shared `tokenizer` section

    def trained_what(self) -> str:
        t = self.cfg.tokenizer
        return f"VQ tokenizer ({t.vocab_size} codes, {t.downsample}x downsampling)"

    def report(self, steps: int) -> dict:
        from pathlib import Path

        if not self.rt.main:
            return {}
        out = Path(self.cfg.out)
        self.module.eval()
        metrics = self.module.final_report(self.splits, self.cfg, self.rt.device)  # prints the psnr line
        tok_dir = self.module.export_folder(out / "tokenizer", self.cfg)
        summary = {"method": "tokenizer", "steps": steps, "tokenizer": str(tok_dir), **metrics}
        say(f"tokenizer exported to '{tok_dir}' (use it with tokenizer.path={out} or {tok_dir})")
        replace_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def train_tokenizer(cfg: Config) -> dict:
    """`mimkit tokenizer train`: train, then export and report on rank 0."""
    return pretrain(cfg, TokenizerTask)

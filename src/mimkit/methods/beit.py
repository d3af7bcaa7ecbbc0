"""BEiT (Bao et al., 2022): blockwise-masked patches replaced by a mask token; predict their visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PositiveFloat, PositiveInt, Probability, TokenizerConfig
from ..data.views import View
from ..masking import block_mask_count, blockwise_masking
from ..models import vit as V
from ..models.tokenizer import check_grid, load_tokenizer
from .base import Method, SharedSettings


@dataclass
class BEiTOptions:
    # the masked count: num_masking_patches (BEiT's --num_mask_patches), or round(mask_ratio * N), or when both are
    # None BEiT's 75 of 196 scaled to the grid, round(75 * N / 196); blockwise masks may hold fewer (as BEiT's)
    num_masking_patches: PositiveInt | None = None
    mask_ratio: Probability | None = None
    min_block_patches: PositiveInt = 16  # smallest block (capped at the target count on small grids)
    max_block_patches: PositiveInt | None = None
    min_aspect: PositiveFloat = 0.3
    # BEiT's lr relative to the run's (mimkit's own knob, as dino.lr_scale): a recipe shared with other methods can
    # give BEiT its own; on the digits demo it wants 3x the demo's (k-NN 0.867 against 0.807, 4 seeds)
    lr_scale: PositiveFloat = 1.0


LAYER_SCALE = 0.1  # BEiT's --layer_scale_init_value for ViT-B (1e-5 for ViT-L): used when model.layer_scale is None


def check_mask_ratio(key: str, ratio: float, num_patches: int) -> None:
    if not 0.0 < ratio < 1.0 or round(ratio * num_patches) in (0, num_patches):
        raise ConfigError(f"{key} {ratio} leaves no masked or no visible patch of {num_patches}")


def require_tokenizer(tokenizer: TokenizerConfig, method: str):
    """The frozen tokenizer named by tokenizer.path, or an error saying how to get one."""
    if not tokenizer.path:
        raise ConfigError(
            f"method {method} needs a tokenizer: set tokenizer.path=DIR (made by `mimkit tokenizer train` "
            "or `mimkit tokenizer import-dalle`)"
        )
    return load_tokenizer(tokenizer.path)


class BEiT(Method):
    """BEiT: blockwise masks, a mask token in the encoder, cross-entropy on a frozen tokenizer's visual tokens."""

    name = "beit"
    Options = BEiTOptions
    needs_tokenizer = True

    def __init__(self, options: BEiTOptions, shared: SharedSettings, tokenizer=None):
        """`tokenizer`: given when BEiT is a part of another method (CIM's generator)."""
        super().__init__()
        o = options
        self.options = o
        self._mean, self._std = shared.mean, shared.std
        self.encoder = V.create_encoder(shared.model, shared.image_size, allow_beit=True, layer_scale=LAYER_SCALE)
        self.grid = V.grid_size(self.encoder)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = block_mask_count(self.num_patches, o.num_masking_patches, o.mask_ratio, "beit")
        if tokenizer is None:
            tokenizer = require_tokenizer(shared.tokenizer, self.name)
        self.tokenizer = tokenizer  # frozen; its weights travel in the checkpoint
        check_grid(self.tokenizer, shared.image_size, V.patch_size(self.encoder))
        tok_size = self.grid[0] * self.tokenizer.downsample
        # one crop, two resizes: the encoder's view and the tokenizer's (112 px for 224 / DALL-E)
        self.views = (View("image", shared.image_size), View("tokens", tok_size, "lanczos", normalize="unit"))
        dim = self.encoder.embed_dim
        self.lm_head = nn.Linear(dim, self.tokenizer.vocab_size)
        self.mask_token = V.new_mask_token(dim)
        # BEiT's initialisation of its whole pre-training model: trunc-normal 0.02 cut at +-1 std, depth rescaling
        V.init_beit_encoder(self.encoder)
        V.init_beit_weights(self.lm_head)

    # ---- steps -------------------------------------------------------------------------------------------
    def mask(self, batch_size: int, device) -> torch.Tensor:
        """-> (B, N) bool, 1 = masked: BEiT's blockwise masking (at most `num_masked` patches)."""
        o = self.options
        return blockwise_masking(
            batch_size, self.grid, self.num_masked, o.min_block_patches, o.min_aspect, o.max_block_patches,
            device=device,
        )  # fmt: skip

    @torch.no_grad()
    def targets(self, tok_images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h*d, w*d) in [0, 1] -> (B, N) visual-token ids from the frozen tokenizer."""
        return self.tokenizer.encode(tok_images.float()).flatten(1)

    def encode(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, N) -> (B, N, D) patch tokens with masked patches seen as the mask token."""
        return V.encode_with_mask_token(self.encoder, imgs, mask, self.mask_token)[:, self.encoder.num_prefix_tokens :]

    def predict(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D), (B, N) -> (M, V) logits for the M masked patches of the batch."""
        return self.lm_head(tokens[mask])

    def loss(self, logits: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the masked positions: logits (M, V), their visual-token ids (M,) -> scalar."""
        return F.cross_entropy(logits.float(), masked_ids)

    # ---- contract ----------------------------------------------------------------------------------------
    def forward(self, batch: dict, mask: torch.Tensor | None = None):
        imgs = batch["image"]
        ids = self.targets(batch["tokens"])
        mask = self.mask(imgs.shape[0], imgs.device) if mask is None else mask
        logits = self.predict(self.encode(imgs, mask), mask)
        masked_ids = ids[mask]  # once: boolean indexing waits on the device
        loss = self.loss(logits, masked_ids)
        acc = (logits.detach().argmax(-1) == masked_ids).float().mean()
        return loss, {"loss": loss.detach(), "token_acc": acc}

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode
        return self

    def no_weight_decay(self) -> set[str]:
        """BEiT's: the class token and absolute position embedding only (besides every 1-D parameter); the mask
        token and the relative position tables are decayed, as in BEiT's pre-training (its no_weight_decay)."""
        return {"encoder.cls_token", "encoder.pos_embed"}

    @torch.no_grad()
    def visualize(self, batch: dict) -> torch.Tensor:
        """Rows of original | masked | image decoded from the tokens (original ids, predictions where masked)."""
        imgs = batch["image"]
        ids = self.targets(batch["tokens"])
        mask = self.mask(imgs.shape[0], imgs.device)
        pred = self.lm_head(self.encode(imgs, mask)).argmax(-1)
        mixed = torch.where(mask, pred, ids).view(-1, *self.grid)
        decoded = self.tokenizer.decode(mixed).float()
        decoded = F.interpolate(decoded, size=imgs.shape[-2:], mode="bilinear", align_corners=False)
        mean, std = self.image_stats
        decoded = (decoded - mean) / std  # into the encoder's normalised space, like the other panels
        pix = mask.view(-1, 1, *self.grid).float()
        pix = F.interpolate(pix, size=imgs.shape[-2:], mode="nearest")
        return torch.cat([imgs, imgs * (1 - pix), decoded], dim=3)

    @property
    def image_stats(self):
        m = torch.tensor(self._mean, device=self.lm_head.weight.device).view(1, 3, 1, 1)
        s = torch.tensor(self._std, device=self.lm_head.weight.device).view(1, 3, 1, 1)
        return m, s

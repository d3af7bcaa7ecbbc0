"""MAE-style light transformer decoder: visible tokens + mask tokens -> per-patch predictions."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..masking import gather_tokens
from .pos_embed import sincos_2d


class MaskedDecoder(nn.Module):
    """Embeds encoder tokens to `dim`, fills masked slots with a learned token, adds fixed sin-cos positions,
    runs `depth` blocks and predicts `out_dim` values per patch. Sized by the caller: MAE on ImageNet uses
    8x512, a ViT-Tiny at 32 px wants something like 4x192 (the 8x512 decoder would cost 8x the encoder)."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int], out_dim: int, num_prefix: int = 1
    ):
        super().__init__()
        self.num_prefix = num_prefix
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d(dim, grid, num_prefix=num_prefix).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """tokens (B, P + K, D_enc) from the encoder, ids_restore (B, N) -> predictions (B, N, out_dim)."""
        x = self.embed(tokens)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, k, d = visible.shape
        n = ids_restore.shape[1]
        filled = torch.cat([visible, self.mask_token.expand(b, n - k, d)], dim=1)
        filled = gather_tokens(filled, ids_restore)  # back to patch order
        x = torch.cat([prefix, filled], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix :])

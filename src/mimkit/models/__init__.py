"""Backbones and heads: timm encoders with a masked forward, decoders, position embeddings."""

"""Evaluation of encoders (not methods): frozen features, k-NN, linear probe."""

from __future__ import annotations

from .features import extract, pooled_features
from .knn import knn_accuracy
from .linear import linear_probe
from .protocols import PROTOCOLS, FeatureEval

__all__ = ["PROTOCOLS", "FeatureEval", "extract", "knn_accuracy", "linear_probe", "pooled_features"]

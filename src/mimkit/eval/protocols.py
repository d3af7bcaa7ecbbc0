"""One path from an encoder to its scores, shared by `mimkit eval`, `mimkit compare` and the k-NN monitor:
features of the labeled memory (train) and query (test) images extracted once per encoder, then k-NN (DINO's
weighted vote) and/or a linear probe (MAE's BN + linear) on them."""

from __future__ import annotations

from torch import nn

from ..config import DataConfig, EvalConfig
from ..data.folder import ImageSource
from .features import extract
from .knn import knn_accuracy
from .linear import linear_probe

PROTOCOLS = ("knn", "linear")


class FeatureEval:
    """Scores of encoders on one labeled split pair, at `image_size`, with `data`'s preprocessing and `ecfg`'s
    k-NN / linear settings (`eval.knn_k`, `eval.knn_temperature`, `eval.pool`, `eval.linear_epochs`)."""

    def __init__(self, memory: ImageSource, query: ImageSource, data: DataConfig, image_size: int, device,
                 ecfg: EvalConfig):  # fmt: skip
        self.memory, self.query, self.data, self.size, self.device, self.ecfg = memory, query, data, image_size, \
            device, ecfg  # fmt: skip
        self.num_classes = len(memory.classes)

    def features(self, encoder: nn.Module):
        """-> (memory feats, labels, query feats, labels), each extraction one pass in eval mode."""
        tr, ytr = extract(encoder, self.memory, self.data, self.size, self.device, self.ecfg.pool)
        te, yte = extract(encoder, self.query, self.data, self.size, self.device, self.ecfg.pool)
        return tr, ytr, te, yte

    def scores(self, encoder: nn.Module, protocols=PROTOCOLS, seed: int = 0) -> dict[str, dict]:
        """{protocol: result} for each of `protocols`, from one feature extraction."""
        feats = self.features(encoder)
        out = {}
        if "knn" in protocols:
            out["knn"] = knn_accuracy(*feats, self.num_classes, self.ecfg.knn_k, self.ecfg.knn_temperature)
        if "linear" in protocols:
            out["linear"] = linear_probe(*feats, self.num_classes, epochs=self.ecfg.linear_epochs, seed=seed)
        return out

    def knn(self, encoder: nn.Module) -> dict:
        return self.scores(encoder, ("knn",))["knn"]

"""Weighted k-NN classification on frozen features (DINO's protocol: cosine similarity, k=20, T=0.07)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """-> (M, num_classes) class scores: each of the top-k neighbours votes exp(sim / T) for its class."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test), chunk):
        sims = test[start : start + chunk] @ train.T
        top_sim, top_idx = sims.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, temperature=0.07) -> dict:
    scores = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top1 = (scores.argmax(1) == test_labels).float().mean().item()
    top5 = (scores.topk(min(5, num_classes), 1).indices == test_labels[:, None]).any(1).float().mean().item()
    return {
        "top1": top1,
        "top5": top5,
        "k": k,
        "temperature": temperature,
        "train_size": len(train_feats),
        "test_size": len(test_feats),
    }

import torch
import torch.nn.functional as F

from mimkit.eval import knn_accuracy, linear_probe
from mimkit.eval.knn import knn_classify


def test_knn_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g)
    test = torch.randn(7, 8, generator=g)
    scores = knn_classify(train, labels, test, 3, k=5, temperature=0.1)
    tn, qn = F.normalize(train, dim=1), F.normalize(test, dim=1)
    for i in range(7):
        sims = tn @ qn[i]
        top = sims.argsort(descending=True)[:5]
        expect = torch.zeros(3)
        for j in top:
            expect[labels[j]] += torch.exp(sims[j] / 0.1)
        torch.testing.assert_close(scores[i], expect, rtol=1e-5, atol=1e-5)


def test_knn_and_linear_separate_easy_classes():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + 0.5 * torch.randn(400, 16, generator=g)
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], 4)["top1"] > 0.95
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], 4, epochs=20)["top1"] > 0.95

"""bench/knn_loo.py's leave-one-out k-NN and paired difference, against plain loops."""

import importlib.util
import math
import sys
from pathlib import Path

import torch


def _module():
    path = Path(__file__).resolve().parents[1] / "bench" / "knn_loo.py"
    spec = importlib.util.spec_from_file_location("knn_loo_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # it imports compare_methods from bench/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_loo_predictions_match_a_plain_loop():
    knn = _module()
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 8, generator=gen)
    labels = torch.randint(0, 3, (40,), generator=gen)
    got = knn.loo_predictions(emb, labels, k=5)
    unit = emb / emb.norm(dim=-1, keepdim=True)
    for i in range(len(emb)):
        sims = [(float(unit[i] @ unit[j]), j) for j in range(len(emb)) if j != i]
        top = sorted(sims, reverse=True)[:5]
        votes = {}
        for s, j in top:
            c = int(labels[j])
            count, total = votes.get(c, (0, 0.0))
            votes[c] = (count + 1, total + s)
        want = max(votes, key=lambda c: votes[c])  # most votes, then the larger summed similarity
        assert int(got[i]) == want


def test_paired_difference_and_standard_error():
    knn = _module()
    dense = torch.tensor([True] * 8 + [False] * 2)
    pruned = torch.tensor([True] * 5 + [False] * 3 + [True, False])
    got = knn.paired(dense, pruned)
    assert (got["lost"], got["gained"]) == (3, 1)
    d = [0] * 5 + [-1] * 3 + [1, 0]
    mean = sum(d) / 10
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 10 / 10)
    assert math.isclose(got["diff_pt"], 100 * mean) and math.isclose(got["se_pt"], 100 * se)


def test_held_out_leaves_out_exactly_the_calibration_articles():
    from headslim.data import TextData

    knn = _module()
    every = TextData(["a", "b", "c", "d"], [0, 1, 0, 1], None, "t")
    calib = TextData(["d", "b"], [1, 1], None, "t")
    assert knn.held_out(every, calib).tolist() == [True, False, True, False]

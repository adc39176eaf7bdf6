"""Scorers: shape, determinism, and planted cases they must get right."""

import pytest
import torch

from headslim.errors import HeadslimError
from headslim.scoring import SCORERS, score_heads
from headslim.surgery import prune_heads
from headslim.plan import PrunePlan
from tests.conftest import HEADS, LAYERS, tiny_batches, tiny_model


STOCHASTIC = {"gradient", "fisher", "obs", "iterative", "learned", "random"}


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_shape_and_determinism(method):
    model = tiny_model("bert", "BertModel")
    a = score_heads(model, tiny_batches(), method=method, seed=3, progress=False)
    b = score_heads(model, tiny_batches(), method=method, seed=3, progress=False)
    c = score_heads(model, tiny_batches(), method=method, seed=4, progress=False)
    assert a.shape == (LAYERS, HEADS)
    assert torch.equal(a, b)
    if method in STOCHASTIC:  # the others are deterministic functions of model and data
        assert not torch.equal(a, c)


def _silence_head(model, layer, head, scale=0.0):
    dense = model.base_model.encoder.layer[layer].attention.output.dense
    d = dense.in_features // HEADS
    with torch.no_grad():
        dense.weight[:, head * d : (head + 1) * d] *= scale


@pytest.mark.parametrize("objective,model_class", [("dense", "BertModel"), ("task", "BertForSequenceClassification")])
def test_gradient_scores_a_silent_head_lowest(objective, model_class):
    model = tiny_model("bert", model_class)
    _silence_head(model, layer=1, head=2)
    scores = score_heads(model, tiny_batches(labels=objective == "task"), objective=objective, progress=False)
    assert scores[1, 2] == 0
    assert (scores.flatten().argsort()[: 1] == 1 * HEADS + 2).all()
    assert (scores[scores != scores[1, 2]] > 0).all()


def test_gradient_scores_the_head_that_carries_the_output_highest():
    model = tiny_model("bert", "BertModel")
    for h in range(HEADS):
        _silence_head(model, layer=2, head=h, scale=20.0 if h == 3 else 0.05)
    scores = score_heads(model, tiny_batches(), progress=False)
    assert scores[2].argmax() == 3


def test_scores_of_a_pruned_model_mark_missing_heads():
    model = prune_heads(tiny_model("bert", "BertModel"), PrunePlan([HEADS] * LAYERS, [[0], [0, 1, 2, 3], []]))
    for method in SCORERS:
        scores = score_heads(model, tiny_batches(), method=method, progress=False)
        assert torch.isinf(scores[0, 1:]).all() and torch.isinf(scores[2]).all()
        assert torch.isfinite(scores[1]).all() and torch.isfinite(scores[0, 0])


def test_task_objective_needs_labels_and_method_must_exist():
    model = tiny_model("bert", "BertForSequenceClassification")
    with pytest.raises(HeadslimError, match="needs labelled calibration data"):
        score_heads(model, tiny_batches(labels=False), objective="task", progress=False)
    with pytest.raises(HeadslimError, match="unknown scoring method 'nope'"):
        score_heads(model, tiny_batches(), method="nope")


def test_scoring_leaves_the_model_as_it_was():
    model = tiny_model("bert", "BertModel")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_heads(model, tiny_batches(), progress=False)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shrink_and_sweep_share_the_default_method():
    """shrink and sweep share one default method, with and without repair; an explicit one is kept."""
    from headslim.pipeline import ShrinkConfig
    from headslim.sweep import SweepConfig

    assert ShrinkConfig().method == "fisher" and ShrinkConfig(repair=False).method == "fisher"
    assert SweepConfig().method == "fisher" and SweepConfig(repair=False).method == "fisher"
    assert ShrinkConfig(method="gradient", repair=False).method == "gradient"

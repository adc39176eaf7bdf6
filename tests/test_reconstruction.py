"""Repair-aware OBS costs of heads and neurons (``headslim.scoring.reconstruction``) and the head price
fitted on held-out data (``headslim.tradeoff``), against plain PyTorch least squares."""

from __future__ import annotations

import copy

import pytest
import torch

from headslim.arch import get_adapter, weight_out_in
from headslim.errors import HeadslimError
from headslim.plan import PrunePlan
from headslim.scoring.common import merged_scores
from headslim.scoring.reconstruction import compensate, obs_sequence, score_obs_structures
from headslim.tradeoff import fit_exchange, heldout_objective, scaled, split_heldout
from tests.conftest import tiny_batches, tiny_model


def _refit_cost(sigma, metric, weight, removed_cols, lam):
    """1/2 tr(M E H E^T): the ridge re-fit of the kept columns towards ``weight``, solved directly."""
    n = sigma.shape[0]
    h = sigma + lam * torch.eye(n, dtype=torch.float64)
    r = torch.tensor(removed_cols, dtype=torch.long)
    k = torch.tensor([i for i in range(n) if i not in set(removed_cols)], dtype=torch.long)
    e = torch.zeros_like(weight)
    e[:, r] = weight[:, r]
    if len(k):
        e[:, k] = -weight[:, r] @ h[r][:, k] @ torch.linalg.inv(h[k][:, k])
    return 0.5 * float(torch.trace(metric @ e @ h @ e.T))


@pytest.mark.parametrize("group", [1, 3])
def test_sequence_costs_are_the_refit_error_of_every_prefix(group):
    gen = torch.Generator().manual_seed(0)
    n, d = 12, 5
    x = torch.randn(400, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen, dtype=torch.float64)
    x = x - x.mean(0)
    sigma = x.T @ x / len(x)
    weight = torch.randn(d, n, generator=gen, dtype=torch.float64)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    metric = a @ a.T
    seq = obs_sequence(sigma, metric, weight, group, ridge=1e-2)
    assert sorted(i for i, _ in seq) == list(range(n // group))
    lam = 1e-2 * float(sigma.diagonal().mean()) + 1e-12
    total, removed = 0.0, []
    for j, cost in seq:
        total += cost
        removed += list(range(j * group, (j + 1) * group))
        assert total == pytest.approx(_refit_cost(sigma, metric, weight, removed, lam), rel=1e-6)
    # greedy: the first removal is the cheapest single one
    singles = [_refit_cost(sigma, metric, weight, list(range(g * group, (g + 1) * group)), lam) for g in range(n // group)]
    assert seq[0][1] == pytest.approx(min(singles), rel=1e-6)


def test_a_duplicated_neuron_is_free_after_the_refit():
    """Planted redundancy: neuron 5 is a copy of neuron 3. Removing either costs nothing once the other
    takes over its down-projection column, so obs removes one first (magnitude cannot see this)."""
    model = tiny_model("bert", "BertModel")
    inter = model.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        inter.weight[5] = inter.weight[3]
        inter.bias[5] = inter.bias[3]
    result = score_obs_structures(model, tiny_batches(4), progress=False, ridge=1e-6)
    seq = result["sequences"]["mlp"][0]
    assert seq[0][0] in (3, 5)
    assert seq[0][1] < 1e-3 * seq[1][1]
    assert float(result["mlp"][0, seq[0][0]]) == float(result["mlp"].min())  # first of the whole path


def test_compensation_is_the_least_squares_refit():
    """``compensate`` folds into the kept heads of O exactly what ordinary least squares (with an
    intercept) fits to the dense output from the kept inputs, on the calibration tokens."""
    model = tiny_model("bert", "BertModel")
    batches = tiny_batches(4)
    adapter = get_adapter(model)
    o = adapter.o_proj(adapter.attention_blocks(model)[1])
    xs = []
    handle = o.register_forward_hook(lambda m, a, out: xs.append(a[0].detach()))
    result = score_obs_structures(model, batches, progress=False, ridge=0.0)
    handle.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    x = torch.cat([c[m] for c, m in zip(xs, masks)]).double()  # (N, p) real tokens
    w, b = weight_out_in(o).detach().double(), o.bias.detach().double()
    target = x @ w.T + b
    heads = adapter.num_heads(model)
    kept = [list(range(n)) for n in heads]
    kept[1] = [0, 2]
    plan = PrunePlan(heads, kept)
    cols = torch.tensor([h * 8 + i for h in kept[1] for i in range(8)])
    design = torch.cat([x[:, cols], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution  # (K + 1, d)
    fitted = copy.deepcopy(model)
    compensate(fitted, plan, result["moments"])
    o2 = get_adapter(fitted).o_proj(get_adapter(fitted).attention_blocks(fitted)[1])
    torch.testing.assert_close(weight_out_in(o2).detach().double()[:, cols], solution[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o2.bias.detach().double(), solution[-1], rtol=1e-4, atol=1e-5)


def test_merge_takes_the_cheapest_next_removal_and_keeps_floors():
    seqs = [[(1, 0.1), (0, 5.0)], [(2, 0.2), (0, 0.3), (1, 0.4)]]
    scores = merged_scores(seqs, [2, 3], min_per_layer=1)
    # phase 1 (down to 1 each): (0,1) 0.1, (1,2) 0.2, (1,0) 0.3; phase 2: (1,1) 0.4? no: layer 1 is at its floor
    # after two removals, so the floor phase ends there and the rest follows by cost: (0,0) 5.0 vs (1,1) 0.4
    assert scores[0, 1] == 0 and scores[1, 2] == 1 and scores[1, 0] == 2 and scores[1, 1] == 3 and scores[0, 0] == 4


def test_fit_exchange_picks_the_lowest_heldout_objective():
    model = tiny_model("bert", "BertModel")
    fit, held, in_sample = split_heldout(tiny_batches(8))
    assert len(fit) == 6 and len(held) == 2 and not in_sample
    result = score_obs_structures(model, fit, progress=False)
    heads, neurons = get_adapter(model).num_heads(model), get_adapter(model).num_neurons(model)
    plans = {1.0: PrunePlan(heads, [[0], *[list(range(n)) for n in heads[1:]]], num_neurons=neurons,
                            kept_neurons=[list(range(n)) for n in neurons]),
             2.0: PrunePlan(heads, [list(range(n)) for n in heads], num_neurons=neurons,
                            kept_neurons=[list(range(neurons[0] // 2)), *[list(range(n)) for n in neurons[1:]]])}

    def plan_for(alpha):
        if alpha not in plans:
            raise HeadslimError("unreachable")
        return plans[alpha]

    alpha, trials = fit_exchange(model, result["moments"], plan_for, held, grid=(1.0, 2.0, 3.0))
    assert [t["alpha"] for t in trials] == [1.0, 2.0]
    # the judge is the embedding the model delivers: 1 - mean pooled cosine to dense, computed plainly
    from headslim.quality import pool
    from headslim.scoring.reconstruction import compensate
    from headslim.surgery import prune_heads

    def plain(plan):
        trial = prune_heads(compensate_copy(model, plan, result["moments"]), plan)
        with torch.no_grad():
            cos = torch.cat([torch.nn.functional.cosine_similarity(
                pool(model(**b).last_hidden_state, b["attention_mask"]).double(),
                pool(trial(**b).last_hidden_state, b["attention_mask"]).double(), dim=-1) for b in held])
        return 1.0 - float(cos.mean())

    def compensate_copy(m, plan, moments):
        m = copy.deepcopy(m)
        compensate(m, plan, moments)
        return m

    direct = {a: plain(p) for a, p in plans.items()}
    assert alpha == min(direct, key=direct.get)
    assert [t["metric"] for t in trials] == ["cosine", "cosine"]
    assert [t["objective"] for t in trials] == [pytest.approx(direct[1.0], rel=1e-4, abs=1e-9),
                                                pytest.approx(direct[2.0], rel=1e-4, abs=1e-9)]
    assert heldout_objective(model, plans[1.0], result["moments"], held, "dense") == ("cosine", pytest.approx(direct[1.0], rel=1e-5))
    # the judge is the dense model's own: an empty plan costs nothing
    full = PrunePlan(heads, [list(range(n)) for n in heads], num_neurons=neurons, kept_neurons=[list(range(n)) for n in neurons])
    assert heldout_objective(model, full, result["moments"], held, "dense")[1] == pytest.approx(0.0, abs=1e-6)
    # no price gives a plan: the budget's own reason reaches the user, not a generic one
    with pytest.raises(HeadslimError, match="^unreachable$"):
        fit_exchange(model, result["moments"], plan_for, held, grid=(3.0, 4.0))


def test_scaled_prices_only_heads():
    seqs = {"attention": [[(0, 1.0)]], "mlp": [[(0, 1.0)]]}
    assert scaled(seqs, 4.0) == {"attention": [[(0, 4.0)]], "mlp": [[(0, 1.0)]]}

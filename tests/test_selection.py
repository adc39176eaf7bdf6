"""Selection of heads from scores, and plan validation."""

import pytest
import torch

from headslim.errors import HeadslimError
from headslim.plan import PrunePlan
from headslim.selection import heads_to_prune, select_heads


def test_global_ranking_respects_the_per_layer_minimum():
    scores = torch.tensor([[9.0, 8, 7, 6], [0.1, 0.2, 0.3, 0.4], [5, 4, 3, 2]])
    plan = select_heads(scores, [4, 4, 4], prune=6, min_per_layer=1)
    assert plan.kept_heads == [[0, 1, 2, 3], [3], [0]]
    plan0 = select_heads(scores, [4, 4, 4], prune=6, min_per_layer=0)
    assert plan0.kept_heads == [[0, 1, 2, 3], [], [0, 1]]


def test_fraction_and_count():
    scores = torch.rand(6, 12, generator=torch.Generator().manual_seed(0))
    assert sum(select_heads(scores, [12] * 6, prune=0.5).heads_after) == 36
    assert sum(select_heads(scores, [12] * 6, prune=10).heads_after) == 62
    assert heads_to_prune(0.25, 72) == 18


@pytest.mark.parametrize("prune,match", [(0.0, "outside"), (1.0, "outside"), (1.5, "outside"),
                                         (73, "the model has 72 heads"), (0, "removes no head: give a head count from 1 to 72")])
def test_bad_targets(prune, match):
    with pytest.raises(HeadslimError, match=match):
        heads_to_prune(prune, 72)


def test_target_incompatible_with_minimum():
    with pytest.raises(HeadslimError, match="at most 66 can go"):
        select_heads(torch.rand(6, 12), [12] * 6, prune=70, min_per_layer=1)


def test_plan_validation():
    with pytest.raises(HeadslimError, match="layer 1 keeps head 4 but that layer has 4 heads"):
        PrunePlan([4, 4], [[0], [4]])
    with pytest.raises(HeadslimError, match="2 layers of kept heads but the model has 3"):
        PrunePlan([4, 4, 4], [[0], [1]])
    with pytest.raises(HeadslimError, match="lists a head twice"):
        PrunePlan([4], [[1, 1]])


def test_hand_written_plans():
    plan = PrunePlan.from_user({"kept_heads": {"1": [0, 2]}}, [4, 4])
    assert plan.kept_heads == [[0, 1, 2, 3], [0, 2]]
    with pytest.raises(HeadslimError, match="layer 7 does not exist"):
        PrunePlan.from_user({"kept_heads": {"7": [0]}}, [4, 4])
    with pytest.raises(HeadslimError, match="keeps head 9"):
        PrunePlan.from_user({"kept_heads": [[9], [0]]}, [4, 4])


def test_plan_json_round_trip(tmp_path):
    plan = PrunePlan([4, 4], [[3, 0], []], {"method": "gradient", "scores": [[1.0, None]]})
    plan.save(tmp_path / "p.json")
    again = PrunePlan.load(tmp_path / "p.json")
    assert again == PrunePlan([4, 4], [[0, 3], []], {"method": "gradient", "scores": [[1.0, None]]})
    assert again.pruned_heads == {0: [1, 2], 1: [0, 1, 2, 3]}
    assert again.mask().tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]


def test_split_params_takes_the_cheapest_per_parameter_over_both_kinds_and_caps_at_the_floors():
    from headslim.selection import split_params

    heads = torch.tensor([[1.0, 9.0, 0.5], [4.0, 2.0, 0.0]])  # the second layer has 2 heads (padding ignored)
    neurons = torch.tensor([[2.0, 3.0, 8.0, 1.0], [6.0, 0.1, 7.0, 5.0]])
    kw = dict(head_params=[4.0, 4.0], neuron_params=[1.0, 1.0])
    # per parameter: heads .25 2.25 .125 | 1 .5; neurons 2 3 8 1 | 6 .1 7 5 (total 5 * 4 + 8 = 28 parameters)
    # cheapest first: n(1,1) .1, h(0,2) .125, h(0,0) .25, h(1,1) .5, h(1,0) 1, n(0,3) 1, n(0,0) 2, ...
    assert split_params(heads, neurons, [3, 2], [4, 4], fraction=0.1, min_heads_per_layer=0, **kw) == (1, 1)
    # cumulative parameters in that order: 1 5 9 13 17 18 19 23 ...
    assert split_params(heads, neurons, [3, 2], [4, 4], fraction=0.5, min_heads_per_layer=0, **kw) == (4, 1)  # 14
    assert split_params(heads, neurons, [3, 2], [4, 4], fraction=0.7, min_heads_per_layer=0, **kw) == (5, 3)  # 19.6
    # one head per layer must stay: 3 heads at most, the neurons take the rest: 12 + 5 neurons >= 16.8
    assert split_params(heads, neurons, [3, 2], [4, 4], fraction=0.6, min_heads_per_layer=1, **kw) == (3, 5)
    assert split_params(heads, neurons, [3, 2], [4, 4], fraction=0.99, min_heads_per_layer=1, **kw) == (3, 8)  # all
    for bad in (0, 1.0, -0.2, True, "0.3"):
        with pytest.raises(HeadslimError, match="--prune-params must be a fraction in"):
            split_params(heads, neurons, [3, 2], [4, 4], fraction=bad, **kw)

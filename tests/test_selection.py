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

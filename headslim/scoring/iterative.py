"""``iterative``: remove a small share of heads, re-score the pruned model, repeat (Michel et al. 2019).

Works on top of any other scorer (``base``, default ``gradient``; the method name ``iterative:fisher``
picks ``fisher``). Each round physically prunes a copy of the model to the heads still kept,
re-scores it with the base scorer against the *dense* model's outputs (so first- and second-order
scorers see the damage done so far: ``reference``), and removes the ``step`` share of all heads that
score lowest, keeping ``min_per_layer`` per layer, until ``prune`` heads are gone.

The result is an elimination path, so it is consistent with the plan: a removed head scores its
position in the removal order; a head still kept at the end scores above every removed one, ranked
by the last round's scores. Keeping the top-k therefore gives exactly the path's plan for every
``k`` down to the target (with the same ``min_per_layer``), and one run at 70 % also answers 30 %
and 50 % (the rounds are the same).
"""

from __future__ import annotations

import copy

import torch

from headslim.errors import HeadslimError
from headslim.plan import PrunePlan, heads_to_prune
from headslim.scoring.common import SCORERS, dense_reference, finish, head_counts
from headslim.surgery import prune_heads


def score_iterative(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                    base: str = "gradient", prune: float | int = 0.5, step: float = 0.1,
                    min_per_layer: int = 1, **options) -> torch.Tensor:
    """Iterative pruning path ``(layers, max_heads)``; see the module docstring.

    Args:
        model, batches, objective, seed, progress: as for every scorer (``headslim.scoring``).
        base: the scorer run every round (any name in ``SCORERS`` but ``iterative`` / ``learned``).
        prune: where the path stops: fraction (float) or number (int) of all heads to remove.
        step: share of all heads removed per round (Michel et al.: 10 %).
        min_per_layer: heads every layer keeps.
        options: passed on to the base scorer.

    Example:
        >>> scores = score_iterative(model, calib_batches, prune=0.5, base="gradient")   # doctest: +SKIP
    """
    if base not in SCORERS or base in ("iterative", "learned"):
        raise HeadslimError(f"iterative needs a one-shot base scorer, not {base!r}")
    if not 0.0 < step <= 1.0:
        raise HeadslimError(f"iterative step must be in (0, 1], not {step}")
    heads = head_counts(model)
    total, width = sum(heads), max(heads)
    floor = sum(min(min_per_layer, n) for n in heads)
    target = min(heads_to_prune(prune, total), total - floor)
    per_round = max(1, round(step * total))
    reference = dense_reference(model, batches, objective)
    mask = torch.ones(len(heads), width)
    order: list[tuple[int, int]] = []
    last = None
    rounds = 0
    while True:
        kept = [[h for h in range(n) if mask[layer, h] > 0] for layer, n in enumerate(heads)]
        plan = PrunePlan(heads, kept)
        pruned = prune_heads(copy.deepcopy(model), plan) if plan.pruned_heads else model
        sub = SCORERS[base](pruned, batches, objective=objective, seed=seed + rounds, progress=progress,
                            reference=reference, min_per_layer=min_per_layer, **options)
        last = torch.full((len(heads), width), float("-inf"))
        for layer, ks in enumerate(kept):
            last[layer, ks] = sub[layer, : len(ks)]
        rounds += 1
        if len(order) >= target:
            break
        count = [len(k) for k in kept]
        ranked = sorted(((float(last[layer, h]), layer, h) for layer, ks in enumerate(kept) for h in ks))
        removed_now, quota = 0, min(per_round, target - len(order))
        for _, layer, h in ranked:
            if removed_now == quota:
                break
            if count[layer] <= min_per_layer:
                continue
            mask[layer, h] = 0.0
            count[layer] -= 1
            order.append((layer, h))
            removed_now += 1
    scores = torch.zeros(len(heads), width)
    for pos, (layer, h) in enumerate(order):
        scores[layer, h] = float(pos)
    survivors = sorted((float(last[layer, h]), layer, h) for layer in range(len(heads)) for h in range(heads[layer])
                       if mask[layer, h] > 0)
    for rank, (_, layer, h) in enumerate(survivors):
        scores[layer, h] = float(len(order) + rank)
    return finish(scores, heads)

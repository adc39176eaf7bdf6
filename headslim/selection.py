"""Selection: turn head scores into a PrunePlan for a global target with a per-layer minimum."""

from __future__ import annotations

import torch

from headslim.errors import HeadslimError
from headslim.gqa import select_gqa
from headslim.plan import PrunePlan, heads_to_prune


def select_heads(scores: torch.Tensor, num_heads: list[int], *, prune: float | int,
                 min_per_layer: int = 1, provenance: dict | None = None) -> PrunePlan:
    """Keep the highest-scoring heads globally, at least ``min_per_layer`` in every layer.

    Args:
        scores: ``(layers, max_heads)``, higher = more important.
        num_heads: heads per layer.
        prune: fraction (float in (0, 1)) or number (int) of heads to remove.
        min_per_layer: heads every layer keeps (0 allows removing a whole attention block).

    Example:
        >>> plan = select_heads(torch.rand(6, 12), [12] * 6, prune=0.5)
        >>> sum(plan.heads_after)
        36
    """
    total = sum(num_heads)
    n_prune = heads_to_prune(prune, total)
    if min_per_layer < 0:
        raise HeadslimError("--min-heads-per-layer must be >= 0")
    floor = sum(min(min_per_layer, n) for n in num_heads)
    n_keep = total - n_prune
    if n_keep < floor:
        raise HeadslimError(
            f"cannot remove {n_prune} of {total} heads while keeping {min_per_layer} per layer: "
            f"at most {total - floor} can go"
        )
    ranked = {}
    for layer, n in enumerate(num_heads):
        order = sorted(range(n), key=lambda h: (-float(scores[layer, h]), h))
        ranked[layer] = order
    kept = {layer: set(order[:min_per_layer]) for layer, order in ranked.items()}
    rest = [(-float(scores[layer, h]), layer, h) for layer, order in ranked.items() for h in order[min_per_layer:]]
    for _, layer, h in sorted(rest)[: n_keep - sum(len(k) for k in kept.values())]:
        kept[layer].add(h)
    return PrunePlan(num_heads, [sorted(kept[layer]) for layer in range(len(num_heads))], provenance or {})


def select_neurons(scores: torch.Tensor, widths: list[int], *, prune: float | int,
                   min_per_layer: int = 0) -> list[list[int]]:
    """Kept FFN neurons per layer: the highest scores globally, at least ``min_per_layer`` each.

    ``prune`` is a fraction of all neurons (float in (0, 1)) or a neuron count (int); 0 keeps them all.

    Example:
        >>> [len(k) for k in select_neurons(torch.rand(2, 8), [8, 8], prune=0.25)]   # doctest: +SKIP
        [6, 6]
    """
    total = sum(widths)
    if isinstance(prune, bool) or not isinstance(prune, (int, float)):
        raise HeadslimError(f"--prune-ffn must be a fraction in [0, 1) or a neuron count, not {prune!r}")
    n_prune = int(round(prune * total)) if isinstance(prune, float) else prune
    if not 0 <= n_prune <= total or (isinstance(prune, float) and not 0.0 <= prune < 1.0):
        raise HeadslimError(f"--prune-ffn {prune}: the model has {total} FFN neurons")
    floor = sum(min(min_per_layer, n) for n in widths)
    if total - n_prune < floor:
        raise HeadslimError(f"cannot remove {n_prune} of {total} FFN neurons while keeping {min_per_layer} per layer")
    kept = {layer: set(sorted(range(n), key=lambda i: (-float(scores[layer, i]), i))[:min_per_layer])
            for layer, n in enumerate(widths)}
    rest = sorted((-float(scores[layer, i]), layer, i) for layer, n in enumerate(widths) for i in range(n)
                  if i not in kept[layer])
    for _, layer, i in rest[: total - n_prune - sum(len(k) for k in kept.values())]:
        kept[layer].add(i)
    return [sorted(kept[layer]) for layer in range(len(widths))]


def select_plan(scores: torch.Tensor | None, num_heads: list[int], *, prune: float | int, min_per_layer: int = 1,
                kv_head_of_q: list[list[int]] | None = None, gqa: str = "uniform",
                neuron_scores: torch.Tensor | None = None, num_neurons: list[int] | None = None,
                prune_ffn: float | int | None = None, min_neurons_per_layer: int = 0,
                provenance: dict | None = None) -> PrunePlan:
    """The plan for one target from scores already computed: the selection ``shrink`` and ``sweep`` share.

    Heads: ``prune`` of them go (0 keeps every head; ``scores`` may then be None), chosen by
    :func:`headslim.gqa.select_gqa` in mode ``gqa`` when ``kv_head_of_q`` is given (pass it for
    grouped-query models only), else by :func:`select_heads`. FFN neurons: with ``prune_ffn`` (not
    None), :func:`select_neurons` on ``neuron_scores`` over ``num_neurons``. Nothing is scored here,
    so one scoring pass can serve many targets.

    Args:
        provenance: becomes the plan's provenance (``select_gqa`` adds ``gqa`` and, when a fraction
            was rounded to a feasible count, ``heads_requested`` / ``heads_removed``); not modified.

    Example:
        >>> plan = select_plan(torch.rand(2, 4), [4, 4], prune=2, neuron_scores=torch.rand(2, 8),
        ...                    num_neurons=[8, 8], prune_ffn=0.25)
        >>> sum(plan.heads_after), sum(plan.neurons_after)
        (6, 12)
    """
    provenance = provenance if provenance is not None else {}
    if prune != 0 and kv_head_of_q is not None:
        plan = select_gqa(scores, kv_head_of_q, prune=prune, mode=gqa, min_per_layer=min_per_layer,
                          provenance=provenance)
    elif prune != 0:
        plan = select_heads(scores, num_heads, prune=prune, min_per_layer=min_per_layer, provenance=provenance)
    else:
        plan = PrunePlan(num_heads, [list(range(n)) for n in num_heads], provenance, kv_head_of_q=kv_head_of_q)
    if prune_ffn is None:
        return plan
    if neuron_scores is None or num_neurons is None:
        raise HeadslimError("pruning FFN neurons needs their scores and the FFN width of every layer")
    kept = select_neurons(neuron_scores, num_neurons, prune=prune_ffn, min_per_layer=min_neurons_per_layer)
    return PrunePlan(plan.num_heads, plan.kept_heads, plan.provenance, plan.kv_head_of_q, plan.kept_kv_heads,
                     num_neurons, kept)


def split_params(head_costs: torch.Tensor, neuron_costs: torch.Tensor, num_heads: list[int], widths: list[int], *,
                 fraction: float, head_params: list[float], neuron_params: list[float], min_heads_per_layer: int = 1,
                 min_neurons_per_layer: int = 0) -> tuple[int, int]:
    """One budget for heads and FFN neurons: ``(heads, neurons)`` to remove so that ``fraction`` of the
    parameters they hold goes, taking the cheapest first by estimated cost per parameter over both
    kinds and every layer (``head_costs`` ``(layers, max heads)`` and ``neuron_costs`` ``(layers, max
    width)`` in one unit, e.g. the function norms of their outputs; ``head_params[l]``,
    ``neuron_params[l]``: what one structure of layer ``l`` holds). The counts are then chosen per kind
    by :func:`select_plan` (its per-layer floors and GQA modes); a kind is capped at what those floors
    leave removable, the other then takes the rest of the budget (all of both when it is too large).

    Example:
        >>> split_params(torch.tensor([[1.0, 9.0]]), torch.tensor([[2.0, 3.0, 8.0]]), [2], [3], fraction=0.5,
        ...              head_params=[4.0], neuron_params=[2.0], min_heads_per_layer=0)
        (1, 2)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise HeadslimError(f"--prune-params must be a fraction in (0, 1), not {fraction!r}")
    ratios, sizes, kinds = [], [], []
    for kind, (costs, counts, params) in enumerate(((head_costs, num_heads, head_params),
                                                     (neuron_costs, widths, neuron_params))):
        for layer, n in enumerate(counts):
            ratios.append(costs[layer, :n].double().clamp_min(0.0) / params[layer])
            sizes.append(torch.full((n,), float(params[layer]), dtype=torch.float64))
            kinds.append(torch.full((n,), kind))
    ratio, size, kind = torch.cat(ratios), torch.cat(sizes), torch.cat(kinds)
    caps = torch.tensor([sum(max(n - min_heads_per_layer, 0) for n in num_heads),
                         sum(max(w - min_neurons_per_layer, 0) for w in widths)])
    order = torch.argsort(ratio, stable=True)
    ranked = kind[order]
    rank = torch.zeros_like(ranked)  # each item's place among its own kind's, cheapest first
    for k in (0, 1):
        rank[ranked == k] = torch.arange(int((ranked == k).sum()))
    order = order[rank < caps[ranked]]  # a kind at its cap leaves the rest of the budget to the other
    taken = int(torch.searchsorted(torch.cumsum(size[order], 0), fraction * float(size.sum()))) + 1
    chosen = kind[order[:taken]]
    return int((chosen == 0).sum()), int((chosen == 1).sum())

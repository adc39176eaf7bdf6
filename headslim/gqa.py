"""GQA-aware selection: turn head scores into a PrunePlan that respects grouped-query attention.

In grouped-query attention (Llama, Mistral, Qwen2/3) several query heads read one KV head. Three
modes decide which sets of query heads a layer may keep:

``uniform`` (default)
    Every KV head the layer keeps serves the same number ``k`` of query heads (a layer keeps ``m``
    KV heads × ``k``; removing a KV head removes its group). The result is ordinary GQA, so SDPA,
    FlashAttention and ORT's GroupQueryAttention run it unchanged. It is the default because the
    speed-up is real on every backend, while still choosing heads inside groups.
``kv-groups``
    Remove whole KV heads with all their query heads (what Torch-Pruning can express).
``ragged``
    Any subset of query heads; each KV head keeps its own number; KV heads left with no query head
    are removed. Best quality per removed head; needs the ragged attention path
    (``headslim.arch.ragged``, or the Triton kernels on GPU).

For multi-head attention (GPT-2, BERT: one query head per KV head) the three modes coincide.

Selection minimises the summed score of the removed heads under the mode's constraint, for an
exact global count, with a small dynamic programme over layers (each layer offers its cheapest
kept set for every feasible kept count).
"""

from __future__ import annotations

import torch

from headslim.errors import HeadslimError
from headslim.plan import PrunePlan, heads_to_prune

GQA_MODES = ("uniform", "kv-groups", "ragged")
DEFAULT_GQA = "uniform"


def _groups(kv_map: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for q, kv in enumerate(kv_map):
        groups.setdefault(kv, []).append(q)
    return groups


def _ragged_options(scores: list[float], kv_map: list[int]) -> dict[int, tuple[float, list[int]]]:
    order = sorted(range(len(scores)), key=lambda h: (-scores[h], h))
    removed = [0.0] * (len(order) + 1)  # removed[c] = summed score of all but the best c
    for c in reversed(range(len(order))):
        removed[c] = removed[c + 1] + scores[order[c]]
    return {c: (removed[c], sorted(order[:c])) for c in range(len(scores) + 1)}


def _kv_group_options(scores: list[float], kv_map: list[int]) -> dict[int, tuple[float, list[int]]]:
    # groups may differ in size once a model has been pruned raggedly: a 0/1 knapsack over groups
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for heads in _groups(kv_map).values():
        removed = sum(scores[h] for h in heads)
        nxt: dict[int, tuple[float, list[int]]] = {}
        for count, (cost, kept) in best.items():
            for c, option in ((count, (cost + removed, kept)), (count + len(heads), (cost, kept + heads))):
                if c not in nxt or option[0] < nxt[c][0]:
                    nxt[c] = option
        best = nxt
    return {c: (cost, sorted(kept)) for c, (cost, kept) in best.items()}


def _uniform_options(scores: list[float], kv_map: list[int]) -> dict[int, tuple[float, list[int]]]:
    total = sum(scores)
    groups = [sorted(heads, key=lambda h: (-scores[h], h)) for heads in _groups(kv_map).values()]
    best: dict[int, tuple[float, list[int]]] = {0: (total, [])}
    for k in range(1, max(len(g) for g in groups) + 1):
        # groups that can serve k query heads, best first by the score their top k keep
        ranked = sorted((g for g in groups if len(g) >= k), key=lambda g: -sum(scores[h] for h in g[:k]))
        for m in range(1, len(ranked) + 1):
            kept = [h for g in ranked[:m] for h in g[:k]]
            cost = total - sum(scores[h] for h in kept)
            if m * k not in best or cost < best[m * k][0]:
                best[m * k] = (cost, sorted(kept))
    return best


_OPTIONS = {"ragged": _ragged_options, "kv-groups": _kv_group_options, "uniform": _uniform_options}


def select_gqa(scores: torch.Tensor, kv_head_of_q: list[list[int]], *, prune: float | int, mode: str = DEFAULT_GQA,
               min_per_layer: int = 1, provenance: dict | None = None) -> PrunePlan:
    """Keep the heads that matter most while every layer stays feasible for ``mode``.

    Args:
        scores: ``(layers, max_heads)``, higher = more important (``score_heads`` output).
        kv_head_of_q: per layer, the KV head of each current query head (non-decreasing), e.g.
            ``headslim.arch.kv_maps(model)``; its lengths are the heads per layer.
        prune: fraction (float in (0, 1)) or number (int) of query heads to remove. A count the mode
            cannot meet exactly is an error naming the nearest feasible counts; a fraction is
            rounded to the nearest feasible count (recorded in the plan's provenance).
        mode: ``uniform``, ``kv-groups`` or ``ragged`` (see the module docstring).
        min_per_layer: query heads every layer keeps at least (0 allows removing a whole block).
        provenance: merged into the plan's provenance.

    Returns:
        A :class:`PrunePlan` carrying ``kv_head_of_q`` (so it also lists the KV heads kept).

    Example:
        >>> maps = [[0, 0, 1, 1]] * 2
        >>> plan = select_gqa(torch.tensor([[4., 3, 2, 1], [1, 2, 3, 4]]), maps, prune=4, mode="uniform")
        >>> plan.kept_heads            # each layer keeps its best KV head with both its query heads
        [[0, 1], [2, 3]]
    """
    if mode not in _OPTIONS:
        raise HeadslimError(f"unknown --gqa mode {mode!r}; available: {', '.join(GQA_MODES)}")
    if min_per_layer < 0:
        raise HeadslimError("--min-heads-per-layer must be >= 0")
    num_heads = [len(m) for m in kv_head_of_q]
    if scores.dim() != 2 or scores.shape[0] != len(num_heads) or scores.shape[1] < max(num_heads):
        raise HeadslimError(
            f"scores must have shape ({len(num_heads)}, >= {max(num_heads)}), got {tuple(scores.shape)}"
        )
    total = sum(num_heads)
    wanted = heads_to_prune(prune, total)

    # options[l][kept count] = (summed score of the removed heads, kept heads)
    options = []
    for layer, (n, kv_map) in enumerate(zip(num_heads, kv_head_of_q)):
        row = [float(s) for s in scores[layer, :n]]
        floor = min(min_per_layer, n)
        options.append({c: o for c, o in _OPTIONS[mode](row, kv_map).items() if c >= floor})

    # cost[r] = least summed removed score over the layers so far with r heads removed
    inf = float("inf")
    cost = torch.full((total + 1,), inf, dtype=torch.float64)
    cost[0] = 0.0
    choices = []
    for n, opts in zip(num_heads, options):
        new = torch.full_like(cost, inf)
        pick = torch.full((total + 1,), -1, dtype=torch.long)
        for kept_count, (c, _) in sorted(opts.items(), reverse=True):
            r = n - kept_count
            cand = torch.full_like(cost, inf)
            cand[r:] = cost[: total + 1 - r] + c
            better = cand < new
            new = torch.where(better, cand, new)
            pick[better] = kept_count
        cost = new
        choices.append(pick)

    feasible = [r for r in range(total + 1) if cost[r] < inf]
    n_prune = wanted
    if cost[wanted] == inf:
        below = max((r for r in feasible if r < wanted), default=None)
        above = min((r for r in feasible if r > wanted), default=None)
        nearest = " and ".join(str(r) for r in (below, above) if r is not None)
        if isinstance(prune, int) or not feasible:
            raise HeadslimError(
                f"--gqa {mode} cannot remove exactly {wanted} of {total} heads (min {min_per_layer} per layer): "
                f"nearest feasible counts are {nearest}"
            )
        n_prune = min((r for r in (below, above) if r is not None), key=lambda r: (abs(r - wanted), r))

    kept_heads: list[list[int]] = [[] for _ in num_heads]
    r = n_prune
    for layer in reversed(range(len(num_heads))):
        kept_count = int(choices[layer][r])
        kept_heads[layer] = options[layer][kept_count][1]
        r -= num_heads[layer] - kept_count
    info = {"gqa": mode}
    if n_prune != wanted:
        info.update(heads_requested=wanted, heads_removed=n_prune)
    return PrunePlan(num_heads, kept_heads, {**(provenance or {}), **info},
                     kv_head_of_q=[list(m) for m in kv_head_of_q])


def feasible_counts(kv_head_of_q: list[list[int]], *, mode: str = DEFAULT_GQA, min_per_layer: int = 1) -> list[int]:
    """Numbers of query heads ``mode`` can remove exactly (for messages and sweeps).

    Example:
        >>> feasible_counts([[0, 0, 1, 1]] * 2, mode="kv-groups")   # each layer keeps >= 1 head
        [0, 2, 4]
    """
    sets = [{0}]
    for kv_map in kv_head_of_q:
        n = len(kv_map)
        removals = {n - c for c in _OPTIONS[mode]([0.0] * n, kv_map) if c >= min(min_per_layer, n)}
        sets.append({a + b for a in sets[-1] for b in removals})
    return sorted(sets[-1])

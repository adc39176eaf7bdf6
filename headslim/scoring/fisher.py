"""``fisher``: Kwon et al. 2022's empirical-Fisher importance and a mask search with interactions.

Each batch gives gate gradients ``g`` with ``E[g g^T] = F`` (the empirical Fisher of the task loss,
or, label-free, the Fisher of the model's own predictions / the Gauss-Newton matrix of its hidden
states; see ``common.probe``). Removing the set ``R`` of heads costs, to second order,
``1/2 r^T F r - r^T grad`` (``r`` = indicator of ``R``; ``grad`` = 0 at the dense point for the
label-free objective). A sum of single scores keeps only ``diag(F)``; like Kwon et al.'s mask
rearrangement we keep the block of ``F`` within each layer (``interactions="layer"``; ``"full"``
also keeps the blocks between layers, ``"none"`` is the diagonal) and remove heads greedily, each
time the one whose removal adds least to the cost given those already removed.

The result is an elimination path: the score of a head is its position in the removal order (the
first removed scores 0), so keeping the top-k scores is exactly the greedy mask for every k. The
path keeps ``min_per_layer`` heads in every layer until every layer is down to that many.
"""

from __future__ import annotations

import torch

from headslim.distributed import all_sum
from headslim.errors import HeadslimError
from headslim.scoring.common import check_nonempty, finish, gate_gradients, head_counts

INTERACTIONS = ("layer", "full", "none")
DIAGONALS = ("fisher", "exact")


def greedy_path(curv: torch.Tensor, grad: torch.Tensor, heads: list[int], alive: torch.Tensor,
                min_per_layer: int = 1) -> list[tuple[int, int]]:
    """Greedy removal order minimising ``1/2 r^T C r - r^T grad`` over indicators ``r``.

    Args:
        curv: ``(N, N)`` curvature over flattened ``(layer, head)`` slots, ``N = layers * max_heads``.
        grad: ``(N,)`` first-order term.
        heads: heads per layer; ``alive``: ``(layers, max_heads)`` bool, heads that can be removed.
        min_per_layer: heads each layer keeps until every layer is down to that many.

    Returns: every alive ``(layer, head)`` in removal order.
    """
    n_layers, width = alive.shape
    alive = alive.clone().flatten()
    removed = torch.zeros_like(alive, dtype=torch.float64)
    count = alive.view(n_layers, width).sum(1).tolist()
    order = []
    # marginal cost of removing i given removed set R: 1/2 C_ii + sum_{j in R} C_ij - grad_i
    while alive.any():
        marginal = 0.5 * curv.diagonal() + curv @ removed - grad  # (N,)
        allowed = alive.clone()
        floor_reached = all(c <= min(min_per_layer, n) for c, n in zip(count, heads))
        if not floor_reached:
            for layer, c in enumerate(count):
                if c <= min_per_layer:
                    allowed[layer * width : (layer + 1) * width] = False
        marginal = torch.where(allowed, marginal, torch.full_like(marginal, float("inf")))
        i = int(torch.argmin(marginal))
        alive[i] = False
        removed[i] = 1.0
        count[i // width] -= 1
        order.append((i // width, i % width))
    return order


def layer_mask_search(curv: torch.Tensor, heads: list[int], min_per_layer: int = 1,
                      grad: torch.Tensor | None = None, interactions: str = "layer") -> list[tuple[int, int]]:
    """``greedy_path`` over every head, with ``curv`` cut to the blocks ``interactions`` keeps."""
    width = max(heads)
    n = len(heads) * width
    if interactions != "full":
        block = torch.block_diag(*[torch.ones(width, width, dtype=torch.float64)] * len(heads))
        curv = curv * (block if interactions == "layer" else torch.eye(n, dtype=torch.float64))
    alive = torch.zeros(len(heads), width, dtype=torch.bool)
    for layer, h in enumerate(heads):
        alive[layer, :h] = True
    grad = torch.zeros(n, dtype=torch.float64) if grad is None else grad
    return greedy_path(curv, grad, heads, alive, min_per_layer)


def path_scores(order: list[tuple[int, int]], heads: list[int], width: int) -> torch.Tensor:
    """Scores from a removal order: position in the order (removed first = lowest)."""
    scores = torch.zeros(len(heads), width)
    for pos, (layer, head) in enumerate(order):
        scores[layer, head] = float(pos)
    return finish(scores, heads)


def score_fisher(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                 interactions: str = "layer", probes: int = 1, min_per_layer: int = 1,
                 reference: list | None = None, diagonal: str = "fisher", **options) -> torch.Tensor:
    """Fisher mask search as an elimination path ``(layers, max_heads)``; see the module docstring.

    Args:
        model, batches, objective, seed, progress: as for every scorer (``headslim.scoring``).
        interactions: ``layer`` (block-diagonal Fisher, Kwon et al.), ``full`` or ``none`` (diagonal).
        probes: random probes per batch (more probes: a better estimate of the off-diagonal blocks).
        min_per_layer: heads each layer keeps until all layers are down to that many.
        reference: per-batch dense targets; adds the first-order term (used by ``iterative``).
        diagonal: ``fisher`` (the estimate's own) or ``exact``: each head's exact leave-one-out cost
            (``ablation``, one forward pass per head and batch) replaces the quadratic model's
            single-removal cost ``1/2 C_ii - grad_i``; the interactions stay Fisher's (``fisher-exact``).

    Example:
        >>> scores = score_fisher(model, calib_batches)        # doctest: +SKIP
    """
    if interactions not in INTERACTIONS:
        raise HeadslimError(f"fisher interactions must be one of {', '.join(INTERACTIONS)}, not {interactions!r}")
    if diagonal not in DIAGONALS:
        raise HeadslimError(f"fisher diagonal must be one of {', '.join(DIAGONALS)}, not {diagonal!r}")
    heads = head_counts(model)
    n = len(heads) * max(heads)
    curv = torch.zeros(n, n, dtype=torch.float64)
    grad = torch.zeros(n, dtype=torch.float64)
    seen = 0
    for grads, first in gate_gradients(model, batches, objective=objective, seed=seed, progress=progress,
                                       desc="scoring heads (fisher)", probes=probes, reference=reference,
                                       shard=diagonal == "fisher", per_sample=True):
        flat = grads.flatten(2).flatten(0, 1)  # (probes * B, N): one gradient per probe and sample
        curv += flat.T @ flat / len(grads)
        if first is not None:
            grad += first.flatten()
        seen += 1
    if diagonal == "fisher":  # each rank scored its own batches (headslim.distributed)
        curv, grad, seen = all_sum(curv, grad, seen)
        seen = int(seen)
    check_nonempty(seen)
    curv, grad = curv / seen, grad / seen
    if diagonal == "exact":
        curv = exact_diagonal(curv, grad, model, batches, heads, objective=objective, seed=seed,
                              progress=progress, reference=reference)
    order = layer_mask_search(curv, heads, min_per_layer, grad, interactions)
    return path_scores(order, heads, max(heads))


def exact_diagonal(curv: torch.Tensor, grad: torch.Tensor, model, batches, heads: list[int], **ablation_args) -> torch.Tensor:
    """``curv`` with ``C_ii = 2 (cost_i + grad_i)``, ``cost_i`` the measured leave-one-out cost of head
    ``i``: the quadratic model then prices every single removal exactly (large removals, whose cost
    the second-order model underestimates, included) and keeps Fisher's estimate of the interactions."""
    from headslim.scoring.ablation import score_ablation

    cost = score_ablation(model, batches, **ablation_args).double()  # (layers, width), -inf beyond a layer's heads
    curv = curv.clone()
    width = max(heads)
    for layer, n in enumerate(heads):
        for head in range(n):
            i = layer * width + head
            curv[i, i] = 2.0 * (float(cost[layer, head]) + float(grad[i]))
    return curv


def score_fisher_exact(model, batches, **options) -> torch.Tensor:
    """``fisher`` with ``diagonal="exact"``: Fisher's interactions, exact single-removal costs. With
    the diagonal measured, the probes only estimate the interactions: 16 per batch by default."""
    return score_fisher(model, batches, **{"probes": 16, **options, "diagonal": "exact"})

"""``obs``: Kwon et al.'s mask search with a repair-aware choice of heads inside each layer.

``fisher`` and ``ablation`` price a removal as if the remaining heads stayed as they are. But
``headslim shrink`` repairs every pruned layer (``headslim.repair``: a least-squares re-fit of its
output projection), which recovers whatever part of the removed heads' output the kept heads can
express linearly. This scorer chooses *which* heads a layer loses by their cost after that re-fit,
in the manner of Optimal Brain Surgeon (Hassibi & Stork) over whole heads.

For one layer, with context vectors ``c`` (the output projection's input, ``H * D`` wide) split into
kept ``K`` and removed ``R`` heads, the least-squares re-fit leaves the residual
``c_R - E[c_R | c_K]`` (times ``W_R``) whose covariance is the Schur complement
``S_R = (Q_RR)^{-1}``, ``Q = (Sigma + lam I)^{-1}`` the ridge-regularised precision of ``c``. To
second order, with tokens treated as independent, its cost for the objective is

    cost(R) = 1/2 tr(P_RR S_R),   P = E_probes sum_tokens u u^T,   u = d(probe) / dc,

with the random probes ``fisher`` uses (Gauss-Newton of the last hidden states label-free, empirical
Fisher of the task loss or of the model's own predictions). Multi-output least squares has the same
solution for every output metric, so this is the metric-weighted residual of the re-fit itself.
Each layer's heads are ordered greedily by it (each time the head whose removal adds least, given
those already removed).

How many heads each layer loses comes from ``fisher``'s mask search (the block-diagonal Fisher of
the head gates, ``g_h = sum_t u_h . c_h`` from the same backward passes): on MiniLM / BBC News,
layer budgets from the repaired cost above, which ignores how errors compound across layers, were
worse at 50-70 % (see bench/results/compare_methods). The j-th head the mask search takes from layer
``l`` is the j-th of ``l``'s repair-aware order, so the result is an elimination path as in
``fisher``: a head's score is its position (first removed = 0) and keeping the top-k scores gives the
path's plan for every ``k``. Cost: one forward and ``probes`` backward passes per batch (more probes
than ``fisher``'s default: the layer budgets are sensitive to the noise of the Fisher estimate),
plus a few small solves per layer.
"""

from __future__ import annotations

import torch

from headslim.arch import get_adapter
from headslim.errors import HeadslimError
from headslim.gates import gated
from headslim.scoring.common import (batch_generator, check_nonempty, forward, frozen, head_counts, model_device, probe,
                                     progress_bar, to_device)
from headslim.scoring.fisher import layer_mask_search, path_scores


def layer_moments(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                  probes: int = 16) -> tuple[list[dict | None], torch.Tensor]:
    """Moments of each layer's output-projection input ``c`` and probe gradients ``u = d(probe)/dc``.

    Returns ``(moments, gate_grads)``: per layer (``None`` for a layer without heads) a dict of float64
    CPU tensors over real (unpadded) tokens, ``sum_c`` ``(p,)``, ``sum_cc`` ``(p, p)``, ``sum_uu``
    ``(p, p)`` (averaged over probes) and the token count ``n``; and ``gate_grads``
    ``(batches * probes, layers, max_heads)``, each probe's gradient at the head gates
    (``g_h = sum_t u_h . c_h``, as ``common.gate_gradients`` gives).
    """
    adapter = get_adapter(model)
    blocks = adapter.attention_blocks(model)
    heads = head_counts(model)
    head_dim = adapter.head_dim(model)
    device = model_device(model)
    live = [layer for layer, n in enumerate(heads) if n > 0]
    moments: list[dict | None] = [None] * len(heads)
    for layer in live:
        moments[layer] = {"sum_c": 0, "sum_cc": 0, "sum_uu": 0, "n": 0}
    gate_grads = []
    captured: dict[int, torch.Tensor] = {}
    seen = 0
    with frozen(model):
        for i, batch in enumerate(progress_bar(batches, "scoring heads (obs)", progress)):
            gen = batch_generator(seed, i)  # the draws of this batch, whoever runs it (headslim.distributed)
            batch = to_device(batch, device)
            mask = batch["attention_mask"].bool()  # (B, T)
            gates = torch.ones(len(heads), max(heads), device=device, requires_grad=True)
            # the gated context (B, T, p), which requires grad, as the output projection receives it
            handles = [adapter.o_proj(blocks[layer]).register_forward_hook(
                lambda m, a, o, layer=layer: captured.__setitem__(layer, a[0])) for layer in live]
            try:
                with gated(model, gates):
                    out = forward(model, batch)
            finally:
                for h in handles:
                    h.remove()
            if set(captured) != set(live):
                raise HeadslimError("obs: not every layer's output projection ran")
            contexts = [captured[layer] for layer in live]
            xs = [c.detach()[mask.to(c.device)].double() for c in contexts]  # (N, p) each, on its layer's device
            for layer, x in zip(live, xs):
                m = moments[layer]
                m["sum_c"] = m["sum_c"] + x.sum(0).cpu()
                m["sum_cc"] = m["sum_cc"] + (x.T @ x).cpu()
                m["n"] += len(x)
            for k in range(probes):
                grads = torch.autograd.grad(probe(out, batch, objective, gen), contexts,
                                            retain_graph=k < probes - 1, allow_unused=True)
                g = torch.zeros(len(heads), max(heads), dtype=torch.float64)
                for layer, x, u in zip(live, xs, grads):
                    if u is None:  # the layer does not reach the objective
                        continue
                    u = u[mask.to(u.device)].double()  # (N, p)
                    moments[layer]["sum_uu"] = moments[layer]["sum_uu"] + (u.T @ u).cpu() / probes
                    g[layer, : heads[layer]] = (u * x).sum(0).view(heads[layer], head_dim).sum(-1).cpu()
                gate_grads.append(g)
            captured.clear()
            seen += 1
    check_nonempty(seen)
    return moments, torch.stack(gate_grads)


def removal_order(sigma: torch.Tensor, p_mat: torch.Tensor, n_heads: int, head_dim: int,
                  ridge: float = 1e-2) -> tuple[list[int], list[float]]:
    """Greedy repair-aware removal order of one layer's heads and the cumulative cost after each.

    Args:
        sigma: ``(p, p)`` covariance of the context vectors (``p = n_heads * head_dim``).
        p_mat: ``(p, p)``: ``sum_tokens u u^T`` of the probe gradients at the context vectors.
        ridge: ``lam = ridge * mean diag(sigma)``, as in ``headslim.repair``.

    Returns: ``(order, costs)``: every head in removal order and ``costs[k]`` = ``cost(R)`` with the
    first ``k`` removed (``costs[0] = 0``).
    """
    p = n_heads * head_dim
    lam = ridge * float(sigma.diagonal().mean().clamp_min(1e-12)) + 1e-12
    eye = torch.eye(p, dtype=torch.float64)
    precision = torch.cholesky_inverse(torch.linalg.cholesky(sigma.double() + lam * eye))
    cols = torch.arange(p).view(n_heads, head_dim)
    removed: list[int] = []
    costs = [0.0]
    while len(removed) < n_heads:
        best, best_cost = -1, float("inf")
        for h in range(n_heads):
            if h in removed:
                continue
            idx = cols[removed + [h]].flatten()
            # tr(P_RR (Q_RR)^-1): Q_RR^-1 is the covariance of c_R left after predicting it from c_K
            cost = 0.5 * float(torch.linalg.solve(precision[idx][:, idx], p_mat[idx][:, idx].double()).trace())
            if cost < best_cost:
                best, best_cost = h, cost
        removed.append(best)
        costs.append(best_cost)
    return removed, costs


def score_obs(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
              probes: int = 16, ridge: float = 1e-2, min_per_layer: int = 1, **options) -> torch.Tensor:
    """Mask search with repair-aware heads: an elimination path ``(layers, max_heads)``; see the module docstring.

    Args:
        model, batches, objective, seed, progress: as for every scorer (``headslim.scoring``).
        probes: random probes per batch (backward passes re-using one forward pass).
        ridge: regularisation of the context covariance, relative to its mean diagonal.
        min_per_layer: heads each layer keeps until all layers are down to that many.

    Example:
        >>> scores = score_obs(model, calib_batches)        # doctest: +SKIP
    """
    heads = head_counts(model)
    width = max(heads)
    head_dim = get_adapter(model).head_dim(model)
    moments, gate_grads = layer_moments(model, batches, objective=objective, seed=seed, progress=progress,
                                        probes=probes)
    within = []
    for n, m in zip(heads, moments):
        if m is None:
            within.append([])
            continue
        mean = m["sum_c"] / m["n"]
        sigma = m["sum_cc"] / m["n"] - torch.outer(mean, mean)
        p_mat = m["sum_uu"] if torch.is_tensor(m["sum_uu"]) else torch.zeros_like(sigma)
        within.append(removal_order(sigma, p_mat, n, head_dim, ridge)[0])
    # layer budgets: fisher's mask search over the block-diagonal Fisher of the gates
    flat = gate_grads.flatten(1)  # (S, layers * width)
    budget = layer_mask_search(flat.T @ flat / len(flat), heads, min_per_layer)
    taken = [0] * len(heads)
    order = []
    for layer, _ in budget:
        order.append((layer, within[layer][taken[layer]]))
        taken[layer] += 1
    return path_scores(order, heads, width)

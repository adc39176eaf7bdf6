"""``obs`` for heads and FFN neurons together: repair-aware removal costs in one unit (ZipLM's currency).

``headslim shrink`` re-fits every pruned output projection (O for attention, the down projection
for the FFN) by ridge least squares (``headslim.repair``): whatever part of the removed structures'
output the kept ones express linearly comes back. ``fisher`` prices a removal as if nothing were
re-fitted, which overprices neurons whose output others can take over and, at large removals,
underprices heads. This scorer prices each removal *after* that re-fit, with the structured Optimal
Brain Surgeon (Hassibi & Stork; ZipLM, Kurtic et al. 2023, does the same per layer):

For one output projection ``y = W c`` (``W``: ``(d, n)``; ``c``: its input, a head's ``head_dim``
columns or one neuron's column) with input covariance ``Sigma`` over real tokens, removing the
groups ``R`` and re-fitting the kept columns (ridge ``lam = ridge * mean diag Sigma`` towards the
current weights, exactly the repair's objective) leaves the output error ``W_R r_R``, ``r_R`` the part
of ``c_R`` the kept columns cannot predict, of covariance ``(Q_RR)^-1`` with ``Q = (Sigma + lam I)^-1``.
Its cost for the objective, to second order and with tokens treated as independent, is

    cost(R) = 1/2 tr(W_R^T M W_R (Q_RR)^-1),   M = E_probes sum_tokens v v^T,   v = d(probe) / dy,

``v`` the gradient at the projection's output from the random probes every scorer uses
(``common.probe``: Gauss-Newton of the last hidden states label-free, or the task loss). ``M`` is
measured where each structure's output enters the residual stream, so the costs of heads and neurons,
of every layer, are changes of the same objective: one currency. Each layer's groups are ordered
greedily (each time the group whose removal adds least, with the OBS compensation of the others
applied, the downdated ``Q``): the sequences ``headslim.budget.spend`` prices against latency.
"""

from __future__ import annotations

import torch

from headslim.arch import get_adapter, set_weight_out_in, weight_out_in
from headslim.arch.stubs import head_rows
from headslim.errors import HeadslimError
from headslim.gates import gated
from headslim.scoring.common import (batch_generator, check_nonempty, forward, frozen, merged_scores, model_device, probe, progress_bar,
                                     to_device)


def projection_moments(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                       probes: int = 4, kinds: tuple = ("attention", "mlp")) -> dict:
    """Per kind and layer (``None`` where nothing is left): the output projection's input moments over
    real tokens (``sum_c`` ``(n,)``, ``sum_cc`` ``(n, n)``, count ``n``) and ``M``, the probe gradients'
    ``sum_tokens v v^T`` at its output ``(d, d)`` averaged over probes and batches (float64, CPU)."""
    adapter = get_adapter(model)
    n_heads, widths = adapter.num_heads(model), adapter.num_neurons(model)
    projections = {}
    if "attention" in kinds:
        projections["attention"] = [adapter.o_proj(b) if n else None
                                    for b, n in zip(adapter.attention_blocks(model), n_heads)]
    if "mlp" in kinds:
        projections["mlp"] = [adapter.down_proj(b) if n else None for b, n in zip(adapter.mlp_blocks(model), widths)]
    stats = {k: [None if p is None else {"sum_c": 0, "sum_cc": 0, "n": 0, "m": 0} for p in ps]
             for k, ps in projections.items()}
    device = model_device(model)
    seen = 0
    with frozen(model):
        for i, batch in enumerate( progress_bar(batches, "scoring heads and FFN neurons (obs)", progress)):
            gen = batch_generator(seed, i)  # the draws of this batch, whoever runs it (headslim.distributed)
            batch = to_device(batch, device)
            mask = batch["attention_mask"].bool()
            outputs, handles = [], []

            def capture(module, args, output, kind, layer):
                x = args[0].detach()[mask.to(args[0].device)].double()  # (N, n) real tokens
                s = stats[kind][layer]
                s["sum_c"] = s["sum_c"] + x.sum(0).cpu()
                s["sum_cc"] = s["sum_cc"] + (x.T @ x).cpu()
                s["n"] += len(x)
                outputs.append((kind, layer, output))

            for kind, ps in projections.items():
                for layer, proj in enumerate(ps):
                    if proj is not None:
                        handles.append(proj.register_forward_hook(
                            lambda m, a, o, kind=kind, layer=layer: capture(m, a, o, kind, layer)))
            # gates that need grad make every projection output part of the graph (the weights are frozen)
            gates = torch.ones(len(n_heads), max(n_heads, default=1) or 1, device=device, requires_grad=True)
            try:
                with gated(model, gates):
                    out = forward(model, batch)
            finally:
                for h in handles:
                    h.remove()
            tensors = [o for _, _, o in outputs]
            for k in range(probes):
                grads = torch.autograd.grad(probe(out, batch, objective, gen), tensors,
                                            retain_graph=k < probes - 1, allow_unused=True)
                for (kind, layer, _), v in zip(outputs, grads):
                    if v is None:  # this projection does not reach the objective
                        continue
                    v = v.detach().reshape(-1, v.shape[-1]).double()
                    stats[kind][layer]["m"] = stats[kind][layer]["m"] + (v.T @ v).cpu() / probes
            seen += 1
    check_nonempty(seen)
    for rows in stats.values():
        for s in rows:
            if s is not None:
                s["m"] = s["m"] / seen if torch.is_tensor(s["m"]) else None
    return {"stats": stats, "projections": projections}


def obs_sequence(sigma: torch.Tensor, metric: torch.Tensor | None, weight: torch.Tensor, group: int,
                 ridge: float = 1e-2) -> list[tuple[int, float]]:
    """One projection's greedy repair-aware removal sequence ``[(group index, marginal cost), ...]``.

    Args:
        sigma: ``(n, n)`` covariance of the projection's input over tokens.
        metric: ``(d, d)`` ``M`` at its output (None: the identity, plain output reconstruction).
        weight: ``(d, n)`` the projection's weight.
        group: columns per structure (``head_dim`` for heads, 1 for neurons); ``n % group == 0``.
        ridge: ``lam = ridge * mean diag(sigma)``, as in ``headslim.repair``.

    The marginal costs add up to ``cost(R)`` of the module docstring for every prefix ``R``.
    """
    n = sigma.shape[0]
    if n % group:
        raise HeadslimError(f"obs: {n} input columns do not split into groups of {group}")
    sigma = sigma.double()
    lam = ridge * float(sigma.diagonal().mean().clamp_min(1e-12)) + 1e-12
    q = torch.cholesky_inverse(torch.linalg.cholesky(sigma + lam * torch.eye(n, dtype=torch.float64)))
    w = weight.detach().double().cpu().clone()
    mw = w.clone() if metric is None else metric.double() @ w  # (d, n)
    count = n // group
    if group == 1:
        return _obs_sequence_columns(q, w, mw)
    alive = torch.ones(count, dtype=torch.bool)
    seq = []
    for _ in range(count):
        if group == 1:
            cost = (w * mw).sum(0) / q.diagonal().clamp_min(1e-300)
        else:
            cols = torch.arange(n).view(count, group)
            cost = torch.full((count,), float("inf"), dtype=torch.float64)
            for g in torch.nonzero(alive).flatten().tolist():
                idx = cols[g]
                a = (w[:, idx].T @ mw[:, idx])  # (group, group)
                cost[g] = torch.linalg.solve(q[idx][:, idx], a).diagonal().sum()
        cost = torch.where(alive, cost, torch.full_like(cost, float("inf")))
        j = int(torch.argmin(cost))
        seq.append((j, 0.5 * max(float(cost[j]), 0.0)))
        alive[j] = False
        idx = torch.arange(j * group, (j + 1) * group)
        q_rows = q[idx]  # (group, n)
        inv = torch.linalg.inv(q_rows[:, idx])  # (group, group)
        step = inv @ q_rows  # (group, n)
        w -= w[:, idx] @ step  # OBS compensation: the kept columns take over what they can
        mw -= mw[:, idx] @ step
        q -= q[:, idx] @ step
        q[idx] = 0.0
        q[:, idx] = 0.0
        w[:, idx] = 0.0
        mw[:, idx] = 0.0
    return seq


def _obs_sequence_columns(q: torch.Tensor, w: torch.Tensor, mw: torch.Tensor) -> list[tuple[int, float]]:
    """:func:`obs_sequence` for single columns (FFN neurons): the same greedy removals and OBS updates,
    but each removed column is swapped to the end of the live block and the block shrunk by one, so
    step ``i`` updates ``(n - i)^2`` entries in place instead of ``n^2`` (about a third of the work and
    of the memory traffic, no copies). Works on ``q``, ``w``, ``mw`` in place: :func:`obs_sequence`'s own."""
    live = list(range(q.shape[0]))  # original index of each column of the live block
    seq = []
    for m in range(q.shape[0], 0, -1):
        cost = (w[:, :m] * mw[:, :m]).sum(0) / q.diagonal()[:m].clamp_min(1e-300)  # (m,)
        k, last = int(torch.argmin(cost)), m - 1
        seq.append((live[k], 0.5 * max(float(cost[k]), 0.0)))
        if k != last:  # the removed column to the end of the live block
            swap, into = torch.tensor([k, last]), torch.tensor([last, k])
            q[swap] = q[into]
            q[:, swap] = q[:, into]
            w[:, swap] = w[:, into]
            mw[:, swap] = mw[:, into]
            live[k], live[last] = live[last], live[k]
        step = q[last, :last] / q[last, last]  # (m - 1,)
        # OBS compensation: the kept columns take over what they can (views outside the updated block)
        q[:last, :last].addr_(q[:last, last], step, alpha=-1.0)
        w[:, :last].addr_(w[:, last], step, alpha=-1.0)
        mw[:, :last].addr_(mw[:, last], step, alpha=-1.0)
    return seq


def score_obs_structures(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                         probes: int = 4, ridge: float = 1e-2, heads: bool = True, min_per_layer: int = 0,
                         min_heads_per_layer: int = 1) -> dict:
    """Repair-aware costs of every FFN neuron (and, with ``heads``, head): ``score_structures``' result
    for ``method="obs"``: ``"mlp"`` (and ``"attention"``) scores, higher = more important (the position
    in the cost-ordered path over all layers), ``"sequences"`` per kind and layer for the budget, and
    ``"moments"`` per kind and layer (input ``mean``, ``sigma``) for :func:`compensate`."""
    adapter = get_adapter(model)
    kinds = ("attention", "mlp") if heads else ("mlp",)
    n_heads, widths = adapter.num_heads(model), adapter.num_neurons(model)
    head_dim = adapter.head_dim(model)
    found = projection_moments(model, batches, objective=objective, seed=seed, progress=progress, probes=probes,
                               kinds=kinds)
    result = {"sequences": {}, "moments": {}}
    for kind in kinds:
        group = head_dim if kind == "attention" else 1
        seqs, moments = [], []
        for s, proj in zip(found["stats"][kind], found["projections"][kind]):
            if s is None:
                seqs.append([])
                moments.append(None)
                continue
            mean = s["sum_c"] / s["n"]
            sigma = s["sum_cc"] / s["n"] - torch.outer(mean, mean)
            seqs.append(obs_sequence(sigma, s["m"], weight_out_in(proj), group, ridge))
            moments.append({"mean": mean, "sigma": sigma, "group": group, "ridge": ridge})
        result["sequences"][kind] = seqs
        result["moments"][kind] = moments
        counts = n_heads if kind == "attention" else widths
        floor = min_heads_per_layer if kind == "attention" else min_per_layer
        result[kind] = merged_scores(seqs, counts, floor)
    return result


@torch.no_grad()
def compensate(model, plan, moments: dict, ridge: float | None = None) -> None:
    """Before surgery, fold into the kept columns of every pruned output projection what they can take
    over of the removed ones (the OBS update; ``headslim.repair``'s ridge fit on the dense model's own
    inputs, in closed form from the scoring moments): ``W_K += W_R A``, ``b += W_R (mu_R - A mu_K)``,
    ``A = H_RK H_KK^-1``, ``H = Sigma + lam I``. In place; a cheap stand-in for repair when many
    candidate plans are compared (:func:`headslim.tradeoff.fit_exchange`)."""
    adapter = get_adapter(model)
    kept = {"attention": plan.kept_heads, "mlp": plan.kept_neurons}
    widths = {"attention": plan.num_heads, "mlp": plan.num_neurons}
    projections = {"attention": [adapter.o_proj(b) for b in adapter.attention_blocks(model)],
                   "mlp": [adapter.down_proj(b) for b in adapter.mlp_blocks(model)]}
    for kind, rows in moments.items():
        if kept[kind] is None:
            continue
        for layer, m in enumerate(rows):
            keep = set(kept[kind][layer])
            if m is None or len(keep) == widths[kind][layer]:
                continue
            k_idx = head_rows(sorted(keep), m["group"])
            r_idx = head_rows([u for u in range(widths[kind][layer]) if u not in keep], m["group"])
            proj = projections[kind][layer]
            w = weight_out_in(proj).double()
            sigma, mean = m["sigma"], m["mean"]
            lam = (m["ridge"] if ridge is None else ridge) * float(sigma.diagonal().mean().clamp_min(1e-12)) + 1e-12
            h = sigma + lam * torch.eye(len(sigma), dtype=torch.float64)
            if len(k_idx):
                a = torch.linalg.solve(h[k_idx][:, k_idx], h[k_idx][:, r_idx]).T  # (R, K) = H_RK H_KK^-1
                shift = w[:, r_idx] @ (mean[r_idx] - a @ mean[k_idx])
                w[:, k_idx] += w[:, r_idx] @ a
            else:
                shift = w[:, r_idx] @ mean[r_idx]
            set_weight_out_in(proj, w)
            if getattr(proj, "bias", None) is not None:
                proj.bias += shift.to(proj.bias.dtype)

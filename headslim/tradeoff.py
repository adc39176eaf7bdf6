"""The exchange rate between heads and FFN neurons in a speed-up budget, fitted on held-out data.

``headslim.budget`` ranks every removal by estimated quality cost per unit of saved latency. The
costs of both kinds are second-order, per-layer estimates in one unit (``headslim.scoring.
reconstruction``), but they miss what differs between the kinds: a removed head changes every later
layer's attention pattern (errors compound nonlinearly across layers), a removed neuron adds a small
error the next layers mostly pass on linearly. On all-MiniLM-L6-v2 / BBC News the plain costs give
heads away too cheaply: at a 1.5x target, pricing heads 16x higher kept the repaired embedding
cosine at 0.951 where 1x gave 0.929 (bench/README.md, "Speed-up targets").

So the price of a head relative to a neuron is a parameter of the choice, and it is fitted, not
assumed: each candidate on a grid spends the same target (``spend(alpha)``), the plan is applied to a
copy of the model with the closed-form OBS compensation (``reconstruction.compensate``: repair's fit
on the dense model's inputs) and scored by the objective on calibration batches the costs were not
estimated from; the lowest held-out objective wins, and every candidate's result is reported.
"""

from __future__ import annotations

import copy

from headslim.errors import HeadslimError

EXCHANGE_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def split_heldout(batches) -> tuple[list, list, bool]:
    """``(fit, held_out, in_sample)``: every 4th batch held out (as ``headslim.repair`` does) when there
    are at least 4, else every batch in both (``in_sample`` True, and the caller says so)."""
    batches = list(batches)
    if len(batches) >= 4:
        return [b for i, b in enumerate(batches) if i % 4 != 3], [b for i, b in enumerate(batches) if i % 4 == 3], False
    return batches, batches, True


def scaled(sequences: dict, alpha: float) -> dict:
    """The sequences with every head cost multiplied by ``alpha``."""
    return {kind: [[(i, c * alpha) for i, c in seq] for seq in seqs] if kind == "attention" else seqs
            for kind, seqs in sequences.items()}


def heldout_objective(model, plan, moments: dict, held_out, objective: str, references: list) -> float:
    """The objective (``common.discrepancy``, summed) on ``held_out`` of ``model`` pruned by ``plan`` with
    the OBS compensation; ``model`` is left as it was."""
    import torch

    from headslim.scoring.common import discrepancy, forward, frozen, model_device, to_device
    from headslim.scoring.reconstruction import compensate
    from headslim.surgery import prune_heads

    trial = copy.deepcopy(model)
    compensate(trial, plan, moments)
    prune_heads(trial, plan)
    device = model_device(trial)
    total = 0.0
    with frozen(trial), torch.no_grad():
        for batch, ref in zip(held_out, references):
            batch = to_device(batch, device)
            total += float(discrepancy(forward(trial, batch), batch, objective,
                                       None if ref is None else ref.to(device)))
    del trial
    return total


def fit_exchange(model, moments: dict, plan_for, held_out, *, objective: str = "dense",
                 grid=EXCHANGE_GRID) -> tuple[float, list[dict]]:
    """``(alpha, trials)``: the head price on ``grid`` whose plan has the lowest held-out objective.

    Args:
        model: the dense model (left as it was).
        moments: ``score_structures(method="obs")["moments"]``.
        plan_for: ``alpha -> PrunePlan`` (the budget spent with head costs times ``alpha``); a
            ``HeadslimError`` from it skips that candidate.
        held_out: tokenised batches the costs were not estimated from.
        objective: ``dense`` or ``task`` (``headslim.scoring``).
    Returns: the chosen ``alpha`` and, per candidate, ``{"alpha", "heads", "neurons", "objective"}``
    (``objective`` per held-out batch; candidates with the same plan are scored once).
    """
    from headslim.scoring.common import dense_reference

    references = dense_reference(model, held_out, objective)
    trials, seen, refusal = [], {}, None
    for alpha in grid:
        try:
            plan = plan_for(alpha)
        except HeadslimError as e:
            refusal = refusal or e
            continue
        key = (tuple(map(tuple, plan.kept_heads)), tuple(map(tuple, plan.kept_neurons or [])))
        if key not in seen:
            seen[key] = heldout_objective(model, plan, moments, held_out, objective, references) / len(held_out)
        trials.append({"alpha": alpha, "heads": sum(plan.heads_after), "neurons": sum(plan.neurons_after or []),
                       "objective": float(f"{seen[key]:.6g}")})
    if not trials:  # the budget's own reason (e.g. "cannot be reached: ... estimated 1.44x") says more
        raise refusal or HeadslimError("no head price on the grid gives a plan for this target")
    best = min(trials, key=lambda t: (t["objective"], t["alpha"]))
    return best["alpha"], trials

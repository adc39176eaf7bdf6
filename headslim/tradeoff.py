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
on the dense model's inputs) and judged on calibration batches the costs were not estimated from; the
best wins, and every candidate's result is reported.

The judge is what the model delivers, the quantity repair's own check uses
(``scoring.common.fidelity``): the mean-pooled embedding cosine to the dense model for an encoder
without a head, the KL of its predictions for a model with logits, the task loss for ``task``. An
earlier judge, the squared error of every token's last hidden state, ranked the candidates differently
from the embeddings: at a 2.25x target on MiniLM it preferred a price of 32 (15 heads kept; repaired
test cosine 0.843) to 128 (34 heads; 0.905), where the held-out embedding cosine ranks them as the
repaired test cosine does.

Without repair the plans are judged as they are, uncompensated. Judging the best few candidates
after real repair instead of the closed form was tried and dropped: on MiniLM it did not pick better
plans (1.5x: test cosine 0.933 with it, 0.956 without, in runs whose latency calibrations also
differed; bench/README.md).
"""

from __future__ import annotations

import copy

from headslim.errors import HeadslimError

EXCHANGE_GRID = tuple(2.0 ** k for k in range(11))  # 1 ... 1024


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


def judge(trial, model, held_out, objective: str, cache: dict | None = None) -> tuple[str, float]:
    """``(metric, loss)`` of ``trial`` against ``model`` on ``held_out``; lower is better: ``1 - cosine``
    (mean embedding cosine to ``model``), ``kl`` (mean KL of the predictions) or ``task`` (mean task
    loss per sample). ``cache``: ``model``'s embeddings kept between calls (``fidelity``)."""
    import torch

    from headslim.scoring.common import fidelity, forward, frozen, model_device, task_losses, to_device

    device = model_device(trial)
    with frozen(trial), frozen(model), torch.no_grad():
        batches = [to_device(b, device) for b in held_out]
        if objective == "task":
            losses = torch.cat([task_losses(forward(trial, b), b) for b in batches])
            return "task", float(losses.mean())
        metric, value = fidelity(trial, model, batches, cache)
        return metric, 1.0 - value if metric == "cosine" else value


def heldout_objective(model, plan, moments: dict | None, held_out, objective: str,
                      cache: dict | None = None) -> tuple[str, float]:
    """:func:`judge` of ``model`` pruned by ``plan`` with the OBS compensation (none with ``moments``
    None); ``model`` is left as it was."""
    from headslim.scoring.reconstruction import compensate
    from headslim.surgery import prune_heads

    trial = copy.deepcopy(model)
    if moments is not None:
        compensate(trial, plan, moments)
    prune_heads(trial, plan)
    result = judge(trial, model, held_out, objective, cache)
    del trial
    return result


def fit_exchange(model, moments: dict | None, plan_for, held_out, *, objective: str = "dense",
                 grid=EXCHANGE_GRID) -> tuple[float, list[dict]]:
    """``(alpha, trials)``: the head price on ``grid`` whose plan has the lowest held-out objective.

    Args:
        model: the dense model (left as it was).
        moments: ``score_structures(method="obs")["moments"]``; None: the plans are judged without
            the compensation (what a run without repair gets).
        plan_for: ``alpha -> PrunePlan`` (the budget spent with head costs times ``alpha``); a
            ``HeadslimError`` from it skips that candidate.
        held_out: tokenised batches the costs were not estimated from.
        objective: ``dense`` or ``task`` (``headslim.scoring``).
    Returns: the chosen ``alpha`` and, per candidate, ``{"alpha", "heads", "neurons", "metric",
    "objective"}`` (:func:`heldout_objective`'s loss, lower is better; candidates with the same plan
    are scored once).
    """
    trials, seen, refusal, dense_cache = [], {}, None, {}
    for alpha in grid:
        try:
            plan = plan_for(alpha)
        except HeadslimError as e:
            refusal = refusal or e
            continue
        key = (tuple(map(tuple, plan.kept_heads)), tuple(map(tuple, plan.kept_neurons or [])))
        if key not in seen:
            seen[key] = heldout_objective(model, plan, moments, held_out, objective, dense_cache)
        metric, loss = seen[key]
        trials.append({"alpha": alpha, "heads": sum(plan.heads_after), "neurons": sum(plan.neurons_after or []),
                       "metric": metric, "objective": float(f"{loss:.6g}")})
    if not trials:  # the budget's own reason (e.g. "cannot be reached: ... estimated 1.44x") says more
        raise refusal or HeadslimError("no head price on the grid gives a plan for this target")
    best = min(trials, key=lambda t: (t["objective"], t["alpha"]))
    return best["alpha"], trials

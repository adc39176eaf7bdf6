"""``ablation``: exact leave-one-out importance: the objective's change when each head alone is removed.

``dense``: the distance to the reference outputs (``1/2 ||h - h_ref||^2`` of the last hidden states,
or ``KL(p_ref || p)`` for a task head) with that head gated off. ``task``: the rise of the summed
task loss. Costs one forward pass per head and batch (``sum(heads)`` passes over the calibration set).
"""

from __future__ import annotations

import torch

from headslim.gates import gated
from headslim.scoring.common import (check_nonempty, dense_target, discrepancy, finish, forward, frozen,
                                     head_counts, model_device, progress_bar, to_device)


@torch.no_grad()
def score_ablation(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                   reference: list | None = None, **options) -> torch.Tensor:
    """Leave-one-out change of the objective per head ``(layers, max_heads)`` (higher = more important).

    Args:
        model, batches, objective, seed, progress: as for every scorer (``headslim.scoring``).
        reference: per-batch dense targets to measure the distance against (default: the model's own
            outputs, so a head's score is the distance its removal alone causes).

    Example:
        >>> scores = score_ablation(model, calib_batches)    # doctest: +SKIP
    """
    heads = head_counts(model)
    device = model_device(model)
    width = max(heads)
    scores = torch.zeros(len(heads), width, dtype=torch.float64)
    seen = 0
    with frozen(model):
        for i, batch in enumerate(progress_bar(batches, "scoring heads (ablation)", progress)):
            batch = to_device(batch, device)
            out = forward(model, batch)
            if objective == "task" or reference is not None:
                target = None if objective == "task" or reference[i] is None else reference[i].to(device)
                base = float(discrepancy(out, batch, objective, target))
            else:
                target, base = dense_target(out, batch), 0.0
            for layer, n in enumerate(heads):
                for head in range(n):
                    gates = torch.ones(len(heads), width, device=device)
                    gates[layer, head] = 0.0
                    with gated(model, gates):
                        value = float(discrepancy(forward(model, batch), batch, objective, target))
                    scores[layer, head] += value - base
            seen += 1
    check_nonempty(seen)
    return finish(scores / seen, heads)

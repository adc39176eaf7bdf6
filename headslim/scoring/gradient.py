"""``gradient``: first-order head importance from gate gradients (Michel et al. 2019).

With ``objective="task"``: ``sum_batches |dL/dgate|`` of the model's mean loss on labelled data.

With ``objective="dense"`` (label-free): a distance between the gated and the dense model's outputs
is zero at gate = 1, so its gradient there is zero and ``|dD/dgate|`` is noise. We score instead the
first-order cost of removing a head in the Gauss-Newton model of that distance,
``1/2 E ||dh/dgate||^2`` (its diagonal), with one backward pass per batch through a random projection:
``r ~ N(0, I)`` shaped like ``h``, ``g = d(r . h)/dgate``, ``E_r[g^2] = ||dh/dgate||^2``. For a model
with a task head the output is its predicted distribution (targets sampled from it: the Fisher).

Away from the dense point (``iterative`` re-scores a pruned model against the dense reference) the
distance's gradient is no longer zero; with ``reference`` the score is the full second-order
estimate of the removal cost, ``1/2 C_ii - dD/dgate_i`` (``C`` = Gauss-Newton / Fisher matrix).
"""

from __future__ import annotations

import torch

from headslim.gates import gated
from headslim.scoring.common import (check_nonempty, finish, frozen, gate_gradients, head_counts, model_device,
                                     inputs_of, progress_bar, to_device)


def score_gradient(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                   reference: list | None = None, **options) -> torch.Tensor:
    """Gate-gradient importance ``(layers, max_heads)``; see the module docstring.

    Args:
        model: a model an adapter supports (dense or pruned); left as it was.
        batches: re-iterable calibration batches (dicts of tensors; ``labels`` for ``task``).
        objective: ``dense`` or ``task``.
        seed: seeds the random projections.
        progress: show a progress bar over batches.
        reference: per-batch dense targets (``common.dense_reference`` of the dense model): adds the
            first-order term of the distance to them (used by ``iterative``).

    Example:
        >>> scores = score_gradient(model, calib_batches, objective="dense")   # doctest: +SKIP
    """
    heads = head_counts(model)
    if objective == "task" and reference is None:
        return _michel_task(model, batches, heads, progress)
    scores = torch.zeros(len(heads), max(heads), dtype=torch.float64)
    seen = 0
    for grads, first in gate_gradients(model, batches, objective=objective, seed=seed, progress=progress,
                                       desc="scoring heads (gradient)", reference=reference):
        scores += 0.5 * grads.pow(2).mean(0)
        if first is not None:
            scores -= first
        seen += 1
    check_nonempty(seen)
    return finish(scores / seen, heads)


def _michel_task(model, batches, heads, progress) -> torch.Tensor:
    """Michel et al.'s ``E |dL/dgate|`` of the model's own (batch-mean) loss."""
    from headslim.errors import HeadslimError

    device = model_device(model)
    scores = torch.zeros(len(heads), max(heads), dtype=torch.float64)
    seen = 0
    with frozen(model):
        for batch in progress_bar(batches, "scoring heads (gradient)", progress):
            if "labels" not in batch:
                raise HeadslimError("objective 'task' needs labelled calibration data (a label column)")
            batch = to_device(batch, device)
            gates = torch.ones(len(heads), max(heads), device=device, requires_grad=True)
            with gated(model, gates):
                loss = model(**inputs_of(batch), labels=batch["labels"]).loss
            if loss is None:
                raise HeadslimError("objective 'task' needs a model with a task head that returns a loss")
            (g,) = torch.autograd.grad(loss, gates)
            scores += g.abs().cpu().double()
            seen += 1
    check_nonempty(seen)
    return finish(scores / seen, heads)

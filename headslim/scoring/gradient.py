"""``gradient``: first-order head importance from gate gradients (Michel et al. 2019).

With ``objective="task"``: ``sum_batches |dL/dgate|`` of the model's own loss on labelled data.

With ``objective="dense"`` (label-free): a distance between the gated and the dense model's outputs
is zero at gate = 1, so its gradient there is zero and ``|dD/dgate|`` is noise. We score instead
the expected squared change of the output representations, ``E ||dh/dgate||^2`` (the Gauss-Newton
diagonal of that distance), with one backward pass per batch through a random projection:
``r ~ N(0, I)`` shaped like ``h``, ``g = d(r . h)/dgate``, ``E_r[g^2] = ||dh/dgate||^2``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from headslim.adapters import get_adapter
from headslim.errors import HeadslimError
from headslim.gates import gated


def _representation(model, batch: dict) -> torch.Tensor:
    """Last hidden states with padding positions zeroed, ``(B, T, d)``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (B, T, d)
    mask = inputs["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
    return hidden * mask


def score_gradient(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True) -> torch.Tensor:
    adapter = get_adapter(model)
    heads = adapter.num_heads(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    scores = torch.zeros(len(heads), max(heads))
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval().requires_grad_(False)  # only the gates need gradients
    seen = 0
    try:
        for batch in tqdm(batches, desc="scoring heads (gradient)", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            gates = torch.ones(len(heads), max(heads), device=device, requires_grad=True)
            with gated(model, gates):
                if objective == "task":
                    if "labels" not in batch:
                        raise HeadslimError("objective 'task' needs labelled calibration data (a label column)")
                    loss = model(**batch).loss
                    if loss is None:
                        raise HeadslimError("objective 'task' needs a model with a task head that returns a loss")
                    loss.backward()
                    scores += gates.grad.abs().cpu()
                else:
                    h = _representation(model, batch)
                    r = torch.randn(h.shape, generator=gen).to(device=device, dtype=h.dtype)
                    (h * r).sum().backward()
                    scores += gates.grad.pow(2).cpu()
            seen += 1
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
    if seen == 0:
        raise HeadslimError("no calibration batches to score on")
    scores /= seen
    for layer, n in enumerate(heads):
        scores[layer, n:] = float("-inf")
    return scores

"""``random``: the baseline every other scorer must beat."""

from __future__ import annotations

import torch

from headslim.adapters import get_adapter


def score_random(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True) -> torch.Tensor:
    heads = get_adapter(model).num_heads(model)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(heads), max(heads), generator=gen)
    for layer, n in enumerate(heads):
        scores[layer, n:] = float("-inf")
    return scores

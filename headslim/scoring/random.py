"""``random``: the baseline every other scorer must beat."""

from __future__ import annotations

import torch

from headslim.scoring.common import finish, head_counts


def score_random(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                 **options) -> torch.Tensor:
    """Uniform random scores ``(layers, max_heads)`` from ``seed`` (the data is not looked at).

    Example:
        >>> score_random(model, [], seed=0).shape     # doctest: +SKIP
        torch.Size([6, 12])
    """
    heads = head_counts(model)
    gen = torch.Generator().manual_seed(seed)
    return finish(torch.rand(len(heads), max(heads), generator=gen), heads)

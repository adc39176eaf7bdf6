"""Head scorers: each returns a ``(layers, max_heads)`` tensor, higher = more important.

A scorer is a function ``score(model, batches, *, objective, seed, progress) -> Tensor``
registered in ``SCORERS``; slots beyond a layer's head count are ``-inf``.

Objectives:
    ``dense`` (default, label-free): keep what the dense model computes (its last hidden states).
    ``task``: the model's own loss on labelled batches (needs a task head and labels).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from headslim.errors import HeadslimError
from headslim.scoring.gradient import score_gradient
from headslim.scoring.random import score_random

SCORERS = {"gradient": score_gradient, "random": score_random}
OBJECTIVES = ("dense", "task")


def score_heads(model, batches: Iterable[dict], *, method: str = "gradient", objective: str = "dense",
                seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Score every head of ``model`` on calibration ``batches`` with scorer ``method``.

    Example:
        >>> scores = score_heads(model, batches(data, tok), method="gradient")   # doctest: +SKIP
    """
    if method not in SCORERS:
        raise HeadslimError(f"unknown scoring method {method!r}; available: {', '.join(sorted(SCORERS))}")
    if objective not in OBJECTIVES:
        raise HeadslimError(f"unknown objective {objective!r}; available: {', '.join(OBJECTIVES)}")
    return SCORERS[method](model, batches, objective=objective, seed=seed, progress=progress)

"""Head scorers: each returns a ``(layers, max_heads)`` tensor, higher = more important.

A scorer is a function ``score(model, batches, *, objective, seed, progress, **options) -> Tensor``
registered in ``SCORERS``; slots beyond a layer's head count are ``-inf``. Scorers ignore options
they do not use; the pipeline passes ``prune`` (the target) and ``min_per_layer`` to all of them.

Objectives:
    ``dense`` (default, label-free): keep what the dense model computes (its last hidden states, or a
        task head's predicted distribution).
    ``task``: the model's own loss on labelled batches (needs a task head and labels).
    Attention statistics, ``magnitude`` and ``random`` do not depend on the objective.

Methods (see each module):
    ``gradient`` (Michel et al. 2019; label-free: Gauss-Newton diagonal), ``fisher`` (Kwon et al. 2022:
    Fisher with a mask search over the heads of each layer), ``fisher-exact`` (the same search with each
    head's exact leave-one-out cost on the diagonal), ``obs`` (``fisher``'s mask search decides how
    many heads each layer loses, a repair-aware second-order cost which ones),
    ``ablation`` (exact leave-one-out),
    ``iterative`` (re-score after removing 10 % at a time, on top of any one-shot scorer:
    ``iterative:fisher``), ``entropy`` / ``confidence`` (Voita et al. 2019), ``magnitude`` (output
    norm), ``learned`` (trained soft top-k gates, model frozen), ``random``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from headslim.errors import HeadslimError
from headslim.scoring.ablation import score_ablation
from headslim.scoring.attention import score_confidence, score_entropy
from headslim.scoring.common import SCORERS
from headslim.scoring.fisher import score_fisher, score_fisher_exact
from headslim.scoring.gradient import score_gradient
from headslim.scoring.iterative import score_iterative
from headslim.scoring.learned import score_learned
from headslim.scoring.magnitude import score_magnitude
from headslim.scoring.obs import score_obs
from headslim.scoring.random import score_random

SCORERS.update({
    "gradient": score_gradient,
    "fisher": score_fisher,
    "fisher-exact": score_fisher_exact,
    "obs": score_obs,
    "ablation": score_ablation,
    "iterative": score_iterative,
    "entropy": score_entropy,
    "confidence": score_confidence,
    "magnitude": score_magnitude,
    "learned": score_learned,
    "random": score_random,
})
OBJECTIVES = ("dense", "task")
# fisher, with or without repair: obs has the higher and steadier embedding cosine with repair, but lost
# 1.4-2.1 pt of BBC 5-NN accuracy at 50 % over three calibration seeds where fisher lost 0.2-1.0
# (bench/README.md, "How much of this is the calibration sample")
DEFAULT_METHOD = "fisher"  # ShrinkConfig, SweepConfig and the CLI spell it out: they import no torch


def parse_method(method: str) -> tuple[str, dict]:
    """``"iterative:fisher"`` -> ``("iterative", {"base": "fisher"})``; a plain name has no options.

    Raises ``HeadslimError`` for an unknown name, listing the available ones.
    """
    name, _, base = str(method).partition(":")
    if name not in SCORERS or (base and name != "iterative"):
        raise HeadslimError(f"unknown scoring method {method!r}; available: {', '.join(sorted(SCORERS))}"
                            " (and iterative:<method>)")
    if base and (base not in SCORERS or base in ("iterative", "learned")):
        raise HeadslimError(f"iterative needs a one-shot base scorer, not {base!r}")
    return name, ({"base": base} if base else {})


def score_heads(model, batches: Iterable[dict], *, method: str = "gradient", objective: str = "dense",
                seed: int = 0, progress: bool = True, **options) -> torch.Tensor:
    """Score every head of ``model`` on calibration ``batches`` with scorer ``method``.

    Args:
        model: a model an adapter supports; it is left as it was (weights, mode, requires_grad).
        batches: re-iterable batches (dicts of tensors, ``labels`` for ``objective="task"``).
        method: a name in ``SCORERS`` or ``iterative:<base>``.
        objective: ``dense`` (label-free) or ``task``.
        seed: seeds every random choice (random projections, sampled targets, noise).
        progress: show a progress bar over batches.
        options: scorer options, e.g. ``prune`` / ``min_per_layer`` (the target of ``iterative`` and
            ``learned``), ``interactions`` and ``probes`` (``fisher``), ``step`` (``iterative``).

    Returns: ``(layers, max_heads)`` float tensor on the CPU, higher = more important.

    Example:
        >>> scores = score_heads(model, batches(data, tok), method="iterative", prune=0.5)   # doctest: +SKIP
    """
    if objective not in OBJECTIVES:
        raise HeadslimError(f"unknown objective {objective!r}; available: {', '.join(OBJECTIVES)}")
    name, extra = parse_method(method)
    return SCORERS[name](model, batches, objective=objective, seed=seed, progress=progress, **extra, **options)

"""FFN neuron scorers: the head scorers' ideas applied to the other prunable structure.

A neuron is a one-column group of the FFN's down projection (a head is a ``head_dim``-wide group of
the attention output projection), so the same gates and probes serve both: a gate on each neuron's
activation just before the down projection (``headslim.gates``), gradients through the same
label-free Gauss-Newton / Fisher probe (``common.probe``) or the task loss.

Methods (``NEURON_METHODS``):
    ``fisher`` (Kwon et al. 2022): the block-diagonal empirical Fisher of the neuron gates (one
        ``n x n`` block per layer) and a greedy mask search, as for heads; the score is the position
        in the removal order. Layers wider than ``max_block`` neurons use the diagonal only.
    ``gradient``: the diagonal of that Fisher (the first-order removal cost).
    ``obs``: repair-aware Optimal Brain Surgeon costs (``headslim.scoring.reconstruction``): each
        removal priced after the ridge re-fit of the down projection that repair applies, weighted
        by the objective's curvature at the layer output; with ``heads`` the heads in the same unit.
    ``magnitude``: function norm (Lin et al. 2020): RMS over tokens of ``||W_down[:, i]|| * |a_i|``,
        the norm of the neuron's contribution to the layer output; one forward pass, label-free.
    ``random``: the baseline.

Every scorer returns ``(layers, max_neurons)``, higher = more important, ``-inf`` past a layer's width.
With ``heads=True``, ``fisher`` and ``gradient`` also return the head scores of the same backward
passes (``score_structures``), so scoring both kinds costs one pass over the calibration data.
"""

from __future__ import annotations

import torch

from headslim.arch import get_adapter
from headslim.errors import HeadslimError
from headslim.scoring.common import (batch_generator, check_nonempty, finish, frozen, merge_path, model_device, order_scores,
                                     probe_gradients, progress_bar, run_hooked, to_device)

NEURON_METHODS = ("fisher", "gradient", "magnitude", "obs", "random")


def neuron_counts(model) -> list[int]:
    return get_adapter(model).num_neurons(model)


def structure_gradients(model, batches, *, objective: str, seed: int, progress: bool, probes: int = 4,
                        heads: bool = True, desc: str = "scoring heads and FFN neurons", per_sample: bool = False):
    """Yield ``(head_grads, neuron_grads)`` per batch: ``(probes, layers, max_heads)`` (None unless
    ``heads``) and ``(probes, layers, max_neurons)``, each probe's ``g`` with ``E[g g^T]`` = the batch's
    Fisher / Gauss-Newton matrix over the gates (see ``common.probe``). ``per_sample``: gates per sample,
    ``(probes * B, ...)``, whose ``sum g g^T / probes`` estimates the same matrix without the cross terms
    between samples (``common.gate_gradients``)."""
    adapter = get_adapter(model)
    n_heads, widths = adapter.num_heads(model), adapter.num_neurons(model)
    device = model_device(model)
    with frozen(model):
        for i, batch in enumerate(progress_bar(batches, desc, progress)):
            gen = batch_generator(seed, i)  # the draws of this batch, whoever runs it (headslim.distributed)
            batch = to_device(batch, device)
            lead = (len(batch["input_ids"]),) if per_sample else ()
            head_gates = torch.ones(*lead, len(n_heads), max(n_heads), device=device, requires_grad=True) if heads else None
            neuron_gates = torch.ones(*lead, len(widths), max(widths), device=device, requires_grad=True)
            gates = {"neurons": neuron_gates, **({"heads": head_gates} if heads else {})}
            grads, _ = probe_gradients(model, batch, gates, objective, gen, probes)
            hg, ng = grads.get("heads"), grads["neurons"]
            if per_sample:  # (probes, B, layers, width) -> (probes * B, layers, width)
                hg, ng = (hg.flatten(0, 1) if hg is not None else None), ng.flatten(0, 1)
            yield hg, ng


def layer_sequences(blocks: list[torch.Tensor]) -> list[list[tuple[int, float]]]:
    """Each layer's own greedy removal sequence ``[(index, marginal cost), ...]`` under its curvature
    block (``(n, n)``, or ``(n,)`` for the diagonal only): the order in which removing one more adds
    least to ``1/2 r^T C r`` given those already removed."""
    import numpy as np

    sequences = []
    for block in blocks:
        curv = block.double().numpy()
        marginal = 0.5 * (np.diag(curv).copy() if curv.ndim == 2 else curv.copy())  # (n,)
        removed = np.zeros(len(marginal), dtype=bool)
        seq = []
        for _ in range(len(marginal)):
            j = int(np.argmin(np.where(removed, np.inf, marginal)))
            seq.append((j, float(marginal[j])))
            removed[j] = True
            if curv.ndim == 2:
                marginal += curv[:, j]
        sequences.append(seq)
    return sequences


def blockwise_path(blocks: list[torch.Tensor], widths: list[int], min_per_layer: int = 0) -> list[tuple[int, int, float]]:
    """Greedy removal order minimising ``1/2 r^T C r`` over indicators ``r``, ``C`` block-diagonal.

    Args:
        blocks: per layer, the ``(n, n)`` curvature block (a 1-D ``(n,)`` tensor: its diagonal only).
        widths: current structures per layer (``n``).
        min_per_layer: each layer keeps this many until every layer is down to that many.

    Returns: every ``(layer, index, marginal cost)`` in removal order: each step removes the structure
    whose removal adds least to the cost given those already removed. The blocks do not interact, so
    each layer's own greedy sequence is computed alone and the global path merges the sequences,
    always taking the layer whose next removal is cheapest (the same path as a global greedy, in
    ``O(n^2)`` per layer instead of ``O(N^2)``).
    """
    return merge_path(layer_sequences(blocks), widths, min_per_layer)


def score_structures(model, batches, *, method: str = "fisher", objective: str = "dense", seed: int = 0,
                     progress: bool = True, probes: int | None = None, heads: bool = False, min_per_layer: int = 0,
                     min_heads_per_layer: int = 1, max_block: int = 4096, **options) -> dict:
    """Score every FFN neuron (and, with ``heads``, every head in the same passes).

    Args:
        model: a model an adapter supports (dense or pruned); left as it was.
        batches: re-iterable calibration batches.
        method: one of ``NEURON_METHODS``; ``heads=True`` needs ``fisher`` or ``gradient``.
        objective: ``dense`` (label-free) or ``task``.
        probes: random probes per batch; default 1 for ``fisher`` (gradients per sample, as
            ``score_fisher``), 4 for ``gradient`` (per batch) and ``obs``.
        min_per_layer: neurons each layer keeps in the fisher path until every layer is down to it.
        min_heads_per_layer: the same for the heads' path.
        max_block: widest layer whose full Fisher block is kept (memory: ``8 n^2`` bytes a layer).

    Returns: ``{"mlp": (layers, max_neurons)}`` and, with ``heads``, ``"attention": (layers, max_heads)``,
    higher = more important; ``fisher`` and ``gradient`` add ``"sequences"``: per kind and layer, the
    layer's greedy removal sequence ``[(index, marginal cost)]`` (costs of both kinds in one unit:
    the same probes), which ``headslim.budget`` spends to a speed-up target.

    Example:
        >>> scores = score_structures(model, calib_batches, method="fisher", heads=True)   # doctest: +SKIP
    """
    if method not in NEURON_METHODS:
        raise HeadslimError(f"FFN neurons can be scored by {', '.join(NEURON_METHODS)}, not {method!r}")
    widths = neuron_counts(model)
    if heads and method not in ("fisher", "gradient", "obs"):
        raise HeadslimError(f"scoring heads and neurons together needs fisher, gradient or obs, not {method!r}")
    if method == "obs":
        from headslim.scoring.reconstruction import score_obs_structures

        return score_obs_structures(model, batches, objective=objective, seed=seed, progress=progress,
                                    probes=4 if probes is None else probes, heads=heads, min_per_layer=min_per_layer,
                                    min_heads_per_layer=min_heads_per_layer, ridge=options.get("ridge", 1e-2))
    if method == "random":
        gen = torch.Generator().manual_seed(seed + 1)  # not the heads' draw: the two kinds are independent
        return {"mlp": finish(torch.rand(len(widths), max(widths), generator=gen), widths)}
    if method == "magnitude":
        return {"mlp": _magnitude(model, batches, progress)}
    n_heads = get_adapter(model).num_heads(model)
    full = method == "fisher"
    blocks = [torch.zeros((n, n) if full and n <= max_block else (n,), dtype=torch.float64) for n in widths]
    head_curv = torch.zeros(len(n_heads) * max(n_heads), len(n_heads) * max(n_heads), dtype=torch.float64) \
        if heads else None
    seen = 0
    probes = probes if probes is not None else (1 if full else 4)  # fisher per sample (as score_fisher), gradient per batch
    for hg, ng in structure_gradients(model, batches, objective=objective, seed=seed, progress=progress,
                                      probes=probes, heads=heads, per_sample=full,
                                      desc=f"scoring {'heads and ' if heads else ''}FFN neurons ({method})"):
        for layer, n in enumerate(widths):
            g = ng[:, layer, :n]  # (probes [* B], n)
            blocks[layer] += (g.T @ g if blocks[layer].dim() == 2 else g.pow(2).sum(0)) / probes
        if heads:
            flat = hg.flatten(1)  # (probes [* B], layers * max_heads)
            head_curv += flat.T @ flat / probes
        seen += 1
    check_nonempty(seen)
    blocks = [b / seen for b in blocks]
    result = {"sequences": {"mlp": layer_sequences(blocks)}}
    if full:
        result["mlp"] = order_scores(blockwise_path(blocks, widths, min_per_layer), widths)
    else:
        diag = torch.zeros(len(widths), max(widths), dtype=torch.float64)
        for layer, b in enumerate(blocks):
            diag[layer, : widths[layer]] = 0.5 * (b.diagonal() if b.dim() == 2 else b)
        result["mlp"] = finish(diag, widths)
    if heads:
        from headslim.scoring.fisher import layer_mask_search, path_scores

        head_curv /= seen
        width = max(n_heads)
        head_blocks = [head_curv[l * width:l * width + n, l * width:l * width + n] for l, n in enumerate(n_heads)]
        if not full:
            head_blocks = [b.diagonal().clone() for b in head_blocks]
        result["sequences"]["attention"] = layer_sequences(head_blocks)
        if full:
            order = layer_mask_search(head_curv, n_heads, min_heads_per_layer)
            result["attention"] = path_scores(order, n_heads, width)
        else:
            result["attention"] = finish(0.5 * head_curv.diagonal().view(len(n_heads), width), n_heads)
    return result


@torch.no_grad()
def _magnitude(model, batches, progress: bool) -> torch.Tensor:
    """RMS over real tokens of each neuron's contribution norm ``||W_down[:, i]|| |a_i|``."""
    from headslim.scoring.magnitude import o_weight

    adapter = get_adapter(model)
    widths = adapter.num_neurons(model)
    sums = torch.zeros(len(widths), max(widths), dtype=torch.float64)
    state, handles = {}, []
    for layer, (block, n) in enumerate(zip(adapter.mlp_blocks(model), widths)):
        if n == 0:
            continue
        down = adapter.down_proj(block)
        col_norm = o_weight(down).float().norm(dim=0)  # (n,)

        def hook(module, args, layer=layer, n=n, col_norm=col_norm):
            a = args[0].float().pow(2) * state["mask"][..., None].to(args[0].device, torch.float32)  # (B, T, n)
            sums[layer, :n] += (a.sum((0, 1)) * col_norm.pow(2).to(a.device)).double().cpu()

        handles.append(down.register_forward_pre_hook(hook))
    tokens = run_hooked(model, batches, handles, state, "scoring FFN neurons (magnitude)", progress)
    return finish((sums / tokens).sqrt(), widths)

"""What every scorer shares: a frozen model, the objective's output, gate gradients, the final tensor.

Objectives (see ``headslim.scoring``):
    ``dense``: label-free. For a model with a task head (``logits``) the target of the empirical Fisher
        is sampled from the model's own predicted distribution; otherwise the output is the last
        hidden states and gradients are taken through Gaussian random projections of it (the
        Gauss-Newton / output-sensitivity form). Both avoid differentiating a distance to the dense
        model at the dense point, where its gradient is zero.
    ``task``: the model's own per-sample loss on labelled batches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from headslim.arch import get_adapter
from headslim.errors import HeadslimError
from headslim.gates import gated

# name -> scorer. Filled by ``headslim.scoring`` (which imports every scorer module) and read through
# it; here so that a scorer built on the others (``iterative``) can look them up by name without
# importing the package that imports it.
SCORERS: dict[str, Callable[..., torch.Tensor]] = {}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def head_counts(model) -> list[int]:
    return get_adapter(model).num_heads(model)


def finish(scores: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``scores`` as float32 on the CPU with ``-inf`` in the slots beyond each layer's head count."""
    scores = scores.detach().float().cpu().clone()
    for layer, n in enumerate(heads):
        scores[layer, n:] = float("-inf")
    return scores


@contextmanager
def frozen(model):
    """Eval mode and no parameter gradients inside; the model's previous state is restored after."""
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def progress_bar(batches, desc: str, progress: bool):
    return tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def representation(model, batch: dict) -> torch.Tensor:
    """Last hidden states with padding positions zeroed, ``(B, T, d)``."""
    out = model(**inputs_of(batch), output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (B, T, d)
    mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
    return hidden * mask


def _per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``(B,)`` for sequence (``(B, C)``) or token (``(B, T, C)``, -100 ignored) logits."""
    if logits.shape[-1] == 1 and labels.is_floating_point():  # regression head
        return (logits.squeeze(-1) - labels).pow(2).reshape(len(labels), -1).sum(-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logits.dim() == 2:
        return -logp.gather(-1, labels[:, None]).squeeze(-1)  # (B,)
    valid = labels != -100  # (B, T)
    picked = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)  # (B, T)
    return -(picked * valid).sum(-1)  # (B,)


def forward(model, batch: dict):
    """The model's output with hidden states (labels are never passed: losses are computed here)."""
    return model(**inputs_of(batch), output_hidden_states=True)


def dense_target(out, batch: dict) -> torch.Tensor:
    """What ``dense`` keeps: log-probabilities of a task head, else masked last hidden states."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return torch.log_softmax(logits.double(), dim=-1)  # (B, [T,] C); float64: KL values can be tiny
    hidden = out.hidden_states[-1]  # (B, T, d)
    return hidden * batch["attention_mask"][..., None].to(hidden.dtype)


@torch.no_grad()
def fidelity(model, dense, batches: list, cache: dict | None = None) -> tuple[str, float]:
    """How close ``model``'s outputs are to ``dense``'s on ``batches``, as ``(metric, value)``:
    ``("kl", mean KL(dense || model))`` for a model with logits (per sample for a sequence head, per
    real token for a token head or a causal LM; lower is closer), else ``("cosine", mean embedding
    cosine)`` of the mean-pooled sentence embeddings (higher is closer). The dense outputs are
    recomputed batch by batch, so nothing vocabulary-sized is kept between batches. What repair's
    check and the fitted head price (``headslim.tradeoff``) both judge by. ``cache``: a dict kept
    between calls on the same ``dense`` and ``batches``; the dense sentence embeddings are computed
    once into it (the dense side of a KL is vocabulary-sized and is recomputed)."""
    from headslim.quality import pool

    from headslim import distributed

    metric, total, count = "cosine", 0.0, 0.0
    for i, b in enumerate(batches):
        if not distributed.mine(i):  # under torchrun: this rank's share, summed over the ranks below
            continue
        res = forward(model, b)
        if getattr(res, "logits", None) is None:
            mask = b["attention_mask"]
            ref = None if cache is None else cache.get(i)
            if ref is None:
                ref = pool(forward(dense, b).hidden_states[-1], mask).double()  # (B, d)
                if cache is not None:
                    cache[i] = ref
            cos = torch.nn.functional.cosine_similarity(ref, pool(res.hidden_states[-1], mask).double(), dim=-1)  # (B,)
            total += float(cos.sum())
            count += len(cos)
        else:  # the summed KL, over real tokens for a token head
            metric = "kl"
            target = dense_target(forward(dense, b), b)  # (B, [T,] C)
            total += float(discrepancy(res, b, "dense", target))
            count += float(b["attention_mask"].sum()) if target.dim() == 3 else len(target)
            del target
    total, count = distributed.all_sum(total, count)
    if distributed.active():  # a rank that held no batch cannot tell the metric: every rank takes the one with logits
        metric = "kl" if distributed.all_sum(float(metric == "kl")) > 0 else "cosine"
    return metric, total / max(count, 1.0)


def task_losses(out, batch: dict) -> torch.Tensor:
    """Per-sample task loss ``(B,)`` from the labels of ``batch``."""
    if "labels" not in batch:
        raise HeadslimError("objective 'task' needs labelled calibration data (a label column)")
    logits = getattr(out, "logits", None)
    if logits is None:
        raise HeadslimError("objective 'task' needs a model with a task head that returns logits")
    return _per_sample_loss(logits, batch["labels"])


def probe(out, batch: dict, objective: str, gen: torch.Generator) -> torch.Tensor:
    """A scalar whose gate gradient ``g`` has ``E[g g^T]`` = the Fisher / Gauss-Newton matrix of the batch.

    - ``task``: ``sum_x s_x * loss_x`` with Rademacher signs ``s``: the cross terms between samples
      cancel in expectation, so ``E[g g^T] = sum_x grad loss_x grad loss_x^T`` (empirical Fisher)
      from one backward pass per batch.
    - ``dense`` with a task head: the same, with labels sampled from the model's own predictions.
    - ``dense`` without one: ``r . h`` with ``r ~ N(0, I)``: ``E[g g^T] = sum J^T J`` (Gauss-Newton).
    """
    device = batch["input_ids"].device
    logits = getattr(out, "logits", None)
    if objective == "task":
        losses = task_losses(out, batch)  # (B,)
    elif logits is None:
        hidden = dense_target(out, batch)  # (B, T, d)
        r = torch.randn(hidden.shape, generator=gen).to(device=device, dtype=hidden.dtype)
        return (hidden * r).sum()
    else:
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)  # (B, [T,] C)
            flat = probs.reshape(-1, probs.shape[-1]).cpu()
            labels = torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1]).to(device)
            if logits.dim() == 3:  # token-level heads: only real tokens count
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        losses = _per_sample_loss(logits, labels)  # (B,)
    signs = (torch.randint(0, 2, (len(losses),), generator=gen) * 2 - 1).to(device=device, dtype=losses.dtype)
    return (losses * signs).sum()


def discrepancy(out, batch: dict, objective: str, target: torch.Tensor | None) -> torch.Tensor:
    """The objective's value on the batch, summed over samples; the quantity a removal should not raise.

    ``task``: the summed loss. ``dense``: ``1/2 ||h - h_ref||^2`` for hidden states, or
    ``KL(p_ref || p)`` for a task head's predictions; ``target`` is ``dense_target`` of the reference.
    """
    if objective == "task":
        return task_losses(out, batch).sum()
    current = dense_target(out, batch)
    if getattr(out, "logits", None) is not None:
        kl = (target.exp() * (target - current)).sum(-1)  # (B, [T])
        if kl.dim() == 2:
            kl = kl * batch["attention_mask"].to(kl.dtype)
        return kl.sum()
    return 0.5 * (current - target.to(current.dtype)).pow(2).sum()


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random draws of batch ``index``: seeded by the batch itself, so a batch draws the same
    numbers whichever rank runs it (``headslim.distributed``)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def gate_gradients(model, batches, *, objective: str, seed: int, progress: bool, desc: str,
                   mask: torch.Tensor | None = None, probes: int = 1, reference: list | None = None,
                   shard: bool = False, per_sample: bool = False):
    """Yield ``(probe_grads, first)`` per batch at gates ``mask`` (default all ones).

    ``probe_grads`` is ``(probes, layers, max_heads)``: each ``g`` has ``E[g g^T]`` = the batch's
    Fisher / Gauss-Newton matrix (see ``probe``); ``probes`` > 1 re-uses the forward pass.
    ``per_sample``: ``(probes, B, layers, max_heads)`` instead, one gate per sample (same backward
    passes): ``sum_x E[g_x g_x^T]`` is the same matrix without the cross terms between samples, which
    only add noise (each probe's draws are independent across samples).
    ``first`` is the exact gradient of ``discrepancy`` against ``reference[i]`` (the i-th batch's
    dense target; ``None`` for the task objective), or ``None`` when no ``reference`` is given.
    ``shard``: under ``torchrun``, only this rank's batches (``headslim.distributed.mine``); the caller
    sums what it accumulates over the ranks.
    """
    from headslim import distributed

    heads = head_counts(model)
    device = model_device(model)
    base = mask if mask is not None else torch.ones(len(heads), max(heads))
    with frozen(model):
        for i, batch in enumerate(progress_bar(batches, desc, progress)):
            if shard and not distributed.mine(i):
                continue
            gen = batch_generator(seed, i)
            batch = to_device(batch, device)
            gates = base.detach().clone().to(device)
            if per_sample:
                gates = gates.expand(len(batch["input_ids"]), *gates.shape).clone()
            gates.requires_grad_(True)
            target = (reference[i].to(device) if reference[i] is not None else None) if reference is not None else _NO_TARGET
            grads, first = probe_gradients(model, batch, {"heads": gates}, objective, gen, probes, target)
            if first is not None:
                first = first["heads"].sum(0) if per_sample else first["heads"]
            yield grads["heads"], first


_NO_TARGET = object()  # probe_gradients: no exact gradient wanted


def probe_gradients(model, batch: dict, gates: dict, objective: str, gen: torch.Generator, probes: int,
                    target=_NO_TARGET) -> tuple[dict, dict | None]:
    """One forward pass of ``batch`` with ``model`` gated by ``gates`` (``{"heads": ..., "neurons": ...}``,
    either may be absent; tensors that require grad, shapes as :func:`headslim.gates.gated` takes),
    then ``probes`` backward passes: ``({name: (probes, *gate shape) float64 on the CPU}, first)``,
    each probe's gradient of :func:`probe` (draws from ``gen``), and ``first``, the exact gradient of
    :func:`discrepancy` against ``target`` per name (``None`` when no ``target`` is given; a ``None``
    target is the task objective's). What ``gate_gradients`` and ``scoring.neurons.structure_gradients``
    share."""
    with gated(model, gates.get("heads"), neurons=gates.get("neurons")):
        out = forward(model, batch)
    names = list(gates)
    wrt = [gates[name] for name in names]
    want_first = target is not _NO_TARGET
    grads: dict = {name: [] for name in names}
    for k in range(probes):
        got = torch.autograd.grad(probe(out, batch, objective, gen), wrt, retain_graph=k < probes - 1 or want_first)
        for name, g in zip(names, got):
            grads[name].append(g.detach().cpu().double())
    first = None
    if want_first:
        got = torch.autograd.grad(discrepancy(out, batch, objective, target), wrt)
        first = {name: g.detach().cpu().double() for name, g in zip(names, got)}
    return {name: torch.stack(g) for name, g in grads.items()}, first


def check_nonempty(count: int) -> None:
    if count == 0:
        raise HeadslimError("no calibration batches to score on")


def run_hooked(model, batches, handles: list, state: dict, desc: str, progress: bool) -> int:
    """Run ``model`` over ``batches`` for the forward hooks in ``handles``, then remove them.

    Before each forward pass ``state["mask"]`` holds the batch's attention mask ``(B, T)``, which the
    hooks read. Returns the number of real (unpadded) tokens seen, at least 1.
    """
    device = model_device(model)
    tokens = seen = 0
    try:
        with frozen(model):
            for batch in progress_bar(batches, desc, progress):
                batch = to_device(batch, device)
                state["mask"] = batch["attention_mask"]
                model(**inputs_of(batch))
                tokens += int(batch["attention_mask"].sum())
                seen += 1
    finally:
        for h in handles:
            h.remove()
    check_nonempty(seen)
    return max(tokens, 1)


@torch.no_grad()
def dense_reference(model, batches, objective: str = "dense") -> list:
    """Per batch, what the model computes now (``dense_target``, on the CPU); ``None`` for ``task``."""
    if objective == "task":
        return [None for _ in batches]
    device = model_device(model)
    with frozen(model):
        return [dense_target(forward(model, b), b).cpu() for b in (to_device(b, device) for b in batches)]


def merge_path(sequences: list[list[tuple[int, float]]], widths: list[int],
               min_per_layer: int = 0) -> list[tuple[int, int, float]]:
    """Merge per-layer removal sequences ``[(index, marginal cost), ...]`` into one global order
    ``[(layer, index, marginal cost), ...]``: always the layer whose next removal is cheapest, each
    layer keeping ``min_per_layer`` until every layer is down to that many."""
    import heapq

    floors = [min(min_per_layer, n) for n in widths]
    order, pos = [], [0] * len(widths)
    for phase in (0, 1):  # 0: every layer down to its floor; 1: the rest
        limit = [n - f if phase == 0 else n for n, f in zip(widths, floors)]
        heap = [(sequences[l][pos[l]][1], l) for l in range(len(widths)) if pos[l] < limit[l]]
        heapq.heapify(heap)
        while heap:
            _, layer = heapq.heappop(heap)
            j, cost = sequences[layer][pos[layer]]
            order.append((layer, j, cost))
            pos[layer] += 1
            if pos[layer] < limit[layer]:
                heapq.heappush(heap, (sequences[layer][pos[layer]][1], layer))
    return order


def merged_scores(sequences: list[list[tuple[int, float]]], widths: list[int], min_per_layer: int = 0) -> torch.Tensor:
    """Scores ``(layers, max width)`` of :func:`merge_path`'s order: a structure's position in it
    (first removed = 0), ``-inf`` past a layer's width."""
    return order_scores(merge_path(sequences, widths, min_per_layer), widths)


def order_scores(order, widths: list[int]) -> torch.Tensor:
    scores = torch.zeros(len(widths), max(widths) if widths else 0)
    for pos, (layer, index, _) in enumerate(order):
        scores[layer, index] = float(pos)
    return finish(scores, widths)

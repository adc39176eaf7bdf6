"""Surgery: physically remove heads and FFN neurons, fixing weights, biases, counts and config at once."""

from __future__ import annotations

from torch import nn

from headslim.arch import get_adapter, kv_maps
from headslim.errors import HeadslimError
from headslim.plan import PrunePlan


def prune_heads(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Remove every head and FFN neuron ``plan`` does not keep from a dense ``model``, in place, and return it.

    Exact: the result computes what the dense model computes with ``plan.mask()`` as its head gates
    and ``plan.neuron_mask()`` as its neuron gates. Layers that keep no head get a bias-only attention
    block, layers that keep no neuron a bias-only FFN (see ``headslim.arch.stubs``).

    A model that is already pruned takes a plan over its current heads (``plan.num_heads`` equal to
    what it has now); the plans compose, and ``model.headslim_plan`` (what ``save_pruned`` writes)
    is always the one plan over the dense model's heads, so the checkpoint reloads.

    Example:
        >>> plan = PrunePlan(num_heads=[12] * 6, kept_heads=[[0, 1]] * 6)   # doctest: +SKIP
        >>> prune_heads(model, plan)                                         # doctest: +SKIP
    """
    adapter = get_adapter(model)
    current = adapter.num_heads(model)
    if current != plan.num_heads:
        raise HeadslimError(
            f"plan is for a model with heads per layer {plan.num_heads}, this model has {current}"
        )
    if plan.kv_head_of_q is not None:
        maps = kv_maps(model)
        for layer, (want, have) in enumerate(zip(plan.kv_head_of_q, maps)):
            if want != have:
                raise HeadslimError(f"plan is for a model whose layer {layer} maps query heads to KV heads as {want}, "
                                    f"this model maps them as {have}")
    if plan.num_neurons is not None and adapter.num_neurons(model) != plan.num_neurons:
        raise HeadslimError(f"plan is for a model with FFN neurons per layer {plan.num_neurons}, this model has "
                            f"{adapter.num_neurons(model)}")
    previous = getattr(model, "headslim_plan", None)
    applied = plan if previous is None else compose(previous, plan)
    for block, kept, n in zip(adapter.attention_blocks(model), plan.kept_heads, plan.num_heads):
        if len(kept) < n:
            adapter.prune_block(block, kept)
    if plan.num_neurons is not None:
        for block, kept, n in zip(adapter.mlp_blocks(model), plan.kept_neurons, plan.num_neurons):
            if len(kept) < n:
                adapter.prune_mlp(block, kept)
    adapter.update_config(model, applied.pruned_heads)
    model.headslim_plan = applied
    return model


def compose(first: PrunePlan, then: PrunePlan) -> PrunePlan:
    """The plan over the dense model's heads that ``first`` followed by ``then`` amounts to.

    ``then`` indexes the heads ``first`` kept (its ``num_heads`` are ``first.heads_after``). The
    provenance lists both steps; ``then``'s dict is shared, so what is added to it later is kept.

    Example:
        >>> compose(PrunePlan([4], [[0, 2, 3]]), PrunePlan([3], [[0, 2]])).kept_heads
        [[0, 3]]
    """
    if then.num_heads != first.heads_after:
        raise HeadslimError(f"plan is for heads per layer {then.num_heads}, the pruned model has {first.heads_after}")
    kept = [[row[h] for h in step] for row, step in zip(first.kept_heads, then.kept_heads)]
    steps = first.provenance.get("steps", [first.provenance]) if first.provenance.get("composed") else [first.provenance]
    num_neurons = kept_neurons = None
    if first.num_neurons is not None or then.num_neurons is not None:
        before = first.kept_neurons if first.num_neurons is not None else [list(range(n)) for n in then.num_neurons]
        if then.num_neurons is not None and then.num_neurons != [len(k) for k in before]:
            raise HeadslimError(f"plan is for FFN neurons per layer {then.num_neurons}, the pruned model has "
                                f"{[len(k) for k in before]}")
        num_neurons = first.num_neurons if first.num_neurons is not None else then.num_neurons
        kept_neurons = before if then.num_neurons is None else \
            [[row[i] for i in step] for row, step in zip(before, then.kept_neurons)]
    return PrunePlan(first.num_heads, kept, {"composed": True, "steps": [*steps, then.provenance]},
                     kv_head_of_q=first.kv_head_of_q, num_neurons=num_neurons, kept_neurons=kept_neurons)

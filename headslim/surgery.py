"""Head surgery: physically remove heads, fixing weights, biases, head counts and config at once."""

from __future__ import annotations

from torch import nn

from headslim.adapters import get_adapter
from headslim.errors import HeadslimError
from headslim.plan import PrunePlan


def prune_heads(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Remove every head ``plan`` does not keep from a dense ``model``, in place, and return it.

    Exact: the result computes what the dense model computes with ``plan.mask()`` as its gates.
    Layers that keep no head get a bias-only attention block (see ``headslim.modules``).

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
        from headslim.decoders import kv_maps

        maps = kv_maps(model)
        for layer, (want, have) in enumerate(zip(plan.kv_head_of_q, maps)):
            if want != have:
                raise HeadslimError(f"plan is for a model whose layer {layer} maps query heads to KV heads as {want}, "
                                    f"this model maps them as {have}")
    for block, kept, n in zip(adapter.attention_blocks(model), plan.kept_heads, plan.num_heads):
        if len(kept) < n:
            adapter.prune_block(block, kept)
    adapter.update_config(model, plan.pruned_heads)
    return model

"""Run a supported model with a ``[layers, heads]`` gate tensor (1 = keep, 0 = remove).

The gate multiplies each head's context vector just before the output projection, so
``MHA(x) = sum_h gate[l, h] * O_h @ Attn_h(x)``. It is a forward pre-hook on the output projection,
which works on every transformers version and attention backend (5.x removed ``head_mask``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from headslim.adapters import get_adapter
from headslim.errors import HeadslimError


@contextmanager
def gated(model: nn.Module, gates: torch.Tensor):
    """Context manager: inside it, ``model`` runs with its heads scaled by ``gates``.

    Args:
        model: a model an adapter supports (dense or already pruned).
        gates: ``(num_layers, H)`` with ``H >= `` the largest head count; entry ``[l, h]`` gates the
            h-th head *currently* in layer l. May require grad (gradient scorers use that).

    Example:
        >>> with gated(model, torch.ones(6, 12)):    # doctest: +SKIP
        ...     out = model(**batch)
    """
    adapter = get_adapter(model)
    blocks = adapter.attention_blocks(model)
    heads = adapter.num_heads(model)
    head_dim = adapter.head_dim(model)
    if gates.dim() != 2 or gates.shape[0] != len(blocks) or gates.shape[1] < max(heads):
        raise HeadslimError(
            f"gates must have shape ({len(blocks)}, >= {max(heads)}), got {tuple(gates.shape)}"
        )
    handles = []
    for layer, (block, n) in enumerate(zip(blocks, heads)):
        if n == 0:
            continue

        def hook(module, args, layer=layer, n=n):
            x = args[0]  # (B, T, n * D)
            g = gates[layer, :n].to(x.dtype)
            x = (x.unflatten(-1, (n, head_dim)) * g[:, None]).flatten(-2)  # (B, T, n * D)
            return (x, *args[1:])

        handles.append(adapter.o_proj(block).register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()

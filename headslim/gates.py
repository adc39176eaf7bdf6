"""Run a supported model with gates on its structures (1 = keep, 0 = remove).

Heads: a ``[layers, heads]`` tensor multiplies each head's context vector just before the output
projection, so ``MHA(x) = sum_h gate[l, h] * O_h @ Attn_h(x)``. FFN neurons: a ``[layers, neurons]``
tensor multiplies each neuron's activation just before the down projection, so
``FFN(x) = sum_i gate[l, i] * W_down[:, i] act_i(x)``. Both are forward pre-hooks on an output
projection, which work on every transformers version and attention backend (5.x removed ``head_mask``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from headslim.arch import get_adapter
from headslim.errors import HeadslimError


@contextmanager
def gated(model: nn.Module, gates: torch.Tensor | None = None, *, neurons: torch.Tensor | None = None):
    """Context manager: inside it, ``model`` runs with its heads scaled by ``gates`` and its FFN
    neurons by ``neurons``.

    Args:
        model: a model an adapter supports (dense or already pruned).
        gates: ``(num_layers, H)`` with ``H >= `` the largest head count; entry ``[l, h]`` gates the
            h-th head *currently* in layer l. May require grad (gradient scorers use that). None: no gates.
            ``(B, num_layers, H)``: one gate per sample of a batch of ``B`` (per-sample gradients from
            one backward pass).
        neurons: ``(num_layers, N)`` with ``N >=`` the widest FFN; entry ``[l, i]`` gates the i-th FFN
            neuron currently in layer l; ``(B, num_layers, N)`` per sample. None: no gates.

    Example:
        >>> with gated(model, torch.ones(6, 12), neurons=torch.ones(6, 1536)):    # doctest: +SKIP
        ...     out = model(**batch)
    """
    handles = []
    try:
        if gates is not None:
            handles += _head_hooks(model, gates)
        if neurons is not None:
            handles += _neuron_hooks(model, neurons)
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _neuron_hooks(model: nn.Module, gates: torch.Tensor) -> list:
    adapter = get_adapter(model)
    blocks = adapter.mlp_blocks(model)
    widths = adapter.num_neurons(model)
    if gates.dim() not in (2, 3) or gates.shape[-2] != len(blocks) or gates.shape[-1] < max(widths):
        raise HeadslimError(f"neuron gates must have shape ([B,] {len(blocks)}, >= {max(widths)}), got {tuple(gates.shape)}")
    handles = []
    for layer, (block, n) in enumerate(zip(blocks, widths)):
        if n == 0:
            continue

        def hook(module, args, layer=layer, n=n):
            g = gates[..., layer, :n].to(device=args[0].device, dtype=args[0].dtype)  # (n,) or (B, n)
            return (args[0] * (g if g.dim() == 1 else g[:, None]), *args[1:])  # (B, T, n)

        handles.append(adapter.down_proj(block).register_forward_pre_hook(hook))
    return handles


def _head_hooks(model: nn.Module, gates: torch.Tensor) -> list:
    adapter = get_adapter(model)
    blocks = adapter.attention_blocks(model)
    heads = adapter.num_heads(model)
    head_dim = adapter.head_dim(model)
    if gates.dim() not in (2, 3) or gates.shape[-2] != len(blocks) or gates.shape[-1] < max(heads):
        raise HeadslimError(
            f"gates must have shape ([B,] {len(blocks)}, >= {max(heads)}), got {tuple(gates.shape)}"
        )
    handles = []
    for layer, (block, n) in enumerate(zip(blocks, heads)):
        if n == 0:
            continue

        def hook(module, args, layer=layer, n=n):
            x = args[0]  # (B, T, n * D)
            g = gates[..., layer, :n].to(device=x.device, dtype=x.dtype)  # (n,) or (B, n); --device-map: x's device
            g = g[:, None] if g.dim() == 1 else g[:, None, :, None]
            x = (x.unflatten(-1, (n, head_dim)) * g).flatten(-2)  # (B, T, n * D)
            return (x, *args[1:])

        handles.append(adapter.o_proj(block).register_forward_pre_hook(hook))
    return handles

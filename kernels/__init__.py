"""Attention kernels for pruned models (uneven heads per layer, ragged query -> KV head groups).

Imported as ``headslim.kernels``. Importing it is free: it loads neither torch nor Triton; the
names below are resolved on first use, and Triton only when a kernel is launched.

* :func:`encoder_attention`, :func:`ragged_prefill_attention`, :func:`ragged_decode_attention`:
  documented entry points (Triton on CUDA, PyTorch otherwise; ``backend=`` forces either).
* :func:`head_groups` / :class:`HeadGroups`: a query -> KV head map as compact group offsets.
* :func:`enable` / :func:`disable`: make a (pruned) transformers model use the kernels.

Example:
    >>> import torch
    >>> from headslim.kernels import encoder_attention
    >>> q = k = v = torch.randn(2, 7, 3, 32)          # (batch, seqlen, nheads, headdim)
    >>> encoder_attention(q, k, v, torch.ones(2, 7)).shape
    torch.Size([2, 7, 3, 32])
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "encoder_attention": "attention",
    "ragged_prefill_attention": "attention",
    "ragged_decode_attention": "attention",
    "encoder_attention_torch": "attention",
    "ragged_attention_torch": "attention",
    "HeadGroups": "attention",
    "head_groups": "attention",
    "uniform_groups": "attention",
    "triton_available": "attention",
    "BACKENDS": "attention",
    "enable": "wiring",
    "disable": "wiring",
    "kernel_route": "wiring",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

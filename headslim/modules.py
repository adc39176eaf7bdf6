"""Small modules that stand in for an attention block or an FFN whose heads / neurons were all removed.

A layer that keeps no head computes ``LayerNorm(x + b_O)``: no query/key/value projections run and
no zero-sized tensor is created (so ONNX export and every attention backend stay happy).
"""

from __future__ import annotations

import torch
from torch import nn


class NoHeadsSelfAttention(nn.Module):
    """Replaces a self-attention module with zero heads: passes the hidden states through unchanged.

    The output projection that follows it is a :class:`BiasOnly`, which ignores its input.
    Returns ``(hidden_states, None)`` like the transformers self-attention modules it replaces.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.num_attention_heads = 0
        self.attention_head_size = head_dim
        self.all_head_size = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states, None


class BiasOnly(nn.Module):
    """An output projection with no input features: returns its bias broadcast to the input's rows."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.in_features = 0
        self.out_features = bias.shape[0]
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.to(x.dtype).expand(*x.shape[:-1], self.out_features)  # (..., d)


def slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` keeping rows (``dim=0``, output features) or columns (``dim=1``) in ``index``.

    The bias is sliced with the output features and kept whole when input features are sliced.
    """
    weight = layer.weight.detach().index_select(dim, index.to(layer.weight.device)).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            bias = layer.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a ``(num_heads * head_dim, ...)`` projection."""
    rows = [h * head_dim + i for h in heads for i in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


class NoNeurons(nn.Module):
    """Stands in for the first half of an FFN whose neurons were all removed (BERT's ``intermediate``).

    Passes its input through: the output projection after it is a :class:`BiasOnly`, which ignores
    it, so the layer computes ``LayerNorm(b_out + x)`` with no zero-sized tensor.
    """

    out_features = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class NoNeuronsMLP(nn.Module):
    """Stands in for a whole FFN block with no neurons left (Llama-family ``mlp``, GPT-2 ``mlp``):
    returns its output projection's bias (zeros when it had none) for every token."""

    def __init__(self, hidden_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.hidden_size = hidden_size
        # not ``bias``: GPT-2 checkpoints drop keys ending in ``attn.bias``; ``out_bias`` is safe everywhere
        self.out_bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.out_bias is None:
            return hidden_states.new_zeros(hidden_states.shape)  # (B, T, d)
        return self.out_bias.to(hidden_states.dtype).expand(hidden_states.shape)  # (B, T, d)

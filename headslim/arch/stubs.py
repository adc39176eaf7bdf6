"""Zero-unit stand-ins and slicing helpers shared by the families (``headslim.arch``): one place.

A layer that keeps no head (no FFN neuron) gets a small module in place of its attention (FFN)
that computes what the gated dense layer computes with every gate off: the output projection's
bias, added to the residual as usual. No query/key/value projection runs and no zero-sized tensor
is created, so ONNX export and every attention backend stay happy.

* BERT family: :class:`NoHeadsSelfAttention` + :class:`BiasOnly` (``LayerNorm(x + b_O)``), and
  :class:`NoNeurons` + :class:`BiasOnly` for the FFN.
* modules that own their output projection (DistilBERT's attention and FFN):
  :class:`NoHeadsAttention`, :class:`NoNeuronsFFN`, which keep it as a :class:`BiasOnly` under its
  own name (checkpoint keys unchanged, ``headslim.repair`` can re-fit the bias).
* decoders: :class:`NoHeadsDecoderAttention` (keeps the KV cache's length right), :class:`NoNeuronsMLP`.
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


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a self-attention module was called with, whatever the calling convention:
    positional (transformers 5.x), ``hidden_states=`` or ``query=`` (DistilBERT on 4.x)."""
    if args:
        return args[0]
    for name in ("hidden_states", "query", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError("no hidden states among the attention module's arguments")


class NoHeadsAttention(nn.Module):
    """Stands in for a self-attention module that owns its output projection (DistilBERT's) and
    keeps no head: returns that projection's bias for every token, as ``(out, None)``.

    The projection is kept as a :class:`BiasOnly` under its own attribute name (``out_lin``), so
    the checkpoint keeps its key and the adapter's ``o_proj`` still finds it.
    """

    def __init__(self, proj_name: str, bias: torch.Tensor, head_dim: int):
        super().__init__()
        self.proj_name = proj_name
        self.add_module(proj_name, BiasOnly(bias))
        self.n_heads = self.num_heads = 0
        self.attention_head_size = self.head_dim = head_dim

    def forward(self, *args, **kwargs):
        hidden_states = hidden_states_of(args, kwargs)  # (B, T, d)
        return getattr(self, self.proj_name)(hidden_states), None  # (B, T, d)


class NoNeuronsFFN(nn.Module):
    """Stands in for an FFN module with no neurons left that owns its down projection (DistilBERT's
    ``ffn``): returns the projection's bias for every token; the projection is a :class:`BiasOnly`
    under its own name (``lin2``)."""

    def __init__(self, proj_name: str, bias: torch.Tensor):
        super().__init__()
        self.proj_name = proj_name
        self.add_module(proj_name, BiasOnly(bias))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return getattr(self, self.proj_name)(hidden_states)  # (B, T, d)


def find_cache(args: tuple, kwargs: dict):
    """The KV cache a decoder layer hands its attention module, whatever the keyword.

    transformers has renamed it three times (4.x ``past_key_value``, then ``past_key_values``, 5.24
    ``cache``); a stand-in that looks for one name silently stops filling its cache slot at the next
    rename, and every later position and mask is then wrong. So the cache is found by its type.
    """
    from transformers.cache_utils import Cache

    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


class NoHeadsDecoderAttention(nn.Module):
    """Stands in for a decoder self-attention module whose heads were all removed.

    Returns the output projection's bias (zeros when it has none, as in Llama), so the layer adds
    only that to the residual. It still writes a one-element-per-token stub into the KV cache:
    transformers reads the cached length from layer 0's cache (``get_seq_length``) and treats an
    empty tensor as length 0, which would shift every position during generation.
    """

    def __init__(self, layer_idx: int, hidden_size: int, head_dim: int, bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.num_heads = 0
        self.hidden_size = hidden_size
        # not called ``bias``: GPT-2 checkpoints drop ``attn.bias`` keys (an old causal-mask buffer)
        self.o_bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = find_cache(args, kwargs)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # (B, 1, T, 1)
            cache.update(stub, stub, self.layer_idx)
        if self.o_bias is None:
            return hidden_states.new_zeros(hidden_states.shape), None  # (B, T, d)
        return self.o_bias.to(hidden_states.dtype).expand(hidden_states.shape), None  # (B, T, d)

"""Route a (pruned) model's attention through :mod:`headslim.kernels.attention`.

Two routes, picked per model, with the same result:

* **attention-function registry** (transformers 5.x BERT family, and models such as Llama on either
  version): the model's attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
  config._attn_implementation, ...)``. We register ``"headslim"`` (and ``"headslim_triton"``,
  ``"headslim_torch"``) there, plus a mask function under the same names that hands over the plain
  2-D padding mask (as for flash-attention), and switch the model to it.
* **module swap** (encoders on transformers 4.x that compute attention inline: the BERT family's
  ``BertSelfAttention`` / ``BertSdpaSelfAttention``, DistilBERT's ``MultiHeadSelfAttention`` /
  ``DistilBertSdpaAttention``): the model's adapter (``Adapter.kernel_attention``) names each
  layer's attention module and the forward below that fits it; the module's class is swapped for a
  subclass with that ``forward``, which calls the kernel. Parameters, names and state dicts are
  untouched; :func:`disable` swaps back.

Anything the kernels do not cover (dropout in training, head masks, attention probabilities,
relative positions, cross-attention, caches on 4.x encoders) falls back to the original code.
Layers with 0 heads (the stand-ins of :mod:`headslim.arch.stubs`) are left alone.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from headslim.errors import HeadslimError

from .attention import (BACKENDS, HeadGroups, begin_forward, encoder_attention, end_forward, head_groups,
                        ragged_decode_attention, ragged_prefill_attention, tensor_version, uniform_groups,
                        _identity_groups)

ATTN_IMPLEMENTATIONS = {"auto": "headslim", "triton": "headslim_triton", "torch": "headslim_torch"}
_STATE = "_headslim_kernels"  # attribute on the model: how to undo enable()


def enable(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make ``model`` run its attention with headslim's kernels (in place; returns the model).

    Args:
        model: a transformers model, pruned or not. BERT-family and DistilBERT encoders on both
            transformers versions; on the registry route any model whose attention uses it.
        backend: ``"auto"`` (Triton kernels for CUDA tensors, the PyTorch path otherwise),
            ``"triton"`` (always the kernels; on CPU only under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Outputs at real tokens match the original model; outputs at padded query positions are zero
    (they are never read by pooling or losses, and skipping them is where padded batches save time).

    Example:
        >>> from headslim.kernels import enable, disable
        >>> model = enable(model)                # doctest: +SKIP
        >>> out = model(**batch)                 # doctest: +SKIP
        >>> disable(model)                       # doctest: +SKIP
    """
    if backend not in BACKENDS:
        raise HeadslimError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if getattr(model, _STATE, None) is not None:
        disable(model)
    if _uses_attention_registry(model):
        _register()
        previous = model.config._attn_implementation
        name = ATTN_IMPLEMENTATIONS[backend]
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
        else:
            _set_attn_implementation(model, name)
        ragged = _route_ragged_layers(model, name)
        setattr(model, _STATE, {"route": "registry", "previous": previous, "ragged": ragged,
                                "hooks": _forward_hooks(model)})
        return model

    from headslim.arch import get_adapter

    adapter = get_adapter(model)
    swapped = []
    for block in adapter.attention_blocks(model):
        target = adapter.kernel_attention(block)
        if target is None:  # a layer with no heads
            continue
        attn, forward = target
        attn.__class__ = _swapped_class(type(attn), forward)
        attn._headslim_backend = backend
        swapped.append(attn)
    setattr(model, _STATE, {"route": "swap", "modules": swapped, "hooks": _forward_hooks(model)})
    return model


def _forward_hooks(model: nn.Module) -> list:
    """One token per forward pass of ``model``: lets the mask memos work on inference tensors too
    (see ``attention.tensor_version``)."""
    return [model.register_forward_pre_hook(begin_forward),
            model.register_forward_hook(end_forward, always_call=True)]


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable` (in place; returns the model). A model never enabled is returned as is."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if state["route"] == "registry":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(state["previous"])
        else:
            _set_attn_implementation(model, state["previous"])
        for attn, config in state["ragged"]:
            attn.config = config
    else:
        for attn in state["modules"]:
            attn.__class__ = type(attn)._headslim_original_class
            del attn._headslim_backend
    for handle in state["hooks"]:
        handle.remove()
    delattr(model, _STATE)
    return model


def kernel_route(model: nn.Module) -> str | None:
    """``"registry"``, ``"swap"`` or None (not enabled): which route :func:`enable` took."""
    state = getattr(model, _STATE, None)
    return None if state is None else state["route"]


# ----------------------------------------------------------------------------------------------
# Registry route


def _uses_attention_registry(model: nn.Module) -> bool:
    """Whether the model's attention modules dispatch through transformers' AttentionInterface."""
    for module in model.modules():
        source = sys.modules.get(type(module).__module__)
        if type(module).__name__.endswith("Attention") and source is not None:
            return hasattr(source, "ALL_ATTENTION_FUNCTIONS")
    return False


def _route_ragged_layers(model: nn.Module, name: str) -> list:
    """Point the ragged layers of a pruned decoder (``headslim.arch.ragged``: a ``headslim_kv_head_of_q``
    buffer and a ``RaggedConfig`` view naming ``"headslim_ragged"``) at the kernels too, with their
    compact K/V (no gather). Returns ``[(module, original config view)]`` for :func:`disable`."""
    routed = []
    for module in model.modules():
        if "headslim_kv_head_of_q" not in getattr(module, "_buffers", {}):
            continue
        view = getattr(module, "config", None)
        base = getattr(view, "base", None) if view is not None else None
        if base is None:
            continue
        module.config = _kernel_config_view(type(view), name)(base)
        routed.append((module, view))
    return routed


_VIEWS: dict[tuple[type, str], type] = {}


def _kernel_config_view(view_cls: type, name: str) -> type:
    """A subclass of the ragged config view (so ``isinstance`` checks still hold) naming ``name``."""
    key = (view_cls, name)
    if key not in _VIEWS:
        _VIEWS[key] = type(f"{view_cls.__name__}_{name}", (view_cls,), {"_attn_implementation": name})
    return _VIEWS[key]


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older transformers build masks without a registry
        AttentionMaskInterface = None
    for backend, name in ATTN_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make_attention_function(backend))
        if AttentionMaskInterface is not None:
            AttentionMaskInterface.register(name, _padding_mask)
    _REGISTERED = True


def _padding_mask(*, kv_length: int, attention_mask=None, **kwargs):
    """Mask function for the registry: the 2-D key-padding mask ``(B, kv_length)`` as bool, or None.

    Like transformers' flash-attention mask it returns the padding itself (no 4-D mask is built);
    causality comes from the attention module. Unlike it, it never calls ``.all()`` (no host sync).
    Keyword-only: transformers 4.57 and 5.x call mask functions by keyword, with different sets.
    """
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].bool()  # (B, kv_length)


def _make_attention_function(backend: str):
    def headslim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """AttentionInterface signature: ``query (B, Hq, Tq, D)``, ``key/value (B, Hkv, Tk, D)``;
        returns ``((B, Tq, Hq, D), None)``."""
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D) views
        batch, t_q, n_q, _ = q.shape
        t_k = k.shape[1]
        mask = _key_padding(attention_mask, batch, t_k)
        causal = bool(getattr(module, "is_causal", False))
        cross = "Cross" in type(module).__name__
        if mask is False or cross or (module.training and dropout > 0) or kwargs.get("output_attentions"):
            return _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, causal)
        if not causal:
            if n_q != k.shape[2]:
                raise HeadslimError(f"{type(module).__name__}: bidirectional attention with {n_q} query heads "
                                    f"but {k.shape[2]} KV heads is not supported")
            out = encoder_attention(q, k, v, mask, softmax_scale=scaling, backend=backend)
        else:
            groups = _module_groups(module, n_q, k.shape[2], q.device)
            if t_q < t_k and t_q <= 16:  # decoding against a cache
                out = ragged_decode_attention(q, k, v, groups, attention_mask=mask, softmax_scale=scaling,
                                              backend=backend)
            else:
                out = ragged_prefill_attention(q, k, v, groups, mask, softmax_scale=scaling, backend=backend)
        return out, None  # (B, Tq, Hq, D)

    headslim_attention.__name__ = f"headslim_attention_{backend}"
    return headslim_attention


def _module_groups(module: nn.Module, n_q: int, n_kv: int, device) -> HeadGroups:
    """The layer's query -> KV head map: ``module.headslim_groups`` (a :class:`HeadGroups`) or
    ``module.headslim_kv_head_of_q`` (``(n_q,)`` ints, the buffer ``headslim.arch.ragged`` gives a ragged
    layer) or ``module.kv_head_of_q``, else the standard GQA/MHA map.

    The groups derived from ``kv_head_of_q`` are cached on the module (building them syncs once;
    launches then never do), keyed by that tensor's identity.
    """
    groups = getattr(module, "headslim_groups", None)
    if groups is None:
        source = getattr(module, "headslim_kv_head_of_q", None)
        if source is None:
            source = getattr(module, "kv_head_of_q", None)
        key = (id(source), n_q, n_kv)
        cached = getattr(module, "_headslim_groups_cache", None)
        if cached is not None and cached[0] == key:
            groups = cached[1]
        else:
            if source is not None:
                groups = head_groups(source, n_kv)
            elif n_q == n_kv:
                groups = _identity_groups(n_q, str(device))
            else:
                groups = uniform_groups(n_q, n_kv, device)
            module._headslim_groups_cache = (key, groups)
    if groups.num_q_heads != n_q or groups.num_kv_heads != n_kv:
        raise HeadslimError(f"{type(module).__name__}: head map {groups.num_q_heads}->{groups.num_kv_heads} "
                            f"does not match the tensors {n_q}->{n_kv}")
    return groups


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, causal):
    """What the model would do with SDPA, for the cases the kernels do not cover."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        batch, t_q, t_k = query.shape[0], query.shape[2], key.shape[2]
        keep = attention_mask.bool().view(batch, 1, 1, t_k).expand(batch, 1, t_q, t_k)  # (B, 1, Tq, Tk)
        if causal:
            q_pos = torch.arange(t_k - t_q, t_k, device=query.device).view(t_q, 1)
            keep = keep & (torch.arange(t_k, device=query.device).view(1, t_k) <= q_pos)
        attention_mask = keep
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal and attention_mask is None)


_PADDING_MEMO: list = []  # [(mask passed by the model, its _version, batch, t_k, result)]


def _key_padding(mask, batch: int, t_k: int):
    """A ``(B, Tk)`` bool key-padding mask from what a model passes, None for no padding, or False
    when the mask is not a key-padding mask (a 4-D mask that varies over queries is left to SDPA).

    Memoised on the last mask object (every layer gets the same one), so the kernels' own memo of
    per-row ranges hits for all layers too.
    """
    if mask is None:
        return None
    version = tensor_version(mask)  # an inference tensor: the forward pass in progress; None: no memo
    if _PADDING_MEMO and version is not None:
        m, seen, b, tk, result = _PADDING_MEMO[0]
        if m is mask and seen == version and (b, tk) == (batch, t_k):
            return result
    if mask.dim() == 2 and mask.shape == (batch, t_k):
        result = mask if mask.dtype == torch.bool else mask.bool()
    elif mask.dim() == 4 and mask.shape[-1] == t_k and mask.shape[1] == 1:
        result = _additive_to_bool(mask[:, 0, -1, :]).expand(batch, t_k)  # (B, Tk)
    else:
        result = False
    if version is not None:
        _PADDING_MEMO[:] = [(mask, version, batch, t_k, result)]
    return result


def _additive_to_bool(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # 0 = keep, dtype-min = masked


# ----------------------------------------------------------------------------------------------
# Module-swap route (transformers 4.x encoders; the adapter picks the module and the forward)

_SWAPPED: dict[type, type] = {}


def _swapped_class(cls: type, forward) -> type:
    """A subclass of ``cls`` whose forward is ``forward`` (one per class, importable by name from
    this module so a swapped model still pickles)."""
    if getattr(cls, "_headslim_original_class", None) is not None:
        return cls
    if cls not in _SWAPPED:
        name = f"Headslim{cls.__name__}"
        new = type(name, (cls,), {"forward": forward, "_headslim_original_class": cls,
                                  "__module__": __name__})
        new.__qualname__ = name
        globals()[name] = new
        _SWAPPED[cls] = new
    return _SWAPPED[cls]


def bert_self_attention_forward(self, hidden_states, attention_mask=None, head_mask=None,
                                encoder_hidden_states=None, past_key_values=None, output_attentions=False,
                                cache_position=None, **kwargs):
    """``BertSelfAttention.forward`` (4.x signature) on the encoder kernel; the original runs for
    everything else (decoders, caches, cross-attention, head masks, probabilities, dropout)."""
    original = type(self)._headslim_original_class
    mask = _key_padding(attention_mask, hidden_states.shape[0], hidden_states.shape[1])
    if (mask is False or head_mask is not None or encoder_hidden_states is not None or past_key_values is not None
            or output_attentions or kwargs or self.is_decoder
            or getattr(self, "position_embedding_type", "absolute") != "absolute"
            or (self.training and self.dropout.p > 0)):
        return original.forward(self, hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                past_key_values, output_attentions, cache_position, **kwargs)
    batch, seq, _ = hidden_states.shape
    shape = (batch, seq, self.num_attention_heads, self.attention_head_size)
    q = self.query(hidden_states).view(shape)  # (B, T, H, D), read in place by the kernel
    k = self.key(hidden_states).view(shape)  # (B, T, H, D)
    v = self.value(hidden_states).view(shape)  # (B, T, H, D)
    out = encoder_attention(q, k, v, mask, backend=self._headslim_backend)  # (B, T, H, D)
    return out.view(batch, seq, self.all_head_size), None


def distilbert_attention_forward(self, query, key, value, mask, head_mask=None, output_attentions=False):
    """DistilBERT's ``MultiHeadSelfAttention.forward`` (4.x signature; ``mask`` is the 2-D padding
    mask, or SDPA's 4-D additive one, or None) on the encoder kernel, out projection included; the
    original runs for everything else (head masks, probabilities, dropout, distinct query/key/value)."""
    original = type(self)._headslim_original_class
    batch, seq, _ = query.shape
    padding = _key_padding(mask, batch, key.shape[1])
    if (padding is False or head_mask is not None or output_attentions or key is not query or value is not query
            or (self.training and self.dropout.p > 0)):
        return original.forward(self, query, key, value, mask, head_mask, output_attentions)
    head_dim = self.dim // self.n_heads  # as 4.x computes it (surgery keeps dim = n_heads * head size)
    shape = (batch, seq, self.n_heads, head_dim)
    q = self.q_lin(query).view(shape)  # (B, T, H, D)
    k = self.k_lin(query).view(shape)  # (B, T, H, D)
    v = self.v_lin(query).view(shape)  # (B, T, H, D)
    out = encoder_attention(q, k, v, padding, backend=self._headslim_backend)  # (B, T, H, D)
    return (self.out_lin(out.reshape(batch, seq, self.n_heads * head_dim)),)

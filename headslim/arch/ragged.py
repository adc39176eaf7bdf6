"""Ragged grouped-query attention: each KV head serves its own number of query heads.

After ragged pruning, layer ``l`` keeps ``n_q`` query heads and ``n_kv`` KV heads and carries
``kv_head_of_q``: a non-decreasing ``(n_q,)`` index giving the KV head each query head reads.
Standard kernels (SDPA, FlashAttention, ``repeat_kv``) need the same number of query heads per KV
head, so a ragged layer goes through :func:`ragged_attention_forward`, registered in transformers'
attention-function registry as ``"headslim_ragged"``. It gathers K/V by the map (the plain-PyTorch
reference path; the Triton kernels of a separate issue replace it on GPU) and hands the
now-multi-head problem to the model's own attention implementation (``eager`` → :func:`eager_reference`).

Only the ragged layers see ``"headslim_ragged"``: their ``config`` is a :class:`RaggedConfig` view
of the model's config, so masks are still built for the model's own implementation and
``model.config._attn_implementation`` stays whatever the user chose (read live at every call).

The KV cache stores the compact K/V (``n_kv`` heads per layer); nothing is expanded before it.
"""

from __future__ import annotations

import torch
from torch import nn

RAGGED_ATTENTION = "headslim_ragged"


def kv_offsets(kv_head_of_q: list[int]) -> list[int]:
    """Compact form of a non-decreasing map, like ``cu_seqlens`` over heads: KV head ``j`` serves
    query heads ``offsets[j]:offsets[j + 1]``.

    Example:
        >>> kv_offsets([0, 0, 0, 1, 2, 2])
        [0, 3, 4, 6]
    """
    offsets = [0]
    for j in range(max(kv_head_of_q) + 1 if kv_head_of_q else 0):
        offsets.append(offsets[-1] + sum(1 for k in kv_head_of_q if k == j))
    return offsets


def uniform_groups(kv_head_of_q: list[int]) -> int | None:
    """``g`` when the map is ``[0]*g + [1]*g + ...`` (standard GQA, ``repeat_kv`` applies), else None."""
    n_q = len(kv_head_of_q)
    n_kv = max(kv_head_of_q) + 1 if kv_head_of_q else 0
    if n_kv == 0 or n_q % n_kv:
        return None
    g = n_q // n_kv
    return g if list(kv_head_of_q) == [h // g for h in range(n_q)] else None


class RaggedConfig:
    """A live view of a model config whose only difference is ``_attn_implementation``.

    Attention modules look their attention function up by ``self.config._attn_implementation``;
    giving a ragged layer this view routes it (and only it) to :func:`ragged_attention_forward`.
    Every other attribute reads through to the shared config, so later changes there still apply.
    """

    _attn_implementation = RAGGED_ATTENTION

    def __init__(self, base):
        self.__dict__["base"] = base

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "base":  # copy/deepcopy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self.__dict__["base"], name)

    def __setattr__(self, name: str, value):
        setattr(self.__dict__["base"], name, value)


class _OneGroup:
    """The attention module as seen by a standard kernel once K/V have one head per query head."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module):
        self.__dict__["module"] = module

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "module":
            raise AttributeError(name)
        return getattr(self.__dict__["module"], name)


def gather_kv(key: torch.Tensor, value: torch.Tensor, kv_head_of_q: torch.Tensor):
    """K/V with one head per query head.

    Args:
        key, value: ``(B, n_kv, S, D)`` (the compact, cached states).
        kv_head_of_q: ``(n_q,)`` long, the KV head of each query head.

    Returns:
        ``(key, value)``, each ``(B, n_q, S, D)``.
    """
    index = kv_head_of_q.to(key.device)
    return key.index_select(1, index), value.index_select(1, index)  # (B, n_q, S, D) each


def eager_reference(query, key, value, attention_mask, *, scaling: float, dropout: float = 0.0,
                    training: bool = False):
    """Plain-PyTorch multi-head attention, the reference the ragged path is tested against.

    Args:
        query: ``(B, H, T, D)``; key, value: ``(B, H, S, D)`` (already gathered to H heads).
        attention_mask: None, an additive float mask or a boolean keep-mask broadcastable to
            ``(B, H, T, S)`` (transformers' eager/SDPA masks; may be longer than S: sliced).
        scaling: multiplies ``Q K^T``.

    Returns:
        ``(out, weights)``: ``(B, T, H, D)`` as transformers' attention functions return it, and
        ``(B, H, T, S)``.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, H, T, S)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return out, weights


def ragged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs):
    """transformers attention function for a layer with a per-layer query-head → KV-head map.

    Args:
        module: the attention module; carries ``headslim_kv_head_of_q`` ``(n_q,)`` and a
            :class:`RaggedConfig` whose ``base`` names the model's own implementation.
        query: ``(B, n_q, T, D)``; key, value: ``(B, n_kv, S, D)``.
        attention_mask: the mask built for the model's own implementation.
        scaling, dropout, kwargs: passed on (``sliding_window``, ``is_causal``, ...).

    Returns:
        ``(out (B, T, n_q, D), weights or None)``.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    key, value = gather_kv(key, value, module.headslim_kv_head_of_q)  # (B, n_q, S, D) each
    base = module.config.base._attn_implementation or "eager"
    if base == "eager" or base == RAGGED_ATTENTION or base not in ALL_ATTENTION_FUNCTIONS:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return eager_reference(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                               training=module.training)
    return ALL_ATTENTION_FUNCTIONS[base](_OneGroup(module), query, key, value, attention_mask,
                                         scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Add ``"headslim_ragged"`` to transformers' attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED_ATTENTION, ragged_attention_forward)


def make_ragged(attn: nn.Module, kv_head_of_q: list[int] | None) -> None:
    """Give ``attn`` the map (ragged) or remove it (``None``: standard GQA applies)."""
    if kv_head_of_q is None:
        if "headslim_kv_head_of_q" in attn._buffers:
            del attn._buffers["headslim_kv_head_of_q"]
        if isinstance(attn.config, RaggedConfig):
            attn.config = attn.config.base
        return
    register()
    device = next(attn.parameters()).device
    if device.type == "meta":  # built without weights (headslim.load_pruned): the map is data, not a weight
        device = torch.device("cpu")
    # not persistent: the map is rebuilt from the saved plan, so checkpoints stay stock-shaped
    attn.register_buffer("headslim_kv_head_of_q", torch.tensor(kv_head_of_q, dtype=torch.long, device=device),
                         persistent=False)
    if not isinstance(attn.config, RaggedConfig):
        attn.config = RaggedConfig(attn.config)
    attn.num_key_value_groups = 1  # K/V are gathered to one head per query head before any kernel

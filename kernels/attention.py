"""Attention for pruned models: uneven heads per layer and ragged query -> KV head groups.

Three forward (inference) entry points, each documented with its shapes, each dispatching to a
Triton kernel on CUDA and to a plain-PyTorch path otherwise (``backend="auto"``); ``"triton"`` or
``"torch"`` forces one. The PyTorch path is the reference the kernels are tested against and the CPU
path. Triton is imported only when a kernel is launched, so this module works without it.

* :func:`encoder_attention` - bidirectional attention with a key-padding mask, any head count.
* :func:`ragged_prefill_attention` - causal attention where each KV head serves its own number of
  query heads (:class:`HeadGroups`, compact offsets like ``cu_seqlens`` over heads).
* :func:`ragged_decode_attention` - a few new tokens against a KV cache, same ragged map.

All take tensors in the layout the projections produce, ``(batch, seqlen, nheads, headdim)`` with
any strides: ``proj(x).view(B, T, H, D)`` is read in place (no transpose copy). Outputs are
contiguous ``(batch, seqlen_q, nheads_q, headdim)``, so ``out.view(B, T, H * D)`` feeds the output
projection for free. Padded query tokens (mask 0) get zero outputs, as with flash-attention's
unpadded path; fully padded rows never produce NaN.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headslim.errors import HeadslimError

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class HeadGroups:
    """A query -> KV head map stored as groups: query heads sorted by KV head plus offsets.

    Query heads of KV head ``g`` are ``q_head_index[offsets[g]:offsets[g + 1]]`` (like ``cu_seqlens``
    over heads). Build it once per layer with :func:`head_groups`; it is reused by every call.

    Attributes:
        kv_head_of_q: ``(nheads_q,)`` int64, the KV head each query head reads.
        q_head_index: ``(nheads_q,)`` int32, query heads ordered by KV head (stable).
        offsets: ``(nheads_kv + 1,)`` int32, group boundaries into ``q_head_index``.
        num_kv_heads: number of KV heads.
        max_group: size of the largest group (a Python int, so launches never sync).
    """

    kv_head_of_q: torch.Tensor
    q_head_index: torch.Tensor
    offsets: torch.Tensor
    num_kv_heads: int
    max_group: int

    @property
    def num_q_heads(self) -> int:
        return self.kv_head_of_q.numel()

    def to(self, device) -> HeadGroups:
        return HeadGroups(self.kv_head_of_q.to(device), self.q_head_index.to(device), self.offsets.to(device),
                          self.num_kv_heads, self.max_group)


def head_groups(kv_head_of_q, num_kv_heads: int | None = None) -> HeadGroups:
    """Group query heads by the KV head they read (any map; a non-decreasing one keeps head order).

    Args:
        kv_head_of_q: ``(nheads_q,)`` ints, KV head of each query head (tensor or list).
        num_kv_heads: number of KV heads; defaults to ``max(kv_head_of_q) + 1``. KV heads nobody
            reads are allowed (their group is empty).

    Example:
        >>> g = head_groups([0, 0, 0, 1, 2, 2], num_kv_heads=3)
        >>> g.offsets.tolist(), g.max_group
        ([0, 3, 4, 6], 3)
    """
    kv = torch.as_tensor(kv_head_of_q).to(torch.long).reshape(-1)  # (Hq,)
    if kv.numel() == 0:
        raise HeadslimError("head map has no query heads (a layer with 0 heads needs no attention)")
    lo, hi = int(kv.min()), int(kv.max())
    if num_kv_heads is None:
        num_kv_heads = hi + 1
    if lo < 0 or hi >= num_kv_heads:
        raise HeadslimError(f"head map refers to KV head {hi if hi >= num_kv_heads else lo}, "
                            f"outside 0..{num_kv_heads - 1}")
    counts = torch.bincount(kv, minlength=num_kv_heads)  # (Hkv,)
    offsets = torch.zeros(num_kv_heads + 1, dtype=torch.int32, device=kv.device)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    order = torch.argsort(kv, stable=True).to(torch.int32)  # (Hq,)
    return HeadGroups(kv, order, offsets, num_kv_heads, int(counts.max()))


def uniform_groups(num_q_heads: int, num_kv_heads: int, device=None) -> HeadGroups:
    """The standard GQA/MHA map: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``."""
    if num_q_heads % num_kv_heads:
        raise HeadslimError(f"{num_q_heads} query heads do not split evenly over {num_kv_heads} KV heads")
    kv = torch.arange(num_q_heads, device=device) // (num_q_heads // num_kv_heads)
    return head_groups(kv, num_kv_heads)


# ----------------------------------------------------------------------------------------------
# Public entry points


def encoder_attention(q, k, v, attention_mask=None, *, softmax_scale: float | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Bidirectional (encoder) attention with a key-padding mask; any number of heads, even 1.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, any strides, e.g. ``query(x).view(B, T, H, D)``.
        k: ``(batch, seqlen_k, nheads, headdim)``.
        v: ``(batch, seqlen_k, nheads, headdim)``.
        attention_mask: ``(batch, seqlen_k)``, 1/True for real tokens, 0/False for padding; None
            means no padding. When ``seqlen_q == seqlen_k`` (self-attention) it marks padded
            queries too, whose outputs are zero and whose query tiles cost nothing.
        softmax_scale: defaults to ``headdim ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, PyTorch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``(batch, seqlen_q, nheads, headdim)`` contiguous, dtype of ``q``.

    Example:
        >>> B, T, H, D = 2, 7, 3, 32
        >>> x = torch.randn(B, T, 3 * H * D)
        >>> q, k, v = x.split(H * D, dim=-1)
        >>> mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        >>> out = encoder_attention(q.view(B, T, H, D), k.view(B, T, H, D), v.view(B, T, H, D), mask)
        >>> out.reshape(B, T, H * D).shape
        torch.Size([2, 7, 96])
    """
    _check_qkv(q, k, v, same_heads=True)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mask = _check_mask(attention_mask, q.shape[0], k.shape[1])
    if _use_triton(backend, q):
        groups = _identity_groups(q.shape[2], str(q.device))
        return _run_triton(q, k, v, groups, mask, None, causal=False, mask_queries=q.shape[1] == k.shape[1],
                           scale=scale, num_splits=1)
    return encoder_attention_torch(q, k, v, mask, softmax_scale=scale)


def ragged_prefill_attention(q, k, v, groups: HeadGroups, attention_mask=None, *,
                             softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention where KV head ``g`` serves its own set of query heads (ragged GQA).

    The Triton kernel schedules per KV head: each K/V tile it loads is used by all query heads of
    that group, whatever the group's size.

    Args:
        q: ``(batch, seqlen_q, nheads_q, headdim)``, any strides.
        k: ``(batch, seqlen_k, nheads_kv, headdim)`` with ``seqlen_k >= seqlen_q``; query token ``t``
            sits at key position ``seqlen_k - seqlen_q + t`` (bottom-right aligned causal mask, so a
            prefill that extends a cache works too).
        v: ``(batch, seqlen_k, nheads_kv, headdim)``.
        groups: :class:`HeadGroups` from :func:`head_groups` (``nheads_q`` heads, ``nheads_kv`` groups).
        attention_mask: ``(batch, seqlen_k)`` key-padding mask (1 real, 0 pad; left padding is
            fine) or None. Padded query tokens get zero outputs.
        softmax_scale: defaults to ``headdim ** -0.5``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(batch, seqlen_q, nheads_q, headdim)`` contiguous, dtype of ``q``.

    Example:
        >>> g = head_groups([0, 0, 0, 1, 2, 2])
        >>> q, k, v = torch.randn(1, 9, 6, 64), torch.randn(1, 9, 3, 64), torch.randn(1, 9, 3, 64)
        >>> ragged_prefill_attention(q, k, v, g).shape
        torch.Size([1, 9, 6, 64])
    """
    _check_qkv(q, k, v, same_heads=False)
    _check_groups(groups, q, k)
    if k.shape[1] < q.shape[1]:
        raise HeadslimError(f"causal attention needs seqlen_k >= seqlen_q, got {k.shape[1]} < {q.shape[1]}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mask = _check_mask(attention_mask, q.shape[0], k.shape[1])
    if _use_triton(backend, q):
        return _run_triton(q, k, v, groups.to(q.device), mask, None, causal=True, mask_queries=True,
                           scale=scale, num_splits=1)
    return ragged_attention_torch(q, k, v, groups, mask, None, softmax_scale=scale)


def ragged_decode_attention(q, k_cache, v_cache, groups: HeadGroups, cache_seqlens=None, attention_mask=None, *,
                            softmax_scale: float | None = None, num_splits: int | None = None,
                            backend: str = "auto") -> torch.Tensor:
    """One decode step (one or a few new tokens) against a KV cache, with a ragged head map.

    Memory-bound: the Triton kernel reads each KV head's cache once for its whole query group, and
    splits long caches over several programs (flash-decoding) so small batches still fill the GPU.

    Args:
        q: ``(batch, seqlen_q, nheads_q, headdim)``, the new tokens (``seqlen_q`` small, e.g. 1).
        k_cache: ``(batch, seqlen_cache, nheads_kv, headdim)``, any strides: a transformers cache
            ``(B, Hkv, T, D)`` is passed as ``cache.transpose(1, 2)``. The new tokens' keys must
            already be written.
        v_cache: ``(batch, seqlen_cache, nheads_kv, headdim)``.
        groups: :class:`HeadGroups` (``nheads_q`` heads, ``nheads_kv`` groups).
        cache_seqlens: ``(batch,)`` int, valid cache length per row (static caches); default
            ``seqlen_cache``. The new tokens are the last ``seqlen_q`` of them (causal among them).
        attention_mask: ``(batch, seqlen_cache)`` key-padding mask (e.g. left-padded prompts) or None.
        softmax_scale: defaults to ``headdim ** -0.5``.
        num_splits: split the cache over this many programs per KV head (Triton only); default
            picks one from the GPU size.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(batch, seqlen_q, nheads_q, headdim)`` contiguous, dtype of ``q``.

    Example:
        >>> g = head_groups([0, 1, 1, 1])
        >>> q = torch.randn(2, 1, 4, 64)
        >>> kc, vc = torch.randn(2, 100, 2, 64), torch.randn(2, 100, 2, 64)
        >>> ragged_decode_attention(q, kc, vc, g, cache_seqlens=torch.tensor([100, 37])).shape
        torch.Size([2, 1, 4, 64])
    """
    _check_qkv(q, k_cache, v_cache, same_heads=False)
    _check_groups(groups, q, k_cache)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mask = _check_mask(attention_mask, q.shape[0], k_cache.shape[1])
    if cache_seqlens is not None:
        cache_seqlens = torch.as_tensor(cache_seqlens, device=q.device).reshape(-1)
        if cache_seqlens.numel() != q.shape[0]:
            raise HeadslimError(f"cache_seqlens has {cache_seqlens.numel()} entries for batch {q.shape[0]}")
    if _use_triton(backend, q):
        return _run_triton(q, k_cache, v_cache, groups.to(q.device), mask, cache_seqlens, causal=True,
                           mask_queries=mask is not None, scale=scale, num_splits=num_splits, decode=True)
    return ragged_attention_torch(q, k_cache, v_cache, groups, mask, cache_seqlens, softmax_scale=scale)


# ----------------------------------------------------------------------------------------------
# PyTorch paths (reference and CPU path)


def encoder_attention_torch(q, k, v, attention_mask=None, *, softmax_scale: float | None = None) -> torch.Tensor:
    """PyTorch path of :func:`encoder_attention` (same arguments and result): SDPA with a bool mask."""
    batch, t_q, heads, head_dim = q.shape
    t_k = k.shape[1]
    keep = None
    if attention_mask is not None:
        keep = (attention_mask != 0).view(batch, 1, 1, t_k)  # (B, 1, 1, Tk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=keep, scale=softmax_scale)  # (B, H, Tq, D)
    out = out.transpose(1, 2)  # (B, Tq, H, D)
    if attention_mask is not None:
        # Padded queries and rows with no real key are zero (SDPA may give NaN for the latter on GPU).
        row_ok = (attention_mask != 0).any(1).view(batch, 1, 1, 1)  # (B, 1, 1, 1)
        if t_q == t_k:
            row_ok = row_ok & (attention_mask != 0).view(batch, t_q, 1, 1)  # (B, Tq, 1, 1)
        out = torch.where(row_ok, out, out.new_zeros(()))
    return out.contiguous()


def ragged_attention_torch(q, k, v, groups: HeadGroups, attention_mask=None, cache_seqlens=None, *,
                           softmax_scale: float | None = None) -> torch.Tensor:
    """PyTorch path of the ragged prefill and decode: ``index_select`` K/V per query head, then SDPA.

    Same arguments and result as :func:`ragged_decode_attention` (prefill is the case
    ``cache_seqlens=None``); the causal mask is bottom-right aligned at each row's valid length.
    """
    batch, t_q, _, _ = q.shape
    t_k = k.shape[1]
    kv_index = groups.kv_head_of_q.to(k.device)
    k_rep = k.index_select(2, kv_index)  # (B, Tk, Hq, D)
    v_rep = v.index_select(2, kv_index)  # (B, Tk, Hq, D)
    kv_len = _kv_len(cache_seqlens, batch, t_k, q.device)  # (B,)
    key_pos = torch.arange(t_k, device=q.device)  # (Tk,)
    q_pos = kv_len.view(batch, 1) - t_q + torch.arange(t_q, device=q.device)  # (B, Tq)
    keep = key_pos.view(1, 1, t_k) <= q_pos.view(batch, t_q, 1)  # (B, Tq, Tk) causal, and < kv_len
    if attention_mask is not None:
        keep = keep & (attention_mask != 0).view(batch, 1, t_k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_rep.transpose(1, 2), v_rep.transpose(1, 2),
                                         attn_mask=keep.unsqueeze(1), scale=softmax_scale)  # (B, Hq, Tq, D)
    out = out.transpose(1, 2)  # (B, Tq, Hq, D)
    row_ok = keep.any(-1)  # (B, Tq)
    if attention_mask is not None:
        q_real = torch.gather(attention_mask != 0, 1, q_pos.clamp(0, t_k - 1)) & (q_pos >= 0)  # (B, Tq)
        row_ok = row_ok & q_real
    out = torch.where(row_ok.view(batch, t_q, 1, 1), out, out.new_zeros(()))
    return out.contiguous()


# ----------------------------------------------------------------------------------------------
# Dispatch and launch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _kernel_module():
    return importlib.import_module("._triton_attention", __package__)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise HeadslimError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "auto":
        return q.is_cuda and triton_available()
    if not triton_available():
        raise HeadslimError("backend='triton' needs the triton package (pip install 'headslim[triton]')")
    if not q.is_cuda and not _interpreting():
        raise HeadslimError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU)")
    return True


@functools.lru_cache(maxsize=64)
def _identity_groups(num_heads: int, device: str) -> HeadGroups:
    return head_groups(torch.arange(num_heads, device=device), num_heads)


def _kv_len(cache_seqlens, batch: int, t_k: int, device) -> torch.Tensor:
    if cache_seqlens is None:
        return torch.full((batch,), t_k, dtype=torch.int32, device=device)
    return cache_seqlens.to(device=device, dtype=torch.int32).clamp(0, t_k)


def _key_ranges(mask, kv_len: torch.Tensor):
    """First real key and one past the last real key per row (no host sync); empty rows get 0, 0."""
    if mask is None:
        return torch.zeros_like(kv_len), kv_len
    t_k = mask.shape[1]
    real = mask != 0  # (B, Tk)
    has = real.any(1)
    first = real.to(torch.int8).argmax(1)  # argmax returns the first maximum
    last = t_k - real.flip(1).to(torch.int8).argmax(1)
    start = torch.where(has, first, 0).to(torch.int32)
    stop = torch.minimum(torch.where(has, last, 0).to(torch.int32), kv_len)
    return start, stop


_MASK_MEMO: list = []  # [(mask, its _version, cache_seqlens, t_k, result)]: the last mask seen
_FULL_MEMO: dict = {}  # (batch, t_k, device) -> metadata of calls with neither mask nor cache_seqlens


def _mask_metadata(mask, cache_seqlens, batch: int, t_k: int, device):
    """``kv_len, kv_start, kv_stop`` (each ``(B,)`` int32) and the ``(B, Tk)`` int8 mask for a launch.

    Every layer of a model receives the same mask object, so the last result is memoised on that
    object (identity + version counter; the memo holds a reference, so the id cannot be reused):
    a 12-layer encoder then runs these few small ops once per forward instead of 12 times. Calls
    without mask and cache lengths reuse read-only tensors made once per shape: on a GPU each small
    op costs host time comparable to the attention kernel itself at encoder sizes.
    """
    if mask is None and cache_seqlens is None:  # no padding: constant per shape, made once
        key = (batch, t_k, str(device))
        result = _FULL_MEMO.get(key)
        if result is None:
            kv_len = _kv_len(None, batch, t_k, device)  # (B,)
            result = (kv_len, torch.zeros_like(kv_len), kv_len, None)
            if len(_FULL_MEMO) >= 64:
                _FULL_MEMO.clear()
            _FULL_MEMO[key] = result
        return result
    version = tensor_version(mask)
    if _MASK_MEMO and version is not None:
        m, seen, seqlens, tk, result = _MASK_MEMO[0]
        if m is mask and seen == version and seqlens is cache_seqlens and tk == t_k:
            return result
    kv_len = _kv_len(cache_seqlens, batch, t_k, device)  # (B,)
    kv_start, kv_stop = _key_ranges(mask, kv_len)  # (B,), (B,)
    mask_i8 = None if mask is None else (mask != 0).to(torch.int8).contiguous()  # (B, Tk)
    result = (kv_len, kv_start, kv_stop, mask_i8)
    if version is not None:
        _MASK_MEMO[:] = [(mask, version, cache_seqlens, t_k, result)]
    return result


# The model forward pass in progress, set by the hooks :func:`headslim.kernels.enable` puts on the
# model: [token (a fresh object per outermost forward, None outside one), nesting depth].
_FORWARD: list = [None, 0]


def tensor_version(t):
    """What a memo on ``t`` must match: its in-place version counter; for an inference tensor (made
    under ``torch.inference_mode()``, which tracks no versions) the model forward pass in progress,
    so every layer of one pass shares the work and the next pass redoes it; None (no memo) for no
    tensor, or an inference tensor outside an enabled model's forward."""
    if t is None:
        return None
    if t.is_inference():
        return None if _FORWARD[0] is None else ("forward", _FORWARD[0])
    return t._version


def begin_forward(*_args, **_kwargs) -> None:
    """Forward pre-hook of an enabled model: a new pass starts (nested passes share the outer one)."""
    if _FORWARD[1] == 0:
        _FORWARD[0] = object()
    _FORWARD[1] += 1


def end_forward(*_args, **_kwargs) -> None:
    """Forward hook (``always_call``) of an enabled model: the pass ends, even by an exception."""
    _FORWARD[1] = max(0, _FORWARD[1] - 1)
    if _FORWARD[1] == 0:
        _FORWARD[0] = None


def _launch_config(q, k, rows_per_group: int, decode: bool):
    """Tile sizes and warps. On GPU: flash-attention-like tiles (smaller for fp32 and headdim 128, whose
    tiles take more shared memory; decode tiles just cover a group's rows). On the CPU interpreter:
    64 x 64, which runs fastest there while 129-token tests still span three tiles."""
    return dict(_tile_config(q.is_cuda, q.shape[-1], q.dtype, rows_per_group, decode))  # a copy of the cached one


@functools.lru_cache(maxsize=256)
def _tile_config(is_cuda: bool, head_dim: int, dtype: torch.dtype, rows_per_group: int, decode: bool) -> dict:
    """``_launch_config``, computed once per distinct call shape."""
    rows_pow2 = max(16, 1 << max(0, (rows_per_group - 1).bit_length()))
    if not is_cuda:
        return dict(block_m=min(64, rows_pow2), block_n=64, num_warps=4, num_stages=1)
    big = head_dim > 64 or dtype == torch.float32
    if decode:
        return dict(block_m=min(64, rows_pow2), block_n=64, num_warps=4, num_stages=3)
    block_m = min(64 if big else 128, rows_pow2)
    return dict(block_m=block_m, block_n=32 if dtype == torch.float32 else 64,
                num_warps=8 if head_dim > 64 else 4, num_stages=2 if big else 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_splits(q, k, groups: HeadGroups, block_m: int, block_n: int) -> int:
    """Enough programs to fill the GPU (about 2 per SM), but at least 4 key tiles per split."""
    if not q.is_cuda:
        return 1
    batch, t_q = q.shape[:2]
    programs = batch * groups.num_kv_heads * math.ceil(groups.max_group * t_q / block_m)
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    by_gpu = math.ceil(2 * sms / max(1, programs))
    by_len = max(1, k.shape[1] // (4 * block_n))
    return max(1, min(by_gpu, by_len, 64))


def _run_triton(q, k, v, groups: HeadGroups, mask, cache_seqlens, *, causal: bool, mask_queries: bool,
                scale: float, num_splits: int | None, decode: bool = False) -> torch.Tensor:
    kmod = _kernel_module()
    batch, t_q, n_q, head_dim = q.shape
    cfg = _launch_config(q, k, groups.max_group * t_q, decode=decode)
    if num_splits is None:
        num_splits = _choose_splits(q, k, groups, cfg["block_m"], cfg["block_n"])
    kv_len, kv_start, kv_stop, mask_i8 = _mask_metadata(mask, cache_seqlens, batch, k.shape[1], q.device)
    out = torch.empty(batch, t_q, n_q, head_dim, device=q.device, dtype=q.dtype)  # (B, Tq, Hq, D)
    precision = "ieee"
    if q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # follow PyTorch's own fp32 matmul setting
    kmod.launch_attention(q, k, v, out, mask_i8, kv_len, kv_start, kv_stop, groups.q_head_index, groups.offsets,
                          groups.max_group, causal=causal, mask_queries=mask_queries and mask is not None,
                          softmax_scale=scale, num_splits=max(1, int(num_splits)), dot_precision=precision, **cfg)
    return out


# ----------------------------------------------------------------------------------------------
# Argument checks (one-line errors)


def _check_qkv(q, k, v, *, same_heads: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise HeadslimError(f"{name} must be (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise HeadslimError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise HeadslimError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or headdim")
    if same_heads and q.shape[2] != k.shape[2]:
        raise HeadslimError(f"q has {q.shape[2]} heads but k has {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise HeadslimError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0:
        raise HeadslimError("attention with 0 heads: leave such layers alone (NoHeadsSelfAttention)")


def _check_groups(groups: HeadGroups, q, k) -> None:
    if not isinstance(groups, HeadGroups):
        raise HeadslimError("pass the head map as HeadGroups (headslim.kernels.head_groups(kv_head_of_q))")
    if groups.num_q_heads != q.shape[2] or groups.num_kv_heads != k.shape[2]:
        raise HeadslimError(f"head map is {groups.num_q_heads} query -> {groups.num_kv_heads} KV heads, "
                            f"tensors have {q.shape[2]} -> {k.shape[2]}")


def _check_mask(mask, batch: int, t_k: int):
    if mask is None:
        return None
    if mask.shape != (batch, t_k):
        raise HeadslimError(f"attention_mask must be (batch, seqlen_k) = ({batch}, {t_k}), got {tuple(mask.shape)}")
    return mask

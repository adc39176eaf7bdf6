"""Triton kernels behind :mod:`headslim.kernels.attention` (imported lazily: needs ``triton``).

One forward kernel serves the three public entry points. Its unit of work is a *row tile* of one
KV head: the rows are (query token, query head of that KV head's group) pairs laid out token-major,
``row = t * group_size + j``, so a tile holds every head of the group for ``BLOCK_M / group_size``
consecutive tokens and each K/V tile it loads is used by the whole group at once. Groups may have
different sizes (ragged); the grid is sized for the largest group and programs past the end of a
smaller group exit at once. The encoder case is the identity map (every group has one head).

Per batch row the kernel only visits keys in ``[kv_start, kv_stop)`` (first and last real token of
the key-padding mask), so padded batches cost what their real tokens cost; a row tile whose query
tokens are all padding does no key iterations at all and writes zeros. Inside the range the mask
is applied element-wise, so masks with holes stay exact.

The decode path splits the key range over ``num_splits`` programs (flash-decoding): each writes a
partial output and its log-sum-exp (base 2), and :func:`_combine_kernel` merges them.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Finite start value for the running max: a row whose keys are all masked keeps m = -1e30 and
# l = 0 (no inf - inf = NaN), and is written as zeros.
_M_INIT = tl.constexpr(-1.0e30)

# Whether the kernels below were created for the CPU interpreter (decided at decoration time). Its
# tl.dot mis-handles bfloat16 operands (Triton 3.9), so there bf16 tiles are upcast before the dot.
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs; it read the variable the same way
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Reductions go through tl.reduce with the library's own combine functions: the interpreter runs
# exactly these with numpy (anything else it loops over in Python), and never has to call them,
# which matters when triton was imported before TRITON_INTERPRET=1 was set (torch imports it) and
# its library jit functions were created for the compiler. The same holds for avoiding tl.max,
# tl.sum, tl.zeros and tl.cdiv, which are such library jit functions.
_max_op = tl.standard._elementwise_max
_add_op = tl.standard._sum_combine


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Mask, KvLen, KvStart, KvStop, QHeadIdx, GroupOff, PartO, PartLse,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb, stride_mt,
    stride_pos, stride_pob, stride_poh, stride_pot,
    stride_pls, stride_plb, stride_plh,
    T_Q, num_splits, split_chunk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_QUERIES: tl.constexpr,
    SPLIT_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)  # KV head
    bs = tl.program_id(2)
    b = (bs // num_splits).to(tl.int64)  # 64-bit offsets: B * T * H * D may exceed 2**31
    split = bs % num_splits

    g_lo = tl.load(GroupOff + g)
    group = tl.load(GroupOff + g + 1) - g_lo
    n_rows = group * T_Q
    n_tiles = (n_rows + BLOCK_M - 1) // BLOCK_M
    if tile >= n_tiles:  # grid is sized for the largest group
        return
    # Heaviest (latest, under a causal mask) tiles first: shortens the tail of the launch.
    row_tile = n_tiles - 1 - tile

    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < n_rows
    tok = rows // group  # query token of each row
    qh = tl.load(QHeadIdx + g_lo + (rows - tok * group), mask=row_ok, other=0)  # query head of each row
    kv_len = tl.load(KvLen + b)
    pos = kv_len - T_Q + tok  # key position each query token sits at (bottom-right aligned)

    k_first = tl.load(KvStart + b)
    hi = tl.load(KvStop + b)
    lo = (k_first // BLOCK_N) * BLOCK_N  # tile-aligned start; keys before k_first are never loaded
    if IS_CAUSAL:
        last_tok = (tl.minimum(row_tile * BLOCK_M + BLOCK_M, n_rows) - 1) // group
        hi = tl.minimum(hi, kv_len - T_Q + last_tok + 1)
    if MASK_QUERIES:
        q_in = row_ok & (pos >= 0) & (pos < kv_len)
        q_real = tl.load(Mask + b * stride_mb + pos * stride_mt, mask=q_in, other=0) != 0
        q_valid = q_in & q_real  # (BLOCK_M,)
        # A tile of padding queries visits no key at all.
        hi = tl.where(tl.reduce(q_valid.to(tl.int32), 0, _max_op) > 0, hi, lo)
    if SPLIT_KV:
        lo = tl.maximum(lo, split * split_chunk)
        hi = tl.minimum(hi, split * split_chunk + split_chunk)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + tok[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_UPCAST:  # exact for q and k; p is rounded to the input dtype first, as on the GPU
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_ok = (offs_n >= k_first) & (offs_n < hi)
        k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if DOT_UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        valid = n_ok[None, :]
        if HAS_MASK:
            k_real = tl.load(Mask + b * stride_mb + offs_n * stride_mt, mask=n_ok, other=0) != 0
            valid = valid & k_real[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_op))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add_op)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        p = p.to(v.dtype)
        if DOT_UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    if MASK_QUERIES:
        has_keys = has_keys & q_valid
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out = tl.where(has_keys[:, None], out, 0.0)
    if SPLIT_KV:
        po_ptrs = (PartO + split * stride_pos + b * stride_pob + qh[:, None] * stride_poh
                   + tok[:, None] * stride_pot + offs_d[None, :])
        tl.store(po_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + split * stride_pls + b * stride_plb + qh * stride_plh + tok, lse, mask=row_ok)
    else:
        o_ptrs = Out + b * stride_ob + tok[:, None] * stride_ot + qh[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    PartO, PartLse, Out,
    stride_pos, stride_pob, stride_poh, stride_pot,
    stride_pls, stride_plb, stride_plh,
    stride_ob, stride_ot, stride_oh, stride_od,
    H, T_Q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)  # one (batch, token, query head) row
    h = pid % H
    bt = pid // H
    t = bt % T_Q
    b = (bt // T_Q).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PartLse + offs_s * stride_pls + b * stride_plb + h * stride_plh + t,
                  mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    m = tl.reduce(lse, 0, _max_op)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits weigh 0
    denom = tl.reduce(w, 0, _add_op)
    o = tl.load(PartO + offs_s[:, None] * stride_pos + b * stride_pob + h * stride_poh + t * stride_pot
                + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    out = tl.reduce(o * w[:, None], 0, _add_op) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * stride_ob + t * stride_ot + h * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok)


def launch_attention(q, k, v, out, mask, kv_len, kv_start, kv_stop, q_head_idx, group_off, max_group,
                     *, causal: bool, mask_queries: bool, softmax_scale: float, block_m: int, block_n: int,
                     num_splits: int, num_warps: int, num_stages: int, dot_precision: str) -> None:
    """Launch the forward kernel (and the split combine) on tensors validated by the caller.

    Shapes: ``q/out (B, Tq, Hq, D)``, ``k/v (B, Tk, Hkv, D)`` with any strides; ``mask (B, Tk)`` int8
    or None; ``kv_len/kv_start/kv_stop (B,)`` int32; ``q_head_idx (Hq,)`` int32 query heads sorted
    by KV head; ``group_off (Hkv + 1,)`` int32 offsets into it.
    """
    import torch

    batch, t_q, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    n_tiles = triton.cdiv(max_group * t_q, block_m)
    split = num_splits > 1
    if split:
        # Chunks are whole key tiles so no tile straddles two splits.
        split_chunk = triton.cdiv(triton.cdiv(k.shape[1], num_splits), block_n) * block_n
        part_o = torch.empty(num_splits, batch, n_q_heads, t_q, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_splits, batch, n_q_heads, t_q, device=q.device, dtype=torch.float32)
    else:
        split_chunk = 0
        part_o = part_lse = out  # unused placeholders (the SPLIT_KV=False branch never touches them)
    po_strides = part_o.stride()[:4] if split else (0, 0, 0, 0)
    pl_strides = part_lse.stride()[:3] if split else (0, 0, 0)
    mask_arg = mask if mask is not None else kv_len
    mask_strides = mask.stride() if mask is not None else (0, 0)
    log2e = 1.4426950408889634
    grid = (n_tiles, n_kv_heads, batch * num_splits)
    _attn_fwd_kernel[grid](
        q, k, v, out, mask_arg, kv_len, kv_start, kv_stop, q_head_idx, group_off, part_o, part_lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides, *po_strides, *pl_strides,
        t_q, num_splits, split_chunk, softmax_scale * log2e,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        IS_CAUSAL=causal, HAS_MASK=mask is not None, MASK_QUERIES=mask_queries, SPLIT_KV=split,
        DOT_PRECISION=dot_precision, DOT_UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _combine_kernel[(batch * t_q * n_q_heads,)](
            part_o, part_lse, out, *po_strides, *pl_strides, *out.stride(), n_q_heads, t_q, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4 if block_d >= 128 else 2,
        )


def compile_for_gpu(capability: int = 90, dtype: str = "fp16", head_dim: int = 64, *, causal: bool = True,
                    has_mask: bool = True, split_kv: bool = False, block_m: int = 64, block_n: int = 64,
                    num_warps: int = 4, num_stages: int = 3):
    """Compile the forward kernel (and the split combine) for an NVIDIA GPU without needing one.

    The CPU interpreter accepts code the GPU compiler rejects (and the other way round), so CI runs
    this to catch compile errors for sm_80 / sm_90. Needs kernels created for the compiler, i.e.
    this module imported without ``TRITON_INTERPRET=1``. Returns the compiled kernels.

    Example:
        >>> compile_for_gpu(90, "bf16", 128, split_kv=True)   # doctest: +SKIP
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("kernels were created for the interpreter (TRITON_INTERPRET=1); import without it")
    pointer = {"Mask": "*i8", "PartO": "*fp32", "PartLse": "*fp32", "Q": f"*{dtype}", "K": f"*{dtype}",
               "V": f"*{dtype}", "Out": f"*{dtype}", "KvLen": "*i32", "KvStart": "*i32", "KvStop": "*i32",
               "QHeadIdx": "*i32", "GroupOff": "*i32"}
    const = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
                 BLOCK_N=block_n, IS_CAUSAL=causal, HAS_MASK=has_mask, MASK_QUERIES=has_mask, SPLIT_KV=split_kv,
                 DOT_PRECISION="ieee", DOT_UPCAST=False)
    signature = {name: "constexpr" if name in const else pointer.get(name, "fp32" if name == "qk_scale" else "i32")
                 for name in _attn_fwd_kernel.arg_names}
    target = GPUTarget("cuda", capability, 32)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    compiled = [triton.compile(ASTSource(fn=_attn_fwd_kernel, signature=signature, constexprs=const),
                               target=target, options=options)]
    if split_kv:
        c_const = dict(HEAD_DIM=head_dim, BLOCK_D=const["BLOCK_D"], BLOCK_S=8)
        c_sig = {name: "constexpr" if name in c_const else
                 ("*fp32" if name in ("PartO", "PartLse") else f"*{dtype}" if name == "Out" else "i32")
                 for name in _combine_kernel.arg_names}
        compiled.append(triton.compile(ASTSource(fn=_combine_kernel, signature=c_sig, constexprs=c_const),
                                       target=target))
    return compiled

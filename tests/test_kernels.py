"""Parity tests for headslim.kernels: Triton kernels (interpreter on CPU) and the PyTorch path against an
independent fp32 reference, on awkward shapes; and the model wiring on both transformers versions.

Tolerance rule (flash-attention's): for fp16/bf16 the kernel's max error against the fp32 reference must
be at most 2x the error of plain PyTorch attention computed in the same low precision; for fp32 a small
absolute tolerance. Without a GPU the Triton tests run under ``TRITON_INTERPRET=1`` with small shapes; with
one (``torch.cuda.is_available()``) the same tests run on CUDA with larger shapes added.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_MODELS, TF_MAJOR, tiny_inputs, tiny_model

from headslim.compat import cache_kwargs, output_cache
from headslim.errors import HeadslimError
from headslim.kernels import (HeadGroups, disable, enable, encoder_attention, head_groups, kernel_route,
                              ragged_decode_attention, ragged_prefill_attention, triton_available)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture(scope="module")
def triton_backend():
    """Make the Triton kernels runnable here: on a GPU as is; on CPU under the interpreter.

    Triton picks interpreter or compiler when a kernel is *decorated*, so the kernel module is
    (re)imported after setting ``TRITON_INTERPRET=1``, whether or not something imported triton or
    the kernels before this test module ran.
    """
    if not triton_available():
        pytest.skip("triton is not installed")
    saved = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
        from triton.runtime.interpreter import InterpretedFunction

        mod = importlib.import_module("headslim.kernels._triton_attention")
        if not isinstance(mod._attn_fwd_kernel, InterpretedFunction):
            importlib.reload(mod)
    yield "triton"
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


# ----------------------------------------------------------------------------------------------
# Independent reference: explicit gather + matmul + softmax, in a chosen dtype


def reference(q, k, v, kv_head_of_q, mask=None, causal=False, kv_len=None, dtype=torch.float32):
    """Attention written out by hand. ``dtype=float32`` is the ground truth; the input's low
    precision gives "PyTorch's own error" (every op in that dtype, like eager attention).

    q (B, Tq, Hq, D); k, v (B, Tk, Hkv, D); kv_head_of_q (Hq,); mask (B, Tk); kv_len (B,) valid
    keys per row with the queries as its last Tq positions (default Tk). Padded query tokens and
    rows without keys give zeros.
    """
    batch, t_q, _, head_dim = q.shape
    t_k = k.shape[1]
    idx = torch.as_tensor(kv_head_of_q, device=k.device)
    qd = q.to(dtype)
    kd, vd = k.to(dtype)[:, :, idx], v.to(dtype)[:, :, idx]  # (B, Tk, Hq, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * head_dim ** -0.5  # (B, Hq, Tq, Tk)
    kv_len = torch.full((batch,), t_k, device=q.device) if kv_len is None else torch.as_tensor(kv_len, device=q.device)
    q_pos = kv_len.view(batch, 1) - t_q + torch.arange(t_q, device=q.device)  # (B, Tq)
    key_pos = torch.arange(t_k, device=q.device)
    allowed = key_pos.view(1, 1, t_k) < kv_len.view(batch, 1, 1)  # (B, 1, Tk)
    if causal:
        allowed = allowed & (key_pos.view(1, 1, t_k) <= q_pos.view(batch, t_q, 1))  # (B, Tq, Tk)
    q_ok = torch.ones(batch, t_q, dtype=torch.bool, device=q.device)
    if mask is not None:
        real = mask.bool()
        allowed = allowed & real.view(batch, 1, t_k)
        if causal or t_q == t_k:
            q_ok = torch.gather(real, 1, q_pos.clamp(0, t_k - 1)) & (q_pos >= 0)
    allowed = allowed.expand(batch, t_q, t_k)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vd)  # (B, Tq, Hq, D)
    keep = allowed.any(-1) & q_ok  # (B, Tq)
    return torch.where(keep.view(batch, t_q, 1, 1), out, torch.zeros((), dtype=dtype, device=q.device))


def check(out, ref32, ref_low, dtype):
    """The tolerance rule; returns (error, tolerance) for the failure message."""
    assert out.shape == ref32.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.float() - ref32).abs().max().item()
    if dtype == torch.float32:
        tol = 2e-5 if not GPU else 1e-4
    else:
        tol = 2 * (ref_low.float() - ref32).abs().max().item() + 1e-6
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g} ({dtype})"
    return err, tol


def fused_qkv(batch, seq, heads, head_dim, dtype, kv_heads=None, seed=0):
    """Q/K/V as views of one projection output ``(B, T, (Hq + 2 Hkv) * D)``: strided, not contiguous."""
    kv_heads = heads if kv_heads is None else kv_heads
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = x.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(batch, seq, heads, head_dim), k.view(batch, seq, kv_heads, head_dim),
            v.view(batch, seq, kv_heads, head_dim))


def padding_mask(batch, seq, kind):
    """Masks with right padding, a fully padded row and (``holes``) left padding and gaps."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 1:
        mask[1, max(1, seq * 2 // 3):] = 0  # right padding
    if batch > 2:
        mask[2] = 0  # fully padded row
    if kind == "holes" and seq > 4:
        mask[0, :3] = 0  # left padding
        mask[0, seq // 2] = 0  # a hole
    return mask.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Encoder attention

ENCODER_CASES = [  # (batch, seq, heads, head_dim, mask kind)
    (1, 1, 1, 32, None),
    (3, 7, 1, 64, "right"),
    (3, 129, 2, 32, "holes"),
    (2, 40, 3, 128, "right"),
]
if GPU:
    ENCODER_CASES += [(8, 512, 12, 64, "holes"), (4, 1000, 5, 128, "right"), (2, 2049, 1, 32, "right")]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda c: "x".join(map(str, c)))
def test_encoder_attention_triton(triton_backend, case, dtype):
    batch, seq, heads, head_dim, kind = case
    q, k, v = fused_qkv(batch, seq, heads, head_dim, dtype)
    mask = None if kind is None else padding_mask(batch, seq, kind)
    out = encoder_attention(q, k, v, mask, backend=triton_backend)
    ident = list(range(heads))
    check(out, reference(q, k, v, ident, mask), reference(q, k, v, ident, mask, dtype=dtype), dtype)
    if mask is not None:
        pad = mask == 0
        assert (out[pad] == 0).all(), "padded query tokens must give zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ENCODER_CASES[:3], ids=lambda c: "x".join(map(str, c)))
def test_encoder_attention_torch_path(case, dtype):
    batch, seq, heads, head_dim, kind = case
    q, k, v = fused_qkv(batch, seq, heads, head_dim, dtype)
    mask = None if kind is None else padding_mask(batch, seq, kind)
    out = encoder_attention(q, k, v, mask, backend="torch")
    ident = list(range(heads))
    check(out, reference(q, k, v, ident, mask), reference(q, k, v, ident, mask, dtype=dtype), dtype)


@needs_triton
def test_encoder_never_reads_padding(triton_backend):
    """K/V/Q memory outside the real tokens may hold anything (even NaN): it is never read or leaks."""
    batch, seq, heads, head_dim = 4, 70, 2, 32
    q, k, v = (t.clone() for t in fused_qkv(batch, seq, heads, head_dim, torch.float32))
    mask = padding_mask(batch, seq, "right")
    mask[3, :40] = 0  # left padding longer than a tile
    clean = encoder_attention(q, k, v, mask, backend=triton_backend)
    for t in (q, k, v):
        t[mask == 0] = float("nan")
    poisoned = encoder_attention(q, k, v, mask, backend=triton_backend)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@needs_triton
def test_mask_metadata_follows_in_place_changes(triton_backend):
    """Per-row key ranges are memoised on the mask object; editing the mask in place invalidates them."""
    q, k, v = fused_qkv(2, 20, 2, 32, torch.float32)
    mask = torch.ones(2, 20, dtype=torch.long, device=DEVICE)
    encoder_attention(q, k, v, mask, backend=triton_backend)
    mask[1, 9:] = 0
    out = encoder_attention(q, k, v, mask, backend=triton_backend)
    check(out, reference(q, k, v, [0, 1], mask), None, torch.float32)


# ----------------------------------------------------------------------------------------------
# Ragged prefill and decode

GROUP_MAPS = {  # name -> (kv_head_of_q, num_kv_heads)
    "uneven": ([0, 0, 0, 1, 2, 2], 3),
    "mha": ([0, 1, 2], 3),
    "mqa1": ([0, 0, 0, 0, 0], 1),
    "one-head": ([0], 1),
    "empty-group": ([0, 0, 2, 2, 2], 3),
    "unsorted": ([1, 0, 1, 2, 0], 3),
}
PREFILL_CASES = [  # (batch, seq_q, seq_k, head_dim, mask kind)
    (1, 1, 1, 32, None),
    (3, 7, 7, 64, "right"),
    (3, 129, 129, 32, "holes"),
    (2, 7, 20, 128, None),
]
if GPU:
    PREFILL_CASES += [(4, 1024, 1024, 128, "holes"), (2, 777, 1500, 64, None)]


def prefill_inputs(map_name, batch, seq_q, seq_k, head_dim, dtype, seed=0):
    kv_head_of_q, n_kv = GROUP_MAPS[map_name]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, len(kv_head_of_q) * head_dim, generator=gen).to(DEVICE, dtype)
    kv = torch.randn(batch, seq_k, 2 * n_kv * head_dim, generator=gen).to(DEVICE, dtype)
    k, v = kv.split(n_kv * head_dim, dim=-1)
    shape_kv = (batch, seq_k, n_kv, head_dim)
    return q.view(batch, seq_q, -1, head_dim), k.view(shape_kv), v.view(shape_kv), kv_head_of_q, n_kv


def _matrix(cases, maps, long_seq):
    """Full product on a GPU; under the interpreter every map in fp16 on the short cases, all dtypes
    on the ``uneven`` map, and the long case only for ``uneven`` (fp16, bf16) and ``unsorted`` (fp16)."""
    params = []
    for case in cases:
        for map_name in maps:
            for dtype in DTYPES:
                if not GPU:
                    if map_name != "uneven" and dtype != torch.float16:
                        continue
                    if long_seq(case) and (map_name, dtype) not in (("uneven", torch.float16),
                                                                    ("uneven", torch.bfloat16),
                                                                    ("unsorted", torch.float16)):
                        continue
                params.append(pytest.param(case, map_name, dtype,
                                           id=f"{'x'.join(map(str, case[:4]))}-{map_name}-{str(dtype)[6:]}"))
    return params


@needs_triton
@pytest.mark.parametrize("case,map_name,dtype", _matrix(PREFILL_CASES, list(GROUP_MAPS), lambda c: c[2] > 64))
def test_ragged_prefill_triton(triton_backend, case, map_name, dtype):
    batch, seq_q, seq_k, head_dim, kind = case
    q, k, v, kv_head_of_q, n_kv = prefill_inputs(map_name, batch, seq_q, seq_k, head_dim, dtype)
    mask = None if kind is None else padding_mask(batch, seq_k, kind)
    groups = head_groups(torch.tensor(kv_head_of_q, device=DEVICE), n_kv)
    out = ragged_prefill_attention(q, k, v, groups, mask, backend=triton_backend)
    ref32 = reference(q, k, v, kv_head_of_q, mask, causal=True)
    check(out, ref32, reference(q, k, v, kv_head_of_q, mask, causal=True, dtype=dtype), dtype)
    torch_path = ragged_prefill_attention(q, k, v, groups, mask, backend="torch")
    check(torch_path, ref32, reference(q, k, v, kv_head_of_q, mask, causal=True, dtype=dtype), dtype)


DECODE_CASES = [  # (batch, new tokens, cache length, head_dim, cache_seqlens or None, num_splits)
    (1, 1, 1, 32, None, None),
    (3, 1, 129, 64, [129, 50, 0], 4),
    (2, 3, 129, 32, [100, 129], 1),
    (2, 2, 65, 128, None, 3),
]
if GPU:
    DECODE_CASES += [(1, 1, 8192, 128, None, None), (16, 1, 2048, 64, None, None), (4, 4, 4096, 128, None, None)]


@needs_triton
@pytest.mark.parametrize("case,map_name,dtype",
                         _matrix(DECODE_CASES, ["uneven", "unsorted", "mqa1", "empty-group"], lambda c: False))
def test_ragged_decode_triton(triton_backend, case, map_name, dtype):
    batch, new, cache_len, head_dim, seqlens, splits = case
    kv_head_of_q, n_kv = GROUP_MAPS[map_name]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, new, len(kv_head_of_q), head_dim, generator=gen).to(DEVICE, dtype)
    # transformers caches are (B, Hkv, T, D): the kernel reads them through a transposed view.
    k_cache = torch.randn(batch, n_kv, cache_len, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    v_cache = torch.randn(batch, n_kv, cache_len, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    mask = None
    if batch == 3:  # left-padded prompt in row 1, a hole in row 0
        mask = torch.ones(batch, cache_len, dtype=torch.long, device=DEVICE)
        mask[1, :20] = 0
        mask[0, 5] = 0
    lens = None if seqlens is None else torch.tensor(seqlens, device=DEVICE)
    groups = head_groups(kv_head_of_q, n_kv).to(DEVICE)
    out = ragged_decode_attention(q, k_cache, v_cache, groups, lens, mask, num_splits=splits, backend=triton_backend)
    args = (q, k_cache, v_cache, kv_head_of_q, mask, True, lens)
    ref32 = reference(*args)
    check(out, ref32, reference(*args, dtype=dtype), dtype)
    torch_path = ragged_decode_attention(q, k_cache, v_cache, groups, lens, mask, backend="torch")
    check(torch_path, ref32, reference(*args, dtype=dtype), dtype)


@needs_triton
def test_kernels_compile_for_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile for sm_90 and sm_80 (no GPU
    needed), covering both epilogues (direct store; split-KV partials + combine)."""
    code = (
        "from headslim.kernels._triton_attention import compile_for_gpu\n"
        "compile_for_gpu(90, 'fp16', 64, causal=False, block_m=128)\n"
        "compile_for_gpu(80, 'bf16', 128, split_kv=True, num_warps=8, num_stages=2)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if result.returncode and "GPUTarget" in result.stderr and "ImportError" in result.stderr:
        pytest.skip("this triton build cannot compile for CUDA targets")
    assert result.returncode == 0, result.stderr[-3000:]


def test_head_groups():
    g = head_groups([0, 0, 0, 1, 2, 2], 3)
    assert g.offsets.tolist() == [0, 3, 4, 6] and g.max_group == 3 and g.num_kv_heads == 3
    assert g.q_head_index.tolist() == [0, 1, 2, 3, 4, 5]
    g = head_groups(torch.tensor([1, 0, 1, 2, 0]), 4)
    assert g.offsets.tolist() == [0, 2, 4, 5, 5] and g.q_head_index.tolist() == [1, 4, 0, 2, 3]
    with pytest.raises(HeadslimError, match="outside"):
        head_groups([0, 3], 2)
    with pytest.raises(HeadslimError, match="no query heads"):
        head_groups([], 2)


def test_bad_arguments():
    q = torch.randn(2, 5, 3, 32)
    with pytest.raises(HeadslimError, match="backend"):
        encoder_attention(q, q, q, backend="cuda")
    with pytest.raises(HeadslimError, match=r"\(batch, seqlen_k\)"):
        encoder_attention(q, q, q, torch.ones(2, 4))
    with pytest.raises(HeadslimError, match="head map"):
        ragged_prefill_attention(q, q[:, :, :2], q[:, :, :2], head_groups([0, 1, 1, 1], 2))
    with pytest.raises(HeadslimError, match="HeadGroups"):
        ragged_prefill_attention(q, q, q, [0, 1, 2])
    if not triton_available():
        with pytest.raises(HeadslimError, match="triton"):
            encoder_attention(q, q, q, backend="triton")


def test_import_is_cheap():
    """``import headslim.kernels`` loads neither torch nor triton; using the PyTorch path loads no
    triton and never initialises CUDA."""
    code = (
        "import sys, headslim.kernels as hk\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'eager import'\n"
        "import torch\n"
        "q = torch.randn(1, 3, 2, 16)\n"
        "hk.encoder_attention(q, q, q)\n"
        "assert 'triton' not in sys.modules, 'triton imported by the CPU path'\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------------------------
# Wiring into (pruned) models


def pruned_tiny(model_type="bert", class_name="BertModel", attn_implementation=None):
    """A tiny model with uneven heads: 4, 1 and 0 heads in its three layers (``attn_implementation``:
    as transformers builds it; None: the constructor's default, eager)."""
    from headslim.plan import PrunePlan
    from headslim.surgery import prune_heads

    model = tiny_model(model_type, class_name)
    if attn_implementation is not None:
        import transformers

        model = getattr(transformers, class_name)._from_config(model.config, attn_implementation=attn_implementation)
        model.load_state_dict(tiny_model(model_type, class_name).state_dict())
        model.eval()
    n = model.config.num_attention_heads
    prune_heads(model, PrunePlan(num_heads=[n] * 3, kept_heads=[list(range(n)), [2], []]))
    return model


def _real_token_outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    return hidden


WIRING_CASES = [(t, classes[0]) for t, (_, _, classes) in TINY_MODELS.items()]


# eager and SDPA: on 4.x they are different attention classes, given a 2-D padding mask and a 4-D
# additive one respectively (both swapped; on 5.x both go through the registry)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type,class_name", WIRING_CASES)
def test_enable_torch_backend_matches(model_type, class_name, attn_implementation, monkeypatch):
    import transformers

    if attn_implementation == "sdpa" and not getattr(transformers, class_name)._supports_sdpa:
        pytest.skip(f"{class_name} has no SDPA attention on this transformers version")
    model = pruned_tiny(model_type, class_name, attn_implementation)
    inputs = tiny_inputs()
    real = inputs["attention_mask"].bool()
    expected = _real_token_outputs(model, inputs)
    calls = []
    import headslim.kernels.wiring as wiring

    original = wiring.encoder_attention
    monkeypatch.setattr(wiring, "encoder_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    enable(model, backend="torch")
    assert kernel_route(model) == ("registry" if TF_MAJOR >= 5 else "swap")
    got = _real_token_outputs(model, inputs)
    assert len(calls) == 2, "the two layers with heads use the kernel path, the 0-head layer does not"
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    disable(model)
    assert kernel_route(model) is None
    torch.testing.assert_close(_real_token_outputs(model, inputs), expected, rtol=0, atol=0)


@needs_triton
def test_enable_triton_backend_matches(triton_backend):
    model = pruned_tiny().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in tiny_inputs().items()}
    real = inputs["attention_mask"].bool()
    expected = _real_token_outputs(model, inputs)
    enable(model, backend="triton")
    got = _real_token_outputs(model, inputs)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    disable(model)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_enabled_model_runs_under_inference_mode(backend, request, monkeypatch):
    """Inference tensors have no version counter for the mask memos to read (found by `headslim bench`,
    which times under torch.inference_mode(), on a GPU): their memo lasts one forward pass, shared by
    the layers, and a mask refilled in place between passes is seen."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    import headslim.kernels.attention as attention_mod

    model = pruned_tiny().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in tiny_inputs().items()}
    real = inputs["attention_mask"].bool()
    expected = _real_token_outputs(model, inputs)
    shorter = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    shorter["attention_mask"][0, 3:] = 0
    expected_shorter = _real_token_outputs(model, shorter)
    ranges = []
    original = attention_mod._key_ranges
    monkeypatch.setattr(attention_mod, "_key_ranges", lambda *a: ranges.append(1) or original(*a))
    enable(model, backend=backend)
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in inputs.items()}  # inference tensors, as a server's inputs
        assert frozen["attention_mask"].is_inference()
        first = model(**frozen).last_hidden_state
        frozen["attention_mask"].copy_(shorter["attention_mask"])  # the same buffer, refilled in place
        second = model(**frozen).last_hidden_state
    disable(model)
    torch.testing.assert_close(first[real], expected[real], rtol=0, atol=1e-5)
    keep = shorter["attention_mask"].bool()
    torch.testing.assert_close(second[keep], expected_shorter[keep], rtol=0, atol=1e-5)
    if backend == "triton":  # per-row key ranges: once per forward pass for both layers with heads
        assert len(ranges) == 2
    assert attention_mod._FORWARD == [None, 0]


def test_enable_falls_back_where_kernels_do_not_apply():
    """Attention probabilities (and training with dropout) go through the original code."""
    model = pruned_tiny()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True)
    enable(model, backend="torch")
    with torch.no_grad():
        got = model(**inputs, output_attentions=True)
    disable(model)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], rtol=0, atol=1e-5)
    shapes = lambda out: [None if a is None else tuple(a.shape) for a in out.attentions or ()]  # noqa: E731
    assert shapes(got) == shapes(expected)  # 4.x returns them via the original code; 5.x SDPA returns none


def test_enable_swap_route_needs_the_adapter(monkeypatch):
    """A family whose adapter names no swappable attention gets a one-line error, not a crash."""
    import headslim.kernels.wiring as wiring

    monkeypatch.setattr(wiring, "_uses_attention_registry", lambda model: False)
    with pytest.raises(HeadslimError, match="does not cover"):
        enable(_tiny_llama(), backend="torch")


def test_enable_rejects_bad_backend():
    with pytest.raises(HeadslimError, match="backend"):
        enable(pruned_tiny(), backend="cuda")


def _tiny_llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _prefill_then_decode(model, ids, mask):
    """Logits of a left-padded prompt, then of one decode step against the cache it filled."""
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        second = model(input_ids=nxt, attention_mask=mask2, use_cache=True,
                       **cache_kwargs(model, output_cache(first)))
    return first.logits, second.logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_enable_decoder_through_registry(backend, request):
    """A GQA decoder (Llama: 4 query heads on 2 KV heads) goes through the attention registry on both
    transformers versions: causal prefill with left padding, then a decode step against the cache."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = _tiny_llama().to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (3, 9), generator=gen).to(DEVICE)
    mask = torch.ones(3, 9, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0
    mask[2, :8] = 0  # a single real token
    expected = _prefill_then_decode(model, ids, mask)
    enable(model, backend=backend)
    assert kernel_route(model) == "registry"
    got = _prefill_then_decode(model, ids, mask)
    disable(model)
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_enable_ragged_pruned_decoder(backend, request, monkeypatch):
    """A decoder pruned to ragged groups (issue 6; headslim.arch.llama / headslim.arch.ragged) runs its ragged
    layers on the ragged kernels with compact K/V: same logits at real tokens, prefill and decode."""
    try:
        from conftest import tiny_decoder
        from headslim.arch import kv_maps
        from headslim.plan import PrunePlan
        from headslim.surgery import prune_heads
    except ImportError as exc:
        pytest.skip(f"decoder pruning (issue 6) not available: {exc}")
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = tiny_decoder("llama", "LlamaForCausalLM")  # 8 query heads over 2 KV heads, 3 layers
    maps = kv_maps(model)
    n = [len(m) for m in maps]
    # ragged (3 + 1 heads), one head, ragged (1 + 3 heads, unsorted kept list is fine)
    prune_heads(model, PrunePlan(n, [[0, 1, 2, 5], [6], [3, 4, 6, 7]], kv_head_of_q=maps))
    model = model.to(DEVICE)
    ragged = [m for m in model.modules() if "headslim_kv_head_of_q" in getattr(m, "_buffers", {})]
    assert ragged, "the plan should leave ragged layers"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (2, 9), generator=gen).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0
    expected = _prefill_then_decode(model, ids, mask)
    calls = []
    import headslim.kernels.wiring as wiring

    original = wiring._module_groups
    monkeypatch.setattr(wiring, "_module_groups", lambda m, *a: calls.append(m) or original(m, *a))
    enable(model, backend=backend)
    got = _prefill_then_decode(model, ids, mask)
    disable(model)
    assert any(m in ragged for m in calls), "ragged layers must reach the kernels with their own map"
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-5)
    assert all(type(m.config).__name__ == "RaggedConfig" for m in ragged), "disable restores the views"

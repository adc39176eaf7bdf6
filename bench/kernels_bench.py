"""GPU benchmark of headslim's attention kernels against PyTorch, per kernel (needs CUDA + triton).

For each kernel and shape it times, with ``triton.testing.do_bench`` (median of repeated runs after
warm-up, CUDA-graph free), the headslim Triton kernel and its PyTorch baselines in the same loop:

* encoder (uniform heads, no padding): SDPA on the same shapes, eager (matmul-softmax-matmul);
* encoder, padded batch: SDPA with the boolean key-padding mask, eager;
* ragged causal prefill: SDPA after ``index_select`` of K/V to one head per query head (what
  ``headslim.arch.ragged`` does on GPU without the kernels), eager on the same gathered K/V; on the
  uniform map also SDPA with ``enable_gqa`` / ``repeat_interleave``;
* ragged decode (1 new token against a cache): ``index_select`` + SDPA, eager.

TFLOP/s counts the useful work only (real tokens; the causal half; 4 * Tq * Tk * D per head), so
padded and causal rows compare fairly; decode also reports GB/s of K/V cache read. Each kernel's
output is checked against the PyTorch path before it is timed. Goals (from issue 7) are printed as
PASS/FAIL: ragged prefill and decode >= 1.5x the index_select+SDPA path; uniform encoder >= 0.8x
SDPA; padded encoder faster than SDPA with a mask.

Usage (on a GPU machine, from the repository root)::

    python bench/kernels_bench.py                     # fp16, all kernels -> bench/results/kernels/
    python bench/kernels_bench.py --dtype bf16 --quick
    python bench/kernels_bench.py --kernels decode --out /tmp/k

Writes ``kernels.md`` (a table per kernel, with device name, versions and the command) and
``kernels.json`` (every timing) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# A pruned Llama-8B-like layer: 32 query heads over 8 KV heads, about 60 % of query heads kept, unevenly.
RAGGED_GROUPS = [4, 1, 3, 4, 2, 4, 3, 0]  # query heads per KV head (a KV head with none is dropped)
UNIFORM_GROUPS = [4] * 8
DEV = "cuda"  # --smoke runs the script's logic on CPU under TRITON_INTERPRET=1 (numbers meaningless)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python bench/kernels_bench.py --dtype fp16")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--kernels", default="encoder,prefill,decode", help="comma list of encoder,prefill,decode")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run, ~1 min)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time in ms")
    p.add_argument("--out", type=Path, default=Path("bench/results/kernels"))
    p.add_argument("--smoke", action="store_true",
                   help="check the script itself on CPU with tiny shapes (needs TRITON_INTERPRET=1; no timings)")
    return p.parse_args(argv)


def groups_map(sizes: list[int]) -> torch.Tensor:
    """kv_head_of_q for per-KV-head group sizes, with empty KV heads removed (as surgery does)."""
    kept = [s for s in sizes if s > 0]
    return torch.tensor([g for g, s in enumerate(kept) for _ in range(s)])


def time_ms(fn, args) -> float:
    from triton.testing import do_bench

    if DEV != "cuda":  # --smoke: run once, report 1 ms
        fn()
        return 1.0
    return float(do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))


def eager(q, k, v, keep, scale):
    """matmul-softmax-matmul on (B, H, T, D) tensors, fp32 softmax, like transformers' eager path."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if keep is not None:
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def check(out, ref, what):
    err = (out.float() - ref.float()).abs().max().item()
    if not err < 2e-2:
        raise SystemExit(f"{what}: kernel differs from PyTorch by {err:.3g}; not timing a wrong kernel")


def row(kernel, shape, name, ms, flops, extra=None, baseline_ms=None):
    r = {"kernel": kernel, "shape": shape, "impl": name, "ms": ms, "tflops": flops / ms / 1e9}
    if baseline_ms is not None:
        r["speedup_vs_baseline"] = baseline_ms / ms
    r.update(extra or {})
    return r


def bench_encoder(args, dtype, results, goals):
    from headslim.kernels import encoder_attention

    shapes = [(32, 128, 12, 64), (32, 512, 12, 64), (8, 512, 5, 64), (16, 256, 1, 32), (8, 1024, 6, 128)]
    if args.quick:
        shapes = shapes[1:3]
    if args.smoke:
        shapes = [(2, 40, 2, 32)]
    for batch, seq, heads, dim in shapes:
        gen = torch.Generator(device=DEV).manual_seed(0)
        x = torch.randn(batch, seq, 3 * heads * dim, device=DEV, dtype=dtype, generator=gen)
        q, k, v = (t.view(batch, seq, heads, dim) for t in x.split(heads * dim, -1))  # projection layout
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) views, as transformers passes them
        scale = dim ** -0.5
        for padded in (False, True):
            if padded:  # lengths uniform in [seq/8, seq]: a typical padded batch of sentences
                lengths = torch.randint(max(1, seq // 8), seq + 1, (batch,), generator=torch.Generator().manual_seed(1))
                mask = (torch.arange(seq) < lengths[:, None]).to(DEV)  # (B, T)
                flops = 4 * heads * dim * float((lengths.double() ** 2).sum())
                keep = mask.view(batch, 1, 1, seq)
            else:
                mask, keep, flops = None, None, 4.0 * batch * heads * seq * seq * dim
            ours = lambda: encoder_attention(q, k, v, mask, backend="triton")  # noqa: E731
            sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep)  # noqa: E731
            eag = lambda: eager(qt, kt, vt, keep, scale)  # noqa: E731
            ref = sdpa().transpose(1, 2)
            out = ours()
            if mask is not None:
                ref = ref * mask.view(batch, seq, 1, 1)  # padded queries are zero in ours
            check(out, ref, f"encoder {batch}x{seq}x{heads}x{dim}")
            shape = f"B{batch} T{seq} H{heads} D{dim}" + (" padded" if padded else "")
            t_sdpa = time_ms(sdpa, args)
            t_ours = time_ms(ours, args)
            t_eager = time_ms(eag, args)
            kernel = "encoder (padded)" if padded else "encoder"
            results += [row(kernel, shape, "sdpa" + (" + mask" if padded else ""), t_sdpa, flops),
                        row(kernel, shape, "eager", t_eager, flops),
                        row(kernel, shape, "headslim triton", t_ours, flops, baseline_ms=t_sdpa)]
            goal = 1.0 if padded else 0.8
            goals.append((kernel, shape, t_sdpa / t_ours, goal, "vs SDPA" + (" with mask" if padded else "")))


def bench_prefill(args, dtype, results, goals):
    from headslim.kernels import head_groups, ragged_prefill_attention

    shapes = [(1, 2048, 128), (4, 2048, 128), (8, 512, 128), (2, 4096, 64)]
    if args.quick:
        shapes = shapes[1:2]
    if args.smoke:
        shapes = [(1, 40, 32)]
    for name, sizes in (("ragged", RAGGED_GROUPS), ("uniform", UNIFORM_GROUPS)):
        kv_of_q = groups_map(sizes).to(DEV)
        groups = head_groups(kv_of_q)
        n_q, n_kv = kv_of_q.numel(), groups.num_kv_heads
        for batch, seq, dim in shapes:
            gen = torch.Generator(device=DEV).manual_seed(0)
            q = torch.randn(batch, seq, n_q * dim, device=DEV, dtype=dtype, generator=gen).view(batch, seq, n_q, dim)
            kv = torch.randn(batch, seq, 2 * n_kv * dim, device=DEV, dtype=dtype, generator=gen)
            k, v = (t.view(batch, seq, n_kv, dim) for t in kv.split(n_kv * dim, -1))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            scale = dim ** -0.5
            flops = 2.0 * batch * n_q * seq * seq * dim  # causal: half of 4 * T^2 * D

            def gathered():
                return (kt.index_select(1, kv_of_q), vt.index_select(1, kv_of_q))  # (B, Hq, T, D) each

            def sdpa_gather():
                kg, vg = gathered()
                return F.scaled_dot_product_attention(qt, kg, vg, is_causal=True)

            causal = torch.ones(seq, seq, dtype=torch.bool, device=DEV).tril()

            def eag():
                kg, vg = gathered()
                return eager(qt, kg, vg, causal, scale)

            ours = lambda: ragged_prefill_attention(q, k, v, groups, backend="triton")  # noqa: E731
            check(ours(), sdpa_gather().transpose(1, 2), f"prefill {name} {batch}x{seq}x{dim}")
            shape = f"{name} {n_q}q/{n_kv}kv B{batch} T{seq} D{dim}"
            t_base = time_ms(sdpa_gather, args)
            t_ours = time_ms(ours, args)
            t_eager = time_ms(eag, args)
            results += [row("prefill", shape, "index_select + sdpa", t_base, flops),
                        row("prefill", shape, "eager (gathered)", t_eager, flops)]
            if name == "uniform":
                sdpa_gqa = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    qt, kt, vt, is_causal=True, enable_gqa=True)
                rep = n_q // n_kv
                sdpa_rep = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1), is_causal=True)
                t_gqa, t_rep = time_ms(sdpa_gqa, args), time_ms(sdpa_rep, args)
                results += [row("prefill", shape, "sdpa enable_gqa", t_gqa, flops),
                            row("prefill", shape, "repeat_interleave + sdpa", t_rep, flops)]
                goals.append(("prefill", shape, t_gqa / t_ours, 0.8, "vs SDPA (uniform GQA)"))
            else:
                goals.append(("prefill", shape, t_base / t_ours, 1.5, "vs index_select+SDPA"))
            results.append(row("prefill", shape, "headslim triton", t_ours, flops, baseline_ms=t_base))


def bench_decode(args, dtype, results, goals):
    from headslim.kernels import head_groups, ragged_decode_attention

    shapes = [(1, 1024, 128), (1, 8192, 128), (16, 2048, 128), (16, 8192, 128), (64, 1024, 64)]
    if args.quick:
        shapes = shapes[1:3]
    if args.smoke:
        shapes = [(2, 100, 32)]
    for name, sizes in (("ragged", RAGGED_GROUPS), ("uniform", UNIFORM_GROUPS)):
        kv_of_q = groups_map(sizes).to(DEV)
        groups = head_groups(kv_of_q)
        n_q, n_kv = kv_of_q.numel(), groups.num_kv_heads
        for batch, cache, dim in shapes:
            gen = torch.Generator(device=DEV).manual_seed(0)
            q = torch.randn(batch, 1, n_q, dim, device=DEV, dtype=dtype, generator=gen)
            # transformers' cache layout (B, Hkv, T, D), read by the kernel through a transposed view
            kc = torch.randn(batch, n_kv, cache, dim, device=DEV, dtype=dtype, generator=gen)
            vc = torch.randn(batch, n_kv, cache, dim, device=DEV, dtype=dtype, generator=gen)
            qt = q.transpose(1, 2)  # (B, Hq, 1, D)
            scale = dim ** -0.5
            flops = 4.0 * batch * n_q * cache * dim
            cache_bytes = 2 * batch * n_kv * cache * dim * kc.element_size()

            def sdpa_gather():
                return F.scaled_dot_product_attention(qt, kc.index_select(1, kv_of_q), vc.index_select(1, kv_of_q))

            def eag():
                return eager(qt, kc.index_select(1, kv_of_q), vc.index_select(1, kv_of_q), None, scale)

            ours = lambda: ragged_decode_attention(q, kc.transpose(1, 2), vc.transpose(1, 2), groups,  # noqa: E731
                                                   backend="triton")
            check(ours(), sdpa_gather().transpose(1, 2), f"decode {name} {batch}x{cache}x{dim}")
            shape = f"{name} {n_q}q/{n_kv}kv B{batch} cache{cache} D{dim}"
            t_base, t_ours, t_eager = time_ms(sdpa_gather, args), time_ms(ours, args), time_ms(eag, args)
            gbps = lambda ms: {"GB/s (cache)": cache_bytes / ms / 1e6}  # noqa: E731
            results += [row("decode", shape, "index_select + sdpa", t_base, flops, gbps(t_base)),
                        row("decode", shape, "eager (gathered)", t_eager, flops, gbps(t_eager))]
            if name == "uniform":
                sdpa_gqa = lambda: F.scaled_dot_product_attention(qt, kc, vc, enable_gqa=True)  # noqa: E731
                t_gqa = time_ms(sdpa_gqa, args)
                results.append(row("decode", shape, "sdpa enable_gqa", t_gqa, flops, gbps(t_gqa)))
                goals.append(("decode", shape, t_gqa / t_ours, 0.8, "vs SDPA (uniform GQA)"))
            else:
                goals.append(("decode", shape, t_base / t_ours, 1.5, "vs index_select+SDPA"))
            results.append(row("decode", shape, "headslim triton", t_ours, flops, gbps(t_ours), baseline_ms=t_base))


def environment() -> dict:
    import triton

    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke run, no timings)"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "command": " ".join(sys.argv)}


def write(args, results, goals, env):
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps({"env": env, "dtype": args.dtype, "results": results,
                                                       "goals": [dict(zip(("kernel", "shape", "speedup", "goal",
                                                                           "baseline"), g)) for g in goals]},
                                                      indent=1))
    lines = [f"# headslim attention kernels, {args.dtype}", "",
             f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']}",
             f"Command: `{env['command']}`", ""]
    for kernel in dict.fromkeys(r["kernel"] for r in results):
        lines += [f"## {kernel}", "", "| shape | implementation | ms | TFLOP/s | extra |", "|---|---|---:|---:|---|"]
        for r in (r for r in results if r["kernel"] == kernel):
            extra = ", ".join(f"{k} {v:.2f}" for k, v in r.items()
                              if k not in ("kernel", "shape", "impl", "ms", "tflops"))
            lines.append(f"| {r['shape']} | {r['impl']} | {r['ms']:.4f} | {r['tflops']:.2f} | {extra} |")
        lines.append("")
    lines += ["## Goals", "", "| kernel | shape | speed-up | goal | result |", "|---|---|---:|---:|---|"]
    for kernel, shape, speedup, goal, base in goals:
        verdict = "n/a (smoke)" if DEV != "cuda" else "PASS" if speedup >= goal else "FAIL"
        lines.append(f"| {kernel} | {shape} | {speedup:.2f}x {base} | >= {goal}x | {verdict} |")
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    global DEV
    args = parse_args(argv)
    if args.smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("kernels_bench: needs a CUDA GPU (the kernels' CPU tests are tests/test_kernels.py)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs compare IEEE fp32 on both sides
    results, goals = [], []
    benches = {"encoder": bench_encoder, "prefill": bench_prefill, "decode": bench_decode}
    for name in args.kernels.split(","):
        benches[name.strip()](args, dtype, results, goals)
    write(args, results, goals, environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())

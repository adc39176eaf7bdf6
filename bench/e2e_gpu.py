"""End-to-end GPU latency: a Llama-shaped decoder (random weights), dense vs head-pruned, batch 1 and 16.

Variants, timed interleaved in one loop so machine drift cancels (CUDA events, warm-up apart):

* ``dense sdpa``      - the stock model, ``attn_implementation="sdpa"``;
* ``dense headslim``  - the stock model with ``headslim.kernels.enable`` (uniform GQA on the kernels);
* ``pruned stock``    - pruned with ragged groups by ``headslim.pipeline.prune_model`` (issue 6): its
  ragged layers gather K/V with ``index_select`` and run SDPA;
* ``pruned headslim`` - the same pruned model with ``headslim.kernels.enable(model, "triton")``: ragged
  layers run the ragged prefill/decode kernels on the compact K/V.

Per variant and batch size it reports prefill latency (prompt of ``--prompt`` tokens, p50/p90 ms)
and decode latency per token (``--new`` steps against the cache, p50 ms/token) and tokens/s. The
pruned variants need the decoder support of issue 6 (``headslim.arch``, ``headslim.gqa``); without
it the script says so and measures the dense variants only.

Usage (on a GPU machine, from the repository root)::

    python bench/e2e_gpu.py                         # Llama-3.2-1B shapes, fp16, 50 % of query heads
    python bench/e2e_gpu.py --prune 0.3 --batch 1,16 --prompt 1024 --new 64
    python bench/e2e_gpu.py --smoke                 # check the script on CPU with a tiny model

Writes ``e2e.md`` and ``e2e.json`` under ``--out`` (default ``bench/results/e2e_gpu``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, heads, kv heads, head_dim, intermediate
    "llama-3.2-1b": (2048, 16, 32, 8, 64, 8192),
    "llama-3.1-8b": (4096, 32, 32, 8, 128, 14336),
    "tiny": (64, 2, 8, 2, 8, 128),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python bench/e2e_gpu.py --batch 1,16")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--prune", type=float, default=0.5, help="fraction of query heads removed (ragged)")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--new", type=int, default=32, help="decode steps timed after the prefill")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/e2e_gpu"))
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, backend torch: checks the script only")
    return p.parse_args(argv)


def build_dense(shape: str, dtype, device):
    import transformers

    hidden, layers, heads, kv, head_dim, inter = SHAPES[shape]
    config = transformers.LlamaConfig(vocab_size=32000 if shape != "tiny" else 99, hidden_size=hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      head_dim=head_dim, intermediate_size=inter, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def prune_ragged(dense, prune: float):
    """A ragged plan from random head scores (speed does not depend on which heads go), or None."""
    try:
        from headslim.arch import kv_maps
        from headslim.pipeline import PruneConfig, Scores, prune_model
    except ImportError as exc:
        print(f"e2e_gpu: pruned variants skipped, decoder pruning (issue 6) not available: {exc}", file=sys.stderr)
        return None
    maps = kv_maps(dense)
    scores = torch.rand(len(maps), len(maps[0]), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(prune=prune, method="random", gqa="ragged", min_heads_per_layer=1, repair=False,
                         progress=False)
    done = prune_model(copy.deepcopy(dense), None, config, scores=Scores(heads=scores))
    return done.model, done.plan


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Milliseconds of one call (CUDA events on GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def prefill_and_decode(model, ids, new: int, device):
    """(prefill ms, decode ms per token) for one prompt and ``new`` greedy steps against the cache."""
    from transformers import DynamicCache

    from headslim.compat import cache_kwargs

    with torch.no_grad():
        cache = DynamicCache()
        state = {}

        def prefill():
            state["out"] = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))

        t_prefill = timed(prefill, device)
        nxt = state["out"].logits[:, -1:].argmax(-1)  # (B, 1)

        def decode():
            token = nxt
            for _ in range(new):
                out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
                token = out.logits[:, -1:].argmax(-1)

        t_decode = timed(decode, device) / max(1, new)
    return t_prefill, t_decode


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("e2e_gpu: needs a CUDA GPU (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        args.shape, args.prompt, args.new, args.repeats, args.warmup = "tiny", 16, 3, 2, 1
    dtype = torch.float32 if args.smoke else {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backend = "torch" if args.smoke else "triton"
    from headslim.kernels import disable, enable

    dense = build_dense(args.shape, dtype, device)
    variants = {"dense sdpa": (dense, False), "dense headslim": (dense, True)}
    pruned = prune_ragged(dense, args.prune)
    plan = None
    if pruned is not None:
        pruned_model, plan = pruned
        variants.update({"pruned stock": (pruned_model, False), "pruned headslim": (pruned_model, True)})
    batches = [int(b) for b in args.batch.split(",")]
    results = []
    for batch in batches:
        ids = torch.randint(3, dense.config.vocab_size, (batch, args.prompt),
                            generator=torch.Generator().manual_seed(batch)).to(device)
        times = {name: ([], []) for name in variants}
        for rep in range(args.warmup + args.repeats):
            for name, (model, kernels) in variants.items():  # interleaved: drift hits every variant alike
                if kernels:
                    enable(model, backend=backend)
                t_pre, t_dec = prefill_and_decode(model, ids, args.new, device)
                if kernels:
                    disable(model)
                if rep >= args.warmup:
                    times[name][0].append(t_pre)
                    times[name][1].append(t_dec)
        for name, (pre, dec) in times.items():
            pre_s, dec_s = sorted(pre), sorted(dec)
            results.append({"variant": name, "batch": batch, "prefill_p50_ms": statistics.median(pre_s),
                            "prefill_p90_ms": pre_s[min(len(pre_s) - 1, math.ceil(0.9 * len(pre_s)) - 1)],
                            "decode_p50_ms_per_token": statistics.median(dec_s),
                            "decode_tokens_per_s": batch * 1e3 / statistics.median(dec_s)})
    write(args, results, plan, device)
    return 0


def write(args, results, plan, device):
    import transformers

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "command": " ".join(sys.argv)}
    if device == "cuda":
        import triton

        env["triton"] = triton.__version__
    heads = None if plan is None else [len(k) for k in plan.kept_heads]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps({"env": env, "shape": args.shape, "dtype": args.dtype,
                                                   "prompt": args.prompt, "new": args.new,
                                                   "kept_heads_per_layer": heads, "results": results}, indent=1))
    lines = [f"# End to end: {args.shape} (random weights), {args.dtype}, prompt {args.prompt}, {args.new} new tokens",
             "", f"Device: {env['device']} · torch {env['torch']} · transformers {env['transformers']}"
             + (f" · triton {env['triton']}" if "triton" in env else ""), f"Command: `{env['command']}`", "",
             f"Pruned: {'not available (issue 6 missing)' if heads is None else f'query heads kept per layer {heads}'}",
             "", "| variant | batch | prefill p50 ms | prefill p90 ms | decode ms/token | decode tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['prefill_p50_ms']:.2f} | {r['prefill_p90_ms']:.2f} | "
                     f"{r['decode_p50_ms_per_token']:.3f} | {r['decode_tokens_per_s']:.0f} |")
    (args.out / "e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

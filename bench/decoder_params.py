"""Parameter counts (and optionally forward latency) of decoder LLMs before/after GQA-aware pruning.

Builds a Llama-shaped model and GPT-2 small's shape (12 layers, 12 heads, 768 hidden) from configs
with random weights (no download), scores heads with seeded random scores, and prunes the same
fraction of query heads in each ``--gqa`` mode with ``headslim.pipeline.prune_model`` (as ``shrink``:
GPT-2 has no KV groups, so its three rows are the same plain selection). Parameter counts do not depend on the scores'
values, only on how many query and KV heads each mode keeps, which this prints as well.

Examples:
    python bench/decoder_params.py                                   # parameter table, CPU, seconds
    python bench/decoder_params.py --prune 0.5 --latency --device cuda --dtype bfloat16 \
        --batch 1 16 --seq 512                                       # + forward latency on a GPU

Latency: dense and pruned models are timed interleaved in the same loop (warm-up apart,
``--runs`` timed forwards each, p50/p90 in ms); ``ragged`` runs the plain-PyTorch gather reference
(``headslim.arch.ragged``), not a fused kernel.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import transformers

from headslim.arch import kv_maps
from headslim.gqa import GQA_MODES
from headslim.pipeline import PruneConfig, Scores, prune_model


def llama_config(args) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.llama_hidden, intermediate_size=int(args.llama_hidden * 2.6875),
        num_hidden_layers=args.llama_layers, num_attention_heads=args.llama_heads,
        num_key_value_heads=args.llama_kv_heads, max_position_embeddings=2048,
    )


def gpt2_config(args) -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".attn." in n)


def kv_heads(model) -> int:
    return sum(len(set(m)) for m in kv_maps(model))


def timed(model, ids, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def latency(models: dict, args, vocab: int) -> dict:
    """p50/p90 forward ms per model; models are interleaved in every round so drift cancels."""
    device = torch.device(args.device)
    out = {}
    for batch in args.batch:
        ids = torch.randint(0, vocab, (batch, args.seq), device=device)
        for _ in range(args.warmup):
            for m in models.values():
                timed(m, ids, device)
        times = {name: [] for name in models}
        for _ in range(args.runs):
            for name, m in models.items():
                times[name].append(timed(m, ids, device))
        for name, ts in times.items():
            qs = statistics.quantiles(ts, n=10)
            out[f"{name}@b{batch}"] = {"p50_ms": round(statistics.median(ts), 3), "p90_ms": round(qs[8], 3)}
    return out


def run_family(name: str, config, args) -> dict:
    torch.manual_seed(args.seed)
    dense = transformers.AutoModelForCausalLM.from_config(config).eval()
    maps = kv_maps(dense)
    scores = torch.rand(len(maps), max(len(m) for m in maps), generator=torch.Generator().manual_seed(args.seed))
    rows = {"dense": {"params": params(dense), "attention_params": attention_params(dense),
                      "query_heads": sum(len(m) for m in maps), "kv_heads": kv_heads(dense)}}
    models = {"dense": dense}
    for mode in GQA_MODES:
        config = PruneConfig(prune=args.prune, method="random", gqa=mode, min_heads_per_layer=args.min_heads_per_layer,
                             repair=False, progress=False)
        done = prune_model(copy.deepcopy(dense), None, config, scores=Scores(heads=scores))
        plan, pruned = done.plan, done.model
        rows[mode] = {"params": params(pruned), "attention_params": attention_params(pruned),
                      "query_heads": sum(plan.heads_after), "kv_heads": kv_heads(pruned),
                      "heads_per_layer": plan.heads_after}
        models[mode] = pruned
    result = {"model": name, "prune": args.prune, "rows": rows}
    if args.latency:
        dtype = getattr(torch, args.dtype)
        for m in models.values():
            m.to(device=args.device, dtype=dtype)
        result["latency"] = latency(models, args, config.vocab_size)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prune", type=float, default=0.5, help="fraction of query heads to remove (default 0.5)")
    p.add_argument("--min-heads-per-layer", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-hidden", type=int, default=512)
    p.add_argument("--llama-layers", type=int, default=8)
    p.add_argument("--llama-heads", type=int, default=16)
    p.add_argument("--llama-kv-heads", type=int, default=4)
    p.add_argument("--models", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    p.add_argument("--latency", action="store_true", help="also time forward passes (quiet machine / GPU only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    env = {"transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "device": args.device,
           "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None}
    builders = {"llama": ("llama-shaped", llama_config), "gpt2": ("gpt2-small-shaped", gpt2_config)}
    results = [run_family(builders[m][0], builders[m][1](args), args) for m in args.models]
    for res in results:
        print(f"\n{res['model']}  (prune {res['prune']} of query heads)")
        print(f"{'mode':<10} {'params':>12} {'attn params':>12} {'q heads':>8} {'kv heads':>9} {'saved':>7}")
        base = res["rows"]["dense"]["params"]
        for mode, row in res["rows"].items():
            saved = 100 * (base - row["params"]) / base
            print(f"{mode:<10} {row['params']:>12,} {row['attention_params']:>12,} {row['query_heads']:>8} "
                  f"{row['kv_heads']:>9} {saved:>6.1f}%")
        for key, lat in res.get("latency", {}).items():
            print(f"  latency {key:<20} p50 {lat['p50_ms']:>9.3f} ms   p90 {lat['p90_ms']:>9.3f} ms")
    print("\nenv:", json.dumps(env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

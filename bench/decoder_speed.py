"""Decode speed of a pruned decoder at a real model's shape: Qwen2.5-0.5B-shaped, random weights, fp32.

Issue 17's bar: 50 % of query heads removed (``--gqa uniform`` and ``ragged``); ONNX Runtime CPU
prefill latency and decode tokens/s at batch 1 and 8 (prompt 128, 32 new tokens), dense vs pruned in
one interleaved run each, next to the byte-ideal. Random weights: speed does not depend on what
the weights are, so which heads go is drawn from random scores (a seed) — quality is not measured
here (see ``decoder_testbed.py`` / ``decoder_quality.py`` for that).

    python bench/decoder_speed.py --work /tmp/qwen05 --out bench/results/decoder_speed

Steps (each skipped when its output already exists under ``--work``, so an interrupted run resumes):
1. the dense model: ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's config (24 layers, hidden 896, 14 query /
   2 KV heads, FFN 4864, vocab 151936, tied embeddings, q/k/v biases), seed 0, saved as safetensors;
2. per mode, 50 % of the query heads removed with :func:`headslim.gqa.select_gqa` on random scores,
   cut with :func:`headslim.surgery.prune_heads` and saved with :func:`headslim.io.save_pruned`;
3. ``headslim export --optimize --quantize int8`` of each (fp32 validated: logits parity and greedy generation
   equal to PyTorch; int8 agreement with fp32 recorded in its ``export_report.json``);
4. ``headslim bench --task causal-lm`` per mode against the dense model, results into ``--out/<mode>/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dense_model(work: Path) -> Path:
    out = work / "dense"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_05B)
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    log(f"dense Qwen2.5-0.5B-shaped model: {sum(p.numel() for p in model.parameters()):,} parameters -> {out}")
    return out


def pruned_model(work: Path, dense: Path, mode: str, prune: float, seed: int) -> Path:
    out = work / f"pruned-{mode}"
    if (out / "config.json").is_file():
        return out
    import torch

    from headslim.arch import kv_maps
    from headslim.gqa import select_gqa
    from headslim.io import load_model, save_pruned
    from headslim.surgery import prune_heads

    model = load_model(dense)
    maps = kv_maps(model)
    scores = torch.rand(len(maps), len(maps[0]), generator=torch.Generator().manual_seed(seed))
    plan = select_gqa(scores, maps, prune=prune, mode=mode, min_per_layer=1)
    pruned = prune_heads(copy.deepcopy(model), plan)
    save_pruned(pruned, out, plan)
    kv = [len(k) for k in plan.kv_heads_after] if plan.kv_heads_after else None
    log(f"{mode}: query heads per layer {plan.heads_after} (of {sum(plan.num_heads)}: {sum(plan.heads_after)} kept), "
        f"KV heads {kv} -> {out}")
    return out


def exported(work: Path, model_dir: Path) -> Path:
    out = work / f"{model_dir.name}-onnx"
    if (out / "export_report.json").is_file():
        return out
    from headslim.export_decoder import export_decoder

    started = time.perf_counter()
    report = export_decoder(model_dir, out, optimize=True, quantize="int8")
    log(f"exported {model_dir.name} in {time.perf_counter() - started:.0f} s: validation {json.dumps(report.validation)}; "
        f"fused: {json.dumps(report.fusion)}; int8 agreement {json.dumps(report.quantization['agreement'])}; "
        f"external data {report.external_data}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/qwen05", help="models and ONNX exports (several GB; not committed)")
    p.add_argument("--out", default="bench/results/decoder_speed")
    p.add_argument("--modes", default="uniform,ragged")
    p.add_argument("--prune", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="ort-cpu,ort-opt-cpu,ort-int8-cpu")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.0)
    p.add_argument("--prepare-only", action="store_true", help="build, prune and export; time nothing")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dense = dense_model(work)
    modes = [m for m in args.modes.split(",") if m]
    pruned = {m: pruned_model(work, dense, m, args.prune, args.seed) for m in modes}
    onnx_dense = exported(work, dense) if "ort" in args.backend else None
    onnx = {m: exported(work, d) for m, d in pruned.items()} if "ort" in args.backend else {}
    if args.prepare_only:
        return 0
    from headslim import report
    from headslim.bench import BenchConfig, bench

    for mode in modes:
        config = BenchConfig(backends=args.backend, batches=tuple(int(b) for b in args.batch.split(",")),
                             task="causal-lm", prompt=args.prompt, new_tokens=args.new_tokens, threads=args.threads,
                             warmup=args.warmup, min_runs=args.runs, min_seconds=args.min_time,
                             onnx_dense=str(onnx_dense) if onnx_dense else None,
                             onnx_pruned=str(onnx[mode]) if mode in onnx else None)
        result = bench(pruned[mode], dense, config, out=Path(args.out) / mode, overwrite=True, log=log)
        print(report.bench_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

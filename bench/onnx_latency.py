"""ONNX Runtime CPU latency of a dense vs a head-pruned encoder, next to the FLOP-ideal speed-up.

Usage (the pruned dir made with ``headslim shrink all-MiniLM-L6-v2 --prune 0.5 --out X``):

    python bench/onnx_latency.py all-MiniLM-L6-v2 X [--threads 4] [--batches 1 32] [--seq 128]
                                 [--runs 20] [--min-time 5] [--warmup 10] [--out bench/results/onnx_latency]

Both checkpoints are exported with ``headslim export --optimize --quantize int8`` (validated), then
for every batch size and graph (fp32 unfused, fp32 fused by ORT's transformer optimizer, int8
dynamic) the dense and pruned sessions run interleaved in this one process (alternating which goes
first), after a separate warm-up, with a fixed thread count, until each has at least ``--runs`` runs
and ``--min-time`` seconds. It reports p50 and p90 per point, the measured speed-up
(dense p50 / pruned p50), and the FLOP-ideal speed-up for the same shape, computed from the configs:
per layer QKV+O projections ``2*4*d*hD`` per token, scores+context ``2*2*T*hD`` per token, FFN
``2*2*d*f`` per token (RESEARCH.md, "Cost arithmetic"; embeddings and the pooler are left out, the
same in both models). Writes ``OUT.json`` and ``OUT.md``.

Smoke run (checks the script works; numbers meaningless):
    python bench/onnx_latency.py all-MiniLM-L6-v2 X --batches 1 --runs 2 --min-time 0 --warmup 1 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

GRAPHS = ("fp32-unfused", "fp32-fused", "int8")


def encoder_flops(hidden: int, head_dim: int, intermediate: int, heads: list[int], batch: int, seq: int) -> int:
    """FLOPs of the encoder layers for ``batch`` x ``seq`` tokens (a multiply-add is 2 FLOPs).

    Example:
        >>> encoder_flops(384, 32, 1536, [12] * 6, 1, 128) > encoder_flops(384, 32, 1536, [6] * 6, 1, 128)
        True
    """
    tokens = batch * seq
    total = 0
    for h in heads:
        inner = h * head_dim
        total += 2 * tokens * 4 * hidden * inner  # Q, K, V (d -> hD) and O (hD -> d)
        total += 2 * 2 * tokens * seq * inner  # Q K^T and P V
        total += 2 * 2 * tokens * hidden * intermediate  # FFN in and out
    return total


def _inputs(tokenizer, names: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    """``batch`` real texts of exactly ``seq`` tokens (BBC News test articles, long enough to fill it)."""
    from headslim.data import load_texts
    from headslim.errors import HeadslimError

    try:
        texts = load_texts("bbc-news:test").texts
    except HeadslimError:  # no corpus: repeated sentences, padded to seq (the work is the same)
        texts = ["The quick brown fox jumps over the lazy dog. " * 40]
    texts = (texts * (batch // len(texts) + 1))[:batch]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")  # sessions alternate: see headslim.bench.ort_options
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _interleaved(sessions: dict, feeds: dict, *, runs: int, min_time: float, warmup: int) -> dict[str, list[float]]:
    """Warm up each session apart, then alternate them (who goes first flips) until enough runs and time."""
    for sess in sessions.values():
        wanted = {i.name for i in sess.get_inputs()}
        for _ in range(warmup):
            sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
    times = {k: [] for k in sessions}
    order = list(sessions)
    start, n = time.perf_counter(), 0
    while n < runs or time.perf_counter() - start < min_time:
        for name in order if n % 2 == 0 else order[::-1]:
            sess = sessions[name]
            wanted = {i.name for i in sess.get_inputs()}
            feed = {k: v for k, v in feeds.items() if k in wanted}
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[name].append((time.perf_counter() - t0) * 1e3)
        n += 1
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("dense", help="dense checkpoint dir ('all-MiniLM-L6-v2' = the bundled one)")
    ap.add_argument("pruned", help="pruned checkpoint dir (headslim shrink ... --out)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="ORT intra-op threads")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20, help="minimum timed runs per point and model")
    ap.add_argument("--min-time", type=float, default=5.0, help="minimum seconds per point")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--work", help="where the ONNX exports go (default: a temporary dir)")
    ap.add_argument("--out", default="bench/results/onnx_latency", help="writes OUT.json and OUT.md")
    args = ap.parse_args()

    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    from headslim.export import export_onnx
    from headslim.io import resolve_model_path

    dense_dir, pruned_dir = resolve_model_path(args.dense), resolve_model_path(args.pruned)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        reports = {}
        for name, src in (("dense", dense_dir), ("pruned", pruned_dir)):
            # prefer=unfused: fixed file names; the fused graph is timed here anyway
            reports[name] = export_onnx(src, work / f"{name}-onnx", optimize=True, quantize="int8",
                                        prefer="unfused", calib_samples=4, overwrite=True)
            fusion = reports[name].fusion
            print(f"exported {name}: heads {reports[name].heads_per_layer}, fused attention "
                  f"{fusion['attention_fused']}/{fusion['layers_with_heads']}", flush=True)
        config = AutoConfig.from_pretrained(str(dense_dir))
        head_dim = config.hidden_size // config.num_attention_heads
        tokenizer = AutoTokenizer.from_pretrained(str(dense_dir))
        names = reports["dense"].inputs

        rows = []
        for batch in args.batches:
            feeds = _inputs(tokenizer, names, batch, args.seq)
            flops = {k: encoder_flops(config.hidden_size, head_dim, config.intermediate_size,
                                      reports[k].heads_per_layer, batch, args.seq) for k in reports}
            ideal = flops["dense"] / flops["pruned"]
            for graph in GRAPHS:
                sessions = {k: _session(work / f"{k}-onnx" / reports[k].graphs[graph], args.threads) for k in reports}
                times = _interleaved(sessions, feeds, runs=args.runs, min_time=args.min_time, warmup=args.warmup)
                p = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 90))) for k, v in times.items()}
                speedup = p["dense"][0] / p["pruned"][0]
                rows.append({
                    "batch": batch, "seq": args.seq, "graph": graph, "runs": len(times["dense"]),
                    "dense_p50_ms": p["dense"][0], "dense_p90_ms": p["dense"][1],
                    "pruned_p50_ms": p["pruned"][0], "pruned_p90_ms": p["pruned"][1],
                    "dense_samples_per_s": batch / p["dense"][0] * 1e3,
                    "pruned_samples_per_s": batch / p["pruned"][0] * 1e3,
                    "measured_speedup": speedup, "flop_ideal_speedup": ideal,
                    "measured_over_ideal": speedup / ideal, "dense_gflops": flops["dense"] / 1e9,
                    "pruned_gflops": flops["pruned"] / 1e9,
                })
                r = rows[-1]
                print(f"batch {batch:>3} {graph:<13} dense p50 {r['dense_p50_ms']:8.2f} ms  pruned p50 "
                      f"{r['pruned_p50_ms']:8.2f} ms  speed-up {speedup:.3f} (ideal {ideal:.3f}, "
                      f"{speedup / ideal:.2f} of it), {r['runs']} runs", flush=True)

    from headslim.onnx_utils import cpu_name

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dense": str(dense_dir), "pruned": str(pruned_dir),
        "dense_heads": reports["dense"].heads_per_layer, "pruned_heads": reports["pruned"].heads_per_layer,
        "threads": args.threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "onnxruntime": ort.__version__, "versions": reports["dense"].versions,
        "runs_min": args.runs, "min_time_s": args.min_time, "warmup": args.warmup,
        "int8": reports["dense"].quantization, "order": "dense and pruned interleaved, first one alternating",
        "fusion": {k: {key: r.fusion[key] for key in ("attention_fused", "layers_with_heads")}
                   for k, r in reports.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# ONNX Runtime CPU latency: dense vs head-pruned",
        "",
        f"{meta['date']}; {meta['cpu']} ({meta['cpu_count']} CPUs), {args.threads} ORT threads, "
        f"onnxruntime {meta['onnxruntime']}, torch {meta['versions'].get('torch')}, "
        f"transformers {meta['versions'].get('transformers')}; sequence {args.seq}; >= {args.runs} runs and "
        f">= {args.min_time:g} s per point after {args.warmup} warm-up runs; dense and pruned interleaved.",
        f"Heads per layer: dense {meta['dense_heads']}, pruned {meta['pruned_heads']}.",
        "",
        "| batch | graph | dense p50 ms | dense p90 ms | pruned p50 ms | pruned p90 ms | measured speed-up "
        "| FLOP-ideal | measured / ideal |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['graph']} | {r['dense_p50_ms']:.2f} | {r['dense_p90_ms']:.2f} | "
                     f"{r['pruned_p50_ms']:.2f} | {r['pruned_p90_ms']:.2f} | {r['measured_speedup']:.3f}x | "
                     f"{r['flop_ideal_speedup']:.3f}x | {r['measured_over_ideal']:.2f} |")
    lines += ["", "FLOPs: encoder layers only (QKV+O projections, scores+context, FFN); "
              "goal: measured >= 0.95 x ideal.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

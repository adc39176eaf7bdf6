"""Peak memory of the layer-at-a-time shrink (``headslim.offload``) on a Llama-3.2-1B-shaped model.

Writes a model of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads of width 64,
FFN 8192, vocabulary 128256, tied embeddings) with random bf16 weights as one ``model.safetensors``
(streamed: the writer never holds the model), then, each in its own process:

1. ``shrink_layerwise`` at ``--prune`` of the query heads (``--gqa uniform``), calibrated on
   ``--samples`` BBC News articles of ``--max-length`` tokens (the bundled all-MiniLM-L6-v2 tokenizer:
   the weights are random, only the shapes and the token count matter here);
2. ``headslim.load_pruned`` of the result and one forward pass over a calibration batch.

Each child reports its peak resident set (``VmHWM`` from /proc/self/status); the parent also records
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` after each. The bar: the shrink's peak below half the
model's size. Time does not depend on what the weights learned, memory neither.

    python bench/offload_1b.py --work /tmp/offload-1b --out bench/results/offload_1b

writes ``offload_1b.json`` and ``offload_1b.md``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
             rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_model(path: Path, seed: int = 0) -> int:
    """The random bf16 checkpoint, one tensor chunk in memory at a time; returns its weights' bytes."""
    import torch
    from transformers import LlamaConfig

    from headslim.layerwise import write_streamed
    from headslim.offload import CHUNK_ELEMENTS

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(str(path))
    d, f, h, kv, hd = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim"))
    shapes = {"model.embed_tokens.weight": (SHAPE["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    gen = torch.Generator().manual_seed(seed)

    def chunks(shape):
        def make():
            if len(shape) == 1:  # norm weights
                yield torch.ones(shape)
                return
            rows = max(1, CHUNK_ELEMENTS // shape[1])
            for start in range(0, shape[0], rows):
                yield torch.randn(min(rows, shape[0] - start), shape[1], generator=gen) * 0.02
        return make

    tensors = [(name, torch.bfloat16, shape, chunks(shape)) for name, shape in sorted(shapes.items())]
    return write_streamed(path / "model.safetensors", tensors)


def calibration(samples: int, max_length: int, batch_size: int) -> list:
    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, bbc_news, sample
    from headslim.io import bundled_model_dir

    tokenizer = load_tokenizer(bundled_model_dir(), pad=True)
    data = sample(bbc_news("train"), samples, seed=0)
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
            for b in batches(data, tokenizer, batch_size=batch_size, max_length=max_length)]


def child_shrink(args) -> dict:
    import torch

    from headslim.offload import shrink_layerwise

    torch.set_num_threads(args.threads)
    calib = calibration(args.samples, args.max_length, args.batch_size)
    t = time.perf_counter()
    report = shrink_layerwise(args.work / "dense", args.work / "slim", prune=args.prune, gqa="uniform",
                              batches=calib, progress=False, overwrite=True,
                              provenance={"calibration_source": "bbc-news", "calibration_samples": args.samples})
    report["wall"] = time.perf_counter() - t
    report.pop("scores")
    report["plan"] = {"heads_after": report["plan"]["attention"]["kept_heads"]}
    return report


def child_load(args) -> dict:
    import torch

    import headslim

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = headslim.load_pruned(args.work / "slim")
    loaded = time.perf_counter() - t
    batch = calibration(args.batch_size, args.max_length, args.batch_size)[0]
    with torch.no_grad():
        logits = model(**batch).logits
    return {"load_seconds": loaded, "forward_finite": bool(torch.isfinite(logits.float()).all()),
            "params": sum(p.numel() for p in model.parameters()), "dtype": str(next(model.parameters()).dtype)}


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(args.work), "--prune", str(args.prune),
           "--samples", str(args.samples), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_wall"] = time.perf_counter() - t
    result["ru_maxrss_children_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/headslim-offload-1b"), help="where the model is written")
    p.add_argument("--out", type=Path, default=Path("bench/results/offload_1b"))
    p.add_argument("--prune", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("shrink", "load"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        result = child_shrink(args) if args.child == "shrink" else child_load(args)
        result["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(result))
        return 0

    from headslim.bench import machine_info

    t = time.perf_counter()
    size = write_model(args.work / "dense")
    written = time.perf_counter() - t
    shrink = run_child("shrink", args)  # ru_maxrss of children: the max over the children so far
    load = run_child("load", args)
    gib = 1024 ** 3
    result = {"model_bytes": size, "write_seconds": written, "bar_bytes": size // 2,
              "shrink_peak_rss_bytes": shrink["peak_rss_bytes"], "load_peak_rss_bytes": load["peak_rss_bytes"],
              "passes": shrink["peak_rss_bytes"] < size // 2, "shrink": shrink, "load": load,
              "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload_1b.json").write_text(json.dumps(result, indent=1) + "\n")
    r = shrink["repair"] or {}
    lines = [f"# Layer-at-a-time shrink of a Llama-3.2-1B-shaped model (random bf16 weights, {args.samples} BBC News "
             f"articles of {args.max_length} tokens, --prune {args.prune}, --gqa uniform, {args.threads} threads)", "",
             f"Machine: {result['machine'].get('cpu', '?')}.", "",
             "| | bytes | GiB | vs model |", "|---|---:|---:|---:|",
             f"| model weights (bf16) | {size} | {size / gib:.2f} | 1.00 |",
             f"| bar: half the model | {size // 2} | {size / 2 / gib:.2f} | 0.50 |",
             f"| shrink_layerwise peak RSS | {shrink['peak_rss_bytes']} | {shrink['peak_rss_bytes'] / gib:.2f} | "
             f"{shrink['peak_rss_bytes'] / size:.2f} |",
             f"| load_pruned + forward peak RSS | {load['peak_rss_bytes']} | {load['peak_rss_bytes'] / gib:.2f} | "
             f"{load['peak_rss_bytes'] / size:.2f} |", "",
             f"Shrink: {shrink['wall']:.0f} s (scoring {shrink['seconds']['scoring']:.0f} s, prune + repair + write "
             f"{shrink['seconds']['pruning']:.0f} s); heads {shrink['heads_before']} -> {shrink['heads_after']}; "
             f"at most {shrink['max_layers_in_memory']} layer in memory; repair applied: {r.get('applied')}, "
             f"held-out KL {r.get('check', {}).get('before', float('nan')):.4g} -> "
             f"{r.get('check', {}).get('after', float('nan')):.4g}. Load: {load['load_seconds']:.1f} s. "
             f"Bar (shrink peak < half the model): {'met' if result['passes'] else 'NOT met'}."]
    (args.out / "offload_1b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

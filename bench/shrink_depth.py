"""Shrink's time against depth: BERT-shaped models of 6, 12 and 24 layers (all-MiniLM-L6-v2's width,
random weights: time does not depend on what the weights learned), each shrunk by ``headslim.shrink``
with the same settings, the split of the time recorded (issue 18: within 1.2x of linear in depth).

    python bench/shrink_depth.py --layers 6 12 24 --out bench/results/shrink_depth

writes ``shrink_depth.json`` and ``shrink_depth.md``: seconds for scoring and repair per model, and
each per layer relative to the shallowest model's (1.0 = exactly linear). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="whose config (width, heads, FFN) is copied")
    p.add_argument("--layers", nargs="+", type=int, default=[6, 12, 24])
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--prune", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/shrink_depth")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from headslim.bench import machine_info
    from headslim.io import resolve_model_path
    from headslim.pipeline import ShrinkConfig, shrink

    torch.set_num_threads(args.threads)
    src = resolve_model_path(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.layers:
            config = AutoConfig.from_pretrained(str(src), num_hidden_layers=n)
            torch.manual_seed(0)
            model = AutoModel.from_config(config)
            d = Path(tmp) / f"bert{n}"
            model.save_pretrained(d, safe_serialization=True)
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(d)
            t = time.perf_counter()
            result = shrink(d, Path(tmp) / f"slim{n}", ShrinkConfig(prune=args.prune, calib_samples=args.calib_samples,
                                                                   progress=False))
            wall = time.perf_counter() - t
            rows.append({"layers": n, "seconds": result.seconds, "wall": round(wall, 2),
                         "repair_sites": len(result.repair.get("layers", [])), "mean_cosine": result.quality["mean_cosine"]})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        for k in ("score", "repair"):
            r[f"{k}_per_layer_vs_first"] = round((r["seconds"][k] / r["layers"]) / (base["seconds"][k] / base["layers"]), 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_info(), "args": vars(args)}
    (out / "shrink_depth.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Shrink time vs depth ({args.model}'s width, random weights, {args.calib_samples} BBC News "
             f"calibration articles, --prune {args.prune}, {args.threads} threads)", "",
             "| layers | score s | repair s | total s | score per layer (vs first) | repair per layer (vs first) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['layers']} | {s['score']:.1f} | {s['repair']:.1f} | {s['total']:.1f} | "
                     f"{r['score_per_layer_vs_first']:.2f} | {r['repair_per_layer_vs_first']:.2f} |")
    (out / "shrink_depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

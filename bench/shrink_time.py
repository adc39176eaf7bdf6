"""Wall time and quality of the default ``headslim shrink`` over calibration seeds (issue 18's 60 s bar).

    python bench/shrink_time.py --seeds 0 1 2 3 4 --out bench/results/shrink_time

Runs, one after the other, the command a user types, ``headslim shrink MODEL --prune 0.5 --calib bbc-news
--seed K`` (the seed draws the calibration subset and the scorer's probes), and records per run the wall
time (process start to exit, Python and imports included), shrink's own split, the held-out embedding
cosine (256 BBC test articles, the same for every seed) and the heads kept per layer. Writes
``shrink_time.json`` and ``shrink_time.md``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--prune", default="0.5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--calib-samples", type=int, default=None, help="default: shrink's")
    p.add_argument("--out", type=Path, default=Path("bench/results/shrink_time"))
    args = p.parse_args(argv)

    from headslim.bench import machine_info

    runs = []
    work = Path(tempfile.mkdtemp(prefix="headslim-time-"))
    try:
        for seed in args.seeds:
            cmd = [sys.executable, "-m", "headslim", "shrink", args.model, "--prune", args.prune, "--calib", "bbc-news",
                   "--seed", str(seed), "--no-progress", "--json", "--out", str(work / f"seed{seed}")]
            if args.calib_samples:
                cmd += ["--calib-samples", str(args.calib_samples)]
            t = time.perf_counter()
            # PYTHONSAFEPATH: `-m` from the repository root would put ./kernels first on sys.path, shadowing the
            # PyPI `kernels` transformers 5.25 imports
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
            wall = time.perf_counter() - t
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout[done.stdout.index("{"):])
            runs.append({"seed": seed, "wall_s": round(wall, 2), "seconds": r["seconds"], "quality": r["quality"],
                         "heads_after": r["heads_after"], "calib_samples": r["plan"]["provenance"]["calibration"]["n_samples"]})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cos = [r["quality"]["mean_cosine"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "mean_cosine_over_seeds": sum(cos) / len(cos), "min_cosine_over_seeds": min(cos),
              "wall_s_max": max(walls)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shrink_time.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# headslim shrink {args.model} --prune {args.prune} --calib bbc-news --seed K",
             "", f"Machine: {result['machine'].get('cpu', '?')}, {result['machine'].get('usable_cores', '?')} cores; "
             f"{runs[0]['calib_samples']} calibration articles.", "",
             "| seed | wall s | load s | scoring s | repair s | shrink total s | mean cos | min cos | heads kept per layer |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        s, q = r["seconds"], r["quality"]
        lines.append(f"| {r['seed']} | {r['wall_s']:.1f} | {s['load']:.1f} | {s['score']:.1f} | {s.get('repair', 0):.1f} | "
                     f"{s['total']:.1f} | {q['mean_cosine']:.4f} | {q['min_cosine']:.3f} | {r['heads_after']} |")
    lines += ["", f"Mean cosine over seeds {result['mean_cosine_over_seeds']:.4f} (lowest {min(cos):.4f}); "
              f"wall time {min(walls):.1f}-{max(walls):.1f} s."]
    (args.out / "shrink_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

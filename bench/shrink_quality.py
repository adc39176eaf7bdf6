"""Quality of `headslim shrink` on the bundled all-MiniLM-L6-v2 and BBC News: gradient vs random.

Usage:
    python bench/shrink_quality.py [--prune 0.5] [--random-seeds 5] [--out bench/results/shrink_quality.md]

For each method it runs the same pipeline as the CLI (256 calibration articles from the BBC train
split, max 128 tokens, at least one head per layer, global ranking) and reports parameters and the
mean/min cosine of sentence embeddings to the dense model on 256 held-out BBC test articles.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import headslim
from headslim.pipeline import ShrinkConfig, shrink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/shrink_quality.md")
    args = ap.parse_args()
    runs = [("gradient", 0)] + [("random", s) for s in range(args.random_seeds)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, seed in runs:
            r = shrink("all-MiniLM-L6-v2", Path(tmp) / f"{method}-{seed}",
                       ShrinkConfig(prune=args.prune, method=method, seed=seed, progress=False))
            rows.append((method, seed, r))
            print(f"{method:>8} seed {seed}: mean cosine {r.quality['mean_cosine']:.4f} "
                  f"min {r.quality['min_cosine']:.4f}  {r.seconds['total']:.1f} s", flush=True)
    lines = [
        f"# shrink quality: all-MiniLM-L6-v2, {args.prune:.0%} of heads removed, BBC News",
        "",
        f"headslim {headslim.__version__}, {platform.processor() or platform.machine()}, "
        "calibration 256 train articles, evaluation 256 held-out test articles, max 128 tokens.",
        "",
        "| method | seed | heads | params before | params after | mean cosine | min cosine | shrink wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, seed, r in rows:
        lines.append(f"| {method} | {seed} | {sum(r.heads_before)} -> {sum(r.heads_after)} | {r.params_before:,} | "
                     f"{r.params_after:,} | {r.quality['mean_cosine']:.4f} | {r.quality['min_cosine']:.4f} | "
                     f"{r.seconds['total']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

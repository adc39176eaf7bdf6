"""Wall time of ``headslim shrink`` in one process against ``torchrun --nproc-per-node N`` (gloo) on the
same machine and settings, and whether the plans agree (issue 18: data-parallel calibration).

    python bench/shrink_ranks.py --ranks 2 --out bench/results/shrink_ranks

Runs, one after the other, the command a user types: ``headslim shrink MODEL --prune 0.5 --calib bbc-news``
in one process with ``--threads-total`` CPU threads, then under ``torchrun`` with N ranks sharing the
same threads (``OMP_NUM_THREADS`` = total / N each), so both use the same cores. Writes ``shrink_ranks.json``
and ``shrink_ranks.md``: wall time of each command (process start to exit), shrink's own split, the
held-out cosine and whether the kept heads are identical. Run it on a quiet machine.
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


def run(cmd: list[str], env: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    # PYTHONSAFEPATH: `-m` from the repository root would put ./kernels first on sys.path (shadowing PyPI `kernels`)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONSAFEPATH": "1"})
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(out[out.index("{"):]), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads-total", type=int, default=2)
    p.add_argument("--prune", default="0.5")
    p.add_argument("--calib-samples", type=int, default=None, help="default: shrink's")
    p.add_argument("--out", type=Path, default=Path("bench/results/shrink_ranks"))
    args = p.parse_args(argv)

    from headslim.bench import machine_info

    work = Path(tempfile.mkdtemp(prefix="headslim-ranks-"))
    try:
        common = [args.model, "--prune", args.prune, "--calib", "bbc-news", "--no-progress", "--json"]
        if args.calib_samples:
            common += ["--calib-samples", str(args.calib_samples)]
        env1 = {**os.environ, "OMP_NUM_THREADS": str(args.threads_total)}
        one, wall_one = run([sys.executable, "-m", "headslim", "shrink", *common, "--out", str(work / "one")], env1)
        per_rank = max(1, args.threads_total // args.ranks)
        envn = {**os.environ, "OMP_NUM_THREADS": str(per_rank)}
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        many, wall_many = run([torchrun, "--standalone", f"--nproc-per-node={args.ranks}", "-m", "headslim", "shrink",
                               *common, "--out", str(work / "many")], envn)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = one["plan"]["attention"]["kept_heads"] == many["plan"]["attention"]["kept_heads"]
    rows = [("1 process", args.threads_total, one, wall_one), (f"torchrun, {args.ranks} ranks (gloo)", per_rank, many,
                                                               wall_many)]
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "same_plan": same,
              "runs": [{"run": name, "threads_per_process": t, "wall_s": wall, "seconds": r["seconds"],
                        "quality": r["quality"]} for name, t, r, wall in rows]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shrink_ranks.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# headslim shrink {args.model} --prune {args.prune} --calib bbc-news: one process vs torchrun",
             "", f"Machine: {result['machine'].get('cpu', '?')}, {args.threads_total} threads in all.", "",
             "| run | threads each | wall s | load s | scoring s | repair s | shrink total s | mean cos |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t, r, wall in rows:
        s = r["seconds"]
        lines.append(f"| {name} | {t} | {wall:.1f} | {s['load']:.1f} | {s['score']:.1f} | {s.get('repair', 0):.1f} | "
                     f"{s['total']:.1f} | {r['quality']['mean_cosine']:.4f} |")
    lines += ["", f"Plans identical: {same}. Ratio wall 1 process / {args.ranks} ranks: {wall_one / wall_many:.2f}."]
    (args.out / "shrink_ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

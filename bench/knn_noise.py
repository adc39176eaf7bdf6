"""How much 5-NN accuracy does an embedding error of a given size cost? Random errors as a yardstick.

Adds random errors to the dense model's own embeddings (all-MiniLM-L6-v2, every article of
``bbc-news:all`` outside a seed's 256 calibration articles, as ``knn_loo.py``), scaled so the mean
cosine to dense is 0.98, 0.955 or 0.90, and measures leave-one-out 5-NN against dense on the same
queries, five draws each:

- ``isotropic``: Gaussian in all 384 dimensions alike;
- ``data-shaped``: Gaussian with the covariance of the (normalised) embeddings themselves, i.e.
  along the directions the articles differ in.

A pruned model's loss can then be read against an error of the same size:

    python bench/knn_noise.py --out bench/results/knn_loo
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_loo import held_out, loo_predictions, paired  # noqa: E402


def scaled(e: torch.Tensor, z: torch.Tensor, target: float) -> torch.Tensor:
    """``e + s z`` with ``s`` found by bisection so the mean cosine to ``e`` is ``target``."""
    lo, hi = 0.0, 10.0
    for _ in range(50):
        mid = (lo + hi) / 2
        c = float(torch.nn.functional.cosine_similarity(e + mid * z, e).mean())
        lo, hi = (mid, hi) if c > target else (lo, mid)
    return e + lo * z


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cosines", nargs="+", type=float, default=[0.98, 0.955, 0.90])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--out", default="bench/results/knn_loo")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from headslim.data import batches, load_texts, sample
    from headslim.io import load_model, resolve_model_path
    from headslim.quality import embeddings

    src = resolve_model_path(args.model)
    dense = load_model(src)
    tok = AutoTokenizer.from_pretrained(str(src))
    every, train = load_texts("bbc-news:all"), load_texts("bbc-news:train")
    labels = torch.as_tensor(every.labels)
    emb = torch.nn.functional.normalize(embeddings(dense, list(batches(every, tok, batch_size=64))), dim=-1)
    chol = torch.linalg.cholesky(torch.cov(emb.T) + 1e-6 * torch.eye(emb.shape[1]))
    lines = [f"LOO 5-NN change vs dense (pt, mean of {args.draws} draws; per draw in brackets) when random errors "
             "of a given mean cosine are added to the dense embeddings.", "",
             "| seed | noise | mean cos | LOO diff pt | draws |", "|---|---|---|---|---|"]
    for seed in args.seeds:
        held = held_out(every, sample(train, args.calib_samples, seed))
        e, y = emb[held], labels[held]
        ok = loo_predictions(e, y) == y
        for kind in ("isotropic", "data-shaped"):
            for target in args.cosines:
                diffs = []
                for draw in range(args.draws):
                    z = torch.randn(e.shape, generator=torch.Generator().manual_seed(1000 * seed + draw))
                    if kind == "data-shaped":
                        z = z @ chol.T
                    diffs.append(paired(ok, loo_predictions(scaled(e, z, target), y) == y)["diff_pt"])
                lines.append(f"| {seed} | {kind} | {target} | {statistics.mean(diffs):+.2f} "
                             f"| {' '.join(f'{d:+.2f}' for d in diffs)} |")
                print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much a method's result depends on its calibration sample: method × seed × ratio, repair on.

``compare_methods.py`` measures every method once (calibration seed 0). Differences between the best
methods there are of the order of the variation between calibration samples, so this script repeats
chosen methods over several seeds (the seed draws the 256 calibration articles and seeds the scorer)
and reports, with repair on, the mean embedding cosine to dense on all 422 ``bbc-news:test``
articles and 5-NN topic accuracy with the *full* ``bbc-news:train`` index (1703 articles, as
``headslim eval`` does; one test article = 0.24 pt):

    python bench/method_seeds.py --methods fisher obs --seeds 0 1 2 --out bench/results/method_seeds

Each (method, seed) is scored once, to the largest ratio (the scorers return elimination paths, so
the smaller ratios are prefixes; ``learned`` trains once per ratio, as ``shrink`` would), and every
ratio is pruned and repaired by ``headslim.pipeline.prune_model``, the path ``shrink`` takes. Writes
``method_seeds.json`` / ``.md`` after every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import knn_accuracy  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--methods", nargs="+", default=["fisher", "obs"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--out", default="bench/results/method_seeds")
    args = p.parse_args(argv)

    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.io import load_model, resolve_model_path
    from headslim.pipeline import PruneConfig, prune_model, shared_scores
    from headslim.quality import embedding_cosine, embeddings

    src = resolve_model_path(args.model)
    dense = load_model(src)
    tok = load_tokenizer(src)
    train, test = load_texts("bbc-news:train"), load_texts("bbc-news:test")
    mk = lambda d, bs=16: list(batches(d, tok, batch_size=bs, max_length=128))  # noqa: E731
    train_b, test_b = mk(train, 64), mk(test, 64)
    dense_test, dense_train = embeddings(dense, test_b), embeddings(dense, train_b)
    dense_knn = knn_accuracy(dense_train, train.labels, dense_test, test.labels)
    print(f"dense: 5-NN {100 * dense_knn:.2f} % ({len(test)} test, {len(train)} in the index)", flush=True)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            calib = mk(sample(train, args.calib_samples, seed))
            config = PruneConfig(method=method, seed=seed, progress=False)  # repair on, as shrink
            t = time.perf_counter()
            scores = shared_scores(dense, calib, config, args.ratios)
            score_s = time.perf_counter() - t
            for ratio in args.ratios:
                done = prune_model(copy.deepcopy(dense), calib, replace(config, prune=ratio), scores=scores, dense=dense)
                model, plan = done.model, done.plan
                test_emb = embeddings(model, test_b)
                knn = knn_accuracy(embeddings(model, train_b), train.labels, test_emb, test.labels)
                rows.append({"method": method, "seed": seed, "ratio": ratio, "heads_after": plan.heads_after,
                             **embedding_cosine(dense_test, test_emb), "knn5_acc": knn,
                             "score_s": round(score_s + done.seconds["score"], 1)})
                print(f"{method:>8} seed {seed} {ratio:.1f}: cos {rows[-1]['mean_cosine']:.4f} "
                      f"5-NN {100 * knn:.2f} heads {plan.heads_after}", flush=True)
            write(rows, dense_knn, args)
    print(to_markdown(rows, dense_knn))
    return 0


def write(rows, dense_knn, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "method_seeds.json").write_text(json.dumps({"args": vars(args), "dense_knn5_acc": dense_knn,
                                                       "rows": rows}, indent=2) + "\n")
    (out / "method_seeds.md").write_text(to_markdown(rows, dense_knn))


def to_markdown(rows, dense_knn) -> str:
    """Per method and ratio: every seed's cosine and 5-NN, and their means."""
    lines = [f"Repair on; 5-NN with the full train index, dense {100 * dense_knn:.2f} %.", "",
             "| method | removed | seeds | mean cos per seed | mean | 5-NN % per seed | mean |", "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    for (method, ratio), rs in groups.items():
        cos, knn = [r["mean_cosine"] for r in rs], [100 * r["knn5_acc"] for r in rs]
        lines.append(f"| {method} | {ratio:.0%} | {' '.join(str(r['seed']) for r in rs)} "
                     f"| {' '.join(f'{c:.4f}' for c in cos)} | {statistics.mean(cos):.4f} "
                     f"| {' '.join(f'{k:.2f}' for k in knn)} | {statistics.mean(knn):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

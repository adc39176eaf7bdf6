"""Compare head-scoring methods, with and without repair, on all-MiniLM-L6-v2 / BBC News.

For every method, target (share of heads removed) and repair on/off: mean and minimum embedding
cosine to the dense model on the held-out ``bbc-news:test`` articles, 5-NN topic accuracy on them
(the k-NN index holds ``bbc-news:train`` embeddings computed by the same pruned model), and the
wall time of scoring and repair. One command reproduces the table:

    python bench/compare_methods.py --out bench/results/compare_methods

writes ``compare_methods.json`` and ``compare_methods.md`` there and prints the table. Scores that do
not depend on the target are computed once (``iterative`` runs once to the largest target: its path
answers every smaller one exactly); ``learned`` trains once per target. Quality numbers are valid on
any machine; wall times only on a quiet one (the output records the load average).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_METHODS = ["obs", "fisher", "ablation", "random", "gradient", "magnitude", "entropy", "confidence",
                   "iterative", "iterative:fisher", "learned"]


def knn_predict(index_emb, index_labels, query_emb, k: int = 5, exclude_self: bool = False):
    """k-NN (cosine) class of every query ``(N_query,)``; ties between classes go to the larger summed
    similarity. ``exclude_self``: the queries are the index itself, and none is its own neighbour."""
    import torch

    a = torch.nn.functional.normalize(index_emb, dim=-1)
    b = torch.nn.functional.normalize(query_emb, dim=-1)
    sims = b @ a.T  # (N_query, N_index)
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    sims, idx = sims.topk(k, dim=-1)  # (N_query, k)
    index_labels = torch.as_tensor(index_labels)
    labels = index_labels[idx]  # (N_query, k)
    n_classes = int(index_labels.max()) + 1
    votes = torch.zeros(len(b), n_classes).scatter_add_(1, labels, torch.ones_like(sims))
    votes += 1e-3 * torch.zeros(len(b), n_classes).scatter_add_(1, labels, sims)
    return votes.argmax(-1)


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, k: int = 5) -> float:
    """k-NN (cosine) topic accuracy of ``test_emb`` against the ``train_emb`` index (``knn_predict``)."""
    import torch

    predicted = knn_predict(train_emb, train_labels, test_emb, k)
    return float((predicted == torch.as_tensor(test_labels)).float().mean())


def evaluate(model, test_batches, train_batches, dense_test, data) -> dict:
    from headslim.quality import embedding_cosine, embeddings

    test_emb = embeddings(model, test_batches)
    train_emb = embeddings(model, train_batches)
    q = embedding_cosine(dense_test, test_emb)
    q["knn5_acc"] = knn_accuracy(train_emb, data["train"].labels, test_emb, data["test"].labels)
    return q


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--knn-train", type=int, default=None, help="train articles in the k-NN index (default all)")
    p.add_argument("--test-samples", type=int, default=None, help="test articles (default all)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repair-inputs", default="pruned", choices=["dense", "pruned"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/compare_methods", help="directory for the JSON and markdown")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other methods already in --out (same data settings), replace these")
    args = p.parse_args(argv)
    previous = _previous_rows(args) if args.append else []

    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.io import load_model, resolve_model_path
    from headslim.pipeline import PruneConfig, prune_model, shared_scores
    from headslim.quality import embeddings

    src = resolve_model_path(args.model)
    dense = load_model(src)
    tok = load_tokenizer(src)
    data = {"calib": sample(load_texts("bbc-news:train"), args.calib_samples, args.seed),
            "train": sample(load_texts("bbc-news:train"), args.knn_train, 1),
            "test": sample(load_texts("bbc-news:test"), args.test_samples, 0)}
    mk = lambda d, bs=args.batch_size: list(batches(d, tok, batch_size=bs, max_length=args.max_length))  # noqa: E731
    calib, train_b, test_b = mk(data["calib"]), mk(data["train"], 64), mk(data["test"], 64)

    t0 = time.perf_counter()
    dense_test = embeddings(dense, test_b)
    base = evaluate(dense, test_b, train_b, dense_test, data)
    rows = [{"method": "dense", "ratio": 0.0, "repair": False, **base, "score_s": 0.0, "repair_s": 0.0}]
    rows += [r for r in previous if r["method"] not in args.methods and r["method"] != "dense"]
    print(f"dense: 5-NN accuracy {base['knn5_acc']:.4f} ({time.perf_counter() - t0:.0f} s to embed)", flush=True)
    for method in args.methods:
        config = PruneConfig(method=method, seed=args.seed, progress=args.progress, repair=False)
        t = time.perf_counter()
        # one pass serves every target (a path method runs to the largest); learned trains per target in prune_model
        scores = shared_scores(dense, calib, config, args.ratios)
        shared_s = time.perf_counter() - t
        for ratio in args.ratios:
            off = prune_model(copy.deepcopy(dense), calib, replace(config, prune=ratio), scores=scores)
            row = {"method": method, "ratio": ratio, "heads_after": off.plan.heads_after,
                   "score_s": round(shared_s + off.seconds["score"], 1)}
            rows.append({**row, "repair": False, **evaluate(off.model, test_b, train_b, dense_test, data),
                         "repair_s": 0.0})
            on = prune_model(copy.deepcopy(dense), calib, replace(config, prune=ratio, repair=True,
                                                                  repair_inputs=args.repair_inputs),
                             plan=copy.deepcopy(off.plan), dense=dense)
            rows.append({**row, "repair": True, "repair_applied": on.repair["applied"],
                         **evaluate(on.model, test_b, train_b, dense_test, data),
                         "repair_s": round(on.seconds["repair"], 1)})
            for r in rows[-2:]:
                print(f"{method:>18} {ratio:.1f} repair={'on ' if r['repair'] else 'off'} "
                      f"cos {r['mean_cosine']:.4f} min {r['min_cosine']:.4f} 5-NN {r['knn5_acc']:.4f} "
                      f"score {r['score_s']:.0f} s repair {r['repair_s']:.0f} s", flush=True)
            del off, on
        write(rows, args, src, data, partial=method != args.methods[-1])
    return 0


SAME_DATA = ("model", "calib_samples", "knn_train", "test_samples", "max_length", "batch_size", "repair_inputs", "seed")


def _previous_rows(args) -> list:
    """Rows of an earlier run in ``args.out`` for ``--append``; its data settings must match."""
    path = Path(args.out) / "compare_methods.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    differ = [k for k in SAME_DATA if old["meta"]["args"].get(k) != getattr(args, k)]
    if differ:
        sys.exit(f"--append: {path} was measured with other settings ({', '.join(differ)}); use another --out")
    return old["rows"]


def write(rows, args, src, data, partial: bool) -> None:
    """Write the JSON and markdown (after every method, so an interrupted run keeps what it measured)."""
    import torch
    import transformers

    meta = {"model": str(src), "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "loadavg_at_end": os.getloadavg(), "args": vars(args), "n_test": len(data["test"]),
            "n_knn_train": len(data["train"]), "n_calib": len(data["calib"]),
            "note": "wall times are only comparable on a quiet machine; see loadavg_at_end",
            "complete": not partial}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = to_markdown(rows, meta)
    (out / "compare_methods.md").write_text(md)
    if not partial:
        print(md)


def to_markdown(rows, meta) -> str:
    lines = [f"all-MiniLM-L6-v2 on BBC News: {meta['n_calib']} calibration articles, {meta['n_test']} test articles, "
             f"5-NN index of {meta['n_knn_train']} train articles; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in meta['loadavg_at_end'])} on {meta['threads']} threads.", "",
             "| method | removed | repair | mean cos | min cos | 5-NN acc | score s | repair s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {'on' if r['repair'] else 'off'} | {r['mean_cosine']:.4f} "
                     f"| {r['min_cosine']:.4f} | {100 * r['knn5_acc']:.2f} | {r['score_s']:.0f} | {r['repair_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

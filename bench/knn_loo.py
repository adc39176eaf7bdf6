"""5-NN topic accuracy with four times more held-out queries: leave-one-out over the whole corpus.

``method_seeds.py`` measures 5-NN on the 422 ``bbc-news:test`` articles against the 1703-article
train index: one article is 0.24 pt, and the pruned models differ from dense on a handful of
articles, so a 0.5 pt gap is at the noise floor of that one sample. This script measures the same
quantity on more queries: every article of ``bbc-news:all`` (2125 after dropping the corpus's
duplicates) that is *not* in the calibration sample (1869 with 256 calibration articles) is classified
by its 5 nearest neighbours among the other held-out articles, each model (dense and pruned)
embedding every article itself. It reports the difference to dense on the same queries with its
paired standard error and the articles that decide it (dense right and pruned wrong, and the
reverse), and, for continuity, the test-vs-train-index 5-NN of ``method_seeds.py``.

``--repair off`` / ``--ridge`` / ``--repair-inputs`` measure repair's variants on the same scores;
``--target`` and ``--repair-ffn`` are experiments that are not in the library.

    python bench/knn_loo.py --methods fisher ablation --seeds 0 1 2 --ratios 0.5 --out bench/results/knn_loo

Scores are saved (safetensors) under ``OUT/scores`` and reused when the same method, seed and
calibration size are asked for again. Writes ``knn_loo.json`` / ``.md`` after every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import knn_accuracy, knn_predict  # noqa: E402


def loo_predictions(emb: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Leave-one-out k-NN (cosine) predictions ``(N,)``: every row against all the others."""
    return knn_predict(emb, labels, emb, k, exclude_self=True)


def held_out(every, calib) -> torch.Tensor:
    """``(len(every),)`` bool: the articles of ``every`` that are not in the calibration sample ``calib``."""
    calib_texts = set(calib.texts)
    return torch.as_tensor([t not in calib_texts for t in every.texts])


def paired(dense_ok: torch.Tensor, pruned_ok: torch.Tensor) -> dict:
    """Accuracy difference to dense with its paired standard error (discordant pairs only matter)."""
    n = len(dense_ok)
    lost = int((dense_ok & ~pruned_ok).sum())
    gained = int((~dense_ok & pruned_ok).sum())
    diff = (gained - lost) / n
    # per-article differences d_i in {-1, 0, 1}: var = E[d^2] - E[d]^2, se = sqrt(var / n)
    se = math.sqrt(max((lost + gained) / n - diff * diff, 0.0) / n)
    return {"lost": lost, "gained": gained, "diff_pt": 100 * diff, "se_pt": 100 * se}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--methods", nargs="+", default=["fisher"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--queries-outside", type=int, default=None, metavar="N",
                   help="hold out the articles outside the seed's first N sampled train articles (default: the "
                        "calibration sample); sample(train, 256, s) is a prefix of sample(train, 1024, s), so "
                        "--queries-outside 1024 gives 256 and 1024 calibration articles the same queries")
    p.add_argument("--repair", default="on", choices=["on", "off"])
    p.add_argument("--ridge", type=float, default=1e-2, help="repair's ridge (default: the library's 1e-2)")
    p.add_argument("--repair-inputs", default="pruned", choices=["pruned", "dense"])
    p.add_argument("--repair-ffn", action="store_true",
                   help="experiment: after repair also re-fit every FFN down-projection (bench/ffn_refit.py)")
    p.add_argument("--target", default="tokens", choices=["tokens", "pooled", "pooled-cov"],
                   help="experiment: what the label-free objective keeps (tokens: the library's per-token last "
                        "hidden states; pooled: the normalised mean-pooled sentence embedding; pooled-cov: the "
                        "same, its error weighted by the covariance of the dense calibration embeddings)")
    p.add_argument("--out", default="bench/results/knn_loo")
    args = p.parse_args(argv)

    from safetensors.torch import load_file, save_file

    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.io import load_model, resolve_model_path
    from headslim.pipeline import PruneConfig, Scores, prune_model, shared_scores
    from headslim.quality import embedding_cosine, embeddings

    if args.target != "tokens":
        pooled_target()
    out = Path(args.out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    src = resolve_model_path(args.model)
    dense = load_model(src)
    tok = load_tokenizer(src)
    train, test, every = (load_texts(f"bbc-news:{s}") for s in ("train", "test", "all"))
    labels = torch.as_tensor(every.labels)
    pos = {t: i for i, t in enumerate(every.texts)}
    test_idx = torch.as_tensor([pos[t] for t in test.texts])
    train_idx = torch.as_tensor([pos[t] for t in train.texts])
    all_b = list(batches(every, tok, batch_size=64, max_length=128))
    t = time.perf_counter()
    dense_all = embeddings(dense, all_b)
    print(f"dense: embedded {len(every)} articles in {time.perf_counter() - t:.0f} s", flush=True)

    def std_knn(emb):  # method_seeds.py's protocol: test queries, full train index
        return knn_accuracy(emb[train_idx], train.labels, emb[test_idx], test.labels)

    rows = []
    for method in args.methods:
        for seed in args.seeds:
            calib_data = sample(train, args.calib_samples, seed)
            outside = max(args.calib_samples, args.queries_outside or 0)
            held = held_out(every, sample(train, outside, seed))
            dense_ok = loo_predictions(dense_all[held], labels[held]) == labels[held]
            calib = list(batches(calib_data, tok, batch_size=16, max_length=128))
            if args.target == "pooled-cov":
                covariance_probes(torch.nn.functional.normalize(embeddings(dense, calib), dim=-1))
            cache = out / "scores" / f"{method}-{args.target}-n{args.calib_samples}-s{seed}.safetensors"
            config = PruneConfig(method=method, seed=seed, progress=False, repair=args.repair == "on",
                                 repair_inputs=args.repair_inputs, repair_ridge=args.ridge)
            t = time.perf_counter()
            if cache.exists():
                scores = Scores(heads=load_file(str(cache))["scores"])
            else:
                scores = shared_scores(dense, calib, config, args.ratios)
                if scores.heads is not None:  # learned's depend on the ratio: prune_model trains them at each
                    save_file({"scores": scores.heads.contiguous()}, str(cache))
            score_s = time.perf_counter() - t
            for ratio in args.ratios:
                done = prune_model(copy.deepcopy(dense), calib, replace(config, prune=ratio), scores=scores,
                                   dense=dense)
                model, plan = done.model, done.plan
                if args.repair_ffn:
                    from ffn_refit import refit_ffn

                    refit_ffn(model, dense, calib, ridge=args.ridge)
                emb = embeddings(model, all_b)
                pruned_ok = loo_predictions(emb[held], labels[held]) == labels[held]
                row = {"method": method, "seed": seed, "ratio": ratio, "calib_samples": args.calib_samples,
                       "queries_outside": outside,
                       "target": args.target,
                       "repair": variant(args),
                       "heads_after": plan.heads_after, "queries": int(held.sum()),
                       "dense_loo5": float(dense_ok.float().mean()), "loo5": float(pruned_ok.float().mean()),
                       **paired(dense_ok, pruned_ok),
                       "mean_cosine": embedding_cosine(dense_all[held], emb[held])["mean_cosine"],
                       "test_knn5": std_knn(emb), "dense_test_knn5": std_knn(dense_all),
                       "score_s": round(score_s + done.seconds["score"], 1)}
                rows.append(row)
                print(f"{method:>8} seed {seed} {ratio:.1f}: cos {row['mean_cosine']:.4f} LOO 5-NN "
                      f"{100 * row['loo5']:.2f} vs dense {100 * row['dense_loo5']:.2f} "
                      f"({row['diff_pt']:+.2f} ± {row['se_pt']:.2f} pt; lost {row['lost']}, gained {row['gained']}); "
                      f"test 5-NN {100 * row['test_knn5']:.2f}", flush=True)
                write(rows, args)
    print(to_markdown(rows))
    return 0


def pooled_target() -> None:
    """Make the label-free objective keep the normalised mean-pooled embedding instead of every token."""
    from headslim.quality import pool
    from headslim.scoring import common

    original = common.dense_target

    def target(out, batch):
        if getattr(out, "logits", None) is not None:
            return original(out, batch)
        emb = pool(out.hidden_states[-1], batch["attention_mask"], "mean")  # (B, d)
        return torch.nn.functional.normalize(emb, dim=-1)

    common.dense_target = target


def covariance_probes(calib_emb: torch.Tensor) -> None:
    """Label-free probes ``r ~ N(0, Sigma)``, ``Sigma`` the covariance of ``calib_emb``: the Gauss-Newton
    matrix of ``(e - e_dense)^T Sigma (e - e_dense)``, the error along the directions the articles vary in."""
    from headslim.scoring import common

    chol = torch.linalg.cholesky(torch.cov(calib_emb.T.double()) + 1e-8 * torch.eye(calib_emb.shape[1]))
    original = getattr(common.probe, "library_probe", common.probe)  # the library's, not an earlier seed's

    def probe(out, batch, objective, gen):
        if objective == "task" or getattr(out, "logits", None) is not None:
            return original(out, batch, objective, gen)
        emb = common.dense_target(out, batch)  # (B, d)
        r = torch.randn(emb.shape, generator=gen, dtype=torch.float64) @ chol.T
        return (emb * r.to(emb.dtype)).sum()

    probe.library_probe = original
    common.probe = probe


def variant(args) -> str:
    name = "off" if args.repair == "off" else f"{args.repair_inputs}, ridge {args.ridge:g}"
    return name + (", FFN re-fit" if args.repair_ffn else "")


def write(rows, args) -> None:
    out = Path(args.out)
    old = []
    if (out / "knn_loo.json").exists():  # keep rows of other methods / seeds measured earlier
        key = lambda r: (r["method"], r["seed"], r["ratio"], r["calib_samples"], r.get("repair", "pruned, ridge 0.01"),
                         r.get("target", "tokens"), outside(r))  # noqa: E731
        new = {key(r) for r in rows}
        old = [r for r in json.loads((out / "knn_loo.json").read_text())["rows"] if key(r) not in new]
    allrows = old + rows
    (out / "knn_loo.json").write_text(json.dumps({"args": vars(args), "rows": allrows}, indent=2) + "\n")
    (out / "knn_loo.md").write_text(to_markdown(allrows))


def outside(row) -> int:
    """How many sampled train articles the row's queries leave out (rows from before the option: its calibration)."""
    return row.get("queries_outside", row["calib_samples"])


def rep(row) -> str:
    return row.get("repair", "pruned, ridge 0.01") + ("" if row.get("target", "tokens") == "tokens" else f"; {row['target']} target")


def to_markdown(rows) -> str:
    lines = ["LOO 5-NN: every held-out article of bbc-news:all (not in the calibration sample) "
             "against the other held-out articles; diff = pruned - dense on the same queries, ± paired "
             "standard error; lost/gained = articles dense gets right and pruned wrong / the reverse. "
             "test 5-NN: the 422 test articles against the 1703-article train index.", "",
             "| method | calib | repair | removed | seed | queries | mean cos | dense LOO | LOO 5-NN | diff pt | lost / gained "
             "| test 5-NN (dense) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in sorted(rows, key=lambda r: (outside(r), r["method"], r["calib_samples"], rep(r), r["ratio"], r["seed"])):
        groups.setdefault((r["method"], r["calib_samples"], rep(r), r["ratio"], outside(r)), []).append(r)
        lines.append(f"| {r['method']} | {r['calib_samples']} | {rep(r)} | {r['ratio']:.0%} | {r['seed']} | {r['queries']} "
                     f"| {r['mean_cosine']:.4f} | {100 * r['dense_loo5']:.2f} | {100 * r['loo5']:.2f} "
                     f"| {r['diff_pt']:+.2f} ± {r['se_pt']:.2f} | {r['lost']} / {r['gained']} "
                     f"| {100 * r['test_knn5']:.2f} ({100 * r['dense_test_knn5']:.2f}) |")
    lines += ["", "Queries outside N: the held-out articles are those outside the seed's first N sampled train articles.", "",
              "| method | calib | repair | removed | queries outside | seeds | mean diff pt | mean cos |",
              "|---|---|---|---|---|---|---|---|"]
    for (method, n, repair, ratio, n_out), rs in groups.items():
        lines.append(f"| {method} | {n} | {repair} | {ratio:.0%} | {n_out} | {len(rs)} "
                     f"| {statistics.mean(r['diff_pt'] for r in rs):+.2f} "
                     f"| {statistics.mean(r['mean_cosine'] for r in rs):.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

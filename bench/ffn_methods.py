"""FFN neuron scorers alone on all-MiniLM-L6-v2 / BBC News: 30 % of the FFN neurons removed by each
scorer's global ranking, mean embedding cosine to dense on the 422 bbc-news:test articles before and
after repair (256 calibration articles, seed 0). The evidence behind shrink's default ``--ffn-method``.

    python bench/ffn_methods.py

Each scorer runs once; its plan is applied with and without repair by ``headslim.pipeline.prune_model``
(``--prune 0 --prune-ffn 0.3``, every head kept), the path ``shrink`` takes.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--methods", nargs="+", default=["fisher", "gradient", "magnitude"])
    p.add_argument("--prune-ffn", type=float, default=0.3, help="fraction of all FFN neurons removed (default 0.3)")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--test-samples", type=int, default=None, help="test articles (default all 422)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.io import load_model, resolve_model_path
    from headslim.pipeline import PruneConfig, prune_model, score_for
    from headslim.quality import embedding_cosine, embeddings

    torch.set_num_threads(args.threads)
    src = resolve_model_path(args.model)
    dense = load_model(src)
    tok = load_tokenizer(src)
    calib = list(batches(sample(load_texts("bbc-news:train"), args.calib_samples, args.seed), tok, batch_size=16,
                         max_length=128))
    test = list(batches(sample(load_texts("bbc-news:test"), args.test_samples, 0), tok, batch_size=64, max_length=128))
    ref = embeddings(dense, test)
    for method in args.methods:
        config = PruneConfig(prune=0, prune_ffn=args.prune_ffn, ffn_method=method, seed=args.seed, progress=False,
                             repair=False)
        t = time.perf_counter()
        scores = score_for(dense, calib, config, heads=False)
        score_s = time.perf_counter() - t
        off = prune_model(copy.deepcopy(dense), calib, config, scores=scores)
        c0 = embedding_cosine(ref, embeddings(off.model, test))["mean_cosine"]
        on = prune_model(copy.deepcopy(dense), calib, replace(config, repair=True), plan=copy.deepcopy(off.plan),
                         dense=dense)
        c1 = embedding_cosine(ref, embeddings(on.model, test))["mean_cosine"]
        print(f"{method:>9}: {args.prune_ffn:.0%} FFN neurons, per layer {off.plan.neurons_after}: cos {c0:.4f} "
              f"-> repaired {c1:.4f} (score {score_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed-up targets on all-MiniLM-L6-v2 / BBC News: joint heads + FFN neurons vs heads only, FFN only
and a naive baseline, each measured on ONNX Runtime CPU against the dense model in one interleaved run.

For every structure set (``joint``, ``heads``, ``ffn``) and target, ``headslim.budget`` spends the
target on the structures (Fisher costs of one scoring pass, latency tables of ``headslim.latency``
calibrated on the dense model and its skeleton), the plan is applied and repaired (ridge re-fit of
every pruned O and down projection, kept only where held-out data says it helps), and the result is
scored on the held-out ``bbc-news:test`` articles (mean / min embedding cosine to dense, 5-NN topic
accuracy against a ``bbc-news:train`` index embedded by the same model) and timed dense vs pruned on
the runtime at every shape. The naive line (issue 16): the default 50 %-heads plan (fisher + repair),
then FFN neurons by activation norm x down-projection column norm (``magnitude``), the same share in
every layer, and the same ridge re-fit.

    python bench/speed_target.py --out bench/results/speed_target

writes ``speed_target.json``, ``speed_target.md`` and ``speed_target.png``. Quality numbers hold on
any machine; the speed-ups only on the machine recorded with them (run it on a quiet one).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--targets", nargs="+", type=float, default=[1.2, 1.5, 2.0, 2.5])
    p.add_argument("--kinds", nargs="+", default=["joint", "heads", "ffn", "naive"])
    p.add_argument("--naive-ffn", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--runtime", default="ort-cpu")
    p.add_argument("--shapes", default="1x128,32x128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure-seconds", type=float, default=3.0)
    p.add_argument("--speed-method", default="obs", help="costs the targets spend: obs (default), fisher, gradient")
    p.add_argument("--exchange", type=float, default=None, help="fixed head price (default: fitted per target)")
    p.add_argument("--loo", action="store_true",
                   help="also leave-one-out 5-NN over the bbc-news:all articles outside the calibration sample "
                        "(knn_loo.py's protocol), with its paired difference to dense")
    p.add_argument("--merge", nargs="+", metavar="RUN_DIR",
                   help="run nothing: put the rows of these earlier runs (their speed_target.json; one dense row, "
                        "from the first) into one table and plot in --out")
    p.add_argument("--out", default="bench/results/speed_target")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))

    import torch
    from transformers import AutoTokenizer

    from compare_methods import evaluate
    from headslim.arch import get_adapter
    from headslim.bench import machine_info
    from headslim.data import batches, load_texts, sample
    from headslim.errors import HeadslimError
    from headslim.io import load_model, resolve_model_path, save_pruned
    from headslim.plan import PrunePlan
    from headslim.quality import embeddings
    from headslim.pipeline import PruneConfig, Scores, prune_model, speed_scores
    from headslim.scoring.neurons import score_structures
    from headslim.selection import select_heads
    from headslim.speedup import SpeedTarget, parse_shapes

    torch.set_num_threads(args.threads)
    src = resolve_model_path(args.model)
    dense = load_model(src)
    tok = AutoTokenizer.from_pretrained(str(src))
    adapter = get_adapter(dense)
    heads, neurons = adapter.num_heads(dense), adapter.num_neurons(dense)
    data = {"calib": sample(load_texts("bbc-news:train"), args.calib_samples, args.seed),
            "train": load_texts("bbc-news:train"), "test": load_texts("bbc-news:test")}
    mk = lambda d, bs=16: list(batches(d, tok, batch_size=bs, max_length=128))  # noqa: E731
    calib, train_b, test_b = mk(data["calib"]), mk(data["train"], 64), mk(data["test"], 64)
    dense_test = embeddings(dense, test_b)
    loo = LeaveOneOut(dense, tok, data["calib"]) if args.loo else None
    base = evaluate(dense, test_b, train_b, dense_test, data)
    if loo is not None:
        base.update(loo.dense_row())
    rows = [{"kind": "dense", "target": 1.0, **base}]
    print(f"dense: 5-NN {base['knn5_acc']:.4f}", flush=True)

    t = time.perf_counter()
    speed = SpeedTarget(src, dense, tok, 0.0, runtime=args.runtime, shapes=parse_shapes(args.shapes),
                        threads=args.threads, max_length=128, measure_seconds=args.measure_seconds, progress=False)
    tables_s = time.perf_counter() - t
    t = time.perf_counter()
    # the costs prune_model would score for a joint target (on the batches the head price is not fitted on)
    scored = speed_scores(dense, calib, PruneConfig(target_speedup=2.0, speed_method=args.speed_method, seed=args.seed,
                                                    progress=False)).structures
    score_s = time.perf_counter() - t
    print(f"tables + calibration {tables_s:.0f} s, scoring ({args.speed_method}) {score_s:.0f} s", flush=True)

    def run(kind: str, target: float, config: PruneConfig, extra: dict, plan=None) -> None:
        t0 = time.perf_counter()
        result = prune_model(copy.deepcopy(dense), calib, config, plan=plan, speed=speed, dense=dense,
                             scores=Scores(structures=scored))
        seconds = time.perf_counter() - t0
        model, plan = result.model, result.plan
        quality = evaluate(model, test_b, train_b, dense_test, data)
        if loo is not None:
            quality.update(loo(model))
        with tempfile.TemporaryDirectory() as tmp:
            save_pruned(model, Path(tmp) / "slim", plan, tokenizer=tok, source=src)
            measured = speed.measure(Path(tmp) / "slim")  # a fresh interleaved run, not the plan's own trial
        target_info = plan.provenance.get("speed_target", {})
        row = {"kind": kind, "target": target, **extra, **quality, "repair_applied": result.repair.get("applied"),
               "prune_s": round(seconds, 1), "heads_after": plan.heads_after, "neurons_after": plan.neurons_after,
               "estimated": target_info.get("estimated_speedup", []),
               "exchange": {k: v for k, v in target_info.get("exchange", {}).items() if k != "trials"},
               "trials": target_info.get("exchange", {}).get("trials"), "rounds": target_info.get("rounds"),
               "measured": [{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()} for m in measured]}
        rows.append(row)
        speeds = " / ".join(f"x{m['speedup']:.2f}" for m in measured)
        print(f"{kind:>6} {target:>4}: cos {quality['mean_cosine']:.4f} (min {quality['min_cosine']:.3f}) "
              f"5-NN {quality['knn5_acc']:.4f} measured {speeds} (heads {sum(plan.heads_after)}, neurons "
              f"{sum(plan.neurons_after)}, head price {row['exchange'].get('alpha', '-')}, {seconds:.0f} s)", flush=True)
        write(rows, args, speed, tables_s, score_s, machine_info())

    for kind in [k for k in args.kinds if k in STRUCTURES]:
        for target in args.targets:
            config = PruneConfig(target_speedup=target, target_structures=STRUCTURES[kind],
                                 speed_method=args.speed_method, exchange=args.exchange, seed=args.seed,
                                 progress=False)
            try:
                run(kind, target, config, {})
            except HeadslimError as e:
                rows.append({"kind": kind, "target": target, "unreachable": str(e)})
                print(f"{kind:>6} {target:>4}: {e}", flush=True)
    if "naive" in args.kinds:
        head_plan = select_heads(score_structures(dense, calib, method="fisher", heads=True, seed=args.seed,
                                                  progress=False)["attention"], heads, prune=0.5, min_per_layer=1)
        magnitude = score_structures(dense, calib, method="magnitude", progress=False)["mlp"]
        for share in args.naive_ffn:
            keep = round((1 - share) * neurons[0])
            kept = [sorted(torch.argsort(magnitude[layer, :n], descending=True)[:keep].tolist())
                    for layer, n in enumerate(neurons)]
            plan = PrunePlan(heads, head_plan.kept_heads, num_neurons=neurons, kept_neurons=kept)
            run("naive", share, PruneConfig(progress=False), {"naive": f"50 % heads (fisher) + {int(share * 100)} % "
                                                              "FFN per layer (magnitude)"}, plan=plan)
    speed.close()
    return 0


STRUCTURES = {"joint": "both", "heads": "heads", "ffn": "ffn"}


class LeaveOneOut:
    """LOO 5-NN topic accuracy over every ``bbc-news:all`` article outside the calibration sample
    (``knn_loo.py``): each model embeds the articles itself; the difference to dense is paired."""

    def __init__(self, dense, tok, calib_data):
        import torch

        from headslim.data import batches, load_texts
        from headslim.quality import embeddings
        from knn_loo import held_out, loo_predictions

        every = load_texts("bbc-news:all")
        self.labels = torch.as_tensor(every.labels)
        self.held = held_out(every, calib_data)
        self.batches = list(batches(every, tok, batch_size=64, max_length=128))
        self.dense_ok = self.correct(embeddings(dense, self.batches), loo_predictions)

    def correct(self, emb, predict):
        return predict(emb[self.held], self.labels[self.held]) == self.labels[self.held]

    def dense_row(self) -> dict:
        return {"loo5": float(self.dense_ok.float().mean()), "loo_queries": int(self.held.sum())}

    def __call__(self, model) -> dict:
        from headslim.quality import embeddings
        from knn_loo import loo_predictions, paired

        ok = self.correct(embeddings(model, self.batches), loo_predictions)
        return {"loo5": float(ok.float().mean()), "loo_queries": int(self.held.sum()),
                **{f"loo_{k}": v for k, v in paired(self.dense_ok, ok).items()}}


def write(rows, args, speed, tables_s, score_s, machine) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"settings": vars(args), "machine": machine, "calibration": speed.describe(),
            "tables_s": round(tables_s, 1), "score_s": round(score_s, 1)}
    (out / "speed_target.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "speed_target.md").write_text(to_markdown(rows, meta))
    plot(rows, out / "speed_target.png")


def merge(runs: list, out: Path) -> int:
    """One table and plot from the rows of several runs (each row was timed in its own run, against
    the dense model of that run)."""
    rows, meta = [], None
    for run in runs:
        data = json.loads((Path(run) / "speed_target.json").read_text())
        meta = meta or data["meta"]
        rows += [r for r in data["rows"] if r["kind"] != "dense" or not any(x["kind"] == "dense" for x in rows)]
    order = {"dense": 0, "joint": 1, "heads": 2, "ffn": 3, "naive": 4}
    rows.sort(key=lambda r: (order.get(r["kind"], 9), r["target"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_target.json").write_text(json.dumps({"meta": {**meta, "merged_from": [str(r) for r in runs]},
                                                       "rows": rows}, indent=1) + "\n")
    text = to_markdown(rows, meta).rsplit("Latency tables", 1)[0]
    text += "Merged from " + ", ".join(f"`{r}`" for r in runs) + ": each row timed in its own run.\n"
    (out / "speed_target.md").write_text(text)
    plot(rows, out / "speed_target.png")
    return 0


def to_markdown(rows, meta) -> str:
    m = meta["machine"]
    lines = [f"# Speed-up targets: {meta['settings']['model']}, BBC News, {meta['settings']['runtime']}",
             "", f"{m['cpu']}, {meta['settings']['threads']} threads; calibration "
             f"{meta['settings']['calib_samples']} articles (seed {meta['settings']['seed']}); quality on the "
             "422 bbc-news:test articles; speed-ups measured dense vs pruned, interleaved, p50.", "",
             "| kind | target | est. b1 / b32 | measured b1 / b32 | mean cos | min cos | 5-NN | LOO 5-NN (pt vs dense) "
             "| heads | neurons |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def loo(r):
        if "loo5" not in r:
            return "-"
        diff = f" ({r['loo_diff_pt']:+.2f} ± {r['loo_se_pt']:.2f})" if "loo_diff_pt" in r else ""
        return f"{100 * r['loo5']:.2f}{diff}"

    for r in rows:
        if r["kind"] == "dense":
            lines.append(f"| dense | - | - | - | 1 | 1 | {r['knn5_acc']:.4f} | {loo(r)} | 72 | 9216 |")
            continue
        if "unreachable" in r:
            lines.append(f"| {r['kind']} | {r['target']} | unreachable | | | | | | | |")
            continue
        est = " / ".join(f"{e:.2f}" for e in r.get("estimated", [])) or "-"
        meas = " / ".join(f"{x['speedup']:.2f}" for x in r["measured"])
        target = r["target"] if r["kind"] != "naive" else f"+{int(r['target'] * 100)} % FFN"
        lines.append(f"| {r['kind']} | {target} | {est} | {meas} | {r['mean_cosine']:.4f} | {r['min_cosine']:.3f} | "
                     f"{r['knn5_acc']:.4f} | {loo(r)} | {sum(r['heads_after'])} | {sum(r['neurons_after'])} |")
    lines += ["", f"Latency tables + calibration {meta['tables_s']} s, scoring (heads and neurons, one pass) "
              f"{meta['score_s']} s.", ""]
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for i, ax in enumerate(axes):
        for kind, marker in (("joint", "o-"), ("heads", "s-"), ("ffn", "^-"), ("naive", "x--")):
            pts = sorted((r["measured"][i]["speedup"], r["mean_cosine"]) for r in rows
                         if r["kind"] == kind and "measured" in r and len(r["measured"]) > i)
            if pts:
                ax.plot(*zip(*pts), marker, label=kind)
        shape = next((r["measured"][i] for r in rows if "measured" in r and len(r["measured"]) > i), None)
        if shape:
            ax.set_title(f"batch {shape['batch']} x seq {shape['seq']}")
        ax.set_xlabel("measured speed-up (ORT CPU)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean embedding cosine to dense")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

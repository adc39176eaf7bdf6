"""A task model: fine-tune all-MiniLM-L6-v2 as a 5-topic BBC News classifier, prune it on its task loss.

    python bench/finetune_classifier.py --out bench/results/classifier

1. Fine-tunes ``BertForSequenceClassification`` (MiniLM weights, new 5-way head) on ``bbc-news:train``
   (one epoch, AdamW; a few CPU minutes at ``--max-length 128``) and saves it under ``OUT/model``
   (re-used by later runs unless ``--retrain``).
2. For each method and share of heads removed: scores heads with ``objective="task"`` (the
   classifier's cross-entropy on labelled calibration articles from the train split), prunes, and
   reports test-split accuracy without and with repair. Writes ``OUT/classifier.json`` / ``.md``.
3. With ``--targets``: speed-up targets instead (heads and FFN neurons, what ``headslim shrink
   --target-speedup`` runs), for each ``--speed-methods`` cost (``fisher``/``gradient`` with the
   task objective, ``obs`` label-free), each timed dense vs pruned afterwards in a fresh interleaved
   run on ``--runtime``. Writes ``OUT/classifier_speed.json`` / ``.md``.

    python bench/finetune_classifier.py --targets 1.5 2.0 --speed-methods fisher obs --out bench/results/classifier
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def accuracy(model, batch_list) -> float:
    import torch

    right = total = 0
    with torch.no_grad():
        for b in batch_list:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            right += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    return right / total


def finetune(src, out: Path, tok, train, *, epochs: int, lr: float, batch_size: int, max_length: int, seed: int):
    import torch
    from transformers import BertForSequenceClassification

    from headslim.data import batches

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(src), num_labels=len(train.label_names))
    model.config.id2label = dict(enumerate(train.label_names))
    model.config.label2id = {n: i for i, n in enumerate(train.label_names)}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    import random

    order = list(range(len(train)))
    steps = 0
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        shuffled = train.subset(order)
        for b in batches(shuffled, tok, batch_size=batch_size, max_length=max_length):
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps % 20 == 0:
                print(f"  epoch {epoch + 1} step {steps}: loss {float(loss):.4f}", flush=True)
    model.eval()
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--out", default="bench/results/classifier")
    p.add_argument("--methods", nargs="+", default=["obs", "fisher", "gradient", "random"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--objective", default="task", choices=["task", "dense"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--targets", nargs="+", type=float, default=None, help="speed-up targets instead of --ratios")
    p.add_argument("--speed-methods", nargs="+", default=["fisher", "obs"])
    p.add_argument("--runtime", default="ort-cpu")
    p.add_argument("--shapes", default="1x128,32x128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure-seconds", type=float, default=3.0)
    args = p.parse_args(argv)

    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.io import load_model, resolve_model_path
    from headslim.pipeline import PruneConfig, prune_model, shared_scores

    out = Path(args.out)
    model_dir = out / "model"
    src = resolve_model_path(args.model)
    tok = load_tokenizer(src)
    train, test = load_texts("bbc-news:train"), load_texts("bbc-news:test")
    if args.retrain or not (model_dir / "model.safetensors").is_file():
        t = time.perf_counter()
        model_dir.mkdir(parents=True, exist_ok=True)
        finetune(src, model_dir, tok, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                 max_length=args.max_length, seed=args.seed)
        print(f"fine-tuned in {time.perf_counter() - t:.0f} s -> {model_dir}", flush=True)
    dense = load_model(model_dir)
    test_b = list(batches(test, tok, batch_size=64, max_length=args.max_length))
    calib = list(batches(sample(train, args.calib_samples, args.seed), tok, batch_size=args.batch_size,
                         max_length=args.max_length))
    rows = [{"method": "dense", "ratio": 0.0, "repair": False, "accuracy": accuracy(dense, test_b)}]
    print(f"dense test accuracy {rows[0]['accuracy']:.4f}", flush=True)
    if args.targets:
        return speed_targets(args, out, model_dir, dense, tok, calib, test_b, rows)
    for method in args.methods:
        config = PruneConfig(method=method, objective=args.objective, seed=args.seed, progress=False, repair=False)
        t = time.perf_counter()
        # one pass to the largest target answers the smaller ones; learned trains per target in prune_model
        scores = shared_scores(dense, calib, config, args.ratios)
        shared_s = time.perf_counter() - t
        for ratio in args.ratios:
            off = prune_model(copy.deepcopy(dense), calib, replace(config, prune=ratio), scores=scores)
            acc_off = accuracy(off.model, test_b)
            on = prune_model(copy.deepcopy(dense), calib, replace(config, prune=ratio, repair=True),
                             plan=copy.deepcopy(off.plan), dense=dense)
            acc_on = accuracy(on.model, test_b)
            for rep, acc in ((False, acc_off), (True, acc_on)):
                rows.append({"method": method, "ratio": ratio, "repair": rep, "accuracy": acc,
                             "repair_applied": on.repair["applied"] if rep else False,
                             "score_s": round(shared_s + off.seconds["score"], 1)})
            print(f"{method:>12} {ratio:.1f}: accuracy {acc_off:.4f} -> {acc_on:.4f} with repair", flush=True)
            del off, on
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    md = ["| method | removed | repair | test accuracy |", "|---|---|---|---|"]
    md += [f"| {r['method']} | {r['ratio']:.0%} | {'on' if r['repair'] else 'off'} | {100 * r['accuracy']:.2f} |"
           for r in rows]
    (out / "classifier.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def speed_targets(args, out: Path, model_dir: Path, dense, tok, calib, test_b, rows) -> int:
    """Step 3: each speed-up target with each cost, accuracy and a fresh interleaved timing."""
    import tempfile

    import torch

    from headslim.bench import machine_info
    from headslim.errors import HeadslimError
    from headslim.io import save_pruned
    from headslim.pipeline import PruneConfig, prune_model
    from headslim.speedup import SpeedTarget, parse_shapes

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    speed = SpeedTarget(model_dir, dense, tok, 0.0, runtime=args.runtime, shapes=parse_shapes(args.shapes),
                        threads=args.threads, max_length=args.max_length, measure_seconds=args.measure_seconds,
                        progress=False)
    print(f"latency tables + calibration {time.perf_counter() - t:.0f} s", flush=True)
    for method in args.speed_methods:
        for target in args.targets:
            config = PruneConfig(target_speedup=target, speed_method=method, objective=args.objective,
                                 seed=args.seed, progress=False)
            t = time.perf_counter()
            try:
                result = prune_model(copy.deepcopy(dense), calib, config, speed=speed, dense=dense)
            except HeadslimError as e:
                rows.append({"method": method, "target": target, "unreachable": str(e)})
                print(f"{method:>10} {target}: {e}", flush=True)
                continue
            seconds = time.perf_counter() - t
            acc = accuracy(result.model, test_b)
            with tempfile.TemporaryDirectory() as tmp:
                save_pruned(result.model, Path(tmp) / "slim", result.plan, tokenizer=tok, source=model_dir)
                measured = speed.measure(Path(tmp) / "slim")  # a fresh interleaved run, not the plan's trial
            info = result.plan.provenance.get("speed_target", {})
            rows.append({"method": method, "target": target, "accuracy": acc, "prune_s": round(seconds, 1),
                         "repair_applied": result.repair.get("applied"),
                         "heads_after": result.plan.heads_after, "neurons_after": result.plan.neurons_after,
                         "estimated": info.get("estimated_speedup", []),
                         "head_price": info.get("exchange", {}).get("alpha"),
                         "measured": [{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                                      for m in measured]})
            speeds = " / ".join(f"x{m['speedup']:.2f}" for m in measured)
            print(f"{method:>10} {target}: accuracy {acc:.4f} measured {speeds} (heads "
                  f"{sum(result.plan.heads_after)}, neurons {sum(result.plan.neurons_after)}, {seconds:.0f} s)",
                  flush=True)
            del result
    speed.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier_speed.json").write_text(json.dumps({"args": vars(args), "machine": machine_info(),
                                                           "rows": rows}, indent=2) + "\n")
    md = ["| cost | target | measured b1 / b32 | test accuracy | heads | neurons |", "|---|---:|---:|---:|---:|---:|",
          f"| dense | - | - | {100 * rows[0]['accuracy']:.2f} | | |"]
    for r in rows[1:]:
        if "unreachable" in r:
            md.append(f"| {r['method']} | {r['target']} | unreachable | | | |")
            continue
        meas = " / ".join(f"{m['speedup']:.2f}" for m in r["measured"])
        md.append(f"| {r['method']} | {r['target']} | {meas} | {100 * r['accuracy']:.2f} | {sum(r['heads_after'])} | "
                  f"{sum(r['neurons_after'])} |")
    (out / "classifier_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

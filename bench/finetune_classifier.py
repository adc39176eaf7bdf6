"""A task model: fine-tune all-MiniLM-L6-v2 as a 5-topic BBC News classifier, prune it on its task loss.

    python bench/finetune_classifier.py --out bench/results/classifier

1. Fine-tunes ``BertForSequenceClassification`` (MiniLM weights, new 5-way head) on ``bbc-news:train``
   (one epoch, AdamW; a few CPU minutes at ``--max-length 128``) and saves it under ``OUT/model``
   (re-used by later runs unless ``--retrain``).
2. For each method and share of heads removed: scores heads with ``objective="task"`` (the
   classifier's cross-entropy on labelled calibration articles from the train split), prunes, and
   reports test-split accuracy without and with repair. Writes ``OUT/classifier.json`` / ``.md``.
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


if __name__ == "__main__":
    sys.exit(main())

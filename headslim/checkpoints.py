"""A dense checkpoint and its pruned copy, and their tokenizer: what ``shrink``, ``sweep``, ``bench`` and
``eval`` all need before they measure anything.

Cheap to import (torch and transformers load when a function runs), so the sub-command modules can
import it at the top.
"""

from __future__ import annotations

from pathlib import Path

from headslim.errors import HeadslimError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def has_tokenizer(model_dir) -> bool:
    """Whether ``model_dir`` holds tokenizer files (tiny test checkpoints and bare exports have none)."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(*dirs, pad: bool = False):
    """The tokenizer of the first dir that has tokenizer files.

    The files are checked first: transformers 5.x builds an empty-vocabulary tokenizer (every word
    ``[UNK]``) from a dir that only has ``config.json``, without an error.

    Args:
        pad: give a tokenizer without a pad token its eos token as one (decoder tokenizers often have
            none; padded positions are masked anyway); refused when it has neither.
    """
    from transformers import AutoTokenizer

    reasons = []
    for d in dirs:
        if not has_tokenizer(d):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d))
        except Exception as e:  # transformers raises OSError/ValueError/... for a broken tokenizer: try the next dir
            reasons.append(f"{d}: {(str(e).strip() or type(e).__name__).splitlines()[0]}")
            continue
        if pad and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise HeadslimError(f"the tokenizer of {d} has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if reasons:
        raise HeadslimError("cannot load the tokenizer of " + "; nor of ".join(reasons))
    raise HeadslimError("no tokenizer found in " + " or ".join(str(d) for d in dirs))


def check_compatible(dense, pruned, dense_dir="baseline", pruned_dir="pruned") -> None:
    """Refuse a baseline that is not the pruned model's dense original (architecture, width, depth, heads)."""
    from headslim.arch import get_adapter
    from headslim.io import resolve_model_path
    from headslim.plan import PLAN_FILE, PrunePlan

    cd, cp = dense.config, pruned.config
    for attr in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        a, b = getattr(cd, attr, None), getattr(cp, attr, None)
        if a != b:
            raise HeadslimError(f"baseline {dense_dir} and {pruned_dir} differ in {attr} ({a} vs {b}): "
                                "not a dense model and its pruned copy")
    if type(dense).__name__ != type(pruned).__name__:
        raise HeadslimError(f"baseline {dense_dir} is a {type(dense).__name__}, {pruned_dir} a "
                            f"{type(pruned).__name__}: compare models with the same head")
    plan_file = resolve_model_path(pruned_dir) / PLAN_FILE if isinstance(pruned_dir, (str, Path)) else None
    if plan_file is not None and plan_file.is_file():
        heads = get_adapter(dense).num_heads(dense)
        plan = PrunePlan.load(plan_file)
        if plan.num_heads != heads:
            raise HeadslimError(f"{pruned_dir} was pruned from a model with heads {plan.num_heads}; "
                                f"baseline {dense_dir} has {heads}")


def default_baseline(pruned_dir) -> Path:
    """The dense checkpoint a pruned one was made from (its plan's provenance), if it still exists."""
    from headslim.io import resolve_model_path
    from headslim.plan import PLAN_FILE, PrunePlan

    plan_file = resolve_model_path(pruned_dir) / PLAN_FILE
    source = PrunePlan.load(plan_file).provenance.get("source_model") if plan_file.is_file() else None
    if not source or not Path(source).is_dir():
        raise HeadslimError(f"no --baseline given and {pruned_dir} does not name an existing dense original")
    return Path(source)


def load_pair(dense_dir, pruned_dir):
    """``(dense_dir, pruned_dir, dense, pruned)``: both checkpoints loaded, paths resolved, checked to belong together."""
    from headslim.io import load_model, resolve_model_path

    dense_dir, pruned_dir = resolve_model_path(dense_dir), resolve_model_path(pruned_dir)
    dense, pruned = load_model(dense_dir), load_model(pruned_dir)
    check_compatible(dense, pruned, dense_dir, pruned_dir)
    return dense_dir, pruned_dir, dense, pruned


def optional_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when it has no tokenizer files."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise HeadslimError(f"cannot load the tokenizer in {path}: {first_line(e)}") from None

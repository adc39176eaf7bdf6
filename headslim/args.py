"""Command-line pieces the sub-commands share: prune targets, the FFN options, and args -> config.

Kept apart from :mod:`headslim.cli` so that the sub-command modules (``sweep``, ``bench``, ...) can use
them while ``cli`` imports those modules, not the reverse. Cheap to import (argparse only).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields


def prune_arg(text: str) -> float | int:
    """A prune target as typed: a whole number is a count (``36``), anything else a fraction (``0.5``).

    Example:
        >>> prune_arg("36"), prune_arg("0.5")
        (36, 0.5)
    """
    if re.fullmatch(r"\d+", text.strip()):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor a head count") from None


def add_ffn_arguments(opt, prune_type, prune_help: str) -> None:
    """``--prune-ffn`` (its type and help differ: one target for shrink, one per ratio for sweep),
    ``--ffn-method`` and ``--min-neurons-per-layer``, as shrink and sweep both take them."""
    opt.add_argument("--prune-ffn", type=prune_type, default=None, help=prune_help)
    opt.add_argument("--ffn-method", default=None,
                     help="scorer of the FFN neurons: fisher, gradient, magnitude or random "
                          "(default magnitude: activation x down-projection column norm)")
    opt.add_argument("--min-neurons-per-layer", type=int, default=0,
                     help="FFN neurons every layer keeps (default 0: a layer may lose its whole FFN)")


def add_speed_arguments(opt) -> None:
    """The settings of ``--target-speedup`` (its own flag differs: one target for shrink, a list for
    sweep): ``--target-structures``, ``--speed-method``, ``--exchange``, ``--runtime``, ``--shapes``."""
    opt.add_argument("--target-structures", default="both", choices=["both", "heads", "ffn"],
                     help="what --target-speedup may remove (default both)")
    opt.add_argument("--speed-method", default="obs",
                     help="costs --target-speedup spends: obs (default; repair-aware, headslim.scoring."
                          "reconstruction), fisher or gradient")
    opt.add_argument("--exchange", type=float, default=None,
                     help="price of a head relative to its estimated cost in --target-speedup's ranking (default: "
                          "fitted per target on held-out calibration batches over 1, 2, 4, ..., 128)")
    opt.add_argument("--runtime", default="ort-cpu", help="runtime of --target-speedup: ort-cpu (default), "
                                                          "ort-int8-cpu, torch-cpu or cuda")
    opt.add_argument("--shapes", default="1x128,32x128",
                     help="BATCHxSEQ shapes --target-speedup must be met at (default 1x128,32x128)")


def config_from_args(cls, args: argparse.Namespace, **values):
    """The dataclass ``cls`` built from the parsed ``args``: every field that has an argument of the
    same name (``dest``) takes its value; ``values`` gives the fields whose options are named otherwise.

    Example:
        >>> from headslim.evaluate import EvalConfig
        >>> config_from_args(EvalConfig, argparse.Namespace(k=3, out="x"), task="embedding").k
        3
    """
    given = vars(args)
    named = {f.name: given[f.name] for f in fields(cls) if f.init and f.name in given and f.name not in values}
    return cls(**named, **values)

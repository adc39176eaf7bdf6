"""Spellings that differ between the transformers versions headslim supports.

transformers renamed the KV cache keyword of a model's ``forward`` from ``past_key_values`` to
``cache`` in 5.24 (the old name warns and goes in 5.40), and the output field with it. Code that
drives a decoder step by step (benchmarks, tests, the kernels' checks) asks here instead of
spelling either name.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)``, under the keyword this version's forward declares.

    Example:
        >>> out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))   # doctest: +SKIP
    """
    return {_cache_keyword(type(model).forward): cache}


def output_cache(output):
    """The KV cache a forward pass returned (``output.cache`` on 5.24+, ``past_key_values`` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output["cache"] if "cache" in fields else output.past_key_values

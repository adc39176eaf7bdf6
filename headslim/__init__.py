"""headslim: score attention heads, physically remove the unneeded ones, and measure the gain.

``import headslim`` is cheap: torch and transformers are imported only when an API is used.

Example:
    >>> import headslim
    >>> model = headslim.load_pruned("slim/")          # doctest: +SKIP
"""

from importlib import import_module

from headslim._version import __version__
from headslim.errors import HeadslimError

# transformers' Auto classes (AutoModel*, pipeline, SentenceTransformer) rebuild pruned dirs once
# headslim is imported; registration waits until transformers loads them (headslim/autoload.py)
from headslim import autoload as _autoload

_autoload.install()

_LAZY = {
    "load_pruned": "headslim.io",
    "load_model": "headslim.io",
    "save_pruned": "headslim.io",
    "PrunePlan": "headslim.plan",
    "prune_heads": "headslim.surgery",
    "gated": "headslim.gates",
    "get_adapter": "headslim.arch",
    "score_heads": "headslim.scoring",
    "select_heads": "headslim.selection",
    "select_gqa": "headslim.gqa",
    "repair": "headslim.repair",
    "export_onnx": "headslim.export",
    "evaluate": "headslim.evaluate",
    "load_texts": "headslim.data",
    "shrink": "headslim.pipeline",
    "ShrinkConfig": "headslim.pipeline",
    "prune_model": "headslim.pipeline",
    "PruneConfig": "headslim.pipeline",
    "PruneResult": "headslim.pipeline",
}

__all__ = ["__version__", "HeadslimError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'headslim' has no attribute {name!r}")

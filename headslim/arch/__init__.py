"""Architecture families behind one adapter interface (see :mod:`headslim.arch.base`).

One module per family (``bert``, ``distilbert``, ``llama``, ``gpt2``), each registering an
:class:`Adapter`; ``stubs`` holds the zero-unit stand-ins and slicing helpers the families share,
``ragged`` the ragged grouped-query attention. Importing this package imports no torch.

Example:
    >>> from headslim.arch import get_adapter, supported_model_types
    >>> "bert" in supported_model_types()
    True
"""

from headslim.arch.base import (ADAPTERS, TINY, Adapter, ExportSpec, TinyConfig, TinySizes,
                                adapters, get_adapter, kv_maps, register_adapter,
                                set_weight_out_in, supported_model_types, weight_out_in)

__all__ = ["ADAPTERS", "TINY", "Adapter", "ExportSpec", "TinyConfig", "TinySizes",
           "adapters", "get_adapter", "kv_maps", "register_adapter", "set_weight_out_in",
           "supported_model_types", "weight_out_in"]

"""Stock entry points (``AutoModel*.from_pretrained``, ``pipeline``, ``SentenceTransformer``) for pruned dirs.

A pruned checkpoint's ``config.json`` carries headslim's record (key :data:`CONFIG_KEY`: the plan's
kept heads, KV maps and kept neurons, no provenance), so its shapes can be rebuilt from the config
alone, which is all ``from_pretrained`` sees. Importing headslim registers, for every model type it
supports, a subclass of each stock class with transformers' Auto classes (``AutoModel.register``):
it builds the stock model and, when the config has the record, cuts it to the recorded shapes with
:func:`headslim.surgery.prune_heads` before the weights are read (on the meta device, as
transformers 5 builds models). A config without the record builds exactly the stock model.

The subclass keeps the stock class's name, so ``save_pretrained`` writes the same
``architectures`` and the saved dir still loads without headslim where it did before (4.x reads
``config.pruned_heads``). config.json's ``model_type`` stays the stock one for the same reason.

Registration waits for transformers: it runs at the first look-up in an Auto class's mapping (set up
when ``transformers.models.auto.modeling_auto`` is imported, or at once when it already is), so
``import headslim`` imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

CONFIG_KEY = "headslim"
_AUTO_MODULE = "transformers.models.auto.modeling_auto"
# the Auto classes whose mappings get headslim's classes (those that exist in the installed version)
AUTO_CLASSES = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM", "AutoModelForMaskedLM",
                "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice")
_registered = False


def config_record(plan) -> dict:
    """What config.json keeps of ``plan``: its shapes (heads, KV maps, neurons), not its provenance."""
    data = plan.to_dict()
    data.pop("provenance", None)
    return data


def plan_of_config(config):
    """The :class:`~headslim.plan.PrunePlan` recorded in ``config`` (None when it has no record)."""
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        return None
    from headslim.plan import PrunePlan

    return PrunePlan.from_dict({**record, "provenance": {"source": "config.json"}})


_KV_MAP = "headslim_kv_head_of_q"  # the ragged-GQA buffer (headslim.arch.ragged): not persistent, not in the weights


def _pruned_class(stock: type) -> type:
    """A subclass of ``stock`` that applies the config's recorded plan at construction, under the stock name."""

    def __init__(self, config, *args, **kwargs):
        plan = plan_of_config(config)
        if plan is not None:
            config.pruned_heads = {}  # 4.x would prune at construction; the whole plan is applied below
        stock.__init__(self, config, *args, **kwargs)
        if plan is not None:
            from headslim.surgery import prune_heads

            prune_heads(self, plan)
            for module in self.modules():
                if _KV_MAP in module._buffers:
                    module._headslim_kv_map = module._buffers[_KV_MAP].tolist()

    def tie_weights(self, *args, **kwargs):
        # transformers 5 refills non-persistent buffers with empty tensors after loading and re-initialises
        # only those its own _init_weights knows; tie_weights is the last step of loading in 4.x and 5.x
        out = stock.tie_weights(self, *args, **kwargs)
        import torch

        for module in self.modules():
            buffer = module._buffers.get(_KV_MAP)
            if buffer is not None and not buffer.is_meta and hasattr(module, "_headslim_kv_map"):
                module._buffers[_KV_MAP] = torch.tensor(module._headslim_kv_map, dtype=torch.long, device=buffer.device)
        return out

    cls = type(stock.__name__, (stock,), {"__init__": __init__, "tie_weights": tie_weights, "__module__": __name__,
                                          "__doc__": f"{stock.__name__} that rebuilds headslim's pruned shapes."})
    cls.__qualname__ = stock.__qualname__
    cls._headslim_stock = stock
    return cls


def register() -> None:
    """Register headslim's classes with transformers' Auto classes (once; at the first look-up in their mappings)."""
    global _registered
    if _registered:
        return
    _registered = True
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from headslim.arch import supported_model_types

    autos = [a for a in (getattr(modeling_auto, n, None) for n in AUTO_CLASSES) if a is not None]
    for auto in autos:
        _undefer(auto._model_mapping)
    for model_type in supported_model_types():
        config_class = getattr(transformers, CONFIG_MAPPING_NAMES.get(model_type, ""), None)
        if config_class is None:
            continue
        for auto in autos:
            name = auto._model_mapping._model_mapping.get(model_type)
            stock = getattr(transformers, name, None) if isinstance(name, str) else None
            if stock is not None:
                auto.register(config_class, _pruned_class(stock), exist_ok=True)


# Registering imports the model classes, which cannot be done while transformers is still importing
# (modeling_auto is often first imported half-way through modeling_utils): the Auto classes' mappings
# register on their first look-up instead, when from_pretrained, pipeline or from_config asks them.
_DEFERRED: dict[type, type] = {}
_LOOKUPS = ("__getitem__", "__contains__", "get", "keys", "values", "items", "__iter__", "__len__")


def _deferred_class(base: type) -> type:
    if base not in _DEFERRED:
        def lookup(name):
            def method(self, *args, **kwargs):
                register()
                return getattr(base, name)(self, *args, **kwargs)
            return method

        _DEFERRED[base] = type(base.__name__, (base,), {n: lookup(n) for n in _LOOKUPS if hasattr(base, n)})
    return _DEFERRED[base]


def _undefer(mapping) -> None:
    if type(mapping) in _DEFERRED.values():
        mapping.__class__ = type(mapping).__mro__[1]


def _defer(modeling_auto) -> None:
    for name in AUTO_CLASSES:
        mapping = getattr(getattr(modeling_auto, name, None), "_model_mapping", None)
        if mapping is not None and type(mapping) not in _DEFERRED.values():
            mapping.__class__ = _deferred_class(type(mapping))


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Defers :func:`register` to the Auto mappings' first look-up, right after ``modeling_auto`` is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _defer(module)


def install() -> None:
    """Register now if transformers' Auto classes are loaded, else as soon as they are."""
    if _AUTO_MODULE in sys.modules:
        _defer(sys.modules[_AUTO_MODULE])
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

"""The adapter interface and its registry: the one place that says what an architecture family is.

A family is one module in ``headslim/arch/`` holding one :class:`Adapter` subclass decorated with
:func:`register_adapter`. :func:`get_adapter` finds every such module itself (``pkgutil``), so adding
a family is adding one file; ``tests/test_arch.py`` then walks the registry and checks the new
family's surgery, save/load and export on the tiny models its :meth:`Adapter.tiny_configs` names.

Everything outside ``headslim/arch/`` asks the adapter instead of testing ``config.model_type`` or a
module's class: where Q/K/V/O and the FFN live, how to slice them, GQA maps, the export inputs, the
position offset, whether the FFN is gated, how a projection stores its weight.

This module imports no torch: the family modules are imported to build the registry by commands
(``headslim export`` refuses a decoder from its config.json) that must stay cheap.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from headslim.errors import HeadslimError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ExportSpec:
    """How ``headslim export`` treats one model type.

    Args:
        inputs: the ONNX graph's inputs in order, named as optimum names them; empty: not exported.
        optimizer_model_type: ``model_type`` for onnxruntime's transformer optimizer
            (``onnxruntime.transformers.optimizer.optimize_model``) on headslim's export graph; None:
            ``--optimize`` does not apply (the graph is exported unfused).
        reason: why the model type is not exported (one line), when ``inputs`` is empty.
        dense_alternative, pruned_alternative: what a user can do instead, for a dense and for a
            pruned checkpoint (appended to ``reason``).
        decoder_layout: for a causal LM exported with a KV cache (``headslim.export_decoder``), how
            its layers are run: ``llama`` (pre-RMSNorm, q/k/v/o projections, RoPE, gated MLP) or
            ``gpt2`` (fused ``c_attn``, learned positions); empty for encoders.

    Example:
        >>> ExportSpec(("input_ids", "attention_mask"), "bert").exportable
        True
    """

    inputs: tuple[str, ...] = ()
    optimizer_model_type: str | None = None
    reason: str = ""
    dense_alternative: str = ""
    pruned_alternative: str = ""
    decoder_layout: str = ""

    @property
    def exportable(self) -> bool:
        return bool(self.inputs)

    def refusal(self, pruned: bool) -> str:
        """The one-line reason export refuses this model type, with what to do instead."""
        instead = self.pruned_alternative if pruned else self.dense_alternative
        return f"{self.reason}; {instead}" if instead else self.reason


@dataclass(frozen=True)
class TinySizes:
    """The sizes every family's tiny test models share (tests/conftest.py re-exports them).

    Encoders: ``heads`` heads of width ``hidden / heads``; decoders: ``decoder_heads`` query heads
    over ``kv_heads`` KV heads. ``intermediate`` is odd on purpose (no power-of-two shortcuts).
    """

    vocab: int = 99
    hidden: int = 32
    heads: int = 4
    layers: int = 3
    intermediate: int = 37
    positions: int = 64
    decoder_heads: int = 8
    kv_heads: int = 2
    labels: int = 3


TINY = TinySizes()


@dataclass(frozen=True)
class TinyConfig:
    """A small random model of one model type, for the tests.

    Args:
        model_type: the ``config.model_type`` it builds.
        config_class: the transformers config class name (``"BertConfig"``).
        kwargs: the config's keyword arguments (tiny sizes from :data:`TINY`, dropout off).
        model_classes: transformers model classes to build with it; for an encoder the first is the
            bare model (``last_hidden_state``), for a decoder the causal LM.

    Example:
        >>> TinyConfig("bert", "BertConfig", {"hidden_size": 32}, ("BertModel",)).model_classes
        ('BertModel',)
    """

    model_type: str
    config_class: str
    kwargs: dict = field(default_factory=dict)
    model_classes: tuple[str, ...] = ()

    def config(self, **overrides):
        """The transformers config (``overrides`` replace entries of ``kwargs``)."""
        import transformers

        return getattr(transformers, self.config_class)(**{**self.kwargs, **overrides})

    def build(self, class_name: str | None = None, seed: int = 0, **overrides):
        """A randomly initialised model of ``class_name`` (default: the first class), in eval mode."""
        import torch
        import transformers

        class_name = class_name or self.model_classes[0]
        config = self.config(**overrides)
        config.architectures = [class_name]
        torch.manual_seed(seed)
        return getattr(transformers, class_name)(config).eval()


class Adapter(abc.ABC):
    """One architecture family: where its prunable structures live and how to cut them.

    Two kinds of structure are pruned, both as groups of input columns of an output projection with
    the rows that produce them upstream: attention heads (width ``head_dim`` of the output
    projection O; Q/K/V rows) and FFN neurons (width 1 of the down projection; up/gate rows).

    A *block* is what an adapter hands out per layer (``attention_blocks``, ``mlp_blocks``): whatever
    module owns the parts surgery may replace (BERT's ``layer.attention``, a decoder layer). Indices
    given to ``prune_block`` / ``prune_mlp`` are the *current* ones (sorted), so pruning composes.

    Subclasses set the class attributes and implement the abstract methods; the others have defaults
    that fit a multi-head, non-exported, ungated family.

    Attributes:
        name: the family's name, for messages (``"bert-family"``).
        model_types: the ``config.model_type`` values it handles.
        decoder: a causal decoder LLM (KV cache, generation, next-token loss).
        gated_mlp: the FFN is ``down(act(gate(x)) * up(x))`` (three matrices; ``headslim.flops``).
        keeps_bias_projection: a layer that keeps no head (no neuron) keeps a bias-only output
            projection (``o_proj`` / ``down_proj`` still return a module with that bias), which
            ``headslim.repair`` re-fits; otherwise such a layer has no projection left to fit.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    decoder: bool = False
    gated_mlp: bool = False
    keeps_bias_projection: bool = False

    def check(self, config) -> None:
        """Raise a one-line :class:`HeadslimError` for variants of the family it cannot handle."""

    @abc.abstractmethod
    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The transformer layers, in forward order. Each takes the residual stream as its first
        argument (or ``hidden_states=``) and returns the next one (alone, or first in a tuple), and
        nothing runs between two layers (``headslim.layerwise`` carries the stream layer by layer)."""

    # ---- attention heads ------------------------------------------------------------------------

    @abc.abstractmethod
    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        """One block per layer, in forward order; a block's input (first positional argument) is the
        residual stream the attention output is added to (``headslim.repair`` hooks it)."""

    @abc.abstractmethod
    def head_dim(self, model: nn.Module) -> int:
        """Width of one head (the same in every layer)."""

    @abc.abstractmethod
    def num_heads(self, model: nn.Module) -> list[int]:
        """Current (query) heads per layer; 0 for a layer that kept none."""

    def kv_maps(self, model: nn.Module) -> list[list[int]]:
        """Per layer, the KV head each current query head reads (non-decreasing). Multi-head
        attention: the identity; grouped-query families override it."""
        return [list(range(n)) for n in self.num_heads(model)]

    @abc.abstractmethod
    def o_proj(self, block: nn.Module) -> nn.Module:
        """The attention output projection; its input is the heads' context vectors ``(B, T, n * D)``
        (the gates and scorers hook it)."""

    @abc.abstractmethod
    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        """Keep only heads ``keep`` of one block, in place: weights, biases and head counts together.
        ``keep`` empty: put a zero-head stand-in (``headslim.arch.stubs``) in place."""

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """The Q and K projections whose outputs give the attention weights as
        ``softmax(Q K^T / sqrt(D) + padding mask)`` (bidirectional, absolute positions), for the
        ``entropy`` / ``confidence`` scorers; None when that formula does not hold (causal, rotary)."""
        return None

    # ---- FFN neurons ----------------------------------------------------------------------------

    @abc.abstractmethod
    def mlp_blocks(self, model: nn.Module) -> list[nn.Module]:
        """One block per layer owning the FFN (the module ``prune_mlp`` edits)."""

    @abc.abstractmethod
    def num_neurons(self, model: nn.Module) -> list[int]:
        """Current FFN neurons per layer; 0 for a layer that kept none."""

    @abc.abstractmethod
    def down_proj(self, block: nn.Module) -> nn.Module:
        """The FFN's output projection; its input is the neurons' activations ``(B, T, n)``."""

    @abc.abstractmethod
    def mlp_residual(self, block: nn.Module) -> tuple[nn.Module, int]:
        """``(module, i)``: the residual the FFN output is added to is positional input ``i`` of
        ``module`` (``headslim.repair`` fits ``down_proj`` so that ``down + residual`` matches dense)."""

    @abc.abstractmethod
    def prune_mlp(self, block: nn.Module, keep: list[int]) -> None:
        """Keep only FFN neurons ``keep`` of one block, in place; empty: a zero-neuron stand-in."""

    # ---- config, checkpoints, cost --------------------------------------------------------------

    def update_config(self, model: nn.Module, pruned: dict[int, list[int]]) -> None:
        """Record the removed heads (over the dense model's heads) where stock loaders look for them,
        if anywhere. Default: nothing (the config stays dense; ``headslim.load_pruned`` re-applies
        the saved plan)."""

    @abc.abstractmethod
    def intermediate_size(self, config) -> int:
        """The dense FFN width from the config (``headslim.flops``)."""

    def position_offset(self, config) -> int:
        """Positions taken before the first token (RoBERTa's start after the pad id): the longest
        input is ``max_position_embeddings`` less this."""
        return 0

    # ---- export ---------------------------------------------------------------------------------

    def export_spec(self, model_type: str) -> ExportSpec:
        """How ``headslim export`` treats ``model_type`` (one of ``model_types``)."""
        return ExportSpec(reason=f"headslim export does not support the {self.name} family yet")

    def sliding_window(self, block: nn.Module, config) -> int | None:
        """The attention window of a decoder layer (a query at index q sees keys ``q - w < k <= q``),
        or None for full causal attention. Read by the decoder export's mask."""
        return None

    # ---- decoder export (headslim.export_decoder): the family's layer written with plain tensor ops ----

    def export_embed(self, model: nn.Module, input_ids, position_ids):
        """``(x, rotary)``: the embedded input ``(B, T, d)`` and what ``export_layer`` needs for positions."""
        raise HeadslimError(f"{self.name}: no decoder export")

    def export_layer(self, block: nn.Module, info, x, rotary, mask, past, attend):
        """One decoder layer for the export graph: ``(x, present)``, ``present`` the ``(key, value)``
        with this layer's own KV heads ``(B, kv, past + T, D)`` (None for a layer with no heads).

        ``info``: the layer's ``n_q``, ``n_kv``, ``head_dim``, ``index``; ``past``: its ``(key, value)``;
        ``attend(info, q, k, v, past, mask, scaling) -> (out, present)``: the shared attention (cache
        concat, KV gather by the layer's map or ORT's fused GroupQueryAttention, additive ``mask``),
        ``q`` ``(B, n_q, T, D)`` and this step's ``k``/``v`` ``(B, n_kv, T, D)`` after any rotary
        embedding -> ``out`` ``(B, T, n_q * D)``, ``present`` ``(key, value)`` ``(B, n_kv, past + T, D)``.
        """
        raise HeadslimError(f"{self.name}: no decoder export")

    def export_final(self, model: nn.Module, x):
        """The final norm before the LM head."""
        raise HeadslimError(f"{self.name}: no decoder export")

    def prepare_export(self, model: nn.Module, slot) -> None:
        """Swap in the export attention (``headslim.onnx_utils.ExportSelfAttention``, which reads the
        additive padding mask from ``slot.mask``) and export-friendly zero-head blocks, in place.
        Only called for exportable model types; ``model`` is a copy loaded for the export."""
        raise HeadslimError(f"headslim export does not support the {self.name} family")

    # ---- attention kernels ----------------------------------------------------------------------

    def kernel_attention(self, block: nn.Module) -> tuple[nn.Module, Callable] | None:
        """For ``headslim.kernels``' module-swap route (transformers 4.x encoders that compute
        attention inline instead of through the attention registry): the module of ``block`` whose
        class the route swaps, and the ``forward`` (from ``headslim.kernels.wiring``) the swapped
        class gets. None: nothing to swap in this block (a zero-head stand-in). Default: the family
        is not covered (a one-line error)."""
        raise HeadslimError(f"headslim.kernels does not cover the {self.name} family's attention on this "
                            f"transformers version")

    # ---- weight layout --------------------------------------------------------------------------

    def transposed(self, proj: nn.Module) -> bool:
        """Whether ``proj`` (one of this family's projections) stores its weight ``(in, out)``."""
        return False

    # ---- tests ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def tiny_configs(self) -> list[TinyConfig]:
        """One tiny random config per model type (sizes from :data:`TINY`), with the model classes
        the tests build; ``tests/test_arch.py`` and ``tests/conftest.py`` read them."""


# --------------------------------------------------------------------------------------------------
# the registry

_BY_TYPE: dict[str, Adapter] = {}
_FAMILIES: list[Adapter] = []
# modules of this package that hold shared code, not a family (stubs and ragged import torch at
# import time); every other module (not starting with "_") is a family and is imported on first use
_SHARED_MODULES = frozenset({"base", "stubs", "ragged"})
_DISCOVERED: list[bool] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register one instance of ``cls`` for each of its ``model_types``.

    Example:
        >>> @register_adapter                       # doctest: +SKIP
        ... class PhiAdapter(Adapter):
        ...     name, model_types = "phi", ("phi3",)
    """
    adapter = cls()  # a TypeError here names the abstract methods the family still lacks
    if not adapter.model_types:
        raise TypeError(f"{cls.__name__} names no model_types")
    key = (cls.__module__, cls.__qualname__)  # a reloaded module re-registers its own family
    taken = {t: type(_BY_TYPE[t]).__name__ for t in adapter.model_types
             if t in _BY_TYPE and _key(_BY_TYPE[t]) != key}
    if taken:
        raise TypeError(f"{cls.__name__}: model types already registered: {taken}")
    _FAMILIES[:] = [a for a in _FAMILIES if _key(a) != key] + [adapter]
    for model_type in adapter.model_types:
        _BY_TYPE[model_type] = adapter
    return cls


def _key(adapter: Adapter) -> tuple[str, str]:
    return type(adapter).__module__, type(adapter).__qualname__


def _discover() -> None:
    """Import every family module of ``headslim/arch/`` once (each registers itself)."""
    if _DISCOVERED:
        return
    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _SHARED_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _DISCOVERED.append(True)


class _Registry(Mapping):
    """``model_type -> adapter``, filled on first use."""

    def __getitem__(self, model_type: str) -> Adapter:
        _discover()
        return _BY_TYPE[model_type]

    def __iter__(self):
        _discover()
        return iter(sorted(_BY_TYPE))

    def __len__(self) -> int:
        _discover()
        return len(_BY_TYPE)

    def __repr__(self) -> str:
        return f"ADAPTERS({', '.join(self)})"


ADAPTERS: Mapping[str, Adapter] = _Registry()


def adapters() -> Iterator[Adapter]:
    """Every registered family, once each, in module order."""
    _discover()
    return iter(list(_FAMILIES))


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model or config; a one-line error lists what is supported otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise HeadslimError(
            f"unsupported architecture {model_type!r}; supported model types: "
            + ", ".join(supported_model_types())
        )
    adapter = ADAPTERS[model_type]
    adapter.check(config)
    return adapter


# --------------------------------------------------------------------------------------------------
# helpers over the registry


def kv_maps(model) -> list[list[int]]:
    """Per layer, the KV head of every current query head; identity for multi-head models.

    Example:
        >>> kv_maps(tiny_llama)          # 4 query heads, 2 KV heads, 2 layers   # doctest: +SKIP
        [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    return get_adapter(model).kv_maps(model)


def _transposed(proj) -> bool:
    return any(adapter.transposed(proj) for adapter in adapters())


def weight_out_in(proj) -> torch.Tensor:
    """Any projection's weight as ``(out, in)``, whatever its class (GPT-2 stores ``(in, out)``).

    A view: ``weight_out_in(p)[:, cols]`` reads the columns of the inputs ``cols``.
    """
    return proj.weight.T if _transposed(proj) else proj.weight


def set_weight_out_in(proj, weight: torch.Tensor) -> None:
    """Copy an ``(out, in)`` ``weight`` into ``proj``'s own layout and dtype, in place."""
    import torch

    with torch.no_grad():
        proj.weight.copy_((weight.T if _transposed(proj) else weight).to(proj.weight.dtype))


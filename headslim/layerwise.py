"""Carry calibration batches through a model one layer at a time, so that work done per layer (the
repair fit; layer-wise scores) costs one pass over the model, not one pass per layer.

:func:`layer_calls` runs the model once per batch and records, for every layer, what the model
passes it besides the residual stream (attention masks, rotary position embeddings, per-layer masks
of sliding-window models), and the stream entering the first layer. :func:`run_layer` then calls a
layer on any stream with those arguments. A :class:`Stream` holds one stream per batch and is
advanced a layer at a time; two streams (the dense model's and the pruned model's) share one set of
calls, since what the model passes its layers depends on the inputs and the config, not on how many
heads or neurons a layer kept. Where the first batch shows every layer given the very same
arguments (most models build the mask once), later batches are recorded only up to the first layer:
the recording then costs a fraction of a forward pass instead of one. A :class:`Spill` keeps a
stream's per-batch states in memory up to a budget and in safetensors files past it (:class:`Store`).

What a family must guarantee is in ``Adapter.layers``: the residual stream is the layer's first
argument (or ``hidden_states=``), it comes back alone or first in a tuple, and nothing runs between
two layers. The calls are recorded with ``use_cache=False`` so no layer appends to a KV cache.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headslim.arch import get_adapter
from headslim.errors import HeadslimError

_CACHE_KEYS = ("past_key_value", "past_key_values", "layer_past")
# safetensors' names of the dtypes headslim writes
SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class Stop(Exception):
    """Raised by a hook to end a forward pass early (``headslim.repair``'s hooks raise it too)."""


@dataclass
class Call:
    """What one layer is given besides the stream: the other positional arguments, the keyword
    arguments, and the keyword that carries the stream (None: it is the first positional one)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    key: str | None = None


def model_inputs(model, batch: dict) -> dict:
    """The batch as keyword arguments of ``model`` (labels dropped), with ``use_cache=False`` where the
    model takes it."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
    kwargs = {k: (None if k in _CACHE_KEYS else v) for k, v in kwargs.items()}
    if args:
        return args[0], Call(tuple(args[1:]), kwargs, None)
    if "hidden_states" not in kwargs:
        raise HeadslimError("a layer was called without its hidden states (no first argument, no hidden_states=)")
    return kwargs.pop("hidden_states"), Call((), kwargs, "hidden_states")


@torch.no_grad()
def layer_calls(model, batch: dict, *, every_layer: bool = True) -> tuple[torch.Tensor, list[Call]]:
    """``(stream entering layer 0, [Call per layer])`` for one batch: one forward pass, stopped when the
    last layer is entered (``every_layer`` False: when the first is, and only its call is returned)."""
    layers = get_adapter(model).layers(model)
    calls: list = [None] * len(layers)
    first: list = []
    stop_at = len(layers) - 1 if every_layer else 0

    def hook(index):
        def pre(module, args, kwargs):
            hidden, calls[index] = _split_call(args, kwargs)
            if index == 0:
                first.append(hidden)
            if index == stop_at:
                raise Stop
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers[:stop_at + 1])]
    try:
        model(**model_inputs(model, batch))
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not first or any(c is None for c in calls[:stop_at + 1]):
        raise HeadslimError(f"{type(model).__name__}: not every layer ran in a forward pass")
    return first[0], calls[:stop_at + 1]


def same_call(a: Call, b: Call) -> bool:
    """Whether two layers were given the very same arguments: the same objects (a mask built once
    and handed to every layer), or equal plain values. Identity, not equal values: a model that builds
    an argument per layer (per-layer masks of sliding-window models, a layer index) builds it per layer
    for every batch, while two masks equal in one batch may differ in the next (a longer one)."""
    return a.key == b.key and _same(a.args, b.args) and _same(a.kwargs, b.kwargs)


def _same(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return isinstance(a, (bool, int, float, str)) and a == b


def run_layer(layer, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    """The stream after ``layer`` given the stream ``hidden`` entering it."""
    out = layer(hidden, *call.args, **call.kwargs) if call.key is None else layer(*call.args, **{**call.kwargs,
                                                                                                 call.key: hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


def write_streamed(path: Path, tensors: list[tuple[str, torch.dtype, tuple, Callable]]) -> int:
    """Write a safetensors file whose tensors are produced in row chunks, never whole.

    ``tensors``: ``(name, dtype, shape, chunks)``, ``chunks()`` yielding the tensor's rows in order.
    Returns the bytes of tensor data written.
    """
    header, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        size = math.prod(shape) * torch.finfo(dtype).bits // 8
        header[name] = {"dtype": SAFE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, _, chunks in tensors:
            for chunk in chunks():
                f.write(memoryview(chunk.to(device="cpu", dtype=dtype).contiguous().view(-1).view(torch.uint8).numpy()))
    return offset


class Spill:
    """Where per-batch tensors (carried streams, a layer's outputs and references) are kept: in memory
    up to ``limit`` bytes over every :class:`Store` that shares this spill, the rest in safetensors
    files in a directory made under ``directory`` (the system's temporary directory by default) on the
    first spill and removed by :meth:`close`. ``limit`` None: everything in memory.

    Example:
        >>> with Spill(2 << 30) as spill:                         # doctest: +SKIP
        ...     stream = Stream(model, batches, spill=spill)
    """

    def __init__(self, limit: int | None = None, directory: str | Path | None = None):
        if limit is not None and limit < 0:
            raise HeadslimError(f"stream memory must be >= 0 bytes, not {limit}")
        self.limit, self.parent = limit, directory
        self.held = self.on_disk = self.peak_on_disk = self.files_written = 0
        self.dir: Path | None = None
        self._sizes: dict[Path, int] = {}
        self._meta: dict[Path, tuple] = {}  # a spilled tensor's (dtype, shape, device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def put(self, tensor: torch.Tensor):
        """A handle for ``tensor``: the tensor itself while the budget allows, else the file it went to."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.limit is None or self.held + nbytes <= self.limit:
            self.held += nbytes
            return tensor
        from safetensors.torch import save_file

        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="headslim-spill-", dir=self.parent))
        path = self.dir / f"{self.files_written}.safetensors"
        self.files_written += 1
        save_file({"t": tensor.detach().contiguous().cpu()}, str(path))
        self._sizes[path] = nbytes
        self._meta[path] = (tensor.dtype, tuple(tensor.shape), tensor.device)
        self.on_disk += nbytes
        self.peak_on_disk = max(self.peak_on_disk, self.on_disk)
        return path

    def get(self, handle) -> torch.Tensor:
        if isinstance(handle, Path):
            from safetensors.torch import load_file

            return load_file(str(handle), device=str(self._meta[handle][2]))["t"]  # back where it was
        return handle

    def drop(self, handle) -> None:
        """Forget a handle from :meth:`put`: its bytes leave the budget, its file is deleted."""
        if isinstance(handle, Path):
            self.on_disk -= self._sizes.pop(handle)
            self._meta.pop(handle)
            handle.unlink()
        else:
            self.held -= handle.numel() * handle.element_size()

    def close(self) -> None:
        """Remove the spill directory (only what this spill made)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.held = self.on_disk = 0
        self._sizes.clear()
        self._meta.clear()


class Store:
    """A list of per-batch tensors kept by a :class:`Spill` (``spill`` None: a plain in-memory list)."""

    def __init__(self, spill: Spill | None = None, items=()):
        self.spill = spill
        self._handles: list = []
        for t in items:
            self.append(t)

    def append(self, tensor: torch.Tensor) -> None:
        self._handles.append(tensor if self.spill is None else self.spill.put(tensor))

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, index: int) -> torch.Tensor:
        h = self._handles[index]
        return h if self.spill is None else self.spill.get(h)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def meta(self, index: int) -> tuple[torch.dtype, tuple]:
        """``(dtype, shape)`` of item ``index``, without reading a spilled one back."""
        h = self._handles[index]
        return self.spill._meta[h][:2] if isinstance(h, Path) else (h.dtype, tuple(h.shape))

    def clear(self) -> None:
        """Free every item (its memory, or its file)."""
        if self.spill is not None:
            for h in self._handles:
                self.spill.drop(h)
        self._handles = []


class Stream:
    """Per batch, the residual stream entering layer ``self.layer`` of ``model``.

    Args:
        model: whose layers advance the stream.
        batches: the calibration batches (on the model's device).
        calls: per batch, the layers' :class:`Call` list (:func:`layer_calls`); another stream's may be
            shared. None: recorded here (one forward pass per batch).
        spill: where the per-batch states are kept (:class:`Spill`); None: in memory.
    """

    def __init__(self, model, batches: list, calls: list | None = None, spill: Spill | None = None):
        self.model, self.layer, self.spill = model, 0, spill
        self.layers = get_adapter(model).layers(model)
        self.hidden, recorded = Store(spill), []
        shared = False  # every layer given the very same arguments (see ``same_call``)
        for i, batch in enumerate(batches):
            hidden, own = layer_calls(model, batch, every_layer=calls is None and not shared)
            if calls is None and i == 0:
                shared = all(same_call(c, own[0]) for c in own[1:])
            elif calls is None and shared:
                own = own * len(self.layers)
            self.hidden.append(hidden)
            recorded.append(own)
        self.calls = calls if calls is not None else recorded

    @torch.no_grad()
    def run(self, index: int) -> torch.Tensor:
        """The current layer's output for batch ``index`` (the stream is not advanced)."""
        return run_layer(self.layers[self.layer], self.hidden[index], self.calls[index][self.layer])

    def advance(self, outputs=None) -> None:
        """Move every batch past the current layer (``outputs``: its outputs, already computed, a list
        or a :class:`Store`, which the stream then owns)."""
        if outputs is None:
            outputs = Store(self.spill, (self.run(i) for i in range(len(self.hidden))))
        if isinstance(self.hidden, Store) and self.hidden is not outputs:
            self.hidden.clear()
        self.hidden = outputs
        self.layer += 1

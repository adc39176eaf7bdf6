"""``headslim latency``: per-layer latency tables, measured on a named runtime, to price pruned structures.

A table holds, for one runtime and one input shape ``(batch, seq)``, the median time of

* one **attention block** with ``h`` query heads (Q/K/V, attention, output projection, residual and
  norm), for ``h`` = 0 .. the layer's heads, and
* one **FFN block** with ``n`` neurons (its two matrices, or three when gated, residual and norm),
  for ``n`` on a grid over 0 .. the intermediate width,

so that a selection step can price "this layer keeps h heads and n neurons" without running the
model, and round neuron counts to the ones the runtime runs fastest (:meth:`LatencyTable.fast_neuron_counts`).

How a table is measured:

* Every variant is a small standalone torch module of the layer's shape with random (seeded)
  weights: for ``mlp_matrices = 2`` a BERT-style post-LayerNorm block (biases, GELU FFN,
  bidirectional attention), for 3 a Llama-style pre-RMSNorm block (no biases, rotary positions,
  causal grouped-query attention, SiLU-gated FFN). Inputs are random ``(batch, seq, hidden)``
  activations, no padding. A block with no heads (no neurons) is what a pruned layer keeps:
  ``LayerNorm(x + b_out)`` for the encoder, nothing for the pre-norm decoder.
* ``torch-cpu`` / ``cuda`` run the modules in PyTorch (``inference_mode``; CUDA timed with events);
  ``ort-cpu`` runs each one exported to ONNX (TorchScript exporter, opset 17) in an ONNX Runtime
  ``InferenceSession`` with default graph optimisation; ``ort-int8-cpu`` runs that graph after
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, per channel). Each ORT session's
  thread pool stops spinning when its run ends (``session.force_spinning_stop``): otherwise the
  block just timed keeps the cores busy while the next one runs.
* Timing is :func:`headslim.bench.measure_interleaved`: warm-up apart, then every variant once per
  repetition, order reversed every other repetition, so machine drift hits all variants alike;
  repetitions go on until every variant has had about ``min_time`` seconds. The median is kept.
* Inside a model there is one call for all layers, not one per block, so a call's fixed cost is
  kept out: small blocks run up to 4 times in a row per call (the same weights; the time is divided
  by the count), and the median of an empty call (``y = x``), timed in the same loop, is subtracted
  (floored at 0). Checked on all-MiniLM-L6-v2 at batch 1 x seq 128 (ort-cpu, 2 threads): the sum
  of per-block times was within -2..+7 % of the same blocks stacked into one 6-layer graph.

Tables are cached as JSON under ``$HEADSLIM_CACHE_DIR/latency/`` (default ``~/.cache/headslim``),
keyed by a hash of the machine, runtime, shape, thread count, layer shape, grids and versions. A
table timed while other programs kept the cores busy (``/proc/stat``) is returned with a warning
but not cached.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from headslim.errors import HeadslimError, first_line

RUNTIMES = ("torch-cpu", "ort-cpu", "ort-int8-cpu", "cuda")
FORMAT_VERSION = 3  # bump when the measured blocks change: it is part of the cache key
OPSET = 17
SEED = 0
GRID_POINTS = 24  # the default neuron grid steps by about intermediate / 24 ...
FINE_WINDOW = 4  # ... plus every multiple of 8 within 4 x 8 of half and three quarters of the width
WARMUP, MIN_RUNS, MAX_RUNS = 3, 5, 100000
# Small blocks run several times per timed call, so that a call's fixed cost (waking the thread
# pool, the framework's dispatch) is spread: per-block sums of all-MiniLM-L6-v2 at batch 1 were
# 5-20 % above the same blocks stacked in one graph with one block per call, 0-7 % with four.
CHAIN_TARGET_MS, MAX_CHAIN = 4.0, 4
CACHE_ENV = "HEADSLIM_CACHE_DIR"
# A table is noisy (and not cached) when other programs used more than the cores left over
# beyond the timed threads plus this many, on average, while it was timed.
NOISY_MARGIN = 0.25

LATENCY_EXAMPLE = """example:
  headslim latency all-MiniLM-L6-v2 --runtime ort-cpu --batch 1,32 --seq 128 --threads 2
  headslim latency PATH/TO/MODEL --runtime torch-cpu --neurons 0,512,1024,1536 --json
"""


# ----------------------------------------------------------------------------------------------
# The table.


def _interpolate(points: dict, x: float, what: str) -> float:
    """Linear interpolation between measured points; exact at them; outside their range an error."""
    if not points:
        raise HeadslimError(f"the table has no measured {what} counts")
    if x in points:
        return float(points[x])
    xs = sorted(points)
    if not xs[0] <= x <= xs[-1]:
        raise HeadslimError(f"{what} count {x} is outside the measured range {xs[0]}..{xs[-1]}")
    i = bisect.bisect_left(xs, x)
    lo, hi = xs[i - 1], xs[i]
    t = (x - lo) / (hi - lo)
    return float(points[lo] + t * (points[hi] - points[lo]))


@dataclass
class LatencyTable:
    """Median milliseconds of one attention block by query heads and one FFN block by neurons.

    Args:
        runtime: one of :data:`RUNTIMES`.
        batch, seq: the input shape the blocks ran on.
        threads: CPU threads (torch and ONNX Runtime intra-op).
        machine: CPU model, cores, platform (and the GPU for ``cuda``).
        versions: torch and onnxruntime versions.
        layer: the layer shape (hidden, head_dim, heads, kv_heads, intermediate, mlp_matrices, block,
            and ``kv_heads_for``: the KV heads priced for each query-head count).
        attention_ms: query heads ``h`` -> ms of one attention block (overhead subtracted).
        ffn_ms: neurons ``n`` -> ms of one FFN block (overhead subtracted).
        overhead_ms: median ms of an empty call (``y = x``), already subtracted from the tables.
        runs: timed runs per variant.
        chain: blocks per timed call (the block run that many times in a row, the same weights; the
            tables hold the time per block): spreads a call's fixed cost (thread wake-up, framework)
            that a block inside a model does not pay.
        min_time: seconds of timed runs per variant asked for.
        seconds: how long building and timing took.
        created: when it was measured (UTC, ISO 8601).
        key: the cache key; cache_path: where it is (None when not cached); cached: loaded from there.
        competing_cores: CPU cores other programs kept busy, on average, while the blocks were timed
            (from ``/proc/stat`` less this process's CPU time; None where unknown). Much above 0, they
            competed with the timed threads and the numbers are noisy.
    """

    runtime: str
    batch: int
    seq: int
    threads: int
    machine: dict
    versions: dict
    layer: dict
    attention_ms: dict[int, float]
    ffn_ms: dict[int, float]
    overhead_ms: float = 0.0
    runs: int = 0
    chain: int = 1
    min_time: float = 0.0
    seconds: float = 0.0
    created: str = ""
    key: str = ""
    cache_path: str | None = None
    cached: bool = False
    competing_cores: float | None = None
    format_version: int = FORMAT_VERSION

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready (count keys as strings); :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["attention_ms"] = {str(k): float(v) for k, v in sorted(self.attention_ms.items())}
        d["ffn_ms"] = {str(k): float(v) for k, v in sorted(self.ffn_ms.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["attention_ms"] = {int(k): float(v) for k, v in d["attention_ms"].items()}
        kwargs["ffn_ms"] = {int(k): float(v) for k, v in d["ffn_ms"].items()}
        return cls(**kwargs)

    # -- pricing ------------------------------------------------------------------------------

    def attention(self, h: float) -> float:
        """ms of one attention block with ``h`` query heads (interpolated between measured counts)."""
        return _interpolate(self.attention_ms, h, "head")

    def ffn(self, n: float) -> float:
        """ms of one FFN block with ``n`` neurons (interpolated between measured counts)."""
        return _interpolate(self.ffn_ms, n, "neuron")

    def layer_ms(self, h: float, n: float) -> float:
        """ms of one layer: attention with ``h`` heads plus FFN with ``n`` neurons."""
        return self.attention(h) + self.ffn(n)

    def model_ms(self, heads: list, neurons: list) -> float:
        """ms of all layers (embeddings and task heads left out); one entry per layer in each list."""
        heads, neurons = list(heads), list(neurons)
        if len(heads) != len(neurons):
            raise HeadslimError(f"{len(heads)} head counts but {len(neurons)} neuron counts: give one per layer")
        return sum(self.layer_ms(h, n) for h, n in zip(heads, neurons))

    def speedup(self, dense_heads, dense_neurons, heads, neurons) -> float:
        """Estimated dense / pruned time of the layers (each argument a per-layer list, or one count
        for every layer, the number of layers taken from the lists given)."""
        lists = [x for x in (dense_heads, dense_neurons, heads, neurons) if not isinstance(x, (int, float))]
        layers = len(lists[0]) if lists else 1

        def per_layer(x):
            return [x] * layers if isinstance(x, (int, float)) else list(x)

        dense = self.model_ms(per_layer(dense_heads), per_layer(dense_neurons))
        pruned = self.model_ms(per_layer(heads), per_layer(neurons))
        return dense / pruned if pruned > 0 else math.inf

    def fast_neuron_counts(self, tol: float = 0.0) -> list[int]:
        """Measured neuron counts no larger measured count beats (by more than ``tol``, a fraction).

        Rounding a layer's neuron count up to the nearest of these costs nothing on this runtime
        (as measured; the largest count is always in the list).
        """
        fast, best = [], math.inf
        for n in sorted(self.ffn_ms, reverse=True):
            ms = self.ffn_ms[n]
            if ms <= best * (1 + tol):
                fast.append(n)
            best = min(best, ms)
        return sorted(fast)

    def round_neurons(self, n: float, tol: float = 0.0) -> int:
        """The smallest fast neuron count (see :meth:`fast_neuron_counts`) at or above ``n``."""
        for count in self.fast_neuron_counts(tol):
            if count >= n:
                return count
        raise HeadslimError(f"neuron count {n} is above the largest measured count {max(self.ffn_ms)}")

    # -- report -------------------------------------------------------------------------------

    def markdown(self) -> str:
        """The table a user reads: setting, attention ms by heads, FFN ms by neurons, fast counts."""
        L, m = self.layer, self.machine
        heads, inter = int(L.get("heads", max(self.attention_ms, default=0))), int(L.get("intermediate", 0))
        kv = f", {L['kv_heads']} KV heads" if L.get("kv_heads") not in (None, heads) else ""
        where = f"measured in {self.seconds:.1f} s" + (", read from the cache" if self.cached else "")
        lines = [
            f"### Layer latency: {self.runtime}, batch {self.batch} x seq {self.seq}, {self.threads} threads",
            "",
            f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores){', ' + m['gpu'] if m.get('gpu') else ''}; "
            f"torch {self.versions.get('torch') or '-'}, onnxruntime {self.versions.get('onnxruntime') or '-'}; "
            f"{self.created or '?'}, {where}.",
            f"Layer: hidden {L.get('hidden')}, {heads} heads of {L.get('head_dim')}{kv}, FFN {inter} "
            f"({L.get('block', '?')}). Median of {self.runs} interleaved runs per variant "
            f"({self.chain} block{'s' if self.chain != 1 else ''} per call), less {self.overhead_ms:.4f} ms "
            "of call overhead"
            + (f"; other programs used {self.competing_cores:.2f} cores meanwhile."
               if self.competing_cores is not None else "."),
            "",
            f"| heads | attention ms | vs {heads} heads |",
            "|---:|---:|---:|",
        ]
        full_a = self.attention_ms.get(heads)
        for h, ms in sorted(self.attention_ms.items()):
            rel = f"{100 * ms / full_a:.0f} %" if full_a else "-"
            lines.append(f"| {h} | {ms:.4f} | {rel} |")
        fast = set(self.fast_neuron_counts())
        full_f = self.ffn_ms.get(inter)
        lines += ["", f"| neurons | FFN ms | vs {inter} | fast |", "|---:|---:|---:|:---:|"]
        for n, ms in sorted(self.ffn_ms.items()):
            rel = f"{100 * ms / full_f:.0f} %" if full_f else "-"
            lines.append(f"| {n} | {ms:.4f} | {rel} | {'yes' if n in fast else ''} |")
        lines += ["", "Fast neuron counts (no larger measured count is faster): "
                  + ", ".join(map(str, sorted(fast)))]
        if full_a is not None and full_f is not None:
            lines.append(f"Dense layer: {full_a + full_f:.4f} ms (attention {full_a:.4f} + FFN {full_f:.4f}).")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Grids, layer description, cache key.


def default_neuron_grid(intermediate: int) -> list[int]:
    """0 .. ``intermediate`` in steps of about intermediate / 24 (a multiple of 8), the width itself,
    and every multiple of 8 within 32 of half and of three quarters of the width (where a runtime's
    preference for some counts shows).

    Example:
        >>> g = default_neuron_grid(1536)
        >>> g[:3], g[-1], 744 in g
        ([0, 64, 128], 1536, True)
    """
    intermediate = int(intermediate)
    step = max(8, round(intermediate / GRID_POINTS / 8) * 8)
    grid = set(range(0, intermediate + 1, step)) | {intermediate}
    for anchor in (intermediate / 2, 3 * intermediate / 4):
        a = round(anchor / 8) * 8
        grid |= {a + 8 * k for k in range(-FINE_WINDOW, FINE_WINDOW + 1) if 0 <= a + 8 * k <= intermediate}
    return sorted(grid)


def _grid(values, top: int, what: str, default: list[int]) -> list[int]:
    if values is None:
        return default
    try:
        grid = sorted({int(v) for v in values})
    except (TypeError, ValueError):
        raise HeadslimError(f"{what} counts must be integers, not {values!r}") from None
    if not grid:
        raise HeadslimError(f"give at least one {what} count")
    if grid[0] < 0 or grid[-1] > top:
        raise HeadslimError(f"{what} counts must lie in 0..{top}, not {grid[0]}..{grid[-1]}")
    return grid


def kv_heads_for(h: int, heads: int, kv: int) -> int:
    """KV heads priced for ``h`` query heads: the fewest that serve them at the dense group size
    (``h`` itself for multi-head attention).

    Example:
        >>> [kv_heads_for(h, 8, 2) for h in range(9)]
        [0, 1, 1, 1, 1, 2, 2, 2, 2]
    """
    if h <= 0 or kv <= 0:
        return 0
    group = math.ceil(heads / kv)
    return min(kv, math.ceil(h / group), h)


def describe_layer(shape) -> dict:
    """The layer a table is measured for, from a :class:`headslim.flops.LayerShape`.

    A pruned model's shape is read at its largest layer (most heads, most KV heads).
    """
    mlp = int(shape.mlp_matrices)
    if mlp not in (2, 3):
        raise HeadslimError(f"mlp_matrices must be 2 (W2 act(W1 x)) or 3 (gated), not {mlp}")
    hidden, head_dim, inter = int(shape.hidden), int(shape.head_dim), int(shape.intermediate)
    if min(hidden, head_dim) < 1 or inter < 0:
        raise HeadslimError(f"a layer needs hidden and head_dim >= 1 and intermediate >= 0, not {shape}")
    heads = max((int(h) for h in shape.heads), default=0)
    kv = max((int(k) for k in shape.kv), default=0) if mlp == 3 else heads
    block = ("encoder: post-LayerNorm, biases, GELU FFN" if mlp == 2 else
             "decoder: pre-RMSNorm, no biases, rotary, causal GQA, SiLU-gated FFN")
    return {"hidden": hidden, "head_dim": head_dim, "heads": heads, "kv_heads": kv, "intermediate": inter,
            "mlp_matrices": mlp, "block": block,
            "kv_heads_for": {str(h): kv_heads_for(h, heads, kv) if mlp == 3 else h for h in range(heads + 1)}}


def cache_dir() -> Path:
    """``$HEADSLIM_CACHE_DIR/latency`` (default ``~/.cache/headslim/latency``)."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "headslim")
    return Path(root).expanduser() / "latency"


def cache_key(*, machine: dict, runtime: str, batch: int, seq: int, threads: int, layer: dict, heads: list,
              neurons: list, versions: dict) -> str:
    """Hash of everything a table's numbers depend on."""
    payload = {"format": FORMAT_VERSION, "machine": machine, "runtime": runtime, "batch": batch, "seq": seq,
               "threads": threads, "layer": layer, "heads": list(heads), "neurons": list(neurons),
               "versions": versions}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; a cache file is an ordinary one
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_cached(path: Path, key: str) -> LatencyTable | None:
    try:
        table = LatencyTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or from an older format: measure again and overwrite it
    if table.key != key or table.format_version != FORMAT_VERSION:
        return None
    table.cached, table.cache_path = True, str(path)
    return table


# ----------------------------------------------------------------------------------------------
# The blocks (torch is imported only when a table is measured).


@functools.lru_cache(maxsize=None)
def _blocks():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Empty(nn.Module):
        """``y = x``: what a call costs with no work (and a pre-norm block with nothing left)."""

        def forward(self, x):
            return x

    class EncoderAttention(nn.Module):
        """BERT: ``LayerNorm(x + O(attention(Q x, K x, V x)))``; no heads: ``LayerNorm(x + b_O)``."""

        def __init__(self, d: int, dh: int, h: int):
            super().__init__()
            self.h, self.dh = h, dh
            if h:
                self.q, self.k, self.v = nn.Linear(d, h * dh), nn.Linear(d, h * dh), nn.Linear(d, h * dh)
                self.o = nn.Linear(h * dh, d)
            else:
                self.o_bias = nn.Parameter(0.02 * torch.randn(d))
            self.norm = nn.LayerNorm(d, eps=1e-12)

        def forward(self, x):  # x: (B, T, d)
            if not self.h:
                return self.norm(x + self.o_bias)
            B, T, _ = x.shape
            q, k, v = (p(x).view(B, T, self.h, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, dh)
            return self.norm(x + self.o(a.transpose(1, 2).reshape(B, T, self.h * self.dh)))

    class EncoderFFN(nn.Module):
        """BERT: ``LayerNorm(x + W2 gelu(W1 x + b1) + b2)``; no neurons: ``LayerNorm(x + b2)``."""

        def __init__(self, d: int, n: int):
            super().__init__()
            self.n = n
            if n:
                self.up, self.down = nn.Linear(d, n), nn.Linear(n, d)
            else:
                self.out_bias = nn.Parameter(0.02 * torch.randn(d))
            self.norm = nn.LayerNorm(d, eps=1e-12)

        def forward(self, x):
            if not self.n:
                return self.norm(x + self.out_bias)
            return self.norm(x + self.down(F.gelu(self.up(x))))

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float = 1e-6):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    class DecoderAttention(nn.Module):
        """Llama: ``x + O(causal_attention(rope(Q n), rope(K n), V n))``, ``n = RMSNorm(x)``, ``kv`` KV heads."""

        def __init__(self, d: int, dh: int, h: int, kv: int, seq: int):
            super().__init__()
            self.h, self.kv, self.dh = h, kv, dh
            self.norm = RMSNorm(d)
            self.q, self.o = nn.Linear(d, h * dh, bias=False), nn.Linear(h * dh, d, bias=False)
            self.k, self.v = nn.Linear(d, kv * dh, bias=False), nn.Linear(d, kv * dh, bias=False)
            inv = 1.0 / (10000 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
            angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)  # (T, dh / 2)
            angles = torch.cat([angles, angles], dim=-1)  # (T, dh)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
            # query head i reads KV head i * kv // h (HF's repeat_kv when kv divides h)
            self.register_buffer("kv_index", torch.tensor([i * kv // h for i in range(h)]), persistent=False)

        def rope(self, t):  # t: (B, heads, T, dh)
            half = t.shape[-1] // 2
            rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
            return t * self.cos + rotated * self.sin

        def forward(self, x):
            B, T, _ = x.shape
            n = self.norm(x)
            q = self.rope(self.q(n).view(B, T, self.h, self.dh).transpose(1, 2))
            k = self.rope(self.k(n).view(B, T, self.kv, self.dh).transpose(1, 2))
            v = self.v(n).view(B, T, self.kv, self.dh).transpose(1, 2)
            if self.kv != self.h:
                k, v = k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, dh)
            return x + self.o(a.transpose(1, 2).reshape(B, T, self.h * self.dh))

    class DecoderFFN(nn.Module):
        """Llama: ``x + down(silu(gate n) * up n)``, ``n = RMSNorm(x)``."""

        def __init__(self, d: int, n: int):
            super().__init__()
            self.norm = RMSNorm(d)
            self.gate, self.up = nn.Linear(d, n, bias=False), nn.Linear(d, n, bias=False)
            self.down = nn.Linear(n, d, bias=False)

        def forward(self, x):
            n = self.norm(x)
            return x + self.down(F.silu(self.gate(n)) * self.up(n))

    class Chain(nn.Module):
        """The block ``k`` times in a row (the same weights): one call's overhead spread over ``k`` blocks."""

        def __init__(self, block: nn.Module, k: int):
            super().__init__()
            self.block, self.k = block, k

        def forward(self, x):
            for _ in range(self.k):
                x = self.block(x)
            return x

    return {"Empty": Empty, "EncoderAttention": EncoderAttention, "EncoderFFN": EncoderFFN,
            "DecoderAttention": DecoderAttention, "DecoderFFN": DecoderFFN, "Chain": Chain}


def _variants(layer: dict, heads: list[int], neurons: list[int]) -> list[tuple[str, str, int]]:
    """``(name, kind, count)`` of every block to time; the empty call first."""
    return ([("empty", "empty", 0)] + [(f"attention-{h}", "attention", h) for h in heads]
            + [(f"ffn-{n}", "ffn", n) for n in neurons])


def _variant_params(layer: dict, kind: str, count: int) -> int:
    d, dh, mlp = layer["hidden"], layer["head_dim"], layer["mlp_matrices"]
    if kind == "attention":
        kv = int(layer["kv_heads_for"][str(count)])
        return d * dh * (2 * count + 2 * kv) + 4 * d
    if kind == "ffn":
        return mlp * d * count + count + 3 * d
    return 0


def _build(layer: dict, kind: str, count: int, seq: int, seed: int, chain: int = 1):
    """One block as a torch module in eval mode, its weights drawn from ``seed``; ``chain`` > 1 runs
    it that many times in a row per call."""
    import torch

    blocks = _blocks()
    torch.manual_seed(seed)
    d, dh, encoder = layer["hidden"], layer["head_dim"], layer["mlp_matrices"] == 2
    if kind == "empty" or (not encoder and count == 0):  # a pre-norm block with nothing left is y = x
        module = blocks["Empty"]()
    elif kind == "attention":
        module = (blocks["EncoderAttention"](d, dh, count) if encoder else
                  blocks["DecoderAttention"](d, dh, count, int(layer["kv_heads_for"][str(count)]), seq))
    else:
        module = blocks["EncoderFFN"](d, count) if encoder else blocks["DecoderFFN"](d, count)
    if chain > 1 and not isinstance(module, blocks["Empty"]):
        module = blocks["Chain"](module, chain)
    return module.eval()


def _export(module, x, path: Path, int8: bool) -> Path:
    """The module as an ONNX file (TorchScript exporter, opset 17); int8 weights when asked."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["x"], output_names=["y"])
    if not int8:
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from headslim.onnx_utils import _quiet_ort_logs

    out = path.with_name(path.stem + "-int8.onnx")
    with _quiet_ort_logs():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


# ----------------------------------------------------------------------------------------------
# Measurement.


def _check_settings(runtime: str, batch: int, seq: int, threads, min_time: float) -> None:
    """Refuse bad settings before any slow work (no torch import)."""
    if runtime not in RUNTIMES:
        raise HeadslimError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HeadslimError(f"{name} must be a positive integer, not {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise HeadslimError(f"threads must be a positive integer, not {threads!r}")
    if not (isinstance(min_time, (int, float)) and min_time >= 0):
        raise HeadslimError(f"min_time must be >= 0 seconds, not {min_time!r}")


def _check_runtime_available(runtime: str) -> None:
    import importlib.util

    if runtime.startswith("ort-"):
        for package in ("onnxruntime", "onnx"):
            if importlib.util.find_spec(package) is None:
                raise HeadslimError(f"runtime {runtime} needs {package} (pip install 'headslim[onnx]')")
    if runtime == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HeadslimError("runtime cuda needs a CUDA GPU, and PyTorch sees none")


def _machine_and_versions(runtime: str) -> tuple[dict, dict]:
    from headslim.bench import machine_info

    info = machine_info()
    machine = {"cpu": info["cpu"], "cores": info["usable_cores"], "logical_cores": info["logical_cores"],
               "platform": info["platform"]}
    if runtime == "cuda":
        machine["gpu"] = info["gpu"]
    versions = {name: info["versions"].get(name) for name in ("torch", "onnxruntime")}
    return machine, versions


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 1024**3


def _ort_session(path: Path, threads: int):
    """:class:`headslim.bench.OrtSession` for one block (its thread pool stops spinning when a run ends:
    dozens of sessions take turns here, as two do in a whole-model timing)."""
    import onnxruntime as ort

    from headslim.bench import OrtSession, ort_options

    class BlockSession(OrtSession):
        def __init__(self):
            try:
                self.session = ort.InferenceSession(str(path), sess_options=ort_options(threads),
                                                    providers=["CPUExecutionProvider"])
            except Exception as e:
                raise HeadslimError(f"ONNX Runtime cannot load the block {path.name}: {first_line(e)}") from None
            self.path, self.device = Path(path), "cpu"

    return BlockSession()


def _cpu_busy_seconds() -> float | None:
    """CPU seconds the cores this process may run on have been busy since boot (``/proc/stat``), or None."""
    try:
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit()):
                    continue
                if usable is not None and int(name[3:]) not in usable:
                    continue
                values = [int(v) for v in fields[:8]]
                busy += sum(values) - values[3] - values[4]  # less idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _time_variants(sessions: dict, feeds: dict, min_time: float) -> dict[str, list[float]]:
    """Seconds of every run of every variant, all interleaved (:func:`headslim.bench.measure_interleaved`)."""
    from headslim.bench import measure_interleaved

    return measure_interleaved(sessions, feeds, warmup=WARMUP, min_runs=MIN_RUNS,
                               min_seconds=min_time * len(sessions), max_runs=MAX_RUNS)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"headslim latency: {text}", file=sys.stderr, flush=True)


def _session(runtime: str, module, x, path: Path, threads: int):
    """A timed session of ``module`` on ``runtime`` and its feed."""
    from headslim.bench import TorchSession

    if runtime.startswith("ort-"):
        return _ort_session(_export(module, x, path, int8=runtime == "ort-int8-cpu"), threads), {"x": x.numpy()}
    device = "cuda" if runtime == "cuda" else "cpu"
    return TorchSession(module.to(device), device), {"x": x.to(device)}


def _chain_length(runtime: str, layer: dict, x, seq: int, threads: int, tmp: Path) -> int:
    """Blocks per timed call: enough that the smaller dense block runs ``CHAIN_TARGET_MS`` per call,
    at most ``MAX_CHAIN`` (a quick probe of the dense blocks, one call each)."""
    import statistics

    probes = [(k, c) for k, c in (("attention", layer["heads"]), ("ffn", layer["intermediate"])) if c > 0]
    ms = []
    for kind, count in probes:
        session, feed = _session(runtime, _build(layer, kind, count, seq, SEED), x, tmp / f"probe-{kind}.onnx",
                                 threads)
        for _ in range(2):
            session(feed)
        ms.append(1e3 * statistics.median(session.timed(feed) for _ in range(5)))
        session.close()
    if not ms or min(ms) <= 0:
        return MAX_CHAIN if ms else 1
    return max(1, min(MAX_CHAIN, math.ceil(CHAIN_TARGET_MS / min(ms))))


def _measure(layer: dict, runtime: str, batch: int, seq: int, threads: int, heads: list[int],
             neurons: list[int], min_time: float, progress: bool) -> dict:
    """Build, time and summarise every block: ``attention``, ``ffn``, ``overhead``, ``runs``,
    ``chain`` and ``competing`` (see :class:`LatencyTable`)."""
    import statistics

    import torch
    from tqdm.auto import tqdm

    variants = _variants(layer, heads, neurons)
    weight_bytes = 4 * sum(_variant_params(layer, kind, count) for _, kind, count in variants)
    budget = _available_memory() // 3  # ORT keeps its own (pre-packed) copy; the export needs one more
    if weight_bytes > budget:
        raise HeadslimError(f"timing {len(variants)} variants at once holds {weight_bytes / 2**30:.1f} GiB of "
                            f"weights (more than a third of the free memory): measure fewer heads or neurons")
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, seq, layer["hidden"], generator=gen)  # (B, T, d) activations, no padding
    sessions, feeds = {}, {}
    with tempfile.TemporaryDirectory(prefix="headslim-latency-") as tmp:
        chain = _chain_length(runtime, layer, x, seq, threads, Path(tmp))
        what = "exporting" if runtime.startswith("ort-") else "building"
        try:
            for i, (name, kind, count) in enumerate(tqdm(variants, desc=f"{what} blocks", unit="block",
                                                        disable=not progress, leave=False)):
                module = _build(layer, kind, count, seq, SEED + i, chain)
                sessions[name], feeds[name] = _session(runtime, module, x, Path(tmp) / f"{name}.onnx", threads)
            _say(progress, f"timing {len(variants)} blocks interleaved on {runtime} (batch {batch} x seq {seq}, "
                           f"{threads} threads, {chain} blocks per call), about {min_time * len(variants):.0f} s")
            busy, own, wall = _cpu_busy_seconds(), time.process_time(), time.perf_counter()
            times = _time_variants(sessions, feeds, min_time)
            busy_after = _cpu_busy_seconds()
            own, wall = time.process_time() - own, time.perf_counter() - wall
        finally:
            for session in sessions.values():
                session.close()
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    overhead = medians["empty"]  # one call doing nothing; the chains run `chain` blocks per call

    def per_block(name: str) -> float:
        return max(medians[name] - overhead, 0.0) / chain

    competing = None
    if busy is not None and busy_after is not None and wall > 0:
        competing = round(max(busy_after - busy - own, 0.0) / wall, 2)
    return {"attention": {h: per_block(f"attention-{h}") for h in heads},
            "ffn": {n: per_block(f"ffn-{n}") for n in neurons}, "overhead": overhead,
            "runs": min(len(t) for t in times.values()), "chain": chain, "competing": competing}


def measure_table(shape, *, runtime: str = "ort-cpu", batch: int = 1, seq: int = 128, threads: int | None = None,
                  heads=None, neurons=None, min_time: float = 0.2, cache: bool = True,
                  progress: bool = True) -> LatencyTable:
    """Measure (or load from the cache) the latency table of ``shape``'s layer on ``runtime``.

    Args:
        shape: a :class:`headslim.flops.LayerShape` (``LayerShape.from_model(model)``).
        runtime: one of :data:`RUNTIMES`.
        batch, seq: the input shape to price.
        threads: CPU threads (default: torch's current count).
        heads: query-head counts to measure (default every count 0 .. the layer's heads).
        neurons: neuron counts to measure (default :func:`default_neuron_grid`).
        min_time: seconds of timed runs per block (all blocks interleaved: the timing takes about
            ``min_time`` times the number of blocks).
        cache: return the cached table when there is one, else measure and cache it (unless other
            programs competed for the cores while it was timed: a noisy table is not cached).
        progress: progress lines on stderr.

    Example:
        >>> from headslim.flops import LayerShape
        >>> t = measure_table(LayerShape(384, 32, 1536, (12,) * 6), batch=1, seq=128)  # doctest: +SKIP
        >>> t.speedup(12, 1536, [6] * 6, [1024] * 6)                                     # doctest: +SKIP
    """
    _check_settings(runtime, batch, seq, threads, min_time)
    layer = describe_layer(shape)
    heads = _grid(heads, layer["heads"], "head", list(range(layer["heads"] + 1)))
    neurons = _grid(neurons, layer["intermediate"], "neuron", default_neuron_grid(layer["intermediate"]))
    _check_runtime_available(runtime)
    from headslim.bench import fixed_threads

    with fixed_threads(threads) as n_threads:
        machine, versions = _machine_and_versions(runtime)
        key = cache_key(machine=machine, runtime=runtime, batch=batch, seq=seq, threads=n_threads, layer=layer,
                        heads=heads, neurons=neurons, versions=versions)
        path = cache_dir() / f"{key}.json"
        if cache and path.is_file():
            table = _load_cached(path, key)
            if table is not None:
                _say(progress, f"{runtime} batch {batch} x seq {seq}: from cache {path}")
                return table
        start = time.perf_counter()
        m = _measure(layer, runtime, batch, seq, n_threads, heads, neurons, min_time, progress)
        competing = m["competing"]
        used = 1 if runtime == "cuda" else n_threads  # CPU threads the timed runs keep busy
        busy = competing is not None and competing > max(machine["cores"] - used, 0) + NOISY_MARGIN
        if busy:
            _say(True, f"warning: other programs kept {competing:.2f} of {machine['cores']} CPU cores busy while "
                       f"the blocks were timed on {used} threads: the numbers are noisy and not cached "
                       "(measure on a quiet machine)")
        table = LatencyTable(runtime=runtime, batch=batch, seq=seq, threads=n_threads, machine=machine,
                             versions=versions, layer=layer, attention_ms=m["attention"], ffn_ms=m["ffn"],
                             overhead_ms=m["overhead"], runs=m["runs"], chain=m["chain"], competing_cores=competing,
                             min_time=float(min_time), seconds=time.perf_counter() - start,
                             created=datetime.now(timezone.utc).isoformat(timespec="seconds"), key=key)
    if cache and not busy:
        try:
            _write_atomic(path, json.dumps(table.to_dict(), indent=1) + "\n")
            table.cache_path = str(path)
        except OSError as e:
            _say(True, f"warning: could not write the cache file {path}: {e}")
    return table


# ----------------------------------------------------------------------------------------------
# CLI.


def add_parser(subparsers) -> None:
    """Register ``headslim latency`` (called by ``headslim.cli``)."""
    from headslim.bench import _int_list

    p = subparsers.add_parser("latency", help="per-layer latency tables (attention by heads, FFN by neurons)",
                              description=__doc__.split("\n\n")[0], epilog=LATENCY_EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="checkpoint dir (its layer shape is read), or 'all-MiniLM-L6-v2'")
    opt = p.add_argument_group("optional")
    opt.add_argument("--runtime", default="ort-cpu", help=f"one of {', '.join(RUNTIMES)} (default ort-cpu)")
    opt.add_argument("--batch", type=_int_list, default=(1,), help="comma-separated batch sizes (default 1)")
    opt.add_argument("--seq", type=_int_list, default=(128,), help="comma-separated sequence lengths (default 128)")
    opt.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    opt.add_argument("--heads", type=_int_list, help="query-head counts to measure (default all, 0 .. heads)")
    opt.add_argument("--neurons", type=_int_list,
                     help="neuron counts to measure (default a grid of about 24 steps plus a finer look "
                          "around half and three quarters of the width)")
    opt.add_argument("--min-time", type=float, default=0.2, help="seconds of timed runs per block (default 0.2)")
    opt.add_argument("--no-cache", action="store_true", help="measure again and do not write the cache")
    opt.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    opt.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from headslim.flops import LayerShape
    from headslim.io import check_length, load_model

    for batch in args.batch:
        for seq in args.seq:
            _check_settings(args.runtime, batch, seq, args.threads, args.min_time)
    model = load_model(args.model)
    for seq in args.seq:
        check_length(model.config, seq, "--seq")
    shape = LayerShape.from_model(model)
    del model
    tables = [measure_table(shape, runtime=args.runtime, batch=batch, seq=seq, threads=args.threads,
                            heads=args.heads, neurons=args.neurons, min_time=args.min_time,
                            cache=not args.no_cache, progress=not args.no_progress)
              for seq in args.seq for batch in args.batch]
    if args.json:
        print(json.dumps([t.to_dict() for t in tables], indent=2))
        return 0
    for table in tables:
        print(table.markdown())
        if table.cache_path:
            where = f"{table.cache_path}{' (read from it)' if table.cached else ''}"
        else:
            where = "not written (" + ("--no-cache)" if args.no_cache else "the CPU was busy with other programs)")
        print(f"cache: {where}\n")
    return 0

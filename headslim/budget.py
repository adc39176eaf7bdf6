"""Spend a speed-up target on heads and FFN neurons together, in one currency.

Every structure has an estimated quality cost (its marginal cost in its layer's greedy removal
sequence: repair-aware OBS costs, ``headslim.scoring.reconstruction``, by default, or Kwon et al.'s
Fisher costs, ``headslim.scoring.neurons.layer_sequences``; heads and neurons are priced by the same
probes, so the costs share a unit, and ``headslim.tradeoff`` fits the head price on held-out data)
and a latency saving (from per-layer tables measured on the target runtime, ``headslim.latency``).
The choice is greedy on quality cost per unit of saved time (ZipLM's currency): repeatedly take, over every layer and both kinds,
the next removal step with the lowest cost per saved fraction of the dense time, until the estimated
speed-up reaches the target at every shape.

Time of a count is its *effective* time: the fastest measured time at that count or above, since
keeping more structures than chosen never costs quality. A step is the run of removals down to the
next count whose effective time is lower (a plateau has no saving on its own), and at the end each
layer keeps the count whose time it was priced at (rounding up to a runtime-friendly width for free).

The estimate is ``(rest + scale * dense layers) / (rest + scale * pruned layers)`` per shape: ``scale``
and ``rest`` calibrate the block tables on whole-model timings (``headslim.speedup.SpeedTarget``);
without them (1 and 0) it is the tables' own ratio.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from headslim.errors import HeadslimError


def effective_times(tables: list, kind: str, width: int, dense: list[float]) -> tuple[list[list[float]], list[int]]:
    """``(times, chosen)`` for counts ``0..width``: ``chosen[c] >= c`` is the count at or above ``c``
    with the least time summed over the tables (each relative to its dense time; ties keep the larger
    count), and ``times[t][c]`` table ``t``'s time at ``chosen[c]``."""
    prices = [table.attention if kind == "attention" else table.ffn for table in tables]
    raw = [[price(c) for c in range(width + 1)] for price in prices]  # (tables, width + 1)
    relative = [sum(raw[t][c] / dense[t] for t in range(len(tables))) for c in range(width + 1)]
    chosen = [0] * (width + 1)
    best, best_at = math.inf, width
    for c in range(width, -1, -1):
        if relative[c] < best:
            best, best_at = relative[c], c
        chosen[c] = best_at
    return [[row[chosen[c]] for c in range(width + 1)] for row in raw], chosen


@dataclass
class Budget:
    """What :func:`spend` chose: kept structures per layer, and the estimates behind them."""

    kept_heads: list[list[int]]
    kept_neurons: list[list[int]]
    estimated: list[float]
    target: float
    quality_cost: float
    steps: int
    shapes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"target": self.target, "estimated_speedup": self.estimated, "quality_cost": self.quality_cost,
                "steps": self.steps, "shapes": self.shapes}


class _Scaled:
    """A latency table with every time multiplied by ``scale``."""

    def __init__(self, table, scale: float):
        self.table, self.scale = table, scale
        self.batch, self.seq, self.runtime = table.batch, table.seq, table.runtime

    def attention(self, h):
        return self.scale * self.table.attention(h)

    def ffn(self, n):
        return self.scale * self.table.ffn(n)


def spend(sequences: dict, num_heads: list[int], num_neurons: list[int], tables: list, target, *,
          rest_ms: list[float] | None = None, scale: list[float] | None = None, min_heads_per_layer: int = 1, min_neurons_per_layer: int = 0,
          kinds: tuple = ("attention", "mlp")) -> Budget:
    """Choose which heads and neurons to remove so the estimated speed-up reaches ``target`` at every
    table's shape, at the least estimated quality cost per unit of time saved.

    Args:
        sequences: ``{"attention": [...], "mlp": [...]}``: per layer, its greedy removal sequence
            ``[(index, marginal cost), ...]`` (``score_structures(...)["sequences"]``).
        num_heads, num_neurons: current counts per layer.
        tables: one latency table per shape (``headslim.latency.LatencyTable``).
        target: the speed-up to reach (> 1), or one per table.
        rest_ms: per table, the time of what pruning leaves alone; None: 0.
        scale: per table, what its block times are multiplied by in the whole model; None: 1.
        min_heads_per_layer, min_neurons_per_layer: floors.
        kinds: which structures may go (heads only, neurons only, or both).

    Returns: a :class:`Budget`. A target the tables say cannot be reached is a one-line error naming
    the largest estimated speed-up.
    """
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * len(tables)
    if len(targets) != len(tables) or not all(t > 1.0 for t in targets):
        raise HeadslimError(f"--target-speedup must be above 1, not {target}")
    rest_ms = rest_ms or [0.0] * len(tables)
    tables = [_Scaled(t, a) for t, a in zip(tables, scale or [1.0] * len(tables))]
    layers = len(num_heads)
    width = {"attention": num_heads, "mlp": num_neurons}
    floor = {"attention": min_heads_per_layer, "mlp": min_neurons_per_layer}
    dense = [sum(table.attention(h) + table.ffn(n) for h, n in zip(num_heads, num_neurons)) + rest_ms[t]
             for t, table in enumerate(tables)]
    by_width = {(k, w): effective_times(tables, k, w, dense) for k in kinds for w in set(width[k])}  # once a width
    eff = {(k, layer): by_width[(k, width[k][layer])] for k in kinds for layer in range(layers)}
    count = {k: list(width[k]) for k in ("attention", "mlp")}

    def time_of(t: int, kind: str, layer: int, c: int) -> float:
        if kind in kinds:
            return eff[(kind, layer)][0][t][c]
        return (tables[t].attention if kind == "attention" else tables[t].ffn)(c)

    # pruned times are effective times: each layer will keep the count its time was priced at
    current = [sum(time_of(t, "attention", layer, count["attention"][layer]) +
                   time_of(t, "mlp", layer, count["mlp"][layer]) for layer in range(layers)) + rest_ms[t]
               for t in range(len(tables))]

    def step(kind: str, layer: int):
        """``(priority, removals, saving per table)`` of the next step in this layer, or None."""
        c, lo = count[kind][layer], min(floor[kind], width[kind][layer])
        if c <= lo:
            return None
        here = [time_of(t, kind, layer, c) for t in range(len(tables))]
        seq = sequences[kind][layer]
        done = width[kind][layer] - c
        cost = 0.0
        for j in range(1, c - lo + 1):
            cost += max(seq[done + j - 1][1], 0.0)
            there = [time_of(t, kind, layer, c - j) for t in range(len(tables))]
            saving = [a - b for a, b in zip(here, there)]
            relative = sum(s / d for s, d in zip(saving, dense))  # fractions of the dense times saved
            if relative > 0:
                return cost / relative, j, saving
        return None

    heap = []
    for kind in kinds:
        for layer in range(layers):
            entry = step(kind, layer)
            if entry is not None:
                heapq.heappush(heap, (entry[0], kind, layer, entry[1], entry[2]))

    def reached() -> bool:
        return all(d / c >= t for d, c, t in zip(dense, current, targets))

    total_cost, steps = 0.0, 0
    while not reached():
        if not heap:
            best = min(d / c for d, c in zip(dense, current))
            raise HeadslimError(f"--target-speedup {max(targets):.3g} cannot be reached: removing every structure allowed "
                                f"gives an estimated {best:.2f}x (floors: {min_heads_per_layer} heads, "
                                f"{min_neurons_per_layer} neurons per layer)")
        priority, kind, layer, removals, saving = heapq.heappop(heap)
        done = width[kind][layer] - count[kind][layer]
        total_cost += sum(max(c, 0.0) for _, c in sequences[kind][layer][done:done + removals])
        count[kind][layer] -= removals
        current = [c - s for c, s in zip(current, saving)]
        steps += 1
        entry = step(kind, layer)
        if entry is not None:
            heapq.heappush(heap, (entry[0], kind, layer, entry[1], entry[2]))

    # keep the count each layer's time was priced at (rounding up to it is free)
    kept = {}
    for kind in ("attention", "mlp"):
        rows = []
        for layer in range(layers):
            c = count[kind][layer]
            if kind in kinds:
                c = eff[(kind, layer)][1][c]
            removed = {i for i, _ in sequences[kind][layer][:width[kind][layer] - c]} if kind in kinds else set()
            rows.append([i for i in range(width[kind][layer]) if i not in removed])
        kept[kind] = rows
    estimated = [d / c for d, c in zip(dense, current)]
    shapes = [{"batch": table.batch, "seq": table.seq, "runtime": table.runtime, "dense_ms": round(d, 4),
               "estimated_ms": round(c, 4), "estimated_speedup": round(d / c, 4), "rest_ms": round(r, 4),
               "scale": round(table.scale, 4)}
              for table, d, c, r in zip(tables, dense, current, rest_ms)]
    return Budget(kept["attention"], kept["mlp"], estimated, target, total_cost, steps, shapes)

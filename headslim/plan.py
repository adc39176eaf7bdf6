"""PrunePlan: which structures every layer keeps (attention heads, FFN neurons), and where that choice came from.

A head and an FFN neuron are the same thing to a pruner: a group of input columns of an output
projection (``head_dim`` wide for a head, 1 for a neuron) with the rows upstream that produce it.
The plan file has one section per kind (format 2)::

    {"format_version": 2,
     "attention": {"num_heads": [...], "kept_heads": [[...], ...], "kv_head_of_q": ..., "kept_kv_heads": ...},
     "mlp": {"num_neurons": [...], "kept_neurons": [[...], ...]},        # absent: the FFNs are untouched
     "provenance": {...}}

Format 1 files (``num_heads`` / ``kept_heads`` at the top level, heads only) still read.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from headslim.errors import HeadslimError

PLAN_FILE = "headslim_plan.json"
FORMAT_VERSION = 2


def heads_to_prune(prune: float | int, total: int) -> int:
    """Number of heads to remove: ``prune`` is a fraction in (0, 1) (float) or a count (int)."""
    if isinstance(prune, bool) or not isinstance(prune, (int, float)):
        raise HeadslimError(f"--prune must be a fraction in (0, 1) or a head count, not {prune!r}")
    if isinstance(prune, float):
        if not 0.0 < prune < 1.0:
            raise HeadslimError(f"--prune {prune} is outside (0, 1); give a fraction or a whole head count")
        return int(round(prune * total))
    if prune < 1:
        raise HeadslimError(f"--prune {prune} removes no head: give a head count from 1 to {total} (the model has "
                            f"{total} heads) or a fraction in (0, 1)")
    if prune > total:
        raise HeadslimError(f"--prune {prune} heads: the model has {total} heads")
    return prune


def _show(value) -> str:
    """``value`` as the user wrote it in JSON (``null``, ``true``, ``"a"``), cut to one short line."""
    return json.dumps(value, default=repr)[:60]


def _index(value, what: str, noun: str = "head number") -> int:
    """``value`` as an int: plan files are hand-edited, and ``int()`` would turn ``0.7`` or ``true``
    into a head silently and ``"a"`` into a traceback."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HeadslimError(f"plan: {what}: {_show(value)} is not a {noun} (a whole number, without quotes)")
    return int(value)


def _rows(value, what: str, shape: str = "a list") -> list:
    """``value`` as a list (of per-layer rows or of indices); a one-line error for anything else."""
    if not isinstance(value, (list, tuple)):
        raise HeadslimError(f"plan: {what} must be {shape}, not {_show(value)}")
    return list(value)


def _check_version(data: dict) -> None:
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise HeadslimError(f"plan: format_version must be a whole number, not {_show(version)}")
    if version > FORMAT_VERSION:
        raise HeadslimError(f"plan format_version {version} is newer than this headslim reads")


@dataclass
class PrunePlan:
    """Kept heads per layer of a dense model, and provenance.

    Args:
        num_heads: heads per layer of the dense model, e.g. ``[12] * 6``.
        kept_heads: for each layer, the (dense) indices of the heads it keeps; may be empty.
        provenance: free-form JSON: method, objective, calibration source and hash, version, scores.
        kv_head_of_q: optional, grouped-query attention: for each layer, the KV head each (dense)
            query head reads, non-decreasing, e.g. ``[0, 0, 1, 1]``. Written by ``headslim.gqa``.
        kept_kv_heads: optional, the KV heads each layer keeps (needs ``kv_head_of_q``). A KV head
            without kept query heads is removed anyway; a kept query head whose KV head is not
            listed is an error. Default: exactly the KV heads the kept query heads read.
        num_neurons: optional, FFN neurons per layer of the dense model (``intermediate_size``);
            ``None`` leaves every FFN as it is.
        kept_neurons: for each layer, the (dense) indices of the FFN neurons it keeps; may be empty
            (the layer's FFN then adds only its output bias). Needs ``num_neurons``.

    Example:
        >>> plan = PrunePlan(num_heads=[4, 4], kept_heads=[[0, 3], []])
        >>> plan.pruned_heads
        {0: [1, 2], 1: [0, 1, 2, 3]}
    """

    num_heads: list[int]
    kept_heads: list[list[int]]
    provenance: dict = field(default_factory=dict)
    kv_head_of_q: list[list[int]] | None = None
    kept_kv_heads: list[list[int]] | None = None
    num_neurons: list[int] | None = None
    kept_neurons: list[list[int]] | None = None

    def __post_init__(self):
        self.num_heads = [_index(n, "num_heads", "head count") for n in _rows(self.num_heads, "'num_heads'")]
        if not isinstance(self.provenance, dict):
            raise HeadslimError(f"plan: 'provenance' must be a JSON object, not {_show(self.provenance)}")
        self.kept_heads = _rows(self.kept_heads, "'kept_heads'", "a list with one list of head numbers per layer")
        if len(self.kept_heads) != len(self.num_heads):
            raise HeadslimError(
                f"plan has {len(self.kept_heads)} layers of kept heads but the model has "
                f"{len(self.num_heads)} layers"
            )
        kept = []
        for layer, (heads, n) in enumerate(zip(self.kept_heads, self.num_heads)):
            row = _rows(heads, f"layer {layer}'s kept heads", "a list of head numbers ('kept_heads' has one per layer)")
            heads = [_index(h, f"layer {layer}") for h in row]
            bad = [h for h in heads if not 0 <= h < n]
            if bad:
                raise HeadslimError(
                    f"plan: layer {layer} keeps head {bad[0]} but that layer has {n} heads (0-{n - 1})"
                )
            if len(set(heads)) != len(heads):
                raise HeadslimError(f"plan: layer {layer} lists a head twice: {heads}")
            kept.append(sorted(heads))
        self.kept_heads = kept
        self._check_kv()
        self._check_mlp()

    def _check_mlp(self) -> None:
        if self.num_neurons is None:
            if self.kept_neurons is not None:
                raise HeadslimError("plan: 'kept_neurons' needs 'num_neurons' (the FFN width of every layer)")
            return
        self.num_neurons = [_index(n, "num_neurons", "neuron count") for n in _rows(self.num_neurons, "'num_neurons'")]
        if len(self.num_neurons) != self.num_layers:
            raise HeadslimError(f"plan: 'num_neurons' has {len(self.num_neurons)} layers, the plan has {self.num_layers}")
        if self.kept_neurons is None:
            self.kept_neurons = [list(range(n)) for n in self.num_neurons]
        rows = _rows(self.kept_neurons, "'kept_neurons'", "a list with one list of neuron numbers per layer")
        if len(rows) != self.num_layers:
            raise HeadslimError(f"plan: 'kept_neurons' has {len(rows)} layers, the plan has {self.num_layers}")
        kept = []
        for layer, (row, n) in enumerate(zip(rows, self.num_neurons)):
            what = f"layer {layer}'s kept neurons"
            neurons = [_index(i, what, "neuron number") for i in _rows(row, what)]
            if any(not 0 <= i < n for i in neurons):
                bad = next(i for i in neurons if not 0 <= i < n)
                raise HeadslimError(f"plan: layer {layer} keeps neuron {bad} but that layer has {n} (0-{n - 1})")
            if len(set(neurons)) != len(neurons):
                raise HeadslimError(f"plan: layer {layer} lists an FFN neuron twice")
            kept.append(sorted(neurons))
        self.kept_neurons = kept

    def _check_kv(self) -> None:
        if self.kv_head_of_q is None:
            if self.kept_kv_heads is not None:
                raise HeadslimError("plan: 'kept_kv_heads' needs 'kv_head_of_q' (the KV head of every query head)")
            return
        self.kv_head_of_q = _rows(self.kv_head_of_q, "'kv_head_of_q'")
        if len(self.kv_head_of_q) != self.num_layers:
            raise HeadslimError(
                f"plan: 'kv_head_of_q' has {len(self.kv_head_of_q)} layers, the plan has {self.num_layers}"
            )
        maps = []
        for layer, (row, n) in enumerate(zip(self.kv_head_of_q, self.num_heads)):
            what = f"layer {layer}'s kv_head_of_q"
            row = [_index(k, what, "KV head number") for k in _rows(row, what)]
            if len(row) != n or any(k < 0 for k in row) or any(a > b for a, b in zip(row, row[1:])):
                raise HeadslimError(
                    f"plan: layer {layer}'s kv_head_of_q must list a non-decreasing KV head >= 0 for each of "
                    f"its {n} query heads, got {row}"
                )
            maps.append(row)
        self.kv_head_of_q = maps
        if self.kept_kv_heads is None:
            return
        self.kept_kv_heads = _rows(self.kept_kv_heads, "'kept_kv_heads'")
        if len(self.kept_kv_heads) != self.num_layers:
            raise HeadslimError(
                f"plan: 'kept_kv_heads' has {len(self.kept_kv_heads)} layers, the plan has {self.num_layers}"
            )
        kept_kv = []
        for layer, (kv, q, row) in enumerate(zip(self.kept_kv_heads, self.kept_heads, maps)):
            what = f"layer {layer}'s kept_kv_heads"
            kv = sorted({_index(k, what, "KV head number") for k in _rows(kv, what)})
            for h in q:
                if row[h] not in kv:
                    raise HeadslimError(f"plan: layer {layer} keeps query head {h} but not its KV head {row[h]}")
            kept_kv.append(kv)
        self.kept_kv_heads = kept_kv

    @property
    def kv_heads_after(self) -> list[list[int]] | None:
        """KV heads (dense indices) each layer keeps: those its kept query heads read; None without a map."""
        if self.kv_head_of_q is None:
            return None
        return [sorted({row[h] for h in kept}) for row, kept in zip(self.kv_head_of_q, self.kept_heads)]

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    @property
    def pruned_heads(self) -> dict[int, list[int]]:
        """Removed heads per layer (dense indices), for every layer that loses at least one."""
        out = {}
        for layer, (kept, n) in enumerate(zip(self.kept_heads, self.num_heads)):
            removed = [h for h in range(n) if h not in kept]
            if removed:
                out[layer] = removed
        return out

    @property
    def heads_after(self) -> list[int]:
        return [len(k) for k in self.kept_heads]

    @property
    def neurons_after(self) -> list[int] | None:
        """FFN neurons each layer keeps; None when the plan leaves the FFNs alone."""
        return None if self.kept_neurons is None else [len(k) for k in self.kept_neurons]

    @property
    def prunes_mlp(self) -> bool:
        """Whether any FFN neuron is removed."""
        return self.kept_neurons is not None and self.neurons_after != self.num_neurons

    def neuron_mask(self):
        """Gate tensor ``(layers, max_neurons)`` of the FFNs: 1.0 kept, 0.0 removed; None without an mlp section."""
        import torch

        if self.num_neurons is None:
            return None
        mask = torch.zeros(self.num_layers, max(self.num_neurons))
        for layer, kept in enumerate(self.kept_neurons):
            mask[layer, kept] = 1.0
        return mask

    def mask(self):
        """Gate tensor ``(layers, max_heads)``: 1.0 for kept heads, 0.0 for removed ones."""
        import torch

        mask = torch.zeros(self.num_layers, max(self.num_heads))
        for layer, kept in enumerate(self.kept_heads):
            mask[layer, kept] = 1.0
        return mask

    @classmethod
    def from_mask(cls, mask, num_heads: list[int] | None = None, provenance: dict | None = None):
        rows = mask.tolist()
        num_heads = num_heads or [len(r) for r in rows]
        kept = [[h for h in range(n) if rows[layer][h] > 0.5] for layer, n in enumerate(num_heads)]
        return cls(num_heads=num_heads, kept_heads=kept, provenance=provenance or {})

    def to_dict(self) -> dict:
        attention = {"num_heads": self.num_heads, "kept_heads": self.kept_heads}
        if self.kv_head_of_q is not None:
            attention["kv_head_of_q"] = self.kv_head_of_q
            attention["kept_kv_heads"] = self.kv_heads_after
        out = {"format_version": FORMAT_VERSION, "attention": attention}
        if self.num_neurons is not None:
            out["mlp"] = {"num_neurons": self.num_neurons, "kept_neurons": self.kept_neurons}
        out["provenance"] = self.provenance
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        if isinstance(data, dict):
            _check_version(data)
        data = _sections(data)
        if "kept_heads" not in data or "num_heads" not in data:
            raise HeadslimError("plan JSON needs 'num_heads' and 'kept_heads' (in its 'attention' section)")
        return cls(data["num_heads"], data["kept_heads"], data.get("provenance", {}),
                   data.get("kv_head_of_q"), data.get("kept_kv_heads"),
                   data.get("num_neurons"), data.get("kept_neurons"))

    @classmethod
    def from_user(cls, data: dict, num_heads: list[int], kv_head_of_q: list[list[int]] | None = None,
                  num_neurons: list[int] | None = None) -> "PrunePlan":
        """A hand-written plan for a model with ``num_heads`` per layer.

        ``kept_heads`` is either a list with one entry per layer or a ``{layer: [heads]}`` mapping
        (layers not named keep every head); ``num_heads``, when given, must match the model.
        ``kv_head_of_q`` is the model's query-head → KV-head map (grouped-query attention); with it,
        an optional ``kept_kv_heads`` (list or mapping, like ``kept_heads``) is checked against it.
        ``num_neurons`` is the model's FFN width per layer; an ``mlp`` section's ``kept_neurons`` (list
        or mapping, like ``kept_heads``) is read against it. Sections (format 2) or top-level keys both read.
        """
        if isinstance(data, dict):
            _check_version(data)
        data = _sections(data)
        if "kept_heads" not in data:
            if num_neurons is None or "kept_neurons" not in data:
                raise HeadslimError("plan JSON needs a 'kept_heads' entry (or an 'mlp' section with 'kept_neurons')")
            data = {**data, "kept_heads": [list(range(n)) for n in num_heads]}
        if "num_heads" in data:
            given = [_index(n, "num_heads", "head count") for n in _rows(data["num_heads"], "'num_heads'")]
            if given != list(num_heads):
                raise HeadslimError(f"plan is for heads per layer {given}, the model has {num_heads}")
        kept = _per_layer(data["kept_heads"], [list(range(n)) for n in num_heads])
        kept_kv = data.get("kept_kv_heads")
        if kv_head_of_q is not None:
            kept_kv = _per_layer(kept_kv, [sorted(set(m)) for m in kv_head_of_q], "kept_kv_heads ")
        kept_neurons = None
        if "kept_neurons" in data:
            if num_neurons is None:
                raise HeadslimError("plan: this model's FFN neurons cannot be pruned ('kept_neurons' given)")
            if "num_neurons" in data:
                given = [_index(n, "num_neurons", "neuron count") for n in _rows(data["num_neurons"], "'num_neurons'")]
                if given != list(num_neurons):
                    raise HeadslimError(f"plan is for FFN widths {given}, the model has {num_neurons}")
            kept_neurons = _per_layer(data["kept_neurons"], [list(range(n)) for n in num_neurons], "kept_neurons ")
        return cls(list(num_heads), kept, data.get("provenance", {"method": "hand-written"}),
                   kv_head_of_q, kept_kv, list(num_neurons) if kept_neurons is not None else None, kept_neurons)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        return cls.from_dict(read_json(path, "prune plan"))


def _sections(data) -> dict:
    """A plan dict with its ``attention`` and ``mlp`` sections (format 2) flattened to the top level,
    as format 1 wrote it; a one-line error for a section that is not a JSON object."""
    if not isinstance(data, dict):
        raise HeadslimError(f"plan JSON must be an object, not {_show(data)}")
    flat = {k: v for k, v in data.items() if k not in ("attention", "mlp")}
    for name in ("attention", "mlp"):
        if name in data:
            if not isinstance(data[name], dict):
                raise HeadslimError(f"plan: '{name}' must be a JSON object, not {_show(data[name])}")
            flat.update(data[name])
    return flat


def _per_layer(value, rows: list, what: str = "") -> list:
    """A per-layer list, or a ``{layer: [...]}`` mapping applied over ``rows`` (layers not named keep
    ``rows``); ``what`` names the entry in errors (``"kept_neurons "``; heads: empty)."""
    if not isinstance(value, dict):
        return value
    rows = list(rows)
    for key, item in value.items():
        try:
            layer = int(key)
        except ValueError:
            raise HeadslimError(f"plan: {what}layer {key!r} is not a layer number") from None
        if not 0 <= layer < len(rows):
            raise HeadslimError(f"plan: {what}layer {layer} does not exist (the model has {len(rows)} layers)")
        rows[layer] = item
    return rows


def dumps(data: dict) -> str:
    """JSON with two-space indents, but each list of plain numbers on one line: a plan keeps a list
    of up to thousands of FFN neurons per layer, one per line would be unreadable."""
    import re

    text = json.dumps(data, indent=2)
    return re.sub(r"\[[^\[\]{}\"]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


def read_json(path: str | Path, what: str = "plan file"):
    """The parsed JSON of ``path``; a missing file, a directory, bytes that are not UTF-8 or broken
    JSON are one-line errors naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HeadslimError(f"no {what} at {path}") from None
    except OSError as e:
        raise HeadslimError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeadslimError(f"{what} {path} is not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at byte offset "
                            f"{e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HeadslimError(f"{what} {path} is not valid JSON: {e}") from None

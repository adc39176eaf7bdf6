"""Pruning in one path: :func:`prune_model` chooses a plan (scoring, selection, or a speed-up target),
applies it and repairs, in memory; ``shrink`` is load + ``prune_model`` + quality check + save.

``sweep`` and the scripts in ``bench/`` call :func:`prune_model` for every target too (with
:func:`shared_scores` when one scoring pass serves them all), so no caller chains the steps by hand.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from headslim._version import __version__
from headslim.data import DEFAULT_CALIB_SAMPLES, TARGET_CALIB_SAMPLES
from headslim.errors import HeadslimError

if TYPE_CHECKING:
    import torch

    from headslim.plan import PrunePlan


DEFAULT_FFN_METHOD = "magnitude"


@dataclass
class PruneConfig:
    """What :func:`prune_model` removes, how it chooses and whether it repairs; validated on construction.

    Args:
        prune: fraction of all heads to remove (float in (0, 1)) or a head count (int); 0 keeps
            every head (with ``prune_ffn``: prune FFN neurons only).
        prune_ffn: fraction of all FFN neurons to remove (float in [0, 1)) or a neuron count (int);
            None (default) leaves the FFNs alone.
        method: scorer name (``headslim.scoring.SCORERS``); default ``fisher``.
        ffn_method: scorer of the FFN neurons (``headslim.scoring.neurons.NEURON_METHODS``); default
            ``magnitude`` (measured best with repair). With ``method`` equal to it and ``fisher`` or
            ``gradient``, heads and neurons are scored in the same backward passes.
        min_heads_per_layer: heads every layer keeps (default 1; 0 allows removing a whole attention block).
        min_neurons_per_layer: FFN neurons every layer keeps (default 0: a layer may lose its FFN).
        objective: ``dense`` (label-free, keep the dense model's representations) or ``task``.
        seed: seed of the scorers that draw (``random``, ``learned``, ...).
        step: share of all heads removed per round by ``iterative`` (Michel et al.: 0.1).
        gqa: grouped-query models only: ``uniform`` (default; every kept KV head keeps the same
            number of query heads, so standard kernels apply), ``kv-groups`` or ``ragged``
            (see ``headslim.gqa``).
        target_speedup: plan for this speed-up (measured by the ``speed`` given to :func:`prune_model`)
            instead of ``prune`` / ``prune_ffn`` (which are then ignored): heads and FFN neurons compete
            in one ranking, estimated quality cost (``speed_method``) per unit of saved latency, priced
            by per-layer latency tables (``headslim.budget``); the result is timed against the dense model.
        target_structures: what the target may remove: ``both`` (default), ``heads`` or ``ffn``.
        speed_method: the costs the target spends: ``obs`` (default: repair-aware, in one unit for both
            kinds, ``headslim.scoring.reconstruction``), ``fisher`` or ``gradient``.
        exchange: price of a head relative to its estimated cost; None (default): fitted on held-out
            calibration batches (``headslim.tradeoff``: the estimates miss how head removals compound).
        speed_corrections: when the plan, timed on the runtime, misses the target at a shape, re-spend
            with that shape's target raised by the measured shortfall (ZipLM also corrects its tables
            by measurement); when such a raised plan then beats the target by 5 % at every shape, step
            back halfway and keep the step only if it is measured to meet the target. Up to this many
            re-spends; the plan kept is the met one that removes least (or the last, reported as not met).
        repair: after surgery, re-fit each pruned layer's output projection by ridge least squares
            (``headslim.repair``); it is kept only where it lowers the error on held-out calibration
            batches and raises the held-out embedding cosine, so "on" means "on when it helps".
        repair_inputs: ``pruned`` (sequential, default) or ``dense`` (fit on the dense model's activations).
        repair_ridge: ridge strength of the repair solve, relative to the mean feature energy.
        stream_memory: bytes of repair's carried calibration streams (and a layer's outputs and fit
            references) kept in memory; the rest goes to safetensors files in a directory made under
            ``spill_dir`` (default: the system's temporary directory), removed when repair ends,
            interrupted or not (``headslim.layerwise.Spill``). None (default): no limit.
        spill_dir: where that directory is made.
        progress: progress bars while scoring and repairing.
    """

    prune: float | int = 0.5
    prune_ffn: float | int | None = None
    method: str = "fisher"
    ffn_method: str | None = None
    min_heads_per_layer: int = 1
    min_neurons_per_layer: int = 0
    objective: str = "dense"
    seed: int = 0
    step: float = 0.1
    gqa: str = "uniform"
    target_speedup: float | None = None
    target_structures: str = "both"
    speed_method: str = "obs"
    exchange: float | None = None
    speed_corrections: int = 2
    repair: bool = True
    repair_inputs: str = "pruned"
    repair_ridge: float = 1e-2
    stream_memory: int | None = None
    spill_dir: str | None = None
    progress: bool = True

    @property
    def _scores(self) -> bool:
        """Whether the plan is chosen by scoring (``ShrinkConfig``: not when a hand-written plan is given)."""
        return True

    def __post_init__(self):
        from headslim.gqa import GQA_MODES
        from headslim.repair import INPUTS
        from headslim.scoring import OBJECTIVES, parse_method

        if self._scores:
            parse_method(self.method)
        if self.repair_inputs not in INPUTS:
            raise HeadslimError(f"--repair-inputs must be one of {', '.join(INPUTS)}, not {self.repair_inputs!r}")
        if self.repair_ridge < 0:
            raise HeadslimError(f"--repair-ridge must be >= 0, not {self.repair_ridge}")
        check_spill(self.stream_memory, self.spill_dir)
        if self.gqa not in GQA_MODES:
            raise HeadslimError(f"--gqa must be one of {', '.join(GQA_MODES)}, not {self.gqa!r}")
        if not 0.0 < self.step <= 1.0:
            raise HeadslimError(f"--step must be in (0, 1], not {self.step}")
        if self.objective not in OBJECTIVES:
            raise HeadslimError(f"unknown objective {self.objective!r}; available: {', '.join(OBJECTIVES)}")
        if self.target_speedup is not None:
            if isinstance(self.target_speedup, bool) or not isinstance(self.target_speedup, (int, float)) \
                    or not self.target_speedup > 1.0:
                raise HeadslimError(f"--target-speedup must be a number above 1, not {self.target_speedup!r}")
            if self.speed_method not in ("obs", "fisher", "gradient"):
                raise HeadslimError(f"--target-speedup prices structures by obs, fisher or gradient costs, not "
                                    f"--speed-method {self.speed_method}")
            if self.exchange is not None and (isinstance(self.exchange, bool) or not self.exchange > 0):
                raise HeadslimError(f"--exchange must be a number above 0, not {self.exchange!r}")
            if self.target_structures not in ("both", "heads", "ffn"):
                raise HeadslimError(f"--target-structures must be both, heads or ffn, not {self.target_structures!r}")
            self.prune, self.prune_ffn = 0, None  # the target decides
        ffn = self.prune_ffn is not None
        if ffn:
            from headslim.scoring.neurons import NEURON_METHODS

            check_prune_ffn(self.prune_ffn, self.min_neurons_per_layer)
            if self.ffn_method is None:
                # magnitude + repair kept MiniLM closest to dense at 30 % of its neurons: cosine 0.980 against
                # fisher's 0.953 and gradient's 0.956 (256 BBC articles, seed 0; bench/README.md)
                self.ffn_method = DEFAULT_FFN_METHOD
            if self.ffn_method not in NEURON_METHODS:
                raise HeadslimError(f"--ffn-method must be one of {', '.join(NEURON_METHODS)}, not {self.ffn_method!r}")
        if self.prune == 0 and (ffn or self.target_speedup is not None) and self._scores:
            pass  # FFN neurons only, or the target decides
        elif isinstance(self.prune, float) and not 0.0 < self.prune < 1.0:
            raise HeadslimError(f"--prune {self.prune} is outside (0, 1); give a fraction or a whole head count")
        elif isinstance(self.prune, int) and self.prune < 1:
            raise HeadslimError(f"--prune {self.prune}: give a fraction in (0, 1) or a head count >= 1 "
                                "(0 only with --prune-ffn)")


@dataclass
class ShrinkConfig(PruneConfig):
    """Settings of one ``shrink`` run: a :class:`PruneConfig` (what to remove, how) and the data, the
    quality check and the output around it; validated on construction.

    Args:
        runtime: where ``target_speedup`` is met: ``ort-cpu`` (default), ``ort-int8-cpu``, ``torch-cpu`` or ``cuda``.
        shapes: ``(batch, seq)`` pairs the target must be met at (default 1x128 and 32x128).
        threads: CPU threads for the latency tables and the timings (default: torch's).
        latency_min_time, measure_seconds: seconds per block for the latency tables, per model and
            shape for the whole-model timings of ``target_speedup``.
        calib: calibration source (``bbc-news``, a .txt, .csv or .jsonl file).
        calib_samples: at most this many calibration samples (a seeded random subset; None: all).
            ``"auto"`` (default): ``DEFAULT_CALIB_SAMPLES`` (384), or ``TARGET_CALIB_SAMPLES`` (1024)
            with ``target_speedup``.
        eval_data: held-out texts for the cosine check; default: ``bbc-news:test`` for ``bbc-news``,
            otherwise the last fifth of the calibration file (not used for scoring).
        max_length: tokens per sample; default 128, or the model's position limit when that is lower
            (a larger value than the limit is refused before any work).
        plan: a hand-written plan JSON to apply instead of scoring.
        device: where the model is scored, pruned, repaired and checked: ``cpu`` (default) or
            ``cuda[:N]`` (under ``torchrun``, ``cuda`` is each rank's ``cuda:LOCAL_RANK``); the output is
            the same checkpoint wherever it was computed (up to the device's arithmetic).
        device_map: ``auto``: the model over every GPU (and the CPU when they are not enough), whole
            layers per device (:mod:`headslim.placement`); instead of ``device``. ``max_memory``: what
            each device's weights may take (``"0=20GiB,1=20GiB,cpu=64GiB"``; default: 85 % of its free
            memory, the rest for activations), half for the model and half for repair's unpruned copy.
    """

    runtime: str = "ort-cpu"
    shapes: tuple = ((1, 128), (32, 128))
    threads: int | None = None
    latency_min_time: float = 0.2
    measure_seconds: float = 3.0
    calib: str = "bbc-news"
    calib_samples: int | str | None = "auto"
    eval_data: str | None = None
    eval_samples: int | None = 256
    max_length: int | None = None
    batch_size: int = 16
    text_column: str | None = None
    label_column: str | None = None
    plan: str | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    device: str = "cpu"
    device_map: str | None = None
    max_memory: str | None = None

    @property
    def _scores(self) -> bool:
        return self.plan is None

    def __post_init__(self):
        if self.target_speedup is not None:
            from headslim.speedup import check_runtime, parse_shapes

            if self.plan is not None:
                raise HeadslimError("--target-speedup and --plan exclude each other")
            check_runtime(self.runtime)
            self.shapes = parse_shapes(self.shapes)
            if self.threads is not None and self.threads < 1:
                raise HeadslimError(f"--threads must be >= 1, not {self.threads}")
        super().__post_init__()
        from headslim.placement import check_device_map, parse_max_memory

        check_device_map(self.device_map)
        if self.device_map is not None:
            if str(self.device).strip().lower() != "cpu":
                raise HeadslimError("--device-map places the model over the devices itself: leave out --device")
            if self.target_speedup is not None:
                raise HeadslimError("--target-speedup times models on --runtime; run it without --device-map")
        if self.max_memory is not None:
            if self.device_map is None:
                raise HeadslimError("--max-memory applies to --device-map")
            parse_max_memory(self.max_memory)
        if self.calib_samples == "auto":
            self.calib_samples = DEFAULT_CALIB_SAMPLES if self.target_speedup is None else TARGET_CALIB_SAMPLES
        if isinstance(self.calib_samples, str):
            raise HeadslimError(f"--calib-samples must be a number or 'auto', not {self.calib_samples!r}")
        for name in ("calib_samples", "eval_samples", "max_length", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HeadslimError(f"--{name.replace('_', '-')} must be >= 1, not {value}")


@dataclass
class ShrinkResult:
    out: str
    plan: dict
    heads_before: list[int]
    heads_after: list[int]
    params_before: int
    params_after: int
    neurons_before: list[int] | None = None
    neurons_after: list[int] | None = None
    speedup: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    repair: dict = field(default_factory=dict)
    device_map: dict | None = None  # with --device-map: blocks per device

    def to_dict(self) -> dict:
        return asdict(self)


def _split_eval(config: ShrinkConfig, calib):
    """Calibration and held-out evaluation data that do not overlap."""
    from headslim.data import BBC_NEWS, load_texts, sample

    if config.eval_data is not None:
        return calib, load_texts(config.eval_data, text_column=config.text_column)
    if calib.source == f"{BBC_NEWS}:train":
        return calib, load_texts(f"{BBC_NEWS}:test")
    if len(calib) < 5:
        return calib, calib  # too small to hold any out: checked in-sample, and said so
    cut = len(calib) - len(calib) // 5
    held = calib.subset(list(range(cut, len(calib))))
    return calib.subset(list(range(cut))), held


@dataclass
class _NextTokenBatches:
    """Re-iterable, sized calibration batches with next-token labels (causal LMs, ``task`` objective)."""

    base: object

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        from headslim.data import causal_lm_batches

        return causal_lm_batches(self.base)


def warn(message: str) -> None:
    """One ``headslim: warning:`` line on stderr: the run goes on, but the user should know."""
    print(f"headslim: warning: {message}", file=sys.stderr)


def check_spill(stream_memory, spill_dir) -> None:
    """One-line refusals of a spill budget (bytes) and directory: shared by ``shrink`` and ``--layerwise``."""
    if stream_memory is not None and (isinstance(stream_memory, bool) or not isinstance(stream_memory, int)
                                      or stream_memory < 0):
        raise HeadslimError(f"--stream-memory must be >= 0 GiB, not {stream_memory!r} bytes")
    if spill_dir is not None and not Path(spill_dir).is_dir():
        raise HeadslimError(f"--spill-dir {spill_dir} is not a directory")


def check_prune_ffn(prune_ffn, min_neurons_per_layer: int) -> None:
    """One-line refusals of an FFN target that is not a fraction in [0, 1) or a neuron count, and of a
    negative per-layer minimum (checked before any model is read)."""
    if isinstance(prune_ffn, bool) or not isinstance(prune_ffn, (int, float)) or prune_ffn < 0 \
            or (isinstance(prune_ffn, float) and prune_ffn >= 1.0):
        raise HeadslimError(f"--prune-ffn {prune_ffn!r}: give a fraction in [0, 1) or a neuron count")
    if min_neurons_per_layer < 0:
        raise HeadslimError("--min-neurons-per-layer must be >= 0")


def check_prune_target(prune: float | int, model_config, min_per_layer: int = 1) -> int:
    """Heads ``prune`` removes from the dense model of ``model_config``, checked from the config alone.

    Refused before any work: a count above the model's heads, a fraction so small that it rounds to
    no head (the output would be an unpruned copy), and a target the per-layer minimum forbids.
    """
    from headslim.io import dense_head_count
    from headslim.selection import heads_to_prune

    total = dense_head_count(model_config)
    n = heads_to_prune(prune, total)
    if n == 0:
        raise HeadslimError(f"--prune {prune!r} removes no head: {prune!r} of the model's {total} heads rounds to 0; "
                            "give a larger fraction or a head count")
    if min_per_layer < 0:
        raise HeadslimError("--min-heads-per-layer must be >= 0")
    layers, per_layer = int(model_config.num_hidden_layers), total // int(model_config.num_hidden_layers)
    floor = layers * min(min_per_layer, per_layer)
    if total - n < floor:
        raise HeadslimError(f"cannot remove {n} of {total} heads while keeping {min_per_layer} per layer: "
                            f"at most {total - floor} can go")
    return n


def check_finite_scores(scores, num_heads: list[int], method: str) -> None:
    """Refuse NaN/Inf head scores: sorting them gives an arbitrary plan that would still be saved."""
    import torch

    for layer, n in enumerate(num_heads):
        bad = (~torch.isfinite(scores[layer, :n])).nonzero()
        if len(bad):
            raise HeadslimError(f"head scores are not finite (layer {layer}, head {int(bad[0])}: "
                                f"{float(scores[layer, int(bad[0])])}) with --method {method}; "
                                "refusing to choose heads from them")


def _check_finite_outputs(value, which: str) -> None:
    """Refuse a quality check whose outputs are NaN/Inf: "cosine nan" is not a result."""
    import torch

    finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)
    if not finite:
        raise HeadslimError(f"the outputs of the {which} model are not finite (NaN or Inf) on the held-out texts; "
                            "nothing was written")


def _jsonable_scores(scores) -> list[list[float | None]]:
    return [[None if math.isinf(v) else round(v, 8) for v in row] for row in scores.tolist()]


OVERSHOOT = 1.05  # a corrected plan measured this far past the target at every shape is worth a step back


class Scores(NamedTuple):
    """The scores of one pass; each None where it was not scored.

    ``heads``: ``(layers, max_heads)``, ``neurons``: ``(layers, max_ffn_width)`` (higher = more
    important); ``together``: one set of ``fisher`` / ``gradient`` backward passes scored both;
    ``structures``: for a speed-up target, ``score_structures(..., method=config.speed_method,
    heads=True)`` of the calibration batches the costs are estimated from (with the head price
    fitted: ``headslim.tradeoff.split_heldout(calib)[0]``), reused for every target.
    """

    heads: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    together: bool = False
    structures: dict | None = None


def model_structure(model) -> tuple[list[int], list[int], list[list[int]] | None]:
    """``(heads per layer, FFN neurons per layer, kv map)`` of ``model``; the map (the KV head of every
    query head, per layer) only for grouped-query models, where selection must respect the groups, else None."""
    from headslim.arch import get_adapter, kv_maps

    adapter = get_adapter(model)
    kv_map = kv_maps(model)
    grouped = any(m != list(range(len(m))) for m in kv_map)
    return adapter.num_heads(model), adapter.num_neurons(model), kv_map if grouped else None


def base_provenance(seed: int, **context) -> dict:
    """The start of every plan's provenance: versions, time, ``context`` (source model, calibration), seed."""
    import torch
    import transformers

    return {"headslim_version": __version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **context, "seed": seed}


def _for_objective(model, calib_batches, objective: str):
    """The batches scorers see: a causal LM's ``task`` is its next token, so its batches get those labels."""
    from headslim.evaluate import detect_task

    if calib_batches is not None and objective == "task" and detect_task(model) == "causal-lm":
        return _NextTokenBatches(calib_batches)
    return calib_batches


def score_for(model, calib_batches, config: PruneConfig, *, heads: bool = True, neurons: bool = True) -> Scores:
    """The scores ``config`` asks for, as :class:`Scores`.

    Heads (with ``heads``; ``config.prune`` is the target of target-dependent methods) by
    ``config.method``, FFN neurons (with ``neurons`` and ``config.prune_ffn``) by ``config.ffn_method``;
    in the same backward passes (``together``) when one ``fisher`` / ``gradient`` method scores both.
    ``calib_batches`` are used as given (:func:`prune_model` adds a causal LM's next-token labels).
    """
    from headslim.scoring import score_heads
    from headslim.scoring.neurons import score_structures

    ffn = neurons and config.prune_ffn is not None
    together = heads and ffn and config.method == config.ffn_method and config.method in ("fisher", "gradient")
    common = dict(objective=config.objective, seed=config.seed, progress=config.progress)
    scores = neuron_scores = None
    if together:
        both = score_structures(model, calib_batches, method=config.method, heads=True,
                                min_per_layer=config.min_neurons_per_layer,
                                min_heads_per_layer=config.min_heads_per_layer, **common)
        scores, neuron_scores = both["attention"], both["mlp"]
    elif heads:
        scores = score_heads(model, calib_batches, method=config.method, prune=config.prune,
                             min_per_layer=config.min_heads_per_layer, step=config.step, **common)
    if ffn and neuron_scores is None:
        neuron_scores = score_structures(model, calib_batches, method=config.ffn_method,
                                         min_per_layer=config.min_neurons_per_layer, **common)["mlp"]
    return Scores(scores, neuron_scores, together)


def scored_per_target(method: str, kv_map) -> bool:
    """Whether ``method``'s head scores depend on the target in a way the selection sees, so that a
    pass at one target cannot serve another: ``learned`` (trained to an exact head count), and
    ``iterative`` on a grouped-query selection (``kv_map`` given: its group-constrained selections read
    the order of the heads still kept, which depends on where the path stopped). Other scores are an
    elimination path or a fixed ranking: the pass to the largest target answers every smaller one."""
    name = method.partition(":")[0]
    return name == "learned" or (name == "iterative" and kv_map is not None)


def shared_scores(model, calib_batches, config: PruneConfig, targets) -> Scores:
    """One scoring pass that serves :func:`prune_model` at every head target in ``targets``
    (``config.prune`` is ignored): head scores from the pass to the target that removes the most heads,
    FFN neuron scores (one ranking serves every ``prune_ffn``). Methods whose scores depend on the
    target (:func:`scored_per_target`) leave ``heads`` None: :func:`prune_model` scores them at each target.

    Example:
        >>> shared = shared_scores(model, calib, PruneConfig(), (0.3, 0.5))           # doctest: +SKIP
        >>> results = [prune_model(copy.deepcopy(model), calib, PruneConfig(prune=r), scores=shared,
        ...                        dense=model) for r in (0.3, 0.5)]                  # doctest: +SKIP
    """
    from headslim.selection import heads_to_prune

    num_heads, num_neurons, kv_map = model_structure(model)
    per_target = scored_per_target(config.method, None if config.gqa == "ragged" else kv_map)
    deepest = max(targets, key=lambda t: heads_to_prune(t, sum(num_heads)))
    scores = score_for(model, _for_objective(model, calib_batches, config.objective), replace(config, prune=deepest),
                       heads=not per_target)
    if scores.heads is not None:
        check_finite_scores(scores.heads, num_heads, config.method)
    if scores.neurons is not None:
        check_finite_scores(scores.neurons, num_neurons, config.ffn_method)
    return scores


def choose_plan(model, calib_batches, config: PruneConfig, num_heads: list[int], num_neurons: list[int],
                kv_map: list[list[int]] | None, provenance: dict, speed=None, scores: Scores | None = None):
    """Score the structures ``config`` prunes on ``calib_batches`` and select the plan.

    Heads and FFN neurons are chosen with separate budgets (``prune``, ``prune_ffn``); when both are
    scored by the same ``fisher`` / ``gradient`` method, one set of backward passes scores both.
    ``scores``: already computed (:func:`shared_scores`); only what they lack is scored here.
    """
    from headslim.selection import select_plan

    if speed is not None:
        return _choose_for_speed(model, calib_batches, config, num_heads, num_neurons, kv_map, provenance, speed,
                                 scores.structures if scores is not None else None)
    heads, ffn = config.prune != 0, config.prune_ffn is not None
    given = scores or Scores()
    need_heads, need_ffn = heads and given.heads is None, ffn and given.neurons is None
    fresh = score_for(model, calib_batches, config, heads=need_heads, neurons=need_ffn) \
        if need_heads or need_ffn else Scores()
    scores = Scores(fresh.heads if need_heads else given.heads, fresh.neurons if need_ffn else given.neurons,
                    fresh.together or given.together)
    if heads:
        check_finite_scores(scores.heads, num_heads, config.method)
        provenance.update(method=config.method, objective=config.objective, prune=config.prune,
                          min_heads_per_layer=config.min_heads_per_layer, scores=_jsonable_scores(scores.heads))
    else:
        provenance.update(method=None, objective=config.objective, prune=0)
    if heads and kv_map is not None:
        provenance.update(gqa=config.gqa)
    if ffn:
        check_finite_scores(scores.neurons, num_neurons, config.ffn_method)
        provenance.update(ffn_method=config.ffn_method, prune_ffn=config.prune_ffn,
                          min_neurons_per_layer=config.min_neurons_per_layer, scored_together=scores.together)
    # the whole provenance first: select_gqa copies the dict it is given
    return select_plan(scores.heads if heads else None, num_heads, prune=config.prune if heads else 0,
                       min_per_layer=config.min_heads_per_layer, kv_head_of_q=kv_map, gqa=config.gqa,
                       neuron_scores=scores.neurons, num_neurons=num_neurons,
                       prune_ffn=config.prune_ffn if ffn else None,
                       min_neurons_per_layer=config.min_neurons_per_layer, provenance=provenance)


def _speed_costs(model, batches, config: PruneConfig) -> dict:
    from headslim.scoring.neurons import score_structures

    return score_structures(model, batches, method=config.speed_method, heads=True, objective=config.objective,
                            seed=config.seed, progress=config.progress, min_per_layer=config.min_neurons_per_layer,
                            min_heads_per_layer=config.min_heads_per_layer)


def speed_scores(model, calib_batches, config: PruneConfig) -> Scores:
    """The costs a speed-up target spends, scored once for several targets: what :func:`prune_model`
    scores at each ``config.target_speedup`` itself (``config.speed_method`` costs of heads and neurons,
    on the calibration batches the head price is not fitted on when it is fitted), as ``Scores``."""
    from headslim.tradeoff import split_heldout

    batches = _for_objective(model, calib_batches, config.objective)
    if config.exchange is None and config.target_structures == "both":
        batches = split_heldout(batches)[0]
    return Scores(structures=_speed_costs(model, batches, config))


def _choose_for_speed(model, calib_batches, config: PruneConfig, num_heads, num_neurons, kv_map, provenance,
                      speed, scored: dict | None = None):
    """Heads and neurons in one ranking, spent to the speed-up target (``headslim.budget``)."""
    from headslim.budget import spend
    from headslim.plan import PrunePlan
    from headslim.tradeoff import fit_exchange, scaled, split_heldout

    if kv_map is not None:
        raise HeadslimError("--target-speedup does not plan grouped-query (GQA) models yet; use --prune and "
                            "--prune-ffn")
    kinds = {"both": ("attention", "mlp"), "heads": ("attention",), "ffn": ("mlp",)}[config.target_structures]
    fitting = config.exchange is None and len(kinds) == 2
    fit_batches, held_out, in_sample = split_heldout(calib_batches) if fitting else (calib_batches, None, False)
    method = config.speed_method
    if scored is None:
        scored = _speed_costs(model, fit_batches, config)
    check_finite_scores(scored["attention"], num_heads, method)
    check_finite_scores(scored["mlp"], num_neurons, method)

    def spent(alpha: float, targets):
        return spend(scaled(scored["sequences"], alpha), num_heads, num_neurons, speed.tables, targets,
                     rest_ms=speed.rest_ms, scale=speed.scale, min_heads_per_layer=config.min_heads_per_layer,
                     min_neurons_per_layer=config.min_neurons_per_layer, kinds=kinds)

    def plan_of(budget):
        return PrunePlan(num_heads, budget.kept_heads, provenance, num_neurons=num_neurons,
                         kept_neurons=budget.kept_neurons)

    targets, rounds = [config.target_speedup] * len(speed.tables), []
    exchange = {"alpha": config.exchange if config.exchange is not None else 1.0, "fitted": False}
    if fitting:
        # judged as the result will be: with the closed-form proxy of repair, or plainly pruned without repair
        alpha, trials = fit_exchange(model, scored.get("moments", {}) if config.repair else None,
                                     lambda a: plan_of(spent(a, targets)), held_out, objective=config.objective)
        exchange = {"alpha": alpha, "fitted": True, "held_out_batches": len(held_out), "in_sample": in_sample,
                    "compensated": config.repair and "moments" in scored, "trials": trials}
        if in_sample:
            warn(f"fewer than 4 calibration batches: the head price was chosen on the batches it was estimated "
                 f"from ({len(held_out)})")
    goal = config.target_speedup
    best = last = missed = None  # the met plan that prunes least; the last round; targets of the last miss
    for attempt in range(1 + config.speed_corrections):
        try:
            budget = spent(exchange["alpha"], targets)
        except HeadslimError:
            if not rounds:
                raise
            break  # a corrected target beyond what the tables allow: keep what was measured so far
        plan = plan_of(budget)
        measured = speed.trial(model, plan, goal)  # a miss is timed three times before it is believed
        met = all(m["speedup"] >= goal for m in measured)
        rounds.append({"targets": [round(t, 4) for t in targets], "estimated": [round(e, 4) for e in budget.estimated],
                       "measured": [round(m["speedup"], 4) for m in measured], "met": met,
                       "timings": max(m.get("timings", 1) for m in measured)})
        last = (plan, budget, measured)
        if met:
            best = last  # each later round is tried only because it removes less
            if missed is None or not all(m["speedup"] >= OVERSHOOT * goal for m in measured):
                break
            # met with room to spare at every shape after a raised target: step back halfway towards the miss
            targets = [(lo * hi) ** 0.5 for lo, hi in zip(missed, targets)]
            continue
        if best is not None:
            break  # stepping back missed: keep the met plan
        # the estimate missed on this machine: ask the tables for what the measurement says is needed
        missed = list(targets)
        targets = [t if m["speedup"] >= goal else max(t, 1.01 * goal * e / m["speedup"])
                   for t, e, m in zip(targets, budget.estimated, measured)]
    plan, budget, measured = best or last
    target = {**speed.describe(), **budget.to_dict(), "target": config.target_speedup, "rounds": rounds,
              "exchange": exchange}
    for shape, m in zip(target["shapes"], measured):
        shape.update(measured_dense_ms=round(m["dense_ms"], 4), measured_pruned_ms=round(m["pruned_ms"], 4),
                     measured_speedup=round(m["speedup"], 4))
    target["met"] = all(m["speedup"] >= config.target_speedup for m in measured)
    provenance.update(method=method, objective=config.objective, ffn_method=method,
                      min_heads_per_layer=config.min_heads_per_layer,
                      min_neurons_per_layer=config.min_neurons_per_layer, target_structures=config.target_structures,
                      speed_target=target, scores=_jsonable_scores(scored["attention"]))
    return plan


@dataclass
class PruneResult:
    """What :func:`prune_model` did.

    ``model``: the pruned model (the one given, changed in place); ``plan``: the plan applied, its
    provenance saying how it was chosen and, under ``repair``, what repair did; ``repair``: that
    report (``requested``, ``applied``, per-layer errors, the held-out ``check``, ``warning``:
    see :class:`headslim.repair.RepairReport`); ``seconds``: ``score`` (choosing the plan) and
    ``repair`` (surgery and repair).
    """

    model: torch.nn.Module
    plan: PrunePlan
    repair: dict
    seconds: dict = field(default_factory=dict)


def prune_model(model, calib_batches, config: PruneConfig, *, plan=None, scores: Scores | None = None, speed=None,
                repair_batches=None, dense=None, provenance: dict | None = None) -> PruneResult:
    """Choose a plan, remove its heads and FFN neurons from ``model`` and repair it: in memory, no files.

    The one pruning path: ``shrink`` is load + ``prune_model`` + quality check + save, and ``sweep``
    and the scripts in ``bench/`` call it once per target.

    Args:
        model: the dense model; it is pruned in place.
        calib_batches: tokenised calibration batches (:func:`headslim.data.batches`, re-iterable) for
            scoring and repair (a causal LM scored on its ``task`` gets next-token labels here); None
            when nothing needs them (a plan or every score given, no repair).
        config: :class:`PruneConfig` (a :class:`ShrinkConfig` is one).
        plan: apply this :class:`headslim.plan.PrunePlan` instead of choosing one (its provenance is kept).
        scores: :class:`Scores` already computed (:func:`shared_scores`: one pass for many targets);
            what ``config`` needs and they lack is scored here.
        speed: a :class:`headslim.speedup.SpeedTarget` (latency tables and timings on a runtime);
            required with ``config.target_speedup``.
        repair_batches: the batches repair fits on (default: ``calib_batches``).
        dense: an unpruned copy of ``model`` for repair to fit to (default: a deep copy made here
            when ``config.repair``, so two models are in memory while repair runs).
        provenance: where the plan's provenance starts (default :func:`base_provenance`); copied.

    Example:
        >>> calib = batches(load_texts("bbc-news:train"), tokenizer)                            # doctest: +SKIP
        >>> result = prune_model(model, calib, PruneConfig(prune=0.5, prune_ffn=0.3))          # doctest: +SKIP
        >>> result.plan.heads_after, result.repair["applied"]                                   # doctest: +SKIP
    """
    from headslim.layerwise import Spill
    from headslim.repair import repair
    from headslim.surgery import prune_heads

    t0 = time.perf_counter()
    if plan is None:
        if config.target_speedup is not None and speed is None:
            raise HeadslimError("--target-speedup needs the runtime's latency tables: pass speed=SpeedTarget(...)")
        num_heads, num_neurons, kv_map = model_structure(model)
        provenance = copy.deepcopy(provenance) if provenance is not None else base_provenance(config.seed)
        plan = choose_plan(model, _for_objective(model, calib_batches, config.objective), config, num_heads,
                           num_neurons, kv_map, provenance, speed if config.target_speedup is not None else None,
                           scores=scores)
    t_chosen = time.perf_counter()
    if config.repair and dense is None:
        dense = copy.deepcopy(model)  # repair fits to it: a second copy in memory
    prune_heads(model, plan)
    repair_info = {"applied": False, "requested": config.repair}
    if config.repair:
        with Spill(config.stream_memory, config.spill_dir) as spill:
            report = repair(model, dense, plan, calib_batches if repair_batches is None else repair_batches,
                            inputs=config.repair_inputs, ridge=config.repair_ridge, progress=config.progress,
                            spill=spill if config.stream_memory is not None else None)
        repair_info.update(report.to_dict())
        if config.stream_memory is not None:
            repair_info["spill"] = {"limit_bytes": config.stream_memory, "peak_on_disk_bytes": spill.peak_on_disk,
                                    "files": spill.files_written}
    plan.provenance["repair"] = repair_info
    return PruneResult(model, plan, repair_info,
                       {"score": t_chosen - t0, "repair": time.perf_counter() - t_chosen})


def shrink(model_path: str | Path, out: str | Path, config: ShrinkConfig | None = None) -> ShrinkResult | None:
    """Score heads, remove the least important, check quality on held-out text, write ``out``.

    Under ``torchrun`` (``headslim.distributed``) every rank scores and repairs on its share of the
    calibration batches; rank 0 checks quality, writes and returns the result, the others return None.

    Example:
        >>> result = shrink("all-MiniLM-L6-v2", "slim/", ShrinkConfig(prune=0.5))   # doctest: +SKIP
        >>> result.params_after < result.params_before                             # doctest: +SKIP
        True
    """
    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.evaluate import detect_task, perplexity
    from headslim.io import check_length, check_output_dir, load_config, load_model, resolve_model_path, save_pruned
    from headslim.plan import PLAN_FILE, PrunePlan, read_json
    from headslim.quality import count_parameters, embedding_cosine, embeddings, pooling_mode

    config = config or ShrinkConfig()
    t0 = time.perf_counter()
    src = resolve_model_path(model_path)
    check_output_dir(out, overwrite=config.overwrite, inputs=(src, config.plan, config.calib, config.eval_data))
    if (Path(src) / PLAN_FILE).is_file():
        raise HeadslimError(f"{src} is already pruned by headslim; shrink its dense original instead")
    from headslim.distributed import device_for

    device = device_for(config.device)
    if config.target_speedup is not None and device.type != "cpu":
        raise HeadslimError("--target-speedup times models on --runtime; run it with --device cpu")
    model_config = load_config(src)  # the checks that need only config.json come before any slow work
    max_length = check_length(model_config, config.max_length)
    if config.plan is None and config.prune != 0:
        check_prune_target(config.prune, model_config, config.min_heads_per_layer)
    if config.target_speedup is not None:
        for _, seq in config.shapes:
            check_length(model_config, seq, "--shapes sequence length")
    calib = load_texts(config.calib, text_column=config.text_column, label_column=config.label_column,
                       require_labels=config.objective == "task" and config.plan is None)
    calib, held_out = _split_eval(config, calib)
    calib = sample(calib, config.calib_samples, config.seed)
    held_out = sample(held_out, config.eval_samples, seed=0)  # same texts for every method and seed
    model = load_model(src, allow_pickle=config.allow_pickle)
    placement = None
    if config.device_map is not None:  # over several devices (accelerate); else all of it on one
        from headslim.placement import parse_max_memory, place, summary

        placement = summary(place(model, config.device_map, parse_max_memory(config.max_memory),
                                  copies=2 if config.repair else 1))
    else:
        model.to(device)
    tokenizer = load_tokenizer(src, pad=True)
    num_heads, num_neurons, kv_map = model_structure(model)
    causal = detect_task(model) == "causal-lm"
    params_before = count_parameters(model)

    t_loaded = time.perf_counter()

    provenance = base_provenance(config.seed, source_model=str(src),
                                 calibration={"source": calib.source, "sha256": calib.sha256, "n_samples": len(calib),
                                              "max_length": max_length},
                                 **({"device_map": placement} if placement is not None else {}))
    plan = speed = None
    if config.plan is not None:
        data = read_json(config.plan, "plan file")
        plan = PrunePlan.from_user(data, num_heads, kv_head_of_q=kv_map, num_neurons=num_neurons)
        plan.provenance = {**provenance, "method": "hand-written", "plan_file": str(config.plan)}
    elif config.target_speedup is not None:
        from headslim.speedup import SpeedTarget

        if kv_map is not None:
            raise HeadslimError("--target-speedup does not plan grouped-query (GQA) models yet; use --prune "
                                "and --prune-ffn")
        speed = SpeedTarget(src, model, tokenizer, config.target_speedup, runtime=config.runtime, shapes=config.shapes,
                            threads=config.threads, max_length=max_length, min_time=config.latency_min_time,
                            measure_seconds=config.measure_seconds, progress=config.progress)
    t_tables = time.perf_counter()

    pooling = pooling_mode(src)
    eval_batches = batches(held_out, tokenizer, batch_size=config.batch_size, max_length=max_length, model=model)
    if causal:
        dense_ppl, n_tokens = perplexity(model, eval_batches)
    else:
        dense_emb = embeddings(model, eval_batches, pooling=pooling)
    _check_finite_outputs(dense_ppl if causal else dense_emb, "dense")
    try:
        calib_batches = batches(calib, tokenizer, batch_size=config.batch_size, max_length=max_length, model=model)
        pruned = prune_model(model, calib_batches, config, plan=plan, speed=speed, provenance=provenance)
    finally:
        if speed is not None:
            speed.close()
    plan = pruned.plan
    from headslim import distributed

    if not distributed.is_main():  # under torchrun rank 0 checks quality and writes; the plan is the same
        distributed.barrier()
        return None
    if pruned.repair.get("warning"):
        warn(pruned.repair["warning"])
    if causal:
        pruned_ppl = perplexity(model, eval_batches)[0]
        _check_finite_outputs(pruned_ppl, "pruned")
        quality = {"perplexity_dense": dense_ppl, "perplexity_pruned": pruned_ppl,
                   "n_tokens": n_tokens, "n": len(held_out)}
    else:
        pruned_emb = embeddings(model, eval_batches, pooling=pooling)
        _check_finite_outputs(pruned_emb, "pruned")
        quality = embedding_cosine(dense_emb, pruned_emb)
        quality["pooling"] = pooling
    quality["source"] = held_out.source if held_out is not calib else f"{held_out.source} (in-sample)"
    plan.provenance["quality"] = quality
    speedup = plan.provenance.get("speed_target", {}) if speed is not None else {}
    try:
        save_pruned(model, out, plan, tokenizer=tokenizer, source=src, overwrite=config.overwrite)
    finally:
        distributed.barrier()
    t_end = time.perf_counter()
    return ShrinkResult(
        out=str(out), plan=plan.to_dict(), heads_before=num_heads, heads_after=plan.heads_after,
        neurons_before=num_neurons if plan.num_neurons is not None else None, neurons_after=plan.neurons_after,
        params_before=params_before, params_after=count_parameters(model), quality=quality,
        seconds={"load": round(t_loaded - t0, 2), "score": round(t_tables - t_loaded + pruned.seconds["score"], 2),
                 "repair": round(pruned.seconds["repair"], 2), "total": round(t_end - t0, 2),
                 **({"latency": round(t_tables - t_loaded, 2)} if speed is not None else {})},
        repair=pruned.repair, speedup=speedup, device_map=placement,
    )

"""``headslim sweep``: prune at several ratios or speed-up targets from one scoring pass; quality and latency at each.

Every ratio gets the plan ``shrink`` would choose with the same settings: the dense model is scored
once with ``shrink``'s scorers (``fisher`` by default; its scores are an elimination path, so one pass
serves every ratio), and every ratio is a :func:`headslim.selection.select_plan` of the same scores,
the selection ``shrink`` makes: grouped-query decoders by :func:`headslim.gqa.select_gqa` in the
``--gqa`` mode (``uniform`` by default), other models by :func:`headslim.selection.select_heads`, and
with ``--prune-ffn`` the FFN neurons by :func:`headslim.selection.select_neurons` (one fraction or
count for every ratio, or one per ratio). Scorers whose scores depend on the target are run once
per ratio instead, as ``shrink`` runs them at that ratio: ``learned`` (trained to an exact head count)
and, on grouped-query models with ``--gqa uniform`` or ``kv-groups``, ``iterative`` (its path to the
largest ratio answers a smaller ratio's top-k selection exactly, so it runs once for other models
and for ``--gqa ragged``, but the group-constrained selections read the order of the heads still
kept, which depends on where the path stopped): :func:`headslim.pipeline.shared_scores` decides.
Each ratio's plan is chosen, applied to a fresh copy of the dense model and repaired (unless
``--no-repair``) by :func:`headslim.pipeline.prune_model`, the path ``shrink`` takes. Quality is measured against the dense
model with :mod:`headslim.evaluate`; latency with one :mod:`headslim.bench` backend, dense and
pruned interleaved per ratio. Output: ``sweep.json``, ``sweep.md`` (the accuracy-vs-latency table)
and ``pareto.png`` (quality against latency, Pareto front marked).

With ``--target-speedup`` (a list of speed-ups) the sweep plans for each speed-up as ``shrink
--target-speedup`` does, instead of ratios: one :class:`headslim.speedup.SpeedTarget` (latency tables on
``--runtime``, calibrated on the dense model and its skeleton) and one scoring pass (``--speed-method``
costs of heads and FFN neurons, on the calibration batches ``shrink`` scores them on) serve every target;
each target's plan is chosen, applied and repaired by :func:`headslim.pipeline.prune_model`, the pruned
checkpoint is written and timed against the dense one on the runtime (interleaved, at every ``--shapes``
shape). A row records the target, the planner's estimates, the measured speed-ups, whether every shape met
the target, quality and the heads and neurons kept per layer; a target the tables say cannot be reached is
a row saying why. ``pareto.png`` then plots quality against measured speed-up, one panel per shape.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from headslim.args import add_ffn_arguments, add_speed_arguments, config_from_args, prune_arg
from headslim.data import TARGET_CALIB_SAMPLES
from headslim.errors import HeadslimError
from headslim.speedup import DEFAULT_SHAPES

SWEEP_EXAMPLE = """example:
  headslim sweep all-MiniLM-L6-v2 --prune 0.1,0.3,0.5,0.7 --calib bbc-news --out sweep-out/
  headslim sweep dense/ --prune 0.2,0.4 --calib texts.txt --data labelled.csv --backend ort-cpu --out sweep-out/
  headslim sweep all-MiniLM-L6-v2 --target-speedup 1.2,1.4,1.6,1.8,2.0,2.5 --runtime ort-cpu --out sweep/
"""

DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)
# the settings of speed-up targets (and of their latency tables): in sweep.json's settings only when used
SPEED_FIELDS = ("target_speedups", "target_structures", "speed_method", "exchange", "runtime", "shapes",
                "latency_min_time")


def _numbers(text: str, empty: str) -> tuple:
    try:
        values = tuple(prune_arg(v) for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not values:
        raise argparse.ArgumentTypeError(empty)
    return values


def _ratio_list(text: str) -> tuple:
    return _numbers(text, "give at least one ratio")


def _ffn_list(text: str) -> tuple:
    return _numbers(text, "give a fraction or neuron count, or one per ratio")


def _speedup_list(text: str) -> tuple:
    """``"1.2,1.5,2"`` -> ``(1.2, 1.5, 2.0)``; the values are checked by :class:`SweepConfig`."""
    values = []
    for v in filter(None, (t.strip() for t in text.split(","))):
        try:
            values.append(float(v))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a speed-up (e.g. 1.5)") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one speed-up")
    return tuple(values)


@dataclass
class SweepConfig:
    """Settings of one sweep; validated on construction.

    Args:
        ratios: fractions of all heads to remove (floats in (0, 1)) or head counts (ints).
        method, objective: scorer and objective (``headslim.scoring``; ``iterative:<base>`` too), run once
            (per ratio for the scorers whose scores depend on the target: see the module docstring).
        calib, calib_samples, calib_max_length: calibration data for the scoring pass (tokens per text:
            default 128, or the model's position limit when that is lower).
        min_heads_per_layer: heads every layer keeps.
        gqa: grouped-query decoders: ``uniform`` (default), ``kv-groups`` or ``ragged``, as ``shrink --gqa``;
            a fraction is rounded to the nearest head count the mode can remove (two ratios that round
            to the same count are refused).
        step: ``iterative``: share of all heads removed per round, as ``shrink --step``.
        prune_ffn: also remove FFN neurons: one fraction in [0, 1) or neuron count for every ratio,
            or a sequence with one per ratio; None (default) leaves the FFNs alone.
        ffn_method, min_neurons_per_layer: the FFN neurons' scorer (default ``magnitude``, as ``shrink``;
            scored once) and the neurons every layer keeps, as ``shrink``.
        eval: quality settings (:class:`headslim.evaluate.EvalConfig`).
        backend: one :mod:`headslim.bench` backend for latency, or ``none``.
        batch, seq: the latency shape.
        repair: re-fit each pruned model's output projections with :mod:`headslim.repair`, with
            ``shrink``'s defaults.
        save_models: keep every pruned checkpoint under ``OUT/models/``.
        target_speedups: speed-ups (each above 1) to plan for on ``runtime`` instead of ``ratios`` (then
            ignored; ``prune_ffn`` must be None), each as ``shrink --target-speedup`` plans it (see the
            module docstring); ``backend``, ``batch``, ``seq``, ``warmup``, ``min_runs``, ``max_runs`` and
            ``onnx_dense`` are then not used: the runtime times every result at ``shapes``, for
            ``min_seconds`` per model and shape.
        target_structures, speed_method, exchange, runtime, shapes: as ``shrink``'s (``both``, ``obs``,
            fitted, ``ort-cpu``, 1x128 and 32x128 by default); ``shapes`` also as ``"1x128,32x128"``.
        latency_min_time: seconds per block for the latency tables (as ``ShrinkConfig.latency_min_time``).
    """

    ratios: tuple = DEFAULT_RATIOS
    method: str = "fisher"
    objective: str = "dense"
    calib: str = "bbc-news"
    calib_samples: int | None = TARGET_CALIB_SAMPLES
    calib_max_length: int | None = None
    min_heads_per_layer: int = 1
    gqa: str = "uniform"
    step: float = 0.1
    prune_ffn: object = None
    ffn_method: str | None = None
    min_neurons_per_layer: int = 0
    seed: int = 0
    eval: object = None
    backend: str = "torch-sdpa-cpu"
    batch: int = 8
    seq: int = 128
    warmup: int = 5
    min_runs: int = 10
    min_seconds: float = 3.0
    max_runs: int = 100000
    threads: int | None = None
    onnx_dense: str | None = None
    repair: bool = True
    save_models: bool = False
    progress: bool = True
    target_speedups: tuple | None = None
    target_structures: str = "both"
    speed_method: str = "obs"
    exchange: float | None = None
    runtime: str = "ort-cpu"
    shapes: object = DEFAULT_SHAPES
    latency_min_time: float = 0.2

    def __post_init__(self):
        from headslim.bench import BACKENDS
        from headslim.evaluate import EvalConfig
        from headslim.scoring import OBJECTIVES

        self.eval = self.eval or EvalConfig()
        if self.target_speedups is not None:
            targets = self.target_speedups
            self.target_speedups = tuple(targets) if isinstance(targets, (list, tuple)) else (targets,)
            if not self.target_speedups:
                raise HeadslimError("--target-speedup needs at least one speed-up")
            if self.prune_ffn is not None:
                raise HeadslimError("--target-speedup decides what to remove: leave out --prune and --prune-ffn")
            self.ratios = ()  # the targets decide
        else:
            self._check_ratios()
        if self.objective not in OBJECTIVES:
            raise HeadslimError(f"unknown objective {self.objective!r}; available: {', '.join(OBJECTIVES)}")
        if self.prune_ffn is not None:
            values = tuple(self.prune_ffn) if isinstance(self.prune_ffn, (list, tuple)) else (self.prune_ffn,)
            if len(values) == 1:
                values = values * len(self.ratios)
            if len(values) != len(self.ratios):
                raise HeadslimError(f"--prune-ffn lists {len(values)} values for {len(self.ratios)} --prune ratios; "
                                    "give one value for every ratio or one per ratio")
            self.prune_ffn = values
        if self.backend != "none" and self.backend not in BACKENDS:
            raise HeadslimError(f"unknown backend {self.backend!r} for sweep (one of: none, {', '.join(BACKENDS)})")
        for name in ("batch", "seq", "min_runs", "calib_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise HeadslimError(f"--{name.replace('_', '-')} must be >= 1")
        if self.repair and importlib.util.find_spec("headslim.repair") is None:
            raise HeadslimError("repair needs headslim.repair, which is not part of this install; pass --no-repair")
        # method, --gqa, --step, the FFN and the speed-up settings are checked (and the FFN scorer defaulted,
        # the shapes parsed) by the very config shrink runs with, one per target: sweep accepts what shrink accepts
        first = self.shrink_config(self.targets[0])
        if self.target_speedups is not None:
            self.shapes = first.shapes
        else:
            self.ffn_method = first.ffn_method
        for target in self.targets[1:]:
            self.shrink_config(target)
        twice = next((t for i, t in enumerate(self.target_speedups or ()) if t in self.target_speedups[:i]), None)
        if twice is not None:  # one pruned model per target, as per ratio
            raise HeadslimError(f"--target-speedup lists {twice!r} twice; give every speed-up once")

    def _check_ratios(self) -> None:
        self.ratios = tuple(self.ratios)
        if not self.ratios:
            raise HeadslimError("--prune needs at least one ratio")
        for r in self.ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, float) and not 0 < r < 1) \
                    or (isinstance(r, int) and r < 1):
                raise HeadslimError(f"--prune {r!r}: give fractions in (0, 1) or head counts >= 1")
        twice = next((r for i, r in enumerate(self.ratios) if r in self.ratios[:i]), None)
        if twice is not None:  # one pruned model per ratio: a repeat would only collide at the end
            raise HeadslimError(f"--prune lists {twice!r} twice; give every ratio once")

    @property
    def targets(self) -> tuple:
        """What the sweep prunes to, one pruned model each: the speed-ups if given, else the ratios."""
        return self.target_speedups if self.target_speedups is not None else self.ratios

    def shrink_config(self, target):
        """The :class:`headslim.pipeline.ShrinkConfig` of ``shrink`` at ``target`` (a ratio, or with
        ``target_speedups`` a speed-up) with this sweep's settings (the ones that choose the plan: scoring,
        selection, calibration, and for a speed-up the runtime, shapes and timings)."""
        from headslim.pipeline import ShrinkConfig

        common = dict(method=self.method, min_neurons_per_layer=self.min_neurons_per_layer, objective=self.objective,
                      calib=self.calib, calib_samples=self.calib_samples, max_length=self.calib_max_length,
                      batch_size=self.eval.batch_size, min_heads_per_layer=self.min_heads_per_layer, seed=self.seed,
                      progress=self.progress, repair=self.repair, step=self.step, gqa=self.gqa)
        if self.target_speedups is not None:
            return ShrinkConfig(target_speedup=target, target_structures=self.target_structures,
                                speed_method=self.speed_method, exchange=self.exchange, runtime=self.runtime,
                                shapes=self.shapes, threads=self.threads, latency_min_time=self.latency_min_time,
                                measure_seconds=self.min_seconds, **common)
        prune_ffn = None if self.prune_ffn is None else self.prune_ffn[self.ratios.index(target)]
        return ShrinkConfig(prune=target, prune_ffn=prune_ffn, ffn_method=self.ffn_method, **common)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[bool]:
    """Which ``(latency, quality)`` points no other point beats on both (lower latency, better quality).

    Example:
        >>> pareto_front([(10, 0.9), (5, 0.8), (6, 0.7), (12, 0.9)])
        [True, True, False, False]
    """
    sign = 1 if higher_is_better else -1
    out = []
    for i, (lat, q) in enumerate(points):
        dominated = any(
            (l2 <= lat and sign * q2 >= sign * q) and (l2 < lat or sign * q2 > sign * q)
            for j, (l2, q2) in enumerate(points) if j != i
        )
        out.append(not dominated)
    return out


def _check_against_model(config: SweepConfig, model_config) -> SweepConfig:
    """``config`` with its lengths resolved, after the checks that need only the model's config.json:
    every ratio removes at least one head and no two the same number, and no length exceeds the
    position embeddings. Refused here, before the model loads, rather than after the scoring pass."""
    from dataclasses import replace

    from headslim.io import check_length, dense_head_count
    from headslim.pipeline import check_prune_target

    counts = {}
    for ratio in config.ratios:
        n = check_prune_target(ratio, model_config, config.min_heads_per_layer)
        if n in counts:
            raise HeadslimError(f"--prune {counts[n]!r} and {ratio!r} both remove {n} of the model's "
                                f"{dense_head_count(model_config)} heads; give ratios that differ by a head at least")
        counts[n] = ratio
    if config.target_speedups is not None:
        for _, seq in config.shapes:
            check_length(model_config, seq, "--shapes sequence length")
    elif config.backend != "none":
        check_length(model_config, config.seq, "--seq")
    return replace(config, calib_max_length=check_length(model_config, config.calib_max_length),
                   eval=replace(config.eval, max_length=check_length(model_config, config.eval.max_length)))


def sweep(model_dir, out, config: SweepConfig | None = None, *, overwrite: bool = False, log=print) -> dict:
    """Score once, prune at every ratio (or speed-up target), measure quality and latency, write the table
    and the plot.

    Args:
        model_dir: dense checkpoint dir (or ``all-MiniLM-L6-v2``).
        out: output dir (atomic): ``sweep.json``, ``sweep.md``, ``pareto.png`` and optionally ``models/``.
        config: :class:`SweepConfig`.
        log: progress lines (``None`` for silence).

    Example:
        >>> r = sweep("all-MiniLM-L6-v2", "sweep-out/", SweepConfig(ratios=(0.3, 0.5)))   # doctest: +SKIP
        >>> [row["prune"] for row in r["rows"]]                                          # doctest: +SKIP
        [0, 0.3, 0.5]
        >>> r = sweep("all-MiniLM-L6-v2", "sweep-out/", SweepConfig(target_speedups=(1.5, 2.0)))  # doctest: +SKIP
        >>> [[m["speedup"] for m in row["measured"]] for row in r["rows"][1:]]                  # doctest: +SKIP
    """
    from headslim.bench import fixed_threads
    from headslim.checkpoints import load_tokenizer
    from headslim.io import check_output_dir, load_config, load_model, resolve_model_path
    from headslim.plan import PLAN_FILE

    config = config or SweepConfig()
    log = log or (lambda *a, **k: None)
    src = resolve_model_path(model_dir)
    check_output_dir(out, overwrite=overwrite,
                     inputs=(src, config.calib, config.eval.data, config.eval.train_data, config.onnx_dense))
    if (Path(src) / PLAN_FILE).is_file():
        raise HeadslimError(f"{src} is already pruned by headslim; sweep its dense original instead")
    config = _check_against_model(config, load_config(src))
    dense = load_model(src)
    tokenizer = load_tokenizer(src, pad=True)  # as shrink: decoder tokenizers often have no pad token
    with fixed_threads(config.threads) as threads:
        result = _sweep(src, out, dense, tokenizer, threads, config, overwrite, log)
    log(f"wrote {out}")
    return result


def _check_targets(config: SweepConfig, num_heads: list[int], kv_map, num_neurons) -> None:
    """Refuse, before the scoring pass, every target the selection would refuse after it: a head count
    ``--gqa`` cannot remove exactly, a fraction it rounds to no head or two to the same count, an FFN
    target the model's widths or ``min_neurons_per_layer`` forbid. The selection itself runs, on zero
    scores (the feasible counts and the rounding do not depend on the scores)."""
    import torch

    from headslim.selection import select_neurons, select_plan

    total, seen = sum(num_heads), {}
    zeros = torch.zeros(len(num_heads), max(num_heads))
    for ratio in config.ratios:
        plan = select_plan(zeros, num_heads, prune=ratio, min_per_layer=config.min_heads_per_layer,
                           kv_head_of_q=kv_map, gqa=config.gqa)
        n = total - sum(plan.heads_after)
        if n == 0:
            raise HeadslimError(f"--prune {ratio!r} removes no head with --gqa {config.gqa}: the nearest head count "
                                "it can remove is 0; give a larger fraction")
        if n in seen:
            raise HeadslimError(f"--prune {seen[n]!r} and {ratio!r} both remove {n} of the model's {total} heads "
                                f"with --gqa {config.gqa} (a fraction is rounded to a head count it can remove); "
                                "give ratios further apart")
        seen[n] = ratio
    if config.prune_ffn is not None:
        zeros = torch.zeros(len(num_neurons), max(num_neurons))
        for value in dict.fromkeys(config.prune_ffn):
            select_neurons(zeros, num_neurons, prune=value, min_per_layer=config.min_neurons_per_layer)


def _sweep(src, out, dense, tokenizer, threads: int, config: SweepConfig, overwrite: bool, log) -> dict:
    from headslim import flops, report
    from headslim.bench import BACKENDS, machine_info
    from headslim.data import batches, load_texts, sample
    from headslim.evaluate import evaluate_model, prepare_reference, primary_metric
    from headslim.io import atomic_output_dir, save_pruned
    from headslim.pipeline import base_provenance, model_structure, prune_model, scored_per_target, shared_scores, speed_scores, warn
    from headslim.quality import count_parameters

    num_heads, num_neurons, kv_map = model_structure(dense)  # kv_map: grouped-query models only (as shrink)
    by_speed = config.target_speedups is not None
    ffn = config.prune_ffn is not None
    if by_speed and kv_map is not None:  # as shrink: refused before the latency tables are measured
        raise HeadslimError("--target-speedup does not plan grouped-query (GQA) models yet; use --prune and "
                            "--prune-ffn")
    if not by_speed:
        _check_targets(config, num_heads, kv_map, num_neurons)

    calib = sample(load_texts(config.calib, text_column=config.eval.text_column,
                              label_column=config.eval.label_column, require_labels=config.objective == "task"),
                   config.calib_samples, config.seed)
    calib_batches = batches(calib, tokenizer, batch_size=config.eval.batch_size, max_length=config.calib_max_length,
                            model=dense)
    speed = _speed_target(src, dense, tokenizer, threads, config, log) if by_speed else None
    try:
        if by_speed:
            scores = speed_scores(dense, calib_batches, config.shrink_config(config.target_speedups[0]))
            log(f"scored {sum(num_heads)} heads and {sum(num_neurons)} FFN neurons once ({config.speed_method}, "
                f"{len(calib)} calibration texts) for {len(config.target_speedups)} speed-up targets")
        else:
            # the scoring shrink does; a method whose scores depend on the target (never one that scores heads
            # and neurons together) leaves its heads to prune_model, which scores them at each ratio
            if scored_per_target(config.method, None if config.gqa == "ragged" else kv_map):
                log(f"scoring {sum(num_heads)} heads at each ratio ({config.method}: its scores depend on the target), "
                    + (f"FFN neurons once ({config.ffn_method}), " if ffn else "") + f"{len(calib)} calibration texts")
            else:
                log(f"scoring {sum(num_heads)} heads" + (f" and {sum(num_neurons)} FFN neurons" if ffn else "")
                    + f" once ({config.method}" + (f", FFN {config.ffn_method}" if ffn else "")
                    + f", {len(calib)} calibration texts)")
            scores = shared_scores(dense, calib_batches, config.shrink_config(config.ratios[0]), config.ratios)
        provenance = base_provenance(config.seed, source_model=str(src),
                                     calibration={"source": calib.source, "sha256": calib.sha256,
                                                  "n_samples": len(calib), "max_length": config.calib_max_length})
        ref = prepare_reference(dense, tokenizer, config.eval, model_dir=src)
        dense_shape = flops.LayerShape.from_model(dense)
        dense_metrics = evaluate_model(dense, ref)
        metric_name, dense_quality, higher = primary_metric(ref.task, dense_metrics)
        dense_row = {"heads": sum(num_heads), "heads_per_layer": num_heads, "params": count_parameters(dense),
                     "quality": dense_quality, "metrics": dense_metrics}
        if by_speed:
            rows = [{"target": 1.0, **dense_row, "neurons": sum(num_neurons), "neurons_per_layer": num_neurons,
                     "measured": None}]
        else:
            rows = [{"prune": 0, **dense_row, "ideal_speedup": 1.0, "latency": None}]
        if kv_map is not None:
            rows[0]["kv_heads_per_layer"] = [len(set(m)) for m in kv_map]
        if ffn:
            rows[0].update(prune_ffn=0, neurons=sum(num_neurons), neurons_per_layer=num_neurons)
        notes = []
        backend = BACKENDS[config.backend]() if config.backend != "none" and not by_speed else None
        with atomic_output_dir(out, overwrite=overwrite,
                               inputs=(src, config.calib, config.eval.data, config.eval.train_data,
                                       config.onnx_dense)) as tmp, \
                tempfile.TemporaryDirectory(prefix="headslim-sweep-") as scratch:
            models_dir = (tmp if config.save_models else Path(scratch)) / "models"
            if by_speed:
                _speed_rows(rows, speed, dense, calib_batches, scores, provenance, ref, models_dir, tokenizer,
                            src, config, metric_name, higher, log)
            else:
                dense_exports: dict = {}
                for ratio in config.ratios:
                    # the plan shrink would choose at this ratio, applied to a fresh copy of the dense weights
                    at_ratio = config.shrink_config(ratio)
                    done = prune_model(copy.deepcopy(dense), calib_batches, at_ratio, scores=scores, dense=dense,
                                       provenance=provenance)
                    pruned, plan = done.model, done.plan
                    row = {"prune": ratio, "heads": sum(plan.heads_after), "heads_per_layer": plan.heads_after,
                           "params": count_parameters(pruned)}
                    if kv_map is not None:
                        row["kv_heads_per_layer"] = [len(k) for k in plan.kv_heads_after]
                    if ffn:
                        row.update(prune_ffn=at_ratio.prune_ffn, neurons=sum(plan.neurons_after),
                                   neurons_per_layer=plan.neurons_after)
                    if config.repair:
                        row["repair"] = done.repair
                        if row["repair"].get("warning") and not any(r.get("repair", {}).get("warning") for r in rows):
                            warn(row["repair"]["warning"])  # the calibration data is the same for every ratio: once
                    metrics = evaluate_model(pruned, ref)
                    row.update(quality=primary_metric(ref.task, metrics)[1], metrics=metrics,
                               ideal_speedup=flops.compare(dense_shape, flops.LayerShape.from_model(pruned),
                                                           config.batch, config.seq)["ideal_speedup"],
                               kept_heads=plan.kept_heads, latency=None)
                    pruned_dir = models_dir / f"prune-{ratio:g}"
                    save_pruned(pruned, pruned_dir, plan, tokenizer=tokenizer, source=src)
                    del pruned
                    if backend is not None:
                        row["latency"] = _latency(backend, src, pruned_dir, dense, config, threads, dense_exports,
                                                  Path(scratch), notes)
                    rows.append(row)
                    lat = row["latency"]
                    log(f"prune {ratio:g}: {row['heads']} heads, " + (f"{row['neurons']} FFN neurons, " if ffn else "")
                        + f"{metric_name} {row['quality']:.4f}"
                        + (f", p50 {lat['pruned_p50_ms']:.2f} ms vs dense {lat['dense_p50_ms']:.2f} ms "
                           f"(x{lat['speedup_p50']:.2f})" if lat else ""))
                measured = [r for r in rows[1:] if r.get("latency")]
                if measured:  # the dense row's latency: median of its interleaved runs beside every ratio
                    dense_p50 = statistics.median(r["latency"]["dense_p50_ms"] for r in measured)
                    rows[0]["latency"] = {"dense_p50_ms": dense_p50, "pruned_p50_ms": dense_p50, "speedup_p50": 1.0}
                    points = [(r["latency"]["pruned_p50_ms"], r["quality"]) for r in rows]
                    for r, on in zip(rows, pareto_front(points, higher)):
                        r["pareto"] = on
            settings = {k: v for k, v in asdict(config).items() if k != "eval" and (by_speed or k not in SPEED_FIELDS)}
            result = {
                "kind": "headslim-sweep", "format_version": 1,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": str(src), "task": ref.task, "quality_metric": metric_name, "higher_is_better": higher,
                "calibration": f"{calib.source} ({len(calib)} texts)", "eval_data": ref.source, "threads": threads,
                "machine": machine_info(),
                "settings": {**settings, "ratios": list(config.ratios), "eval": asdict(config.eval)},
                "rows": rows, "notes": notes,
            }
            if by_speed:  # the latency tables and their calibration on the dense model and its skeleton
                result["speed"] = {k: v for k, v in speed.describe().items() if k != "target"}
            (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
            plot = report.sweep_plot(result, tmp / "pareto.png")
            (tmp / "sweep.md").write_text(report.sweep_markdown(result, plot_name=plot.name if plot else None))
    finally:
        if speed is not None:
            speed.close()
    return result


def _speed_target(src, dense, tokenizer, threads: int, config: SweepConfig, log):
    """The :class:`headslim.speedup.SpeedTarget` every target of the sweep shares, as ``shrink`` builds it."""
    from headslim.speedup import SpeedTarget

    shapes = ", ".join(f"{b}x{s}" for b, s in config.shapes)
    log(f"latency tables on {config.runtime} at {shapes}, calibrated on the dense model and its skeleton")
    return SpeedTarget(src, dense, tokenizer, max(config.target_speedups), runtime=config.runtime,
                       shapes=config.shapes, threads=threads, max_length=config.calib_max_length,
                       min_time=config.latency_min_time, measure_seconds=config.min_seconds, progress=config.progress)


def _speed_rows(rows: list, speed, dense, calib_batches, scores, provenance: dict, ref, models_dir: Path, tokenizer,
                src, config: SweepConfig, metric_name: str, higher: bool, log) -> None:
    """One row per speed-up target (appended to ``rows``, after the dense row): the plan ``shrink`` would
    choose, its quality, and the written checkpoint timed against the dense one on the runtime."""
    from headslim.evaluate import evaluate_model, primary_metric
    from headslim.io import save_pruned
    from headslim.pipeline import prune_model, warn
    from headslim.quality import count_parameters

    for target in config.target_speedups:
        try:
            done = prune_model(copy.deepcopy(dense), calib_batches, config.shrink_config(target), scores=scores,
                               speed=speed, dense=dense, provenance=provenance)
        except HeadslimError as e:  # beyond what the tables allow: say so, and go on with the other targets
            rows.append({"target": target, "unreachable": str(e)})
            log(f"target {target:g}: unreachable: {e}")
            continue
        pruned, plan = done.model, done.plan
        planned = plan.provenance["speed_target"]
        row = {"target": target, "heads": sum(plan.heads_after), "heads_per_layer": plan.heads_after,
               "neurons": sum(plan.neurons_after), "neurons_per_layer": plan.neurons_after,
               "params": count_parameters(pruned)}
        if config.repair:
            row["repair"] = done.repair
            if row["repair"].get("warning") and not any(r.get("repair", {}).get("warning") for r in rows):
                warn(row["repair"]["warning"])  # the calibration data is the same for every target: once
        metrics = evaluate_model(pruned, ref)
        row.update(quality=primary_metric(ref.task, metrics)[1], metrics=metrics, kept_heads=plan.kept_heads)
        pruned_dir = models_dir / f"target-{target:g}"
        save_pruned(pruned, pruned_dir, plan, tokenizer=tokenizer, source=src)
        del pruned
        measured = speed.measure(pruned_dir)  # a fresh interleaved run of what was written, not the plan's trial
        row.update(estimated=[s["estimated_speedup"] for s in planned["shapes"]],
                   planned={"measured": [s["measured_speedup"] for s in planned["shapes"]], "met": planned["met"],
                            "rounds": len(planned["rounds"]), "exchange": planned["exchange"]["alpha"]},
                   measured=[{"batch": m["batch"], "seq": m["seq"], "dense_ms": round(m["dense_ms"], 4),
                              "pruned_ms": round(m["pruned_ms"], 4), "speedup": round(m["speedup"], 4)}
                             for m in measured],
                   met=all(m["speedup"] >= target for m in measured))
        rows.append(row)
        log(f"target {target:g}: {row['heads']} heads, {row['neurons']} FFN neurons, {metric_name} "
            f"{row['quality']:.4f}, measured "
            + ", ".join(f"x{m['speedup']:.2f} at {m['batch']}x{m['seq']}" for m in row["measured"])
            + (" (met)" if row["met"] else " (NOT met)"))
    timed = [r for r in rows[1:] if r.get("measured")]
    # the dense row: per shape, the median of its interleaved runs beside every target (or of the calibration)
    dense_ms = [statistics.median(r["measured"][i]["dense_ms"] for r in timed) if timed else round(ms, 4)
                for i, ms in enumerate(speed.dense_ms)]
    rows[0]["measured"] = [{"batch": b, "seq": s, "dense_ms": ms, "pruned_ms": ms, "speedup": 1.0}
                           for (b, s), ms in zip(speed.shapes, dense_ms)]
    timed = [rows[0], *timed]
    fronts = [pareto_front([(-r["measured"][i]["speedup"], r["quality"]) for r in timed], higher)
              for i in range(len(speed.shapes))]
    for j, r in enumerate(timed):  # one flag per shape: the fronts of quality against measured speed-up may differ
        r["pareto"] = [front[j] for front in fronts]


def _latency(backend, dense_dir, pruned_dir: Path, dense, config: SweepConfig, threads: int, dense_exports: dict,
             scratch: Path, notes: list) -> dict | None:
    """Dense vs pruned latency at the sweep's shape on ``backend``; ``None`` (and a note) if it cannot run."""
    from headslim.bench import BackendUnavailable, BenchContext, measure_interleaved, summarize, synthetic_inputs
    from headslim.io import load_model

    pruned = load_model(pruned_dir)
    ctx = BenchContext(dirs={"dense": Path(dense_dir), "pruned": Path(pruned_dir)},
                       models={"dense": dense, "pruned": pruned}, threads=threads,
                       onnx={"dense": config.onnx_dense, "pruned": None}, tmp=scratch / pruned_dir.name)
    ctx._exports.update(dense_exports)  # export the dense model once, not once per ratio
    try:
        sessions = backend.prepare(ctx)
    except BackendUnavailable as e:
        note = f"{backend.name}: skipped: {e}"
        if note not in notes:
            notes.append(note)
        return None
    dense_exports.update({k: v for k, v in ctx._exports.items() if k == "dense"})
    try:
        ids, mask = synthetic_inputs(config.batch, config.seq, int(dense.config.vocab_size), config.seed)
        feeds = {role: s.feed(ids, mask) for role, s in sessions.items()}
        times = measure_interleaved(sessions, feeds, warmup=config.warmup, min_runs=config.min_runs,
                                    min_seconds=config.min_seconds, max_runs=config.max_runs)
    finally:
        for s in sessions.values():
            s.close()
    d, p = summarize(times["dense"], config.batch), summarize(times["pruned"], config.batch)
    return {"backend": backend.name, "dense_p50_ms": d["p50_ms"], "pruned_p50_ms": p["p50_ms"],
            "speedup_p50": d["p50_ms"] / p["p50_ms"], "dense": d, "pruned": p}


def add_parser(subparsers) -> None:
    from headslim.bench import add_timing_arguments
    from headslim.evaluate import add_data_arguments

    p = subparsers.add_parser("sweep", help="prune at several ratios or speed-up targets from one scoring pass; "
                                            "quality vs latency",
                              description=__doc__.split("\n\n")[0], epilog=SWEEP_EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="dense checkpoint dir, or 'all-MiniLM-L6-v2' for the bundled one")
    opt = p.add_argument_group("optional")
    opt.add_argument("--out", default="sweep-out",
                     help="output dir: sweep.json, sweep.md, pareto.png (default sweep-out; must not exist)")
    opt.add_argument("--prune", type=_ratio_list, default=None,
                     help="comma-separated fractions (or head counts) to remove (default 0.1,0.3,0.5,0.7)")
    opt.add_argument("--target-speedup", dest="target_speedups", type=_speedup_list, default=None, metavar="X[,X...]",
                     help="comma-separated speed-ups to plan for on --runtime instead of --prune/--prune-ffn, each "
                          "as shrink --target-speedup plans it: heads and FFN neurons ranked together by quality "
                          "cost per unit of latency saved (per-layer latency tables measured on the runtime once "
                          "and cached, costs scored once for every target), then each result timed against the "
                          "dense model side by side at every --shapes shape (for --min-time seconds)")
    add_speed_arguments(opt)
    opt.add_argument("--calib", default="bbc-news", help="calibration text for the one scoring pass (default bbc-news)")
    opt.add_argument("--calib-samples", type=int, default=TARGET_CALIB_SAMPLES,
                     help=f"calibration samples (default {TARGET_CALIB_SAMPLES})")
    opt.add_argument("--method", default="fisher",
                     help="scoring method, as shrink's (default fisher; iterative:<method> too)")
    opt.add_argument("--step", type=float, default=0.1,
                     help="iterative: share of all heads removed per round (default 0.1)")
    opt.add_argument("--gqa", default="uniform", choices=["uniform", "kv-groups", "ragged"],
                     help="grouped-query decoders, as shrink: uniform (default; equal query heads per kept KV "
                          "head, standard kernels apply), kv-groups (whole KV heads) or ragged (any query heads)")
    add_ffn_arguments(opt, _ffn_list, "also remove FFN neurons: one fraction in [0, 1) or neuron count for every "
                                      "ratio, or a comma-separated list with one per --prune ratio (default: the "
                                      "FFNs are left alone)")
    opt.add_argument("--objective", default="dense", choices=["dense", "task"])
    opt.add_argument("--min-heads-per-layer", type=int, default=1)
    opt.add_argument("--no-repair", dest="repair", action="store_false",
                     help="skip the output-projection repair after pruning (shrink's default is to repair)")
    add_data_arguments(opt)
    opt.add_argument("--backend", default="torch-sdpa-cpu",
                     help="latency backend of --prune ratios, or none (default torch-sdpa-cpu)")
    opt.add_argument("--batch", type=int, default=8, help="latency batch size (default 8)")
    opt.add_argument("--seq", type=int, default=128, help="latency sequence length (default 128)")
    add_timing_arguments(opt, warmup=5, min_time=3.0)  # one shape per ratio: shorter points than bench's
    opt.add_argument("--onnx-dense", help="ONNX export dir of the dense model for an ort backend")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--save-models", action="store_true", help="keep every pruned checkpoint under OUT/models/")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    opt.add_argument("--no-progress", dest="progress", action="store_false")
    opt.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from headslim import report
    from headslim.evaluate import eval_config_from_args

    if args.target_speedups is not None and (args.prune is not None or args.prune_ffn is not None):
        raise HeadslimError("--target-speedup decides what to remove: leave out --prune and --prune-ffn")
    config = config_from_args(SweepConfig, args, ratios=DEFAULT_RATIOS if args.prune is None else args.prune,
                              calib_max_length=args.max_length, eval=eval_config_from_args(args), min_runs=args.runs,
                              min_seconds=args.min_time)
    result = sweep(args.model, args.out, config, overwrite=args.overwrite, log=None if args.json else print)
    print(json.dumps(result, indent=2) if args.json else report.sweep_table(result))
    return 0

"""Speed-up targets: latency tables in, a measured dense-vs-pruned ratio out.

``shrink --target-speedup X --runtime R`` prices every structure with per-layer tables measured on
``R`` (``headslim.latency``), spends the target with ``headslim.budget``, and after surgery times the
dense and the pruned model on ``R`` in one interleaved run (``headslim.bench``), at every shape the
user named, so the output says target, estimate and measurement side by side.
"""

from __future__ import annotations

import re
from pathlib import Path

from headslim.errors import HeadslimError

# the runtime a latency table is measured on -> the bench backend that times whole models on it
RUNTIME_BACKENDS = {"torch-cpu": "torch-sdpa-cpu", "ort-cpu": "ort-cpu", "ort-int8-cpu": "ort-int8-cpu",
                    "cuda": "torch-sdpa-cuda"}
DEFAULT_SHAPES = ((1, 128), (32, 128))


def parse_shapes(text) -> tuple[tuple[int, int], ...]:
    """``"1x128,32x128"`` -> ``((1, 128), (32, 128))`` (batch x sequence length)."""
    if not isinstance(text, str):
        return tuple((int(b), int(s)) for b, s in text)
    shapes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise HeadslimError(f"--shapes: {item!r} is not BATCHxSEQ (e.g. 1x128,32x128)")
        shapes.append((int(match[1]), int(match[2])))
    if not shapes:
        raise HeadslimError("--shapes names no shape (e.g. 1x128,32x128)")
    return tuple(dict.fromkeys(shapes))


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIME_BACKENDS:
        raise HeadslimError(f"--runtime must be one of {', '.join(RUNTIME_BACKENDS)}, not {runtime!r}")
    return RUNTIME_BACKENDS[runtime]


def export_for(runtime: str, model_dir: Path, out: Path, max_length: int) -> Path | None:
    """A checkpoint's ONNX export (once per run) for the ORT runtimes; None for torch ones."""
    if not runtime.startswith("ort"):
        return None
    from headslim.export import export_onnx

    export_onnx(model_dir, out, optimize=False, quantize="int8" if runtime == "ort-int8-cpu" else None,
                prefer="unfused", max_length=max_length)
    return out


def time_pair(dense_dir, pruned_dir, runtime: str, shapes, *, threads: int | None, min_seconds: float = 3.0,
              onnx_dense=None, onnx_pruned=None) -> list[dict]:
    """Dense and pruned p50 latency at each shape, interleaved in one run on ``runtime``.

    Returns: one dict per shape with ``batch``, ``seq``, ``dense_ms``, ``pruned_ms``, ``speedup``.
    """
    from headslim.bench import BenchConfig, bench

    backend = check_runtime(runtime)
    result = {}
    for seq in dict.fromkeys(s for _, s in shapes):  # one run (models and sessions loaded once) per length
        batches = tuple(b for b, s in shapes if s == seq)
        config = BenchConfig(backends=backend, batches=batches, seqs=(seq,), threads=threads, warmup=5,
                             min_runs=10, min_seconds=min_seconds, onnx_dense=onnx_dense, onnx_pruned=onnx_pruned)
        run = bench(pruned_dir, dense_dir, config, log=None)
        entry = run["backends"][0]
        if entry["status"] != "ok":
            raise HeadslimError(f"cannot time the models on {runtime}: {entry['reason']}")
        for point in run["points"]:
            batch = point["batch"]
            if point.get("status") != "ok":
                raise HeadslimError(f"timing on {runtime} at batch {batch} x seq {seq} failed: {point.get('reason')}")
            result[(batch, seq)] = {"batch": batch, "seq": seq, "dense_ms": point["dense"]["p50_ms"],
                                    "pruned_ms": point["pruned"]["p50_ms"], "speedup": point["speedup_p50"]}
    return [result[s] for s in shapes]


def median_points(runs: list[list[dict]]) -> list[dict]:
    """Per shape, the median of several :func:`time_pair` results (speed-up: the median of the runs'
    speed-ups, not the ratio of medians), with ``timings`` = how many."""
    import statistics

    return [{"batch": points[0]["batch"], "seq": points[0]["seq"],
             **{k: statistics.median(p[k] for p in points) for k in ("dense_ms", "pruned_ms", "speedup")},
             "timings": len(points)} for points in zip(*runs)]


class SpeedTarget:
    """One ``--target-speedup`` run: the latency tables, calibrated on the whole model, and the final check.

    The per-layer tables time blocks alone; in a whole model a layer costs more (the graph's own
    reshapes, masks and norms between blocks) and the model has parts no pruning touches (embeddings,
    task head, the runtime's call). So the tables are calibrated at both ends, in one interleaved run
    on the runtime: the dense model, and its *skeleton* with every head and FFN neuron removed. A
    pruned model is then estimated as ``skeleton + scale * (layers' table time - the skeleton's
    table time)``, exact at both ends, with ``scale`` = (dense - skeleton) / (the same in table time).

    Args:
        src: the dense checkpoint dir; model, tokenizer: it, loaded; target: the speed-up asked for.
        runtime, shapes, threads: where and at which ``(batch, seq)`` shapes it is met.
        min_time: seconds per block for the latency tables; measure_seconds: per model and shape for
            the whole-model timings.
    """

    def __init__(self, src: Path, model, tokenizer, target: float, *, runtime: str, shapes, threads: int | None,
                 max_length: int, min_time: float = 0.2, measure_seconds: float = 3.0, progress: bool = True):
        import copy
        import tempfile

        from headslim.arch import get_adapter
        from headslim.flops import LayerShape
        from headslim.io import save_pruned
        from headslim.latency import measure_table
        from headslim.plan import PrunePlan
        from headslim.surgery import prune_heads

        check_runtime(runtime)
        self.src, self.target, self.runtime, self.shapes = Path(src), target, runtime, tuple(shapes)
        self.threads, self.measure_seconds, self.max_length = threads, measure_seconds, max_length
        self.tokenizer, self._measured = tokenizer, 0
        shape = LayerShape.from_model(model)
        self.tables = [measure_table(shape, runtime=runtime, batch=b, seq=s, threads=threads, min_time=min_time,
                                     progress=progress) for b, s in self.shapes]
        self._tmp = tempfile.TemporaryDirectory(prefix="headslim-speed-")
        tmp = Path(self._tmp.name)
        self.onnx_dense = export_for(runtime, self.src, tmp / "onnx-dense", max_length)
        adapter = get_adapter(model)
        heads, neurons = adapter.num_heads(model), adapter.num_neurons(model)
        skeleton = tmp / "skeleton"
        empty = PrunePlan(heads, [[] for _ in heads], num_neurons=neurons, kept_neurons=[[] for _ in neurons])
        save_pruned(prune_heads(copy.deepcopy(model), empty), skeleton, empty, tokenizer=tokenizer, source=self.src)
        onnx_skeleton = export_for(runtime, skeleton, tmp / "onnx-skeleton", max_length)
        ends = time_pair(self.src, skeleton, runtime, self.shapes, threads=threads, min_seconds=measure_seconds,
                         onnx_dense=self.onnx_dense, onnx_pruned=onnx_skeleton)
        self.dense_ms = [e["dense_ms"] for e in ends]
        self.skeleton_ms = [e["pruned_ms"] for e in ends]
        self.scale, self.rest_ms = [], []
        zeros = [0] * len(heads)
        for table, dense, bare in zip(self.tables, self.dense_ms, self.skeleton_ms):
            span = table.model_ms(heads, neurons) - table.model_ms(zeros, zeros)
            if not (dense > bare and span > 0):
                raise HeadslimError(f"on {runtime} the model with every head and FFN neuron removed was not faster than "
                                    f"the dense one ({bare:.2f} ms vs {dense:.2f} ms at batch {table.batch} x seq "
                                    f"{table.seq}): nothing to plan a speed-up with (a busy machine?)")
            scale = (dense - bare) / span
            self.scale.append(scale)
            self.rest_ms.append(bare - scale * table.model_ms(zeros, zeros))

    def measure(self, pruned_dir) -> list[dict]:
        """Dense vs the written pruned checkpoint on the runtime, interleaved, at every shape."""
        self._measured += 1  # one export dir per measurement: a sweep measures many
        onnx_pruned = export_for(self.runtime, Path(pruned_dir), Path(self._tmp.name) / f"onnx-pruned-{self._measured}",
                                 self.max_length)
        try:
            return time_pair(self.src, pruned_dir, self.runtime, self.shapes, threads=self.threads,
                             min_seconds=self.measure_seconds, onnx_dense=self.onnx_dense, onnx_pruned=onnx_pruned)
        finally:
            if onnx_pruned is not None:
                import shutil

                shutil.rmtree(onnx_pruned, ignore_errors=True)

    def trial(self, model, plan, goal: float | None = None) -> list[dict]:
        """Apply ``plan`` to a copy of ``model``, write it to scratch and time it against the dense model.

        Repair changes weight values, not shapes, so a plan is timed before it is repaired. With
        ``goal``, a miss is confirmed before anyone re-spends on it: when a shape's speed-up is below
        ``goal``, the plan is timed twice more and each shape gets the median of the three (its
        ``timings`` says 3). One slow reading on a busy machine otherwise sends the correction far
        past the target: on this project's 2-core VM, beside a CI run, a 1.5x plan of
        all-MiniLM-L6-v2 read 1.18x at batch 1 (quiet, plans of its width read 1.56-1.65x), and the
        corrected plan measured 2.03x.
        """
        import copy
        import shutil

        from headslim.io import save_pruned
        from headslim.surgery import prune_heads

        out = Path(self._tmp.name) / f"trial-{self._measured + 1}"
        save_pruned(prune_heads(copy.deepcopy(model), plan), out, plan, tokenizer=self.tokenizer, source=self.src)
        try:
            first = self.measure(out)
            if goal is None or all(m["speedup"] >= goal for m in first):
                return first
            return median_points([first, self.measure(out), self.measure(out)])
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def describe(self) -> dict:
        return {"target": self.target, "runtime": self.runtime, "shapes": [list(s) for s in self.shapes],
                "tables": [t.cache_path or t.key for t in self.tables],
                "calibration": {"dense_ms": [round(d, 4) for d in self.dense_ms],
                                "skeleton_ms": [round(b, 4) for b in self.skeleton_ms],
                                "scale": [round(a, 4) for a in self.scale]}}

    def close(self) -> None:
        self._tmp.cleanup()

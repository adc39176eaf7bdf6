"""``headslim bench``: latency and throughput of a pruned model against its dense original.

Method (see ``bench/README.md``): every backend loads the dense and the pruned model; for every
``batch x seq`` point both get the same warm-up, then their timed runs alternate (dense, pruned,
pruned, dense, ...) in the same process so machine drift hits both alike; a point runs at least
``min_runs`` repetitions and at least ``min_seconds``. CUDA runs are timed with CUDA events and a
synchronisation, CPU runs with ``time.perf_counter``. Thread counts are fixed (``torch.set_num_threads``,
ORT ``intra_op_num_threads``) and recorded with the machine, the versions and the settings.
Beside every measurement stands the analytic cost (:mod:`headslim.flops`): FLOPs of the dense and
the pruned encoder and the ideal speed-up they imply.

Backends (``--backend``, comma-separated; aliases ``torch``, ``ort``, ``cuda``, ``all``):
    torch-eager-cpu, torch-sdpa-cpu, torch-eager-cuda, torch-sdpa-cuda: PyTorch with that attention code.
    ort-cpu, ort-opt-cpu, ort-int8-cpu: ONNX Runtime on CPU with the exporter's plain fp32 graph, its
        ORT-fused (optimised) graph and its int8 graph (the files ``export_report.json`` names, else
        ``model.onnx``, ``model_optimized.onnx``, ``model_quantized.onnx``); ort-cuda: the plain graph
        on the CUDA provider.
    triton-cuda: the PyTorch model with ``headslim.kernels.enable(model, backend="triton")`` (Triton
        attention for uneven heads), when that module, triton and a GPU exist.
A backend that cannot run is reported with a one-line reason and the others go on.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from headslim.args import config_from_args
from headslim.checkpoints import default_baseline, has_tokenizer, load_pair
from headslim.errors import HeadslimError, first_line

BENCH_EXAMPLE = """example:
  headslim bench slim/ --baseline all-MiniLM-L6-v2 --backend torch,ort --batch 1,8,32 --seq 128,512 --out bench-out/
  headslim bench slim-llama/ --baseline my-llama/ --task causal-lm --backend torch,ort-cpu --batch 1,8 --prompt 128 --new-tokens 32
  headslim bench slim/ --backend ort-cpu --onnx-dense dense-onnx/ --onnx-pruned slim-onnx/ --threads 4
"""

ROLES = ("dense", "pruned")
ONNX_FILES = {"fp32": "model.onnx", "optimized": "model_optimized.onnx", "int8": "model_quantized.onnx"}
# headslim export's export_report.json maps graph kinds to files; the variant each backend runs:
EXPORT_REPORT, EXPORT_KINDS = "export_report.json", {"fp32": "fp32-unfused", "optimized": "fp32-fused", "int8": "int8"}
# What headslim knows how to feed an encoder graph (synthetic ids, a full mask, zero segment ids).
FEEDABLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class BackendUnavailable(Exception):
    """A backend cannot run here (missing package, no GPU, no ONNX file); the message says why."""


# ----------------------------------------------------------------------------------------------
# Sessions: one loaded model on one backend, callable on a prepared feed.


class Session:
    """One model on one backend. ``feed`` prepares inputs once; ``timed`` runs once and returns seconds."""

    device = "cpu"

    def feed(self, input_ids, attention_mask):
        raise NotImplementedError

    def __call__(self, feed) -> None:
        raise NotImplementedError

    def timed(self, feed) -> float:
        start = time.perf_counter()
        self(feed)
        return time.perf_counter() - start

    def close(self) -> None:
        """Drop references so the next backend does not share memory with this one."""


class TorchSession(Session):
    """A PyTorch model in inference mode on ``device``; CUDA runs are timed with CUDA events."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device

    def feed(self, input_ids, attention_mask):
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def __call__(self, feed) -> None:
        import torch

        with torch.inference_mode():
            self.model(**feed)

    def timed(self, feed) -> float:
        if self.device != "cuda":
            return super().timed(feed)
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self(feed)
        end.record()
        end.synchronize()  # the kernels run asynchronously: wait for the end event before reading it
        return start.elapsed_time(end) / 1000.0

    def close(self) -> None:
        self.model = None


def ort_options(threads: int):
    """The ``SessionOptions`` every timed ORT session gets: fixed thread counts, sequential execution,
    and a thread pool that stops spinning when its run ends (``session.force_spinning_stop``).

    Timings here alternate two or more sessions, each with its own intra-op pool. By default a pool
    spins on after its run, so the next session's run shares the cores with it: measured on the
    2-core development machine (all-MiniLM-L6-v2, ORT CPU, batch 1 x seq 128), the dense model took
    33-43 ms per run when alternated with a pruned one and 16.3 ms alone; with spinning stopped at the
    end of each run, 16.2-17.6 ms alternated and 16.3 ms alone. Spinning within a run is unchanged.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OrtSession(Session):
    """An ONNX Runtime ``InferenceSession`` with :func:`ort_options`; ``run`` returns host arrays, so
    wall-clock time includes the device-to-host copy on CUDA (as a user of ``session.run`` sees it)."""

    def __init__(self, path: Path, providers: list[str], threads: int, device: str):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), sess_options=ort_options(threads), providers=providers)
        except Exception as e:
            raise HeadslimError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None
        self.path, self.device = Path(path), device
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}

    def feed(self, input_ids, attention_mask):
        import numpy as np

        arrays = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                  "token_type_ids": np.zeros(tuple(input_ids.shape), dtype=np.int64)}
        return {name: arrays[name].astype(np.int32 if "int32" in kind else np.int64)
                for name, kind in self.inputs.items()}

    def __call__(self, feed) -> None:
        self.session.run(None, feed)

    def outputs(self, feed):
        return self.session.run(None, feed)

    def close(self) -> None:
        self.session = None


# ----------------------------------------------------------------------------------------------
# Backends: turn (dense dir, pruned dir) into two sessions, or say why they cannot.


@dataclass
class BenchContext:
    """What a backend needs to load its sessions.

    Args:
        dirs: ``{"dense": Path, "pruned": Path}`` checkpoint dirs.
        models: the two models loaded on CPU (for ONNX checks and the analytic cost).
        threads: CPU threads for every runtime.
        onnx: ``{"dense": path or None, "pruned": ...}``: an export dir or an ``.onnx`` file.
        tmp: scratch dir (ONNX exports made on the fly go here).
        task: ``forward`` or ``causal-lm`` (decoder graphs with a KV cache: :mod:`headslim.bench_decoder`).
    """

    dirs: dict
    models: dict
    threads: int
    onnx: dict = field(default_factory=lambda: {"dense": None, "pruned": None})
    tmp: Path | None = None
    task: str = "forward"
    _exports: dict = field(default_factory=dict)


def _cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    return None


class TorchBackend:
    """PyTorch with ``attn_implementation`` = ``eager`` or ``sdpa`` on ``cpu`` or ``cuda``."""

    kind = "torch"

    def __init__(self, name: str, attn: str, device: str, dtype: str = "float32"):
        self.name, self.attn, self.device, self.dtype = name, attn, device, dtype

    def settings(self) -> dict:
        return {"runtime": "torch", "attn_implementation": self.attn, "device": self.device, "dtype": self.dtype}

    def prepare(self, ctx: BenchContext) -> dict:
        import torch

        from headslim.io import load_model

        if self.device == "cuda" and (reason := _cuda_reason()):
            raise BackendUnavailable(reason)
        if self.device == "cpu" and self.dtype == "float16":
            raise BackendUnavailable("float16 is a GPU format: PyTorch's CPU kernels for it are slow or missing "
                                     "(use --dtype bfloat16 or float32 on CPU)")
        sessions = {}
        for role in ROLES:
            try:
                model = load_model(ctx.dirs[role], attn_implementation=self.attn)
            except HeadslimError as e:
                raise BackendUnavailable(f"cannot load with attn_implementation={self.attn}: {e}") from None
            used = getattr(model.config, "_attn_implementation", None)
            if used != self.attn:  # transformers may fall back silently; then this is not the backend named
                raise BackendUnavailable(f"the {role} model runs attn_implementation={used}, not {self.attn}")
            # the checkpoint's own dtype is not what is timed: every model runs in the dtype asked for
            sessions[role] = TorchSession(model.to(device=self.device, dtype=getattr(torch, self.dtype)), self.device)
        return sessions


class TritonBackend(TorchBackend):
    """The PyTorch model with ``headslim.kernels.enable(model, backend="triton")`` on a CUDA GPU."""

    kind = "triton"

    def __init__(self, name: str, dtype: str = "float32"):
        super().__init__(name, "eager", "cuda", dtype)

    def settings(self) -> dict:
        return {"runtime": "torch+headslim.kernels", "kernel_backend": "triton", "device": "cuda", "dtype": self.dtype}

    def prepare(self, ctx: BenchContext) -> dict:
        if reason := _cuda_reason():
            raise BackendUnavailable(reason)
        if importlib.util.find_spec("headslim.kernels") is None:
            raise BackendUnavailable("headslim.kernels is not part of this install")
        kernels = importlib.import_module("headslim.kernels")
        if not kernels.triton_available():
            raise BackendUnavailable("the triton package is not installed")
        sessions = super().prepare(ctx)
        for session in sessions.values():
            try:
                session.model = kernels.enable(session.model, backend="triton")
            except HeadslimError as e:
                raise BackendUnavailable(f"headslim.kernels cannot run this model: {e}") from None
        return sessions


class OrtBackend:
    """ONNX Runtime with one of the exporter's files (``variant`` fp32 / optimized / int8)."""

    kind = "ort"

    def __init__(self, name: str, variant: str, device: str):
        self.name, self.variant, self.device = name, variant, device

    def settings(self) -> dict:
        provider = "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
        return {"runtime": "onnxruntime", "variant": self.variant, "file": ONNX_FILES[self.variant],
                "device": self.device, "provider": provider}

    def prepare(self, ctx: BenchContext) -> dict:
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailable("onnxruntime is not installed (pip install 'headslim[onnx]')")
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
            if reason := _cuda_reason():
                raise BackendUnavailable(reason)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        sessions = {}
        for role in ROLES:
            path = onnx_file(ctx, role, self.variant)
            if ctx.task == "causal-lm":
                from headslim.bench_decoder import OrtDecoderSession, check_decoder_graph

                session = OrtDecoderSession(path, providers, ort_options(ctx.threads), self.device)
                check_decoder_graph(session, ctx.models[role], ctx.dirs[role], exact=self.variant != "int8")
            else:
                session = OrtSession(path, providers, ctx.threads, self.device)
                check_onnx(session, ctx.models[role], ctx.dirs[role], exact=self.variant != "int8")
            sessions[role] = session
        return sessions


def _export_on_the_fly(ctx: BenchContext, role: str) -> Path:
    """Export ``role``'s checkpoint with :mod:`headslim.export` into the scratch dir (once per run)."""
    if role in ctx._exports:
        if isinstance(ctx._exports[role], BackendUnavailable):  # failed once: the next ORT backend skips too
            raise ctx._exports[role]
        return ctx._exports[role]
    if importlib.util.find_spec("headslim.export") is None:
        raise BackendUnavailable(f"no ONNX file for the {role} model: pass --onnx-{role} "
                                 "(an export dir or .onnx file); headslim export is not installed")
    export = importlib.import_module("headslim.export")
    out = Path(ctx.tmp or tempfile.mkdtemp()) / f"onnx-{role}"
    max_length = min(128, max_sequence(ctx.models[role].config))  # validation texts must fit the positions
    try:
        export.export_onnx(ctx.dirs[role], out, optimize=True, quantize="int8", prefer="unfused",
                           max_length=max_length)
    except Exception as e:  # the exporter's own errors and anything it did not foresee: skip ORT, go on
        ctx._exports[role] = BackendUnavailable(f"exporting the {role} model to ONNX failed: {first_line(e)}")
        raise ctx._exports[role] from None
    ctx._exports[role] = out
    return out


def onnx_file(ctx: BenchContext, role: str, variant: str) -> Path:
    """The ONNX file of ``variant`` for ``role``: from ``--onnx-ROLE`` (dir or file), else exported now."""
    source = ctx.onnx.get(role)
    wanted = ONNX_FILES[variant]
    if source is None:
        source = _export_on_the_fly(ctx, role)
    source = Path(source)
    if source.is_file():
        if variant != "fp32":
            raise BackendUnavailable(f"--onnx-{role} is a single file; {wanted} needs an export dir "
                                     f"(headslim export {ctx.dirs[role]} --out DIR --optimize --quantize int8)")
        return source
    if not source.is_dir():
        raise HeadslimError(f"--onnx-{role} {source} does not exist")
    report = source / EXPORT_REPORT
    if report.is_file():  # headslim export names its graphs there (model.onnx may be the fused graph)
        try:
            graphs = json.loads(report.read_text()).get("graphs", {})
        except json.JSONDecodeError:
            raise HeadslimError(f"{report} is not valid JSON") from None
        if EXPORT_KINDS[variant] not in graphs:
            fusion = json.loads(report.read_text()).get("fusion") or {}
            why = f" ({fusion['reason']})" if variant == "optimized" and fusion.get("reason") else ""
            raise BackendUnavailable(f"the export in {source} has no {EXPORT_KINDS[variant]} graph{why} "
                                     "(headslim export ... --optimize --quantize int8 writes every kind)")
        wanted = graphs[EXPORT_KINDS[variant]]
    if not (source / wanted).is_file():
        raise BackendUnavailable(f"no {wanted} in {source} (headslim export ... --optimize --quantize int8 writes it)")
    return source / wanted


def check_onnx(session: OrtSession, model, model_dir, *, exact: bool = True) -> None:
    """Refuse an ONNX graph that does not take the model's inputs or does not compute its output.

    Inputs must be ``input_ids`` plus inputs the tokenizer produces; the first output must have the
    model's output shape on a short probe and (for non-quantised graphs) its values.
    """
    import numpy as np
    import torch

    allowed = set(_tokenizer_inputs(model_dir))
    names = list(session.inputs)
    unknown = [n for n in names if n not in allowed]
    if "input_ids" not in names or unknown:
        raise HeadslimError(f"{session.path}: its inputs {names} do not match what the tokenizer of {model_dir} "
                            f"produces ({', '.join(sorted(allowed))})")
    for name, kind in session.inputs.items():
        if "int" not in kind:
            raise HeadslimError(f"{session.path}: input {name} is {kind}, expected integer token ids")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, int(model.config.vocab_size), (2, 8), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)
    try:
        got = session.outputs(session.feed(ids, mask))[0]
    except Exception as e:
        raise HeadslimError(f"{session.path} fails on a (2, 8) input: {first_line(e)}") from None
    with torch.inference_mode():
        ref = main_output(model(input_ids=ids, attention_mask=mask)).float().numpy()  # (B, T, d) or (B, C)
    if tuple(got.shape) != tuple(ref.shape):
        raise HeadslimError(f"{session.path}: output shape {tuple(got.shape)} does not match the model's "
                            f"{tuple(ref.shape)}: not an export of {model_dir}")
    if exact:
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-6))
        if err > 1e-3:  # fp32 runtimes agree to ~1e-6; another model's output differs at ~1e-1
            raise HeadslimError(f"{session.path} does not compute what {model_dir} computes "
                                f"(relative difference {err:.2g}): export it from that checkpoint")


def main_output(out):
    """The tensor an export's first output stands for: logits when the model has a head, else hidden states."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]


def _tokenizer_inputs(model_dir) -> list[str]:
    """Inputs the checkpoint's tokenizer produces; every feedable input when it has no tokenizer."""
    if not has_tokenizer(model_dir):
        return list(FEEDABLE_INPUTS)  # tiny test checkpoints and bare exports have no tokenizer files
    try:
        from transformers import AutoTokenizer

        names = list(AutoTokenizer.from_pretrained(str(model_dir)).model_input_names)
    except Exception:  # an unreadable tokenizer: accept what headslim can feed
        return list(FEEDABLE_INPUTS)
    return [n for n in names if n in FEEDABLE_INPUTS] or list(FEEDABLE_INPUTS)


BACKENDS = {
    "torch-eager-cpu": lambda: TorchBackend("torch-eager-cpu", "eager", "cpu"),
    "torch-sdpa-cpu": lambda: TorchBackend("torch-sdpa-cpu", "sdpa", "cpu"),
    "torch-eager-cuda": lambda: TorchBackend("torch-eager-cuda", "eager", "cuda"),
    "torch-sdpa-cuda": lambda: TorchBackend("torch-sdpa-cuda", "sdpa", "cuda"),
    "ort-cpu": lambda: OrtBackend("ort-cpu", "fp32", "cpu"),
    "ort-opt-cpu": lambda: OrtBackend("ort-opt-cpu", "optimized", "cpu"),
    "ort-int8-cpu": lambda: OrtBackend("ort-int8-cpu", "int8", "cpu"),
    "ort-cuda": lambda: OrtBackend("ort-cuda", "fp32", "cuda"),
    "triton-cuda": lambda: TritonBackend("triton-cuda"),
}
DTYPES = ("float32", "float16", "bfloat16")  # of the torch backends (--dtype); ORT runs its graph's precision
# what is timed: one forward pass (encoders, classifiers) or prefill + decode steps (causal LMs)
TASKS = ("auto", "forward", "causal-lm")


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _ort_cuda_present() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def expand_backends(spec) -> list[str]:
    """Backend names from a comma-separated list with aliases; an unknown name is a one-line error.

    ``torch`` = eager and SDPA on CPU (and on CUDA when a GPU is present); ``ort`` = ONNX Runtime CPU
    fp32 / optimised / int8 (and CUDA when its provider is installed); ``cuda`` = every CUDA backend;
    ``all`` = every backend (those that cannot run here are reported as skipped).

    Example:
        >>> expand_backends("ort-cpu,torch-sdpa-cpu")
        ['ort-cpu', 'torch-sdpa-cpu']
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item == "torch":
            group = ["torch-eager-cpu", "torch-sdpa-cpu"] + (["torch-eager-cuda", "torch-sdpa-cuda"] if _gpu_present() else [])
        elif item == "ort":
            group = ["ort-cpu", "ort-opt-cpu", "ort-int8-cpu"] + (["ort-cuda"] if _ort_cuda_present() else [])
        elif item == "cuda":
            group = [n for n in BACKENDS if n.endswith("-cuda")]
        elif item == "all":
            group = list(BACKENDS)
        elif item in BACKENDS:
            group = [item]
        else:
            raise HeadslimError(f"unknown backend {item!r}; available: {', '.join(BACKENDS)} "
                                "(aliases: torch, ort, cuda, all)")
        names += [n for n in group if n not in names]
    if not names:
        raise HeadslimError("--backend names no backend")
    return names


# ----------------------------------------------------------------------------------------------
# Measurement.


def measure_interleaved(sessions: dict, feeds: dict, *, warmup: int, min_runs: int, min_seconds: float,
                        max_runs: int) -> dict[str, list[float]]:
    """Time every session on its feed, alternating the order each repetition (A B, B A, ...).

    Warm-up runs are done first (alternating too) and not recorded. Repetitions go on until each
    session has ``min_runs`` timings and ``min_seconds`` have passed, or ``max_runs`` are done.

    Returns:
        ``{role: [seconds per run]}``.
    """
    roles = list(sessions)
    for i in range(warmup):
        for role in roles if i % 2 == 0 else roles[::-1]:
            sessions[role](feeds[role])
    times = {role: [] for role in roles}
    start, rep = time.perf_counter(), 0
    while rep < max_runs and (rep < min_runs or time.perf_counter() - start < min_seconds):
        for role in roles if rep % 2 == 0 else roles[::-1]:
            times[role].append(sessions[role].timed(feeds[role]))
        rep += 1
    return times


def summarize(times: list[float], batch: int) -> dict:
    """p50/p90/p99/mean latency (ms) and throughput (samples/s) of one series of runs."""
    import numpy as np

    t = np.asarray(times, dtype=np.float64)
    return {
        "runs": int(t.size),
        "p50_ms": float(np.percentile(t, 50) * 1e3),
        "p90_ms": float(np.percentile(t, 90) * 1e3),
        "p99_ms": float(np.percentile(t, 99) * 1e3),
        "mean_ms": float(t.mean() * 1e3),
        "std_ms": float(t.std() * 1e3),
        "samples_per_s": float(batch * t.size / t.sum()),
    }


def synthetic_inputs(batch: int, seq: int, vocab_size: int, seed: int = 0):
    """Random token ids ``(batch, seq)`` and a full attention mask: latency does not depend on the text."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch, seq), generator=gen)  # (B, T)
    return ids, torch.ones_like(ids)  # (B, T)


def max_sequence(config) -> int:
    """Longest sequence the position embeddings allow (RoBERTa-style models offset positions by pad + 1)."""
    from headslim.io import position_limit

    limit = position_limit(config)
    return 10**9 if limit is None else limit


# ----------------------------------------------------------------------------------------------
# The run.


@dataclass
class BenchConfig:
    """Settings of one benchmark run; validated on construction.

    Args:
        backends: names or aliases (see :func:`expand_backends`).
        batches, seqs: the grid of input shapes.
        warmup: untimed runs per model and point.
        min_runs, min_seconds: a point runs until both are reached (per model), ...
        max_runs: ... or this many repetitions.
        threads: CPU threads for torch and ONNX Runtime (default: torch's current setting).
        onnx_dense, onnx_pruned: export dirs (or .onnx files) for the ORT backends; exported on the
            fly with ``headslim.export`` when not given.
        seed: seed of the synthetic token ids.
        dtype: what the torch and triton backends compute in (``float32``, ``float16``, ``bfloat16``);
            the ORT backends run their graph's own precision.
        task: ``forward`` (one forward pass per run: ``batches`` x ``seqs``), ``causal-lm`` (prefill
            of ``prompt`` tokens + ``new_tokens`` decode steps per run: ``batches``;
            :mod:`headslim.bench_decoder`) or ``auto`` (``causal-lm`` for decoders with an LM head).
    """

    backends: str | tuple = "torch"
    batches: tuple = (1, 8, 32)
    seqs: tuple = (128,)
    warmup: int = 10
    min_runs: int = 10
    min_seconds: float = 10.0
    max_runs: int = 100000
    threads: int | None = None
    onnx_dense: str | None = None
    onnx_pruned: str | None = None
    seed: int = 0
    dtype: str = "float32"
    task: str = "auto"
    prompt: int = 128
    new_tokens: int = 32

    def __post_init__(self):
        if self.task not in TASKS:
            raise HeadslimError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.prompt < 1 or self.new_tokens < 1:
            raise HeadslimError(f"--prompt and --new-tokens must be >= 1, not {self.prompt} and {self.new_tokens}")
        if self.dtype not in DTYPES:
            raise HeadslimError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        self.backends = tuple(expand_backends(self.backends))
        self.batches, self.seqs = tuple(int(b) for b in self.batches), tuple(int(s) for s in self.seqs)
        for name in ("batches", "seqs"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise HeadslimError(f"--{name[:-2] if name == 'batches' else 'seq'} needs positive integers")
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs or self.min_seconds < 0:
            raise HeadslimError("need --warmup >= 0, --runs >= 1, --max-runs >= --runs and --min-time >= 0")
        if self.threads is not None and self.threads < 1:
            raise HeadslimError(f"--threads must be >= 1, not {self.threads}")


@contextmanager
def fixed_threads(threads: int | None):
    """Run with ``torch.set_num_threads(threads)`` (the current count when None); restore it afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def machine_info() -> dict:
    """CPU/GPU names, core counts and library versions recorded with every result."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    versions = {"python": platform.python_version()}
    # distribution metadata, not imports: importing triton or onnx just to read a version is slow
    for name, dists in (("headslim", ["headslim"]), ("torch", ["torch"]), ("transformers", ["transformers"]),
                        ("onnxruntime", ["onnxruntime", "onnxruntime-gpu"]), ("onnx", ["onnx"]),
                        ("numpy", ["numpy"]), ("triton", ["triton"])):
        for dist in dists:
            try:
                versions[name] = metadata.version(dist) + ("" if dist == name else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                continue
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": affinity, "gpu": gpu,
            "platform": platform.platform(), "hostname": platform.node(), "versions": versions}


def bench(pruned_dir, baseline_dir=None, config: BenchConfig | None = None, *, out=None, overwrite: bool = False,
          log=print) -> dict:
    """Benchmark a pruned checkpoint against its dense original on every backend and shape.

    Args:
        pruned_dir: pruned checkpoint dir (``headslim shrink`` output).
        baseline_dir: the dense checkpoint; default: the plan's ``source_model``.
        config: :class:`BenchConfig`.
        out: when given, a dir (written atomically) with ``bench.json``, ``bench.md`` and ``bench.png``.
        log: where progress lines and skipped-backend reasons go (``None`` for silence).

    Returns:
        The result dict written to ``bench.json`` (machine, settings, models, backends, points).

    Example:
        >>> r = bench("slim/", "all-MiniLM-L6-v2", BenchConfig(backends="torch-sdpa-cpu", batches=(1,), seqs=(128,)))  # doctest: +SKIP
        >>> r["points"][0]["speedup_p50"]                                                                             # doctest: +SKIP
    """
    from headslim.io import check_output_dir, load_config

    config = config or BenchConfig()
    log = log or (lambda *a, **k: None)
    if out is not None:
        check_output_dir(out, overwrite=overwrite,
                         inputs=(pruned_dir, baseline_dir, config.onnx_dense, config.onnx_pruned))
    baseline_dir = baseline_dir or default_baseline(pruned_dir)
    model_config = load_config(baseline_dir)
    _check_lengths(config, model_config, resolve_task(config.task, model_config))  # before the weights load
    dense_dir, pruned_dir, dense, pruned = load_pair(baseline_dir, pruned_dir)
    config = replace(config, task=resolve_task(config.task, model_config, dense))
    _check_lengths(config, model_config, config.task)
    with fixed_threads(config.threads) as threads:
        result = _bench_all(config, dense_dir, pruned_dir, dense, pruned, threads, log)
    if out is not None:
        write_outputs(result, out, overwrite=overwrite)
        log(f"wrote {out}")
    return result


def resolve_task(task: str, model_config, model=None) -> str:
    """``causal-lm`` under ``auto`` for a decoder family (and, once ``model`` is loaded, one with a
    language-model head); a causal-lm request for anything else is a one-line error."""
    from headslim.arch import get_adapter

    decoder = bool(get_adapter(model_config).export_spec(model_config.model_type).decoder_layout)
    if model is not None:
        decoder = decoder and model.get_output_embeddings() is not None
    if task == "auto":
        return "causal-lm" if decoder else "forward"
    if task == "causal-lm" and not decoder:
        what = type(model).__name__ if model is not None else model_config.model_type
        raise HeadslimError(f"--task causal-lm needs a decoder with a language-model head, not a {what}")
    return task


def _check_lengths(config: BenchConfig, model_config, task: str) -> None:
    from headslim.io import check_length

    if task == "causal-lm":
        check_length(model_config, config.prompt + config.new_tokens, "--prompt + --new-tokens")
    else:
        for seq in config.seqs:
            check_length(model_config, seq, "--seq")


def _bench_all(config: BenchConfig, dense_dir, pruned_dir, dense, pruned, threads: int, log) -> dict:
    import torch

    from headslim import flops
    from headslim.quality import count_parameters

    shapes = {"dense": flops.LayerShape.from_model(dense), "pruned": flops.LayerShape.from_model(pruned)}
    result = {
        "kind": "headslim-bench", "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {**asdict(config), "backends": list(config.backends), "batches": list(config.batches),
                     "seqs": list(config.seqs), "threads": threads, "interop_threads": torch.get_num_interop_threads(),
                     "inputs": "random token ids, full attention mask", "order": "dense/pruned alternating per repetition",
                     "ort_thread_pools": "stop spinning at the end of each run (session.force_spinning_stop)"},
        "models": {role: {"path": str(d), "params": count_parameters(m), **flops.describe(shapes[role])}
                   for role, d, m in (("dense", dense_dir, dense), ("pruned", pruned_dir, pruned))},
        "backends": [], "points": [],
    }
    if config.task == "causal-lm":
        from headslim import bench_decoder

        result["settings"]["run"] = (f"prefill of {config.prompt} tokens, then {config.new_tokens} greedy decode steps "
                                     "against the KV cache")
        for role, m in (("dense", dense), ("pruned", pruned)):
            result["models"][role]["cache_kv_heads"] = bench_decoder.cache_heads(m)
    with tempfile.TemporaryDirectory(prefix="headslim-bench-") as tmp:
        ctx = BenchContext(dirs={"dense": dense_dir, "pruned": pruned_dir}, models={"dense": dense, "pruned": pruned},
                           threads=threads, onnx={"dense": config.onnx_dense, "pruned": config.onnx_pruned},
                           tmp=Path(tmp), task=config.task)
        for name in config.backends:
            backend = BACKENDS[name]()
            if isinstance(backend, TorchBackend):
                backend.dtype = config.dtype
            _run_backend(backend, ctx, config, shapes, result, log)
    return result


def _run_backend(backend, ctx: BenchContext, config: BenchConfig, shapes: dict, result: dict, log) -> None:
    from headslim import flops

    entry = {"name": backend.name, "settings": backend.settings(), "status": "ok", "reason": None}
    result["backends"].append(entry)
    try:
        sessions = backend.prepare(ctx)
        if config.task == "causal-lm" and backend.kind != "ort":  # a torch model, run with its KV cache
            from headslim.bench_decoder import TorchDecoderSession

            sessions = {role: TorchDecoderSession(s.model, s.device) for role, s in sessions.items()}
    except BackendUnavailable as e:
        entry.update(status="skipped", reason=first_line(e))
        log(f"{backend.name}: skipped: {entry['reason']}")
        return
    except HeadslimError:
        raise  # bad user input (wrong ONNX file): one clear error, no partial output
    except Exception as e:  # a backend that breaks while loading must not stop the others
        entry.update(status="failed", reason=f"{type(e).__name__}: {first_line(e)}")
        log(f"{backend.name}: failed: {entry['reason']}")
        return
    vocab = int(ctx.models["dense"].config.vocab_size)
    try:
        if config.task == "causal-lm":
            from headslim import bench_decoder

            bench_decoder.run_points(backend, sessions, ctx.models, config, result, log,
                                     inputs=lambda batch: synthetic_inputs(batch, config.prompt, vocab, config.seed))
            return
        for seq in config.seqs:
            for batch in config.batches:
                point = {"backend": backend.name, "batch": batch, "seq": seq,
                         "analytic": flops.compare(shapes["dense"], shapes["pruned"], batch, seq)}
                try:
                    ids, mask = synthetic_inputs(batch, seq, vocab, config.seed)
                    feeds = {role: s.feed(ids, mask) for role, s in sessions.items()}
                    times = measure_interleaved(sessions, feeds, warmup=config.warmup, min_runs=config.min_runs,
                                                min_seconds=config.min_seconds, max_runs=config.max_runs)
                except Exception as e:  # e.g. out of memory at the largest shape: report, go on
                    point.update(status="failed", reason=f"{type(e).__name__}: {first_line(e)}")
                    result["points"].append(point)
                    log(f"{backend.name} batch {batch} seq {seq}: failed: {point['reason']}")
                    continue
                d, p = summarize(times["dense"], batch), summarize(times["pruned"], batch)
                point.update(status="ok", dense=d, pruned=p, ratio_p50=p["p50_ms"] / d["p50_ms"],
                             speedup_p50=d["p50_ms"] / p["p50_ms"])
                result["points"].append(point)
                log(f"{backend.name:>16} batch {batch:>3} seq {seq:>4}: dense {d['p50_ms']:9.2f} ms  "
                    f"pruned {p['p50_ms']:9.2f} ms  x{point['speedup_p50']:.2f} (ideal x{point['analytic']['ideal_speedup']:.2f})")
    finally:
        for s in sessions.values():
            s.close()
        gc.collect()
        if backend.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def write_outputs(result: dict, out, *, overwrite: bool = False) -> Path:
    """``bench.json`` (everything), ``bench.md`` (report) and ``bench.png`` (plot), atomically."""
    from headslim import report
    from headslim.io import atomic_output_dir

    with atomic_output_dir(out, overwrite=overwrite,
                           inputs=[*(m.get("path") for m in result.get("models", {}).values()),
                                   result.get("settings", {}).get("onnx_dense"),
                                   result.get("settings", {}).get("onnx_pruned")]) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        plot = report.bench_plot(result, tmp / "bench.png")
        (tmp / "bench.md").write_text(report.bench_markdown(result, plot_name=plot.name if plot else None))
    return Path(out)


# ----------------------------------------------------------------------------------------------
# CLI.


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def add_timing_arguments(opt, *, warmup: int = 10, min_time: float = 10.0) -> None:
    """Timing options shared by ``bench`` and ``sweep``."""
    opt.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: torch's default)")
    opt.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs per model and shape (default {warmup})")
    opt.add_argument("--runs", type=int, default=10, help="at least this many timed runs per model and shape (default 10)")
    opt.add_argument("--min-time", type=float, default=min_time,
                     help=f"and at least this many seconds per shape (default {min_time:g})")
    opt.add_argument("--max-runs", type=int, default=100000, help="stop a shape after this many runs")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency and throughput of a pruned model vs its dense original",
                              description=__doc__.split("\n\n")[0], epilog=BENCH_EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="pruned checkpoint dir")
    opt = p.add_argument_group("optional")
    opt.add_argument("--baseline", help="dense checkpoint dir (default: the source named in the prune plan)")
    opt.add_argument("--backend", default="torch",
                     help="comma-separated: " + ", ".join(BACKENDS) + "; aliases torch, ort, cuda, all (default torch)")
    opt.add_argument("--batch", type=_int_list, default=(1, 8, 32), help="batch sizes (default 1,8,32)")
    opt.add_argument("--seq", type=_int_list, default=(128,), help="sequence lengths (default 128; --task forward)")
    opt.add_argument("--task", default="auto", choices=TASKS,
                     help="what one run is: forward (one forward pass per batch x seq) or causal-lm (prefill of "
                          "--prompt tokens, then --new-tokens greedy decode steps with the KV cache); default auto: "
                          "causal-lm for decoders with an LM head")
    opt.add_argument("--prompt", type=int, default=128, help="causal-lm: prompt tokens of the prefill (default 128)")
    opt.add_argument("--new-tokens", type=int, default=32, help="causal-lm: decode steps per run (default 32)")
    add_timing_arguments(opt)
    opt.add_argument("--onnx-dense", help="ONNX export dir (or model.onnx) of the baseline for the ort backends")
    opt.add_argument("--onnx-pruned", help="ONNX export dir (or model.onnx) of the pruned model")
    opt.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    opt.add_argument("--dtype", default="float32", choices=DTYPES,
                     help="precision of the torch and triton backends (default float32; float16 is for GPUs)")
    opt.add_argument("--out", help="write bench.json, bench.md and bench.png into this dir")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    opt.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from headslim import report

    config = config_from_args(BenchConfig, args, backends=args.backend, batches=args.batch, seqs=args.seq,
                              min_runs=args.runs, min_seconds=args.min_time)
    result = bench(args.model, args.baseline, config, out=args.out, overwrite=args.overwrite,
                   log=None if args.json else print)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report.bench_table(result))
    return 0

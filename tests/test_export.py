"""``headslim export``: every architecture dense and pruned, zero-head layers, fusion, int8, optimum
loading, and every bad input (one line, exit 2, nothing left behind)."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from headslim.arch import ADAPTERS
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.export import EXPORT_INPUTS, NOT_EXPORTED, REPORT_FILE, TASKS, ExportConfig, export_onnx
from headslim.io import save_pruned
from headslim.plan import PLAN_FILE, PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import HEADS, LAYERS, TINY_MODELS, VOCAB, tiny_model

HAS_OPTIMUM = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.onnxruntime")
UNEVEN = PrunePlan([HEADS] * LAYERS, [[0, 1], [], [2]])  # 2 heads, none, 1 head
FAST = dict(prefer="unfused")  # skip the fused/unfused timing where a test does not look at it


def _tiny_tokenizer(path):
    """A WordPiece tokenizer whose 99 ids fit the tiny models' vocabulary, saved into ``path``."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["the", "of", "to", "in", "and", "is", "for", "on", "that", "with", "said", "it", "was", "he"]
    words += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    words += [str(i) for i in range(10)] + [".", ",", "'", "-", "!", "?", '"', "(", ")", ":", ";"]
    words = (words + [f"w{i}" for i in range(VOCAB)])[:VOCAB]
    assert len(set(words)) == VOCAB
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(path))


def _checkpoint(root, model_type, class_name, plan=None, tokenizer=False):
    """A tiny dense (``plan=None``) or pruned checkpoint dir; returns (dir, the PyTorch model)."""
    model = tiny_model(model_type, class_name)
    path = root / f"{class_name}-{'pruned' if plan else 'dense'}"
    if plan is None:
        model.save_pretrained(str(path))
    else:
        prune_heads(model, plan)
        save_pruned(model, path, plan)
    if tokenizer:
        _tiny_tokenizer(path)
    return path, model


def _padded_inputs(names, batch=3, seq=9, seed=1):
    """Fresh inputs (a shape the export never saw) with padded rows, for an independent check."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = torch.zeros_like(ids)
    return feeds


def _ort_outputs(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def _op_counts(path):
    counts = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# encoders (decoders export through headslim.export_decoder: tests/test_export_decoder.py)
EXPORTED = sorted(t for t in ADAPTERS if t in EXPORT_INPUTS and not ADAPTERS[t].export_spec(t).decoder_layout)
DECODERS = sorted(t for t in ADAPTERS if t in EXPORT_INPUTS and ADAPTERS[t].export_spec(t).decoder_layout)


def test_every_adapter_model_type_is_exported_or_refused_on_purpose():
    """Coverage guard: a model type added to the adapters must get an export entry (and a tiny model
    here) or a stated reason in ``NOT_EXPORTED``."""
    assert set(ADAPTERS) <= set(EXPORT_INPUTS) | set(NOT_EXPORTED), set(ADAPTERS) - set(EXPORT_INPUTS)
    assert not set(EXPORT_INPUTS) & set(NOT_EXPORTED)
    assert set(EXPORTED) <= set(TINY_MODELS), set(EXPORTED) - set(TINY_MODELS)
    assert {"bert", "roberta", "xlm-roberta", "electra"} <= set(EXPORTED)
    assert {"llama", "mistral", "qwen2", "qwen3", "gpt2"} <= set(DECODERS)


def test_import_is_cheap():
    code = "import sys, headslim.export; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("model_type", EXPORTED)
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned-uneven-zero"])
def test_export_every_architecture(tmp_path, model_type, pruned):
    class_name = next(c for c in TINY_MODELS[model_type][2] if c.endswith("ForSequenceClassification"))
    src, model = _checkpoint(tmp_path, model_type, class_name, UNEVEN if pruned else None)
    report = export_onnx(src, tmp_path / "onnx", **FAST)
    out = tmp_path / "onnx"
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", REPORT_FILE} <= names
    assert (PLAN_FILE in names) == pruned
    assert report.task == "sequence-classification" and report.outputs == ["logits"]
    assert report.inputs == list(EXPORT_INPUTS[model_type])
    assert report.validation["fp32-unfused"]["max_abs_diff"]["logits"] <= 1e-4
    assert json.loads((out / REPORT_FILE).read_text())["heads_per_layer"] == ([2, 0, 1] if pruned else [4, 4, 4])

    # plain onnxruntime on inputs of a new shape, against PyTorch
    feeds = _padded_inputs(report.inputs)
    (logits,) = _ort_outputs(out / "model.onnx", feeds)
    with torch.no_grad():
        expected = model(**feeds).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4

    # dynamic axes, and no attention left in a layer without heads
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    assert _op_counts(out / "model.onnx").get("Softmax", 0) == (2 if pruned else 3)
    assert not [i.name for i in graph.initializer if 0 in i.dims]


@pytest.mark.parametrize("class_name,task,outputs", [
    ("BertForMaskedLM", "fill-mask", ["logits"]),
    ("BertForTokenClassification", "token-classification", ["logits"]),
    ("ElectraForPreTraining", "feature-extraction", ["last_hidden_state"]),  # no optimum task: the encoder
])
def test_task_from_the_architecture(tmp_path, class_name, task, outputs):
    model_type = "electra" if class_name.startswith("Electra") else "bert"
    src, _ = _checkpoint(tmp_path, model_type, class_name, UNEVEN)
    report = export_onnx(src, tmp_path / "onnx", **FAST)
    assert report.task == task and report.outputs == outputs
    shapes = [o.type.tensor_type.shape.dim for o in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.output]
    assert [d.dim_param for d in shapes[0]][:2] == ["batch_size", "sequence_length"]


def test_feature_extraction_from_a_classifier(tmp_path):
    src, model = _checkpoint(tmp_path, "roberta", "RobertaForSequenceClassification", UNEVEN)
    report = export_onnx(src, tmp_path / "onnx", task="feature-extraction", **FAST)
    assert report.outputs == ["last_hidden_state"]
    feeds = _padded_inputs(report.inputs)
    (hidden,) = _ort_outputs(tmp_path / "onnx" / "model.onnx", feeds)
    with torch.no_grad():
        expected = model.base_model(**feeds).last_hidden_state.numpy()
    assert np.abs(hidden - expected).max() <= 1e-4


def test_all_heads_removed_still_takes_the_attention_mask(tmp_path):
    src, model = _checkpoint(tmp_path, "bert", "BertModel", PrunePlan([HEADS] * LAYERS, [[], [], []]))
    report = export_onnx(src, tmp_path / "onnx", optimize=True, **FAST)
    path = tmp_path / "onnx" / "model.onnx"
    assert [i.name for i in onnx.load(str(path)).graph.input] == list(EXPORT_INPUTS["bert"])
    assert "Softmax" not in _op_counts(path) and "MatMul" in _op_counts(path)  # FFN only
    assert report.fusion["attention_fused"] == 0 and report.fusion["all_attention_fused"]
    feeds = _padded_inputs(report.inputs)
    (hidden,) = _ort_outputs(path, feeds)
    with torch.no_grad():
        assert np.abs(hidden - model(**feeds).last_hidden_state.numpy()).max() <= 1e-4


@pytest.mark.parametrize("model_type", EXPORTED)
def test_optimize_fuses_each_layer_with_its_own_head_count(tmp_path, model_type):
    src, model = _checkpoint(tmp_path, model_type, TINY_MODELS[model_type][2][0], UNEVEN)
    report = export_onnx(src, tmp_path / "onnx", optimize=True)  # prefer=auto: timed here
    out = tmp_path / "onnx"
    fusion = report.fusion
    assert fusion["attention_heads"] == [2, 1] and fusion["all_attention_fused"]
    assert fusion["layers_with_heads"] == 2 and fusion["softmax_left"] == 0
    assert report.validation["fp32-fused"]["max_abs_diff"]["last_hidden_state"] <= 1e-4
    # model.onnx is the graph the timing chose; the other fp32 graph keeps a descriptive name
    default = report.default["graph"]
    assert report.graphs[default] == "model.onnx"
    other = {"fp32-fused": "model_optimized.onnx", "fp32-unfused": "model_unfused.onnx"}
    other.pop(default)
    (kind, name), = other.items()
    assert report.graphs[kind] == name and (out / name).is_file()
    assert ("Attention" in _op_counts(out / "model.onnx")) == (default == "fp32-fused")
    assert set(report.timing["p50_ms"]) == {"fp32-fused", "fp32-unfused"} and report.timing["runs"] >= 10
    feeds = _padded_inputs(report.inputs)
    with torch.no_grad():
        expected = model(**feeds).last_hidden_state.numpy()
    for file in ("model.onnx", name):
        assert np.abs(_ort_outputs(out / file, feeds)[0] - expected).max() <= 1e-4


def test_dynamo_exporter_is_an_alternative(tmp_path):
    """torch.export-based graphs are correct too; ORT's optimizer does not fuse them (hence the default)."""
    src, model = _checkpoint(tmp_path, "bert", "BertForSequenceClassification", UNEVEN)
    report = export_onnx(src, tmp_path / "onnx", exporter="dynamo", **FAST)
    assert report.exporter == "dynamo" and report.validation["fp32-unfused"]["max_abs_diff"]["logits"] <= 1e-4
    feeds = _padded_inputs(report.inputs, batch=4, seq=12)
    with torch.no_grad():
        expected = model(**feeds).logits.numpy()
    assert np.abs(_ort_outputs(tmp_path / "onnx" / "model.onnx", feeds)[0] - expected).max() <= 1e-4


@pytest.mark.parametrize("prefer", ["fused", "unfused"])
def test_prefer_picks_model_onnx(tmp_path, prefer):
    src, _ = _checkpoint(tmp_path, "bert", "BertModel", UNEVEN)
    report = export_onnx(src, tmp_path / "onnx", optimize=True, prefer=prefer)
    assert report.default["graph"] == f"fp32-{prefer}" and report.timing is None
    assert ("Attention" in _op_counts(tmp_path / "onnx" / "model.onnx")) == (prefer == "fused")


@pytest.mark.parametrize("tool", ["default", "onnxruntime"])
def test_int8(tmp_path, monkeypatch, tool):
    if tool == "onnxruntime":  # as if optimum were not installed
        monkeypatch.setitem(sys.modules, "optimum.onnxruntime", None)
    src, _ = _checkpoint(tmp_path, "bert", "BertForSequenceClassification", UNEVEN)
    report = export_onnx(src, tmp_path / "onnx", quantize="int8", **FAST)
    path = tmp_path / "onnx" / "model_quantized.onnx"
    assert report.graphs["int8"] == "model_quantized.onnx"
    ops = _op_counts(path)
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    expected_tool = ("optimum" if HAS_OPTIMUM and tool == "default" else "onnxruntime.quantization")
    assert report.quantization["tool"].startswith(expected_tool)
    agree = report.agreement["int8"]
    assert agree["metric"] == "argmax match" and agree["n"] == 5 and 0.0 <= agree["match"] <= 1.0
    assert report.validation["int8"]["atol"] is None  # int8 is checked by agreement, not closeness


def test_tokenizer_and_text_calibration(tmp_path):
    src, _ = _checkpoint(tmp_path, "bert", "BertModel", UNEVEN, tokenizer=True)
    report = export_onnx(src, tmp_path / "onnx", calib_samples=3, max_length=32, **FAST)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    cal = report.calibration
    assert cal["padded_rows"] >= 1 and cal["texts"] == 4 and cal["shapes"][1][0] == 1
    assert not cal["source"].startswith("synthetic")


@pytest.mark.skipif(not HAS_OPTIMUM, reason="optimum-onnx is installed with transformers 4.57 only")
@pytest.mark.parametrize("class_name", ["BertModel", "BertForSequenceClassification"])
def test_optimum_loads_the_output(tmp_path, class_name):
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification

    src, model = _checkpoint(tmp_path, "bert", class_name, UNEVEN, tokenizer=True)
    export_onnx(src, tmp_path / "onnx", optimize=True, quantize="int8", **FAST)
    loader = ORTModelForFeatureExtraction if class_name == "BertModel" else ORTModelForSequenceClassification
    ort_model = loader.from_pretrained(tmp_path / "onnx")
    feeds = _padded_inputs(["input_ids", "attention_mask"])  # optimum fills in token_type_ids
    out = ort_model(**feeds)
    with torch.no_grad():
        ref = model(**feeds)
    name = "last_hidden_state" if class_name == "BertModel" else "logits"
    assert (getattr(out, name) - getattr(ref, name)).abs().max() <= 1e-4
    assert loader.from_pretrained(tmp_path / "onnx", file_name="model_quantized.onnx")(**feeds) is not None


def test_real_minilm_pruned_with_a_zero_head_layer(tmp_path, minilm_dir):
    """The one real-model export: uneven heads, a layer with none, fused, int8, all validated."""
    import headslim

    model = headslim.load_model(minilm_dir)
    kept = [[0, 1, 2, 3, 4, 5], [1, 3, 5], [], [0, 11], list(range(12)), [7]]
    plan = PrunePlan([12] * 6, kept)
    from transformers import AutoTokenizer

    save_pruned(prune_heads(model, plan), tmp_path / "slim", plan,
                tokenizer=AutoTokenizer.from_pretrained(str(minilm_dir)), source=minilm_dir)
    report = export_onnx(tmp_path / "slim", tmp_path / "onnx", optimize=True, quantize="int8", calib_samples=2,
                         prefer="fused")  # the timing is tested on tiny models
    assert report.fusion["attention_heads"] == [6, 3, 2, 12, 1] and report.fusion["all_attention_fused"]
    assert max(report.validation["fp32-fused"]["max_abs_diff"].values()) <= 1e-4
    assert report.agreement["int8"]["mean_cosine"] > 0.98
    assert report.calibration["padded_rows"] >= 1
    names = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert {"model.onnx", "model_quantized.onnx", "tokenizer.json", PLAN_FILE, "modules.json"} <= names
    assert report.versions["onnxruntime"] == ort.__version__
    out = tmp_path / "onnx"
    assert (out / "model_quantized.onnx").stat().st_size < (out / "model.onnx").stat().st_size / 2


# ------------------------------------------------------------------------------------------------
# the CLI and bad input


def _cli(capsys, *argv):
    code = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _no_leftovers(parent, name="onnx"):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_cli_export_and_overwrite(tmp_path, capsys):
    src, _ = _checkpoint(tmp_path, "bert", "BertForSequenceClassification", UNEVEN)
    code, out, err = _cli(capsys, src, "--out", tmp_path / "onnx", "--prefer", "unfused")
    assert code == 0, err
    assert "model.onnx" in out and "sequence-classification" in out and "wrote" in out
    code, _, err = _cli(capsys, src, "--out", tmp_path / "onnx")
    assert code == 2 and err.startswith("headslim: error: ") and "--overwrite" in err and err.count("\n") == 1
    code, out, err = _cli(capsys, src, "--out", tmp_path / "onnx", "--overwrite", "--json", "--prefer", "unfused")
    assert code == 0 and json.loads(out)["task"] == "sequence-classification"


@pytest.fixture
def bert_model_dir(tmp_path):
    return _checkpoint(tmp_path, "bert", "BertModel", UNEVEN)[0]


@pytest.mark.parametrize("case,args,message", [
    ("not-a-dir", [], "is not a model directory"),
    ("no-config", [], "no config.json"),
    ("no-head", ["--task", "sequence-classification"], "has no sequence-classification head"),
    ("opset-too-new", ["--opset", "99"], "newer than the installed onnx"),
    ("opset-exporter", ["--opset", "21"], "not supported by the torchscript exporter"),
    ("opset-too-old", ["--opset", "11"], "not supported by the torchscript exporter"),
    ("opset-optimize", ["--opset", "16", "--optimize"], "--optimize needs opset 17 or newer"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, bert_model_dir, case, args, message):
    src = {"not-a-dir": tmp_path / "missing", "no-config": tmp_path / "empty"}.get(case, bert_model_dir)
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, src, "--out", tmp_path / "onnx", *args)
    assert code == 2 and message in err and err.startswith("headslim: error: ") and err.count("\n") == 1
    assert _no_leftovers(tmp_path)


def test_failure_half_way_leaves_nothing(tmp_path, capsys, monkeypatch, bert_model_dir):
    from headslim import onnx_utils

    def broken(src, dst, model_type):
        raise HeadslimError("onnxruntime transformer optimizer failed: boom")

    monkeypatch.setattr(onnx_utils, "optimize", broken)
    code, _, err = _cli(capsys, bert_model_dir, "--out", tmp_path / "onnx", "--optimize")
    assert code == 2 and "optimizer failed: boom" in err
    assert _no_leftovers(tmp_path)


def test_failed_validation_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, bert_model_dir):
    import headslim.export as export

    real = export._reference_outputs

    def off_by_a_bit(*args):
        refs = real(*args)
        refs[0]["last_hidden_state"][0, 0, 0] += 1e-3  # PyTorch and ONNX now disagree at one element
        return refs

    monkeypatch.setattr(export, "_reference_outputs", off_by_a_bit)
    with pytest.raises(HeadslimError, match=r"model.onnx: output 'last_hidden_state' differs from PyTorch by 1.0"):
        export_onnx(bert_model_dir, tmp_path / "onnx")
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_decoder_export_refuses_encoder_only_options_in_one_line(tmp_path, model_type):
    """Decoders go to headslim.export_decoder; flags it does not implement are refused, nothing written."""
    from tests.conftest import TINY_DECODERS, tiny_decoder

    model = tiny_decoder(model_type, TINY_DECODERS[model_type][2][0])
    model.save_pretrained(str(tmp_path / "dec"))
    with pytest.raises(HeadslimError, match="decoder export does not take --exporter dynamo, --calib yet"):
        export_onnx(tmp_path / "dec", tmp_path / "onnx", optimize=True, quantize="int8", exporter="dynamo",
                    calib=str(tmp_path / "texts.txt"))
    assert _no_leftovers(tmp_path, "onnx")


def test_older_opset_without_optimize(tmp_path, bert_model_dir):
    report = export_onnx(bert_model_dir, tmp_path / "onnx", opset=14)
    assert onnx.load(str(tmp_path / "onnx" / "model.onnx")).opset_import[0].version == 14
    assert report.validation["fp32-unfused"]["max_abs_diff"]["last_hidden_state"] <= 1e-4


def test_config_rejects_bad_values():
    with pytest.raises(HeadslimError, match="unknown task"):
        ExportConfig(task="translation")
    with pytest.raises(HeadslimError, match="int8 only"):
        ExportConfig(quantize="int4")
    assert set(TASKS) >= {"feature-extraction", "sequence-classification", "token-classification"}


@pytest.mark.parametrize("model_type", EXPORTED)
def test_ffn_pruned_encoder_exports_fused_and_int8_with_parity(tmp_path, model_type):
    """Per-layer FFN widths (one layer with no FFN left, one with a single neuron) beside uneven heads:
    the unfused and the fused graph match PyTorch, int8 is written and judged, the report says the widths."""
    from headslim.arch import get_adapter

    dense = tiny_model(model_type, TINY_MODELS[model_type][2][0])
    widths = get_adapter(dense).num_neurons(dense)
    plan = PrunePlan([HEADS] * LAYERS, UNEVEN.kept_heads, num_neurons=widths,
                     kept_neurons=[[], [4], list(range(0, widths[2], 2))])
    src, model = _checkpoint(tmp_path, model_type, TINY_MODELS[model_type][2][0], plan, tokenizer=True)
    report = export_onnx(src, tmp_path / "onnx", optimize=True, quantize="int8", prefer="unfused")
    assert report.neurons_per_layer == [0, 1, len(range(0, widths[2], 2))]
    assert set(report.graphs) == {"fp32-unfused", "fp32-fused", "int8"}
    feeds = _padded_inputs(report.inputs)
    with torch.no_grad():
        expected = model(**feeds).last_hidden_state.numpy()
    out = tmp_path / "onnx"
    for kind in ("fp32-unfused", "fp32-fused"):
        assert np.abs(_ort_outputs(out / report.graphs[kind], feeds)[0] - expected).max() <= 1e-4, kind
    assert report.fusion["all_attention_fused"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [i.name for i in graph.initializer if 0 in i.dims]

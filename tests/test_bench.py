"""``headslim bench``: result schema, interleaving, failing backends, ONNX checks, analytic cost.

Behaviour only: no test looks at how fast anything is.
"""

import copy
import importlib.util
import json

import pytest
import torch
import transformers

from headslim import bench as bench_mod
from headslim import flops, report
from headslim.bench import BackendUnavailable, BenchConfig, Session, bench, measure_interleaved
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import HEADS, LAYERS, VOCAB, tiny_model

PLAN = PrunePlan([HEADS] * LAYERS, [[0, 2], [], [1, 2, 3]])  # two heads, zero heads, three heads
FAST = dict(warmup=1, min_runs=3, min_seconds=0.0)  # tiny settings: tests check behaviour, not speed
WORDS = [f"w{i}" for i in range(VOCAB - 5)]


def tiny_tokenizer(tmp_path):
    """A BERT WordPiece tokenizer whose vocabulary fits the tiny models (``VOCAB`` entries)."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def save_pair(tmp_path, class_name: str = "BertModel", plan: PrunePlan = PLAN, seed: int = 0):
    """A tiny dense checkpoint and its pruned copy (with tokenizer): ``(dense_dir, pruned_dir)``."""
    tok = tiny_tokenizer(tmp_path)
    model = tiny_model("bert", class_name, seed=seed)
    with torch.no_grad():  # large weights, so that removing heads changes the outputs clearly
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.3)
    dense_dir, pruned_dir = tmp_path / f"dense-{class_name}", tmp_path / f"pruned-{class_name}"
    model.save_pretrained(str(dense_dir))
    tok.save_pretrained(str(dense_dir))
    pruned = prune_heads(copy.deepcopy(model), plan)
    save_pruned(pruned, pruned_dir, PrunePlan(plan.num_heads, plan.kept_heads, {"source_model": str(dense_dir)}),
                tokenizer=tok, source=dense_dir)
    return dense_dir, pruned_dir


@pytest.fixture
def pair(tmp_path):
    return save_pair(tmp_path)


def test_bench_json_schema(pair, tmp_path):
    dense_dir, pruned_dir = pair
    out = tmp_path / "out"
    config = BenchConfig(backends="torch-eager-cpu,torch-sdpa-cpu", batches=(1, 2), seqs=(8,), threads=1, **FAST)
    result = bench(pruned_dir, dense_dir, config, out=out, log=None)
    saved = json.loads((out / "bench.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"machine", "settings", "models", "backends", "points", "created"} <= set(saved)
    assert saved["machine"]["cpu"] and saved["machine"]["versions"]["torch"] == torch.__version__
    assert saved["settings"]["threads"] == 1 and saved["settings"]["min_runs"] == 3
    assert saved["models"]["dense"]["heads"] == [HEADS] * LAYERS
    assert saved["models"]["pruned"]["heads"] == [2, 0, 3]
    assert saved["models"]["pruned"]["params"] < saved["models"]["dense"]["params"]
    assert [b["status"] for b in saved["backends"]] == ["ok", "ok"]
    assert [(p["backend"], p["batch"], p["seq"]) for p in saved["points"]] == [
        ("torch-eager-cpu", 1, 8), ("torch-eager-cpu", 2, 8), ("torch-sdpa-cpu", 1, 8), ("torch-sdpa-cpu", 2, 8)]
    for p in saved["points"]:
        for role in ("dense", "pruned"):
            s = p[role]
            assert s["runs"] >= 3 and s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
            assert s["samples_per_s"] == pytest.approx(p["batch"] * 1e3 / s["mean_ms"])
        assert p["ratio_p50"] == pytest.approx(p["pruned"]["p50_ms"] / p["dense"]["p50_ms"])
        assert p["analytic"]["ideal_speedup"] > 1
    md = (out / "bench.md").read_text()
    assert "torch-sdpa-cpu" in md and "speed-up" in md
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


class Recorder(Session):
    """A fake session that records every call into a shared log."""

    def __init__(self, role, log, fail_at_batch=None):
        self.role, self.log, self.fail_at_batch = role, log, fail_at_batch

    def feed(self, input_ids, attention_mask):
        return input_ids.shape

    def __call__(self, feed) -> None:
        if self.fail_at_batch is not None and feed[0] == self.fail_at_batch:
            raise RuntimeError("out of memory (fake)\nsecond line")
        self.log.append(self.role)


class FakeBackend:
    kind, device = "fake", "cpu"

    def __init__(self, name, log, error=None, fail_at_batch=None):
        self.name, self.log, self.error, self.fail_at_batch = name, log, error, fail_at_batch

    def settings(self):
        return {"runtime": "fake"}

    def prepare(self, ctx):
        if self.error is not None:
            raise self.error
        return {role: Recorder(role, self.log, self.fail_at_batch) for role in ("dense", "pruned")}


def test_measure_interleaved_alternates_order():
    log = []
    sessions = {r: Recorder(r, log) for r in ("dense", "pruned")}
    times = measure_interleaved(sessions, {"dense": (1,), "pruned": (1,)}, warmup=2, min_runs=4, min_seconds=0.0,
                                max_runs=100)
    assert log[:4] == ["dense", "pruned", "pruned", "dense"]  # warm-up alternates too
    assert log[4:] == ["dense", "pruned", "pruned", "dense"] * 2
    assert [len(t) for t in times.values()] == [4, 4]


def test_bench_interleaves_dense_and_pruned(pair, monkeypatch):
    dense_dir, pruned_dir = pair
    log = []
    monkeypatch.setitem(bench_mod.BACKENDS, "fake", lambda: FakeBackend("fake", log))
    result = bench(pruned_dir, dense_dir, BenchConfig(backends="fake", batches=(1,), seqs=(4,), warmup=0,
                                                      min_runs=6, min_seconds=0.0), log=None)
    assert log == ["dense", "pruned", "pruned", "dense"] * 3
    assert result["points"][0]["dense"]["runs"] == result["points"][0]["pruned"]["runs"] == 6


def test_failing_backends_are_reported_and_others_go_on(pair, monkeypatch, capsys):
    dense_dir, pruned_dir = pair
    log = []
    monkeypatch.setitem(bench_mod.BACKENDS, "gone", lambda: FakeBackend("gone", log, BackendUnavailable("no such runtime")))
    monkeypatch.setitem(bench_mod.BACKENDS, "broken", lambda: FakeBackend("broken", log, ValueError("boom\ntrace")))
    monkeypatch.setitem(bench_mod.BACKENDS, "oom", lambda: FakeBackend("oom", log, fail_at_batch=2))
    monkeypatch.setitem(bench_mod.BACKENDS, "fake", lambda: FakeBackend("fake", log))
    config = BenchConfig(backends="gone,broken,oom,fake", batches=(1, 2), seqs=(4,), **FAST)
    result = bench(pruned_dir, dense_dir, config)
    status = {b["name"]: (b["status"], b["reason"]) for b in result["backends"]}
    assert status == {"gone": ("skipped", "no such runtime"), "broken": ("failed", "ValueError: boom"),
                      "oom": ("ok", None), "fake": ("ok", None)}
    points = {(p["backend"], p["batch"]): p["status"] for p in result["points"]}
    assert points == {("oom", 1): "ok", ("oom", 2): "failed", ("fake", 1): "ok", ("fake", 2): "ok"}
    printed = capsys.readouterr().out
    assert "gone: skipped: no such runtime" in printed and "oom batch 2 seq 4: failed" in printed
    assert "broken: failed: ValueError: boom" in report.bench_table(result)


def test_cuda_backend_without_gpu_is_skipped(pair):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    dense_dir, pruned_dir = pair
    result = bench(pruned_dir, dense_dir, BenchConfig(backends="torch-sdpa-cuda,triton-cuda,torch-eager-cpu",
                                                      batches=(1,), seqs=(4,), **FAST), log=None)
    status = [(b["name"], b["status"]) for b in result["backends"]]
    assert status == [("torch-sdpa-cuda", "skipped"), ("triton-cuda", "skipped"), ("torch-eager-cpu", "ok")]
    assert all(b["reason"] and "\n" not in b["reason"] for b in result["backends"][:2])


def test_dtype_is_what_the_torch_backends_run_and_report(pair):
    """--dtype casts both models (whatever dtype the checkpoint holds) and is recorded; float16 is skipped
    on CPU with a reason; an unknown dtype is a one-line error."""
    dense_dir, pruned_dir = pair
    result = bench(pruned_dir, dense_dir, BenchConfig(backends="torch-eager-cpu", batches=(1,), seqs=(4,),
                                                      dtype="bfloat16", **FAST), log=None)
    assert result["backends"][0]["settings"]["dtype"] == "bfloat16" and result["settings"]["dtype"] == "bfloat16"
    assert result["points"][0]["status"] == "ok"
    assert "torch/triton in bfloat16" in report.bench_markdown(result)
    from headslim.io import load_model

    ctx = bench_mod.BenchContext(dirs={"dense": dense_dir, "pruned": pruned_dir},
                                 models={"dense": load_model(dense_dir), "pruned": load_model(pruned_dir)}, threads=1)
    sessions = bench_mod.TorchBackend("torch-sdpa-cpu", "sdpa", "cpu", "bfloat16").prepare(ctx)
    assert {next(s.model.parameters()).dtype for s in sessions.values()} == {torch.bfloat16}
    result = bench(pruned_dir, dense_dir, BenchConfig(backends="torch-eager-cpu", batches=(1,), seqs=(4,),
                                                      dtype="float16", **FAST), log=None)
    assert result["backends"][0]["status"] == "skipped" and "float16" in result["backends"][0]["reason"]
    with pytest.raises(HeadslimError, match="--dtype must be one of"):
        BenchConfig(dtype="fp8")


def test_unknown_backend_is_a_one_line_error(pair, capsys):
    with pytest.raises(HeadslimError, match="unknown backend 'tensorrt'"):
        BenchConfig(backends="torch,tensorrt")
    dense_dir, pruned_dir = pair
    capsys.readouterr()
    assert main(["bench", str(pruned_dir), "--baseline", str(dense_dir), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headslim: error: unknown backend 'tensorrt'") and err.count("\n") == 1


@pytest.mark.parametrize("change", ["hidden", "model_type", "layers", "heads", "class"])
def test_mismatched_architectures_are_refused(tmp_path, change):
    _, pruned_dir = save_pair(tmp_path)
    other = tmp_path / "other"
    if change == "model_type":
        model = tiny_model("roberta", "RobertaModel")
    elif change == "class":
        model = tiny_model("bert", "BertForSequenceClassification")
    else:
        kw = {"hidden": dict(hidden_size=48), "layers": dict(num_hidden_layers=2),
              "heads": dict(num_attention_heads=8)}[change]
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=37, max_position_embeddings=64)
        config = transformers.BertConfig(**{**base, **kw})
        config.architectures = ["BertModel"]
        model = transformers.BertModel(config)
    model.save_pretrained(str(other))
    with pytest.raises(HeadslimError, match="baseline|pruned from") as err:
        bench(pruned_dir, other, BenchConfig(backends="torch-eager-cpu", batches=(1,), seqs=(4,), **FAST), log=None)
    assert "\n" not in str(err.value)


def test_sequence_too_long_is_refused(pair):
    dense_dir, pruned_dir = pair
    with pytest.raises(HeadslimError, match="--seq 512 is longer"):
        bench(pruned_dir, dense_dir, BenchConfig(backends="torch-eager-cpu", batches=(1,), seqs=(512,), **FAST))


def test_baseline_defaults_to_the_plan_source(pair):
    dense_dir, pruned_dir = pair
    result = bench(pruned_dir, None, BenchConfig(backends="torch-eager-cpu", batches=(1,), seqs=(4,), **FAST), log=None)
    assert result["models"]["dense"]["path"] == str(dense_dir)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime backends, on graphs exported here with torch.onnx (the exporter's own files are
# tested by its own tests; these check that bench consumes and verifies what it is given).


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model, path, input_names=("input_ids", "attention_mask")):
    ids = torch.randint(1, VOCAB, (2, 8))
    torch.onnx.export(_Encoder(model), (ids, torch.ones_like(ids)), str(path), input_names=list(input_names),
                      output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in input_names})
    return path


@pytest.fixture
def onnx_pair(pair, tmp_path):
    pytest.importorskip("onnxruntime")
    from headslim.io import load_model

    dense_dir, pruned_dir = pair
    files = {}
    for role, d in (("dense", dense_dir), ("pruned", pruned_dir)):
        out = tmp_path / f"onnx-{role}"
        out.mkdir()
        files[role] = export_onnx(load_model(d, attn_implementation="eager"), out / "model.onnx")
    return dense_dir, pruned_dir, files


def test_ort_backend_runs_exported_files(onnx_pair):
    dense_dir, pruned_dir, files = onnx_pair
    config = BenchConfig(backends="ort-cpu,ort-opt-cpu,ort-int8-cpu", batches=(1, 2), seqs=(8,), threads=1,
                         onnx_dense=str(files["dense"].parent), onnx_pruned=str(files["pruned"]), **FAST)
    result = bench(pruned_dir, dense_dir, config, log=None)
    status = {b["name"]: b["status"] for b in result["backends"]}
    assert status == {"ort-cpu": "ok", "ort-opt-cpu": "skipped", "ort-int8-cpu": "skipped"}
    assert all(p["status"] == "ok" and p["pruned"]["runs"] >= 3 for p in result["points"])
    assert "force_spinning_stop" in result["settings"]["ort_thread_pools"]
    reasons = [b["reason"] for b in result["backends"][1:]]
    assert "no model_optimized.onnx in" in reasons[0] and "no model_quantized.onnx in" in reasons[1]
    config = BenchConfig(backends="ort-opt-cpu", batches=(1,), seqs=(8,), onnx_dense=str(files["dense"]),
                         onnx_pruned=str(files["pruned"]), **FAST)
    assert "single file" in bench(pruned_dir, dense_dir, config, log=None)["backends"][0]["reason"]


def test_timed_ort_sessions_stop_spinning_when_a_run_ends():
    # the sessions timed here alternate; a pool left spinning after its run takes the next one's cores
    pytest.importorskip("onnxruntime")
    from headslim.bench import ort_options

    options = ort_options(2)
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


def test_onnx_of_another_model_is_refused(onnx_pair):
    dense_dir, pruned_dir, files = onnx_pair
    config = BenchConfig(backends="ort-cpu", batches=(1,), seqs=(8,), onnx_dense=str(files["dense"]),
                         onnx_pruned=str(files["dense"]), **FAST)  # the dense graph given as the pruned one
    with pytest.raises(HeadslimError, match="does not compute what"):
        bench(pruned_dir, dense_dir, config, log=None)


def test_onnx_with_foreign_inputs_is_refused(pair, tmp_path):
    pytest.importorskip("onnxruntime")
    from headslim.io import load_model

    dense_dir, pruned_dir = pair
    bad = export_onnx(load_model(dense_dir, attn_implementation="eager"), tmp_path / "bad.onnx",
                      input_names=("tokens", "mask"))
    config = BenchConfig(backends="ort-cpu", batches=(1,), seqs=(8,), onnx_dense=str(bad), onnx_pruned=str(bad), **FAST)
    with pytest.raises(HeadslimError, match=r"inputs \['tokens', 'mask'\] do not match"):
        bench(pruned_dir, dense_dir, config, log=None)


def test_ort_without_onnx_files_says_why(pair, monkeypatch):
    pytest.importorskip("onnxruntime")
    dense_dir, pruned_dir = pair
    real = importlib.util.find_spec  # pretend the exporter is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "headslim.export" else real(name, *a))
    result = bench(pruned_dir, dense_dir, BenchConfig(backends="ort-cpu,torch-eager-cpu", batches=(1,), seqs=(4,),
                                                      **FAST), log=None)
    assert result["backends"][0]["status"] == "skipped" and "--onnx-dense" in result["backends"][0]["reason"]
    assert result["backends"][1]["status"] == "ok"


# ----------------------------------------------------------------------------------------------
# Analytic cost against a real model: parameters by counting, FLOPs by torch's FLOP counter.


@pytest.mark.parametrize("kept", [None, [[0, 2], [], [1, 2, 3]], [[], [], []]])
def test_analytic_cost_matches_the_model(kept):
    from torch.utils.flop_counter import FlopCounterMode

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=37, max_position_embeddings=64,
                                     attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    if kept is not None:
        prune_heads(model, PrunePlan([HEADS] * LAYERS, kept))
    model.requires_grad_(False)  # torch's module tracker trips over BiasOnly's expanded bias otherwise
    shape = flops.LayerShape.from_model(model)
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert flops.encoder_params(shape)["total"] == encoder_params
    ids = torch.randint(1, VOCAB, (3, 13))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert flops.encoder_flops(shape, 3, 13)["total"] == counter.get_total_flops()


def test_ort_exports_on_the_fly_with_headslim_export(pair):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("headslim.export")
    dense_dir, pruned_dir = pair
    result = bench(pruned_dir, dense_dir, BenchConfig(backends="ort-cpu,ort-opt-cpu,ort-int8-cpu", batches=(1,),
                                                      seqs=(8,), threads=1, **FAST), log=None)
    assert [(b["name"], b["status"]) for b in result["backends"]] == [
        ("ort-cpu", "ok"), ("ort-opt-cpu", "ok"), ("ort-int8-cpu", "ok")]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_torch_backends_load_the_attention_they_name(pair, attn):
    from headslim.io import load_model

    dense_dir, pruned_dir = pair
    backend = bench_mod.BACKENDS[f"torch-{attn}-cpu"]()
    ctx = bench_mod.BenchContext(dirs={"dense": dense_dir, "pruned": pruned_dir},
                                 models={"dense": load_model(dense_dir), "pruned": load_model(pruned_dir)}, threads=1)
    sessions = backend.prepare(ctx)
    assert {r: s.model.config._attn_implementation for r, s in sessions.items()} == {"dense": attn, "pruned": attn}
    assert flops.LayerShape.from_model(sessions["pruned"].model).heads == (2, 0, 3)


@pytest.mark.parametrize("model_type,class_name", [("llama", "LlamaModel"), ("gpt2", "GPT2Model")])
@pytest.mark.parametrize("pruned", [False, True])
def test_analytic_flops_of_decoders(model_type, class_name, pruned):
    """Grouped-query attention (K/V read by the kept query heads) and gated feed-forward blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    from headslim.arch import get_adapter
    from tests.conftest import tiny_decoder

    model = tiny_decoder(model_type, class_name)
    model.config._attn_implementation = "eager"
    heads = get_adapter(model).num_heads(model)
    if pruned:  # one query head of a KV group, none, and heads of two groups
        prune_heads(model, PrunePlan(heads, [[0], [], [1, heads[2] - 1]]))
    model.requires_grad_(False)
    shape = flops.LayerShape.from_model(model)
    ids = torch.randint(3, VOCAB, (2, 7))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    extra = counter.get_total_flops() - flops.encoder_flops(shape, 2, 7)["total"]
    # the only matmul outside attention and feed-forward: RoPE's (d_h/2, 1) x (1, T) frequency table
    assert 0 <= extra <= (2 * 7 * shape.head_dim if model_type == "llama" else 0)


def test_triton_backend_enables_headslim_kernels(pair, monkeypatch):
    """Wiring only (no GPU here): both models go through ``headslim.kernels.enable(backend="triton")``."""
    kernels = pytest.importorskip("headslim.kernels")
    from headslim.io import load_model

    dense_dir, pruned_dir = pair
    calls = []
    monkeypatch.setattr(bench_mod, "_cuda_reason", lambda: None)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "enable", lambda model, backend: calls.append((type(model).__name__, backend)) or model)
    backend = bench_mod.BACKENDS["triton-cuda"]()
    backend.device = "cpu"  # the kernels' CPU path stands in for the GPU
    ctx = bench_mod.BenchContext(dirs={"dense": dense_dir, "pruned": pruned_dir},
                                 models={"dense": load_model(dense_dir), "pruned": load_model(pruned_dir)}, threads=1)
    sessions = backend.prepare(ctx)
    assert calls == [("BertModel", "triton"), ("BertModel", "triton")] and set(sessions) == {"dense", "pruned"}

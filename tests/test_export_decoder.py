"""Decoder LLM export to ONNX with a KV cache (``headslim.export_decoder``) and ``headslim generate``.

Every decoder family, dense and pruned under every ``--gqa`` mode (and with a layer left with no
heads, and pruned FFN widths): the export's own validation must pass, the graph's cache inputs must
have each layer's own KV head count, and greedy generation in ONNX Runtime must equal PyTorch's
``generate`` on a left-padded batch this test builds itself (not the one the export validated on).
"""

import copy
import json

import numpy as np
import pytest
import torch

from headslim.arch import kv_maps
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.export_decoder import export_decoder, greedy_generate, past_names, present_names
from headslim.gqa import select_gqa
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import DEC_HEADS, LAYERS, TINY_DECODERS, tiny_decoder

ort = pytest.importorskip("onnxruntime")

FAMILIES = {t: classes[0] for t, (_, _, classes) in TINY_DECODERS.items()}  # the causal LM class of each
MODES = ("dense", "uniform", "kv-groups", "ragged", "zero-head-layer")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_decoder_family_is_covered():
    from headslim.arch import adapters

    decoders = {t for a in adapters() if a.decoder for t in a.model_types}
    assert decoders == set(FAMILIES)
    for t in decoders:
        from headslim.arch import get_adapter

        class Cfg:
            model_type = t
        assert get_adapter(Cfg).export_spec(t).decoder_layout


def _plan(model, mode: str) -> PrunePlan | None:
    maps = kv_maps(model)
    n = [len(m) for m in maps]
    if mode == "dense":
        return None
    if mode == "zero-head-layer":  # layer 0 (where transformers reads the cache length) has no heads
        return PrunePlan(n, [[], [0, 3], [1, 2, n[2] - 1]], kv_head_of_q=maps)
    scores = torch.rand(LAYERS, DEC_HEADS, generator=torch.Generator().manual_seed(len(mode)))
    prune = {"uniform": 0.5, "kv-groups": 0.5, "ragged": 0.4}[mode]
    return select_gqa(scores, maps, prune=prune, mode=mode, min_per_layer=1)


def _save(model, plan, path):
    if plan is None:
        model.save_pretrained(path)
        return model
    pruned = prune_heads(copy.deepcopy(model), plan)
    save_pruned(pruned, path, plan)
    return pruned


def _session(path, name="model.onnx"):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path / name), opts, providers=["CPUExecutionProvider"])


def _prompts(batch=2, seq=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _check_exported(model, out, report, new_tokens: int, name="model.onnx"):
    """Cache inputs per layer with its own KV heads; ORT greedy == PyTorch generate (eos suppressed)."""
    sess = _session(out, name)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, (n_q, n_kv) in enumerate(zip(report.heads_per_layer, report.kv_heads_per_layer)):
        key, value = past_names(layer)
        if n_q == 0:
            assert key not in inputs and present_names(layer)[0] not in outputs
            continue
        assert inputs[key][1] == inputs[value][1] == n_kv
        assert inputs[key][3] == head_dim
        assert set(present_names(layer)) <= outputs
    _check_genai_config(out, report, model.config)
    ids, mask = _prompts()
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0).numpy()
    got = greedy_generate(sess, ids.numpy(), mask.numpy(), new_tokens, eos_token_id=eos, suppress_eos=True)
    np.testing.assert_array_equal(got, expected)


def _genai_installed() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def _check_genai_config(out, report, config):
    """genai_config.json names the graph's tensors; onnxruntime-genai's greedy tokens were checked
    equal where it is installed (dev extras: always in CI)."""
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "model.onnx" and cfg["search"]["past_present_share_buffer"] is False
    assert dec["num_hidden_layers"] == len(report.heads_per_layer)
    assert cfg["model"]["vocab_size"] == config.vocab_size
    cache_kv = [report.kv_heads_per_layer[i] for i in report.cache_layers]
    if cache_kv:
        assert dec["num_key_value_heads"] == cache_kv[0]
    per_layer = len(set(cache_kv)) > 1 or len(cache_kv) < len(report.heads_per_layer)
    assert report.genai["needs"] == ("onnxruntime-genai >= 0.15" if per_layer else "onnxruntime-genai")
    assert report.genai["checked"] is _genai_installed()
    if report.genai["checked"]:
        assert report.genai["equal"] is True and len(report.genai["prompt_lengths"]) == 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_export_parity_and_greedy(tmp_path, model_type, mode):
    dense = tiny_decoder(model_type, FAMILIES[model_type])
    plan = _plan(dense, mode)
    model = _save(dense, plan, tmp_path / "src")
    tokens = 40 if mode in ("ragged", "zero-head-layer") else 12
    report = export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=tokens)
    val = report.validation
    assert val["logits"]["prefill"]["ok"] and val["logits"]["prefill+decode"]["ok"]
    assert val["generation"]["equal"] and val["generation"]["new_tokens"] == tokens
    assert val["generation"]["batch"] >= 2 and len(set(val["generation"]["prompt_lengths"])) > 1
    if plan is not None:
        assert report.heads_per_layer == plan.heads_after
        assert report.kv_heads_per_layer == [len(k) for k in plan.kv_heads_after]
    if mode == "zero-head-layer":
        assert report.cache_layers == [1, 2]
    assert report.kv_head_of_q == kv_maps(model)
    saved = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert saved["validation"]["generation"]["equal"] is True
    assert (tmp_path / "onnx" / "headslim_plan.json").is_file() == (plan is not None)
    _check_exported(model, tmp_path / "onnx", report, new_tokens=tokens)


def test_ragged_layer_is_really_ragged(tmp_path):
    """A hand-made ragged map (3 query heads over 2 KV heads: 2 + 1) goes through the gather."""
    dense = tiny_decoder("llama", FAMILIES["llama"])
    maps = kv_maps(dense)  # [0]*4 + [1]*4 per layer
    plan = PrunePlan([len(m) for m in maps], [[0, 1, 5], [0, 2, 4, 6], [3, 4, 5, 6, 7]], kv_head_of_q=maps)
    model = _save(dense, plan, tmp_path / "src")
    report = export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=40)
    assert report.kv_head_of_q[0] == [0, 0, 1] and report.kv_heads_per_layer == [2, 2, 2]
    _check_exported(model, tmp_path / "onnx", report, new_tokens=40)


def test_no_attention_at_all_and_pruned_ffn(tmp_path):
    """Every layer without heads (no cache tensors at all) plus per-layer FFN widths, one empty."""
    dense = tiny_decoder("qwen3", FAMILIES["qwen3"])
    maps = kv_maps(dense)
    width = dense.config.intermediate_size
    plan = PrunePlan([len(m) for m in maps], [[], [], []], kv_head_of_q=maps, num_neurons=[width] * LAYERS,
                     kept_neurons=[list(range(0, width, 2)), [], list(range(5))])
    model = _save(dense, plan, tmp_path / "src")
    report = export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=12)
    assert report.cache_layers == [] and report.neurons_per_layer == [len(range(0, width, 2)), 0, 5]
    _check_exported(model, tmp_path / "onnx", report, new_tokens=12)

    dense = tiny_decoder("gpt2", FAMILIES["gpt2"])
    maps = kv_maps(dense)
    width = 4 * dense.config.n_embd
    plan = PrunePlan([len(m) for m in maps], [[0, 5], [1, 2, 3], [7]], kv_head_of_q=None,
                     num_neurons=[width] * LAYERS, kept_neurons=[list(range(7)), list(range(width)), []])
    model = _save(dense, plan, tmp_path / "src2")
    report = export_decoder(tmp_path / "src2", tmp_path / "onnx2", generate_tokens=12)
    assert report.heads_per_layer == [2, 3, 1] and report.neurons_per_layer == [7, width, 0]
    _check_exported(model, tmp_path / "onnx2", report, new_tokens=12)


def test_a_wrong_graph_fails_validation_and_leaves_nothing(tmp_path, monkeypatch):
    """Validation is not vacuous: a graph with a broken rotary embedding is refused, no dir left."""
    import headslim.arch.llama as llama

    dense = tiny_decoder("llama", FAMILIES["llama"])
    dense.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(llama, "_rotate_half", lambda x: x)
    with pytest.raises(HeadslimError, match="ONNX logits differ from PyTorch"):
        export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=4)
    assert not (tmp_path / "onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_sliding_window_is_applied(tmp_path, monkeypatch):
    """Mistral's window (5) is shorter than the validation prompts: dropping it from the mask fails."""
    import headslim.export_decoder as ed
    from headslim.arch import get_adapter

    dense = tiny_decoder("mistral", FAMILIES["mistral"])
    assert get_adapter(dense).sliding_window(dense.model.layers[0], dense.config) == 5
    dense.save_pretrained(tmp_path / "src")
    adapter_cls = type(get_adapter(dense))
    monkeypatch.setattr(adapter_cls, "sliding_window", lambda self, block, config: None)
    with pytest.raises(HeadslimError, match="differ from PyTorch"):
        ed.export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=4)
    assert not (tmp_path / "onnx").exists()


def test_cli_export_then_generate(tmp_path, capsys):
    dense = tiny_decoder("qwen2", FAMILIES["qwen2"])
    plan = _plan(dense, "ragged")
    model = _save(dense, plan, tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "onnx")]) == 0
    out = capsys.readouterr().out
    assert "greedy generation: 40 new tokens equal" in out
    if _genai_installed():
        assert "genai_config.json (onnxruntime-genai): onnxruntime-genai 0." in out
        assert "greedy tokens equal to the graph's (40 new" in out
    assert main(["generate", str(tmp_path / "onnx"), "--ids", "5,6,7,8", "--ids", "9,10",
                 "--max-new-tokens", "6", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    with torch.no_grad():  # row 0 unpadded: PyTorch's greedy continuation up to eos
        ref = model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, 4:].tolist()
    assert results[0]["new_ids"] == ref[: len(results[0]["new_ids"])] and results[0]["new_ids"]
    # bad input: one line on stderr, exit 2, no traceback
    for argv, msg in ((["generate", str(tmp_path / "onnx"), "--prompt", "hi"], "no tokenizer"),
                      (["generate", str(tmp_path / "onnx"), "--ids", "1,x"], "comma-separated"),
                      (["generate", str(tmp_path / "onnx"), "--ids", "1", "--max-new-tokens", "0"], ">= 1"),
                      (["generate", str(tmp_path / "onnx"), "--ids", "1", "--max-new-tokens", "500"], "positions"),
                      (["generate", str(tmp_path / "src"), "--ids", "1"], "not a headslim decoder export"),
                      (["export", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--exporter", "dynamo"],
                       "does not take --exporter dynamo")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o2").exists()


def test_generate_with_a_tokenizer(tmp_path, capsys, minilm_dir):
    """Prompts through the checkpoint's tokenizer (left-padded batch of two), text back, as PyTorch."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))  # any real tokenizer: the bundled WordPiece one
    model = tiny_decoder("llama", FAMILIES["llama"], vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    report = export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=20)
    assert report.calibration["source"] == "built-in prompts" and report.validation["generation"]["equal"]
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() or (tmp_path / "onnx" / "vocab.txt").is_file()
    prompts = ["a long first prompt about pruned attention heads", "short"]
    assert main(["generate", str(tmp_path / "onnx"), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "8", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    tok.padding_side = "left"
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    for r, row in enumerate(results):
        expected = ref[r, enc["input_ids"].shape[1]:].tolist()
        assert row["new_ids"] == expected[: len(row["new_ids"])] and row["new_ids"]
        assert row["text"] == tok.decode(row["new_ids"], skip_special_tokens=True)


def test_weights_written_one_file_per_tensor_are_gathered_into_one_data_file(tmp_path):
    """Past 2 GB the TorchScript exporter writes every large weight as its own file; the export
    gathers them into ``model.onnx.data`` (what optimum and onnxruntime-genai ship), same outputs."""
    import onnx

    from headslim.onnx_utils import gather_external_data

    model = tiny_decoder("llama", FAMILIES["llama"])
    model.save_pretrained(tmp_path / "dense")
    report = export_decoder(tmp_path / "dense", tmp_path / "onnx", generate_tokens=2)
    assert report.external_data is None  # small: one self-contained graph
    split = tmp_path / "split"
    split.mkdir()
    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    onnx.save_model(proto, str(split / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)  # what the exporter does for a big model: a file per tensor
    written = sorted(split.iterdir())
    assert len(written) > 10
    (split / "keep.txt").write_text("not the exporter's")
    assert gather_external_data(split / "model.onnx", written) == "model.onnx.data"
    assert sorted(p.name for p in split.iterdir()) == ["keep.txt", "model.onnx", "model.onnx.data"]
    ids, mask = _prompts()
    tokens = {}
    for name, path in (("one graph", tmp_path / "onnx"), ("gathered", split)):
        tokens[name] = greedy_generate(_session(path), ids.numpy(), mask.numpy(), 5)
    np.testing.assert_array_equal(tokens["one graph"], tokens["gathered"])
    assert gather_external_data(split / "model.onnx", []) is None


@pytest.mark.parametrize("mode", ["uniform", "ragged"])
def test_int8_decoder_export_reports_agreement_and_decodes(tmp_path, mode, capsys):
    """``--quantize int8``: model_quantized.onnx beside the fp32 graph, same inputs/outputs, int8
    weights, agreement with fp32 measured (not asserted close: int8 is judged, not validated)."""
    import onnx

    model = tiny_decoder("llama", FAMILIES["llama"])
    pruned = _save(model, _plan(model, mode), tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "onnx"), "--quantize", "int8"]) == 0
    assert "int8" in capsys.readouterr().out
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["graphs"] == {"fp32-unfused": "model.onnx", "int8": "model_quantized.onnx"}
    agree = report["quantization"]["agreement"]
    assert 0.0 <= agree["next_token_top1"] <= 1.0 and len(agree["greedy_equal_prefix"]) == agree["prompts"]
    graph = onnx.load(str(tmp_path / "onnx" / "model_quantized.onnx"))
    # 8-bit weights of the type the report names (optimum's avx2 config, used on CPUs without AVX-512, stores uint8)
    eight = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}[report["quantization"]["weights"]]
    assert any(i.data_type == eight for i in graph.graph.initializer)
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model_quantized.onnx"), providers=["CPUExecutionProvider"])
    fp32 = _session(tmp_path / "onnx")
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [(i.name, i.shape) for i in fp32.get_inputs()]
    ids, mask = _prompts()
    got = greedy_generate(sess, ids.numpy(), mask.numpy(), 4, suppress_eos=True)
    assert got.shape == (ids.shape[0], ids.shape[1] + 4)
    # the recorded agreement is what a recount on the export's own probes finds
    from headslim.export_decoder import _int8_agreement, _probes

    pids, pmask, _ = _probes(None, pruned.config)
    recount = _int8_agreement(fp32, sess, pids, pmask, agree["greedy_new_tokens"], pruned.generation_config.eos_token_id,
                              pruned.config.pad_token_id or 0)
    assert recount == agree


FUSABLE = ("llama", "mistral", "qwen3")  # head_dim 8; the tiny GPT-2 and Qwen2 have 4 (GQA needs a multiple of 8)


@pytest.mark.parametrize("mode", MODES + ("unequal-groups",))
@pytest.mark.parametrize("model_type", FUSABLE)
def test_optimize_fuses_grouped_layers_into_group_query_attention(tmp_path, model_type, mode):
    """--optimize: exactly the layers whose query heads read their KV heads in equal consecutive groups
    become one GroupQueryAttention node each; the graph decodes what PyTorch's generate does."""
    import onnx

    dense = tiny_decoder(model_type, FAMILIES[model_type])
    maps = kv_maps(dense)
    if mode == "unequal-groups":  # layer 0: 2 + 1 query heads over 2 KV heads; layer 1 equal; layer 2 ragged
        plan = PrunePlan([len(m) for m in maps], [[0, 1, 5], [0, 2, 4, 6], [3, 4, 5, 6, 7]], kv_head_of_q=maps)
    else:
        plan = _plan(dense, mode)
    model = _save(dense, plan, tmp_path / "src")
    report = export_decoder(tmp_path / "src", tmp_path / "onnx", optimize=True, generate_tokens=12)
    grouped = []
    for layer, m in enumerate(kv_maps(model)):
        n_kv = len(set(m))
        if m and len(m) % n_kv == 0 and m == [h // (len(m) // n_kv) for h in range(len(m))]:
            grouped.append(layer)
    assert report.fusion["fused_layers"] == grouped
    assert sorted(int(k) for k in report.fusion["not_fused"]) == sorted(set(range(LAYERS)) - set(grouped))
    if mode == "unequal-groups":
        assert grouped == [1] and "ragged" in report.fusion["not_fused"]["0"]
    if mode == "zero-head-layer":
        assert report.fusion["not_fused"]["0"] == "no heads"
    if not grouped:  # every layer ragged: nothing to fuse, no second graph
        assert "fp32-fused" not in report.graphs and not (tmp_path / "onnx" / "model_optimized.onnx").exists()
        return
    graph = onnx.load(str(tmp_path / "onnx" / "model_optimized.onnx"))
    nodes = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == len(grouped) and all(n.domain == "com.microsoft" for n in nodes)
    assert report.graphs["fp32-fused"] == "model_optimized.onnx"
    fused = report.validation["fused"]
    assert fused["logits"]["prefill+decode"]["ok"] and fused["generation"]["equal"]
    _check_exported(model, tmp_path / "onnx", report, new_tokens=12, name="model_optimized.onnx")


def test_optimize_says_why_nothing_fuses(tmp_path, capsys):
    dense = tiny_decoder("gpt2", FAMILIES["gpt2"])  # head_dim 4
    dense.save_pretrained(tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "onnx"), "--optimize"]) == 0
    out = capsys.readouterr().out
    assert "no layer can be fused" in out and "head_dim 4 is not a multiple of 8" in out
    assert not (tmp_path / "onnx" / "model_optimized.onnx").exists()
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["graphs"] == {"fp32-unfused": "model.onnx"} and report["fusion"]["fused_layers"] == []


def test_fused_graph_limit_several_new_tokens_with_a_past_need_batch_1(tmp_path):
    """ORT's GroupQueryAttention (1.32) takes a multi-token step against a past at batch size 1 only;
    the README says so. Fails (and the README line goes) once ORT lifts the limit."""
    dense = tiny_decoder("llama", FAMILIES["llama"])
    dense.save_pretrained(tmp_path / "src")
    export_decoder(tmp_path / "src", tmp_path / "onnx", optimize=True, generate_tokens=2)
    sess = _session(tmp_path / "onnx", "model_optimized.onnx")
    layout = [(i.name, i.shape) for i in sess.get_inputs() if i.name.startswith("past")]
    mask = np.ones((2, 5), dtype=np.int64)
    feeds = {"input_ids": np.ones((2, 2), dtype=np.int64), "attention_mask": mask,
             "position_ids": np.array([[3, 4], [3, 4]], dtype=np.int64)}
    for name, shape in layout:
        feeds[name] = np.zeros((2, shape[1], 3, shape[3]), dtype=np.float32)
    with pytest.raises(Exception, match="batch_size must be 1"):
        sess.run(None, feeds)
    one = {k: v[:1] for k, v in feeds.items()}
    assert sess.run(None, one)[0].shape[:2] == (1, 2)


def test_genai_check_compares_tokens_and_refuses_a_config_genai_cannot_run(tmp_path, monkeypatch):
    """The onnxruntime-genai check is not vacuous: other tokens from the reference loop, or a config
    genai cannot run, fail the export with one line and leave nothing."""
    pytest.importorskip("onnxruntime_genai")
    import headslim.export_decoder as ed

    dense = tiny_decoder("llama", FAMILIES["llama"])
    dense.save_pretrained(tmp_path / "src")
    real = ed.greedy_generate

    def off_by_one(sess, ids, mask, *args, **kwargs):  # only the genai check runs prompts alone
        out = real(sess, ids, mask, *args, **kwargs)
        if ids.shape[0] == 1:
            out[0, -1] += 1
        return out

    monkeypatch.setattr(ed, "greedy_generate", off_by_one)
    with pytest.raises(HeadslimError, match="onnxruntime-genai .* generates other tokens than the graph after "):
        ed.export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=6)
    assert not (tmp_path / "onnx").exists()
    monkeypatch.setattr(ed, "greedy_generate", real)

    config = ed.genai_config
    monkeypatch.setattr(ed, "genai_config", lambda *a, **k: {**config(*a, **k), "model": {
        **config(*a, **k)["model"], "type": "gpt2"}})  # genai's gpt2 wants one combined cache tensor
    with pytest.raises(HeadslimError, match="onnxruntime-genai .* cannot run the export with genai_config.json"):
        ed.export_decoder(tmp_path / "src", tmp_path / "onnx", generate_tokens=6)
    assert not (tmp_path / "onnx").exists()


def test_genai_config_is_written_unchecked_without_onnxruntime_genai(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails
    dense = tiny_decoder("qwen2", FAMILIES["qwen2"])
    dense.save_pretrained(tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "onnx")]) == 0
    out = capsys.readouterr().out
    assert "genai_config.json (onnxruntime-genai): not checked: onnxruntime-genai is not installed" in out
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["genai"]["checked"] is False
    assert json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["type"] == "qwen2"

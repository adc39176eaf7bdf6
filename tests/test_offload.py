"""Layer-at-a-time shrink (``headslim.offload``): the same scores, plan and repaired weights as the
in-memory path, one layer in memory at a time, and nothing written when it refuses or fails."""

import copy
import json

import pytest
import torch

import headslim.offload as offload
from headslim.arch import get_adapter, kv_maps, weight_out_in
from headslim.errors import HeadslimError
from headslim.gqa import select_gqa
from headslim.io import load_pruned
from headslim.offload import materialised_layers, shrink_layerwise
from headslim.repair import repair
from headslim.surgery import prune_heads
from tests.conftest import tiny_batches, tiny_decoder, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_dir(tmp_path, model, shard: bool = False):
    path = tmp_path / "dense"
    model.save_pretrained(str(path), **({"max_shard_size": "20KB"} if shard else {}))
    return path


def _inputs_of(model, modules, batches):
    """Per batch: ``(real-token mask, {layer: what modules[layer] was given})``, from hooks on the whole model."""
    got = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: got.__setitem__(i, a[0])) for i, m in enumerate(modules)]
    try:
        for batch in batches:
            model(**batch)
            yield batch["attention_mask"].bool(), got
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _reference_scores(model, batches) -> torch.Tensor:
    """Each query head's ``sum_t ||W_O[:, h] c_h(t)||^2`` over real tokens, from hooks on the whole model."""
    adapter = get_adapter(model)
    blocks, head_dim = adapter.attention_blocks(model), adapter.head_dim(model)
    n = adapter.num_heads(model)
    scores = torch.zeros(len(blocks), max(n), dtype=torch.float64)
    for mask, got in _inputs_of(model, [adapter.o_proj(b) for b in blocks], batches):
        for layer, block in enumerate(blocks):
            w = weight_out_in(adapter.o_proj(block)).double()  # (d, H * D)
            c = got[layer][mask].double()  # (N, H * D)
            for h in range(n[layer]):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                scores[layer, h] += (c[:, cols] @ w[:, cols].T).pow(2).sum()
    return scores


CASES = [  # (model_type, class, kv heads, gqa mode, calibration batches, shard the checkpoint, tied embeddings)
    ("llama", "LlamaForCausalLM", None, "uniform", 5, False, False),
    ("llama", "LlamaForCausalLM", 1, "uniform", 5, True, True),
    ("qwen3", "Qwen3ForCausalLM", None, "ragged", 3, False, False),
    ("qwen3", "Qwen3ForCausalLM", None, "kv-groups", 4, True, False),
    ("mistral", "MistralForCausalLM", None, "uniform", 4, False, True),
    ("qwen2", "Qwen2ForCausalLM", None, "ragged", 5, True, False),
    ("gpt2", "GPT2LMHeadModel", None, "uniform", 5, True, True),  # Conv1D (in, out) weights, biases, wpe
]


@pytest.mark.parametrize("model_type,class_name,kv,mode,n_batches,shard,tied", CASES)
def test_scores_plan_and_repaired_model_equal_the_in_memory_path(tmp_path, model_type, class_name, kv, mode,
                                                                 n_batches, shard, tied):
    dense = tiny_decoder(model_type, class_name, kv, tie_word_embeddings=tied)
    batches = tiny_batches(n_batches)
    src = _dense_dir(tmp_path, dense, shard)
    report = shrink_layerwise(src, tmp_path / "out", prune=0.5, batches=batches, gqa=mode, progress=False)

    reference = _reference_scores(dense, batches)
    torch.testing.assert_close(torch.tensor(report["scores"], dtype=torch.float64), reference, rtol=1e-5, atol=1e-9)
    plan = select_gqa(reference, kv_maps(dense), prune=0.5, mode=mode)
    assert report["plan"]["attention"]["kept_heads"] == plan.kept_heads

    model = prune_heads(copy.deepcopy(dense), plan)
    expected = repair(model, dense, plan, batches, progress=False)
    got = report["repair"]
    assert got["applied"] == expected.applied
    assert [e["applied"] for e in got["layers"]] == [e["applied"] for e in expected.layers]
    assert got["held_out"] == expected.held_out and got["warning"] == expected.warning
    assert got["layers"] and got["check"]["metric"] == expected.check["metric"] == "kl"
    assert got["check"]["before"] == pytest.approx(expected.check["before"], rel=1e-6)
    assert got["check"]["after"] == pytest.approx(expected.check["after"], rel=1e-6)

    loaded = load_pruned(tmp_path / "out")
    assert loaded.headslim_plan.kept_heads == plan.kept_heads
    with torch.no_grad():
        for seed in range(2):
            inputs = tiny_inputs(seed=seed + 7)
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"config.json", "headslim_plan.json", ".headslim-output", "model.safetensors.index.json"} <= set(files)
    assert len([f for f in files if f.endswith(".safetensors")]) == dense.config.num_hidden_layers + 1


def test_undone_repair_leaves_the_plain_pruned_projections(tmp_path, monkeypatch):
    """When the held-out check rejects the repair, the written shards hold the sliced dense weights."""
    dense = tiny_decoder("llama", "LlamaForCausalLM")  # o_proj has a bias: it is put back too
    batches = tiny_batches(5)
    monkeypatch.setattr(offload, "_mean_kls", lambda *args: [0.0, 1.0])  # "repair made it worse"
    report = shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=0.5, batches=batches,
                              progress=False)
    assert not report["repair"]["applied"] and report["repair"]["check"]["after"] == 1.0
    plan = select_gqa(torch.tensor(report["scores"]), kv_maps(dense), prune=0.5)
    model = prune_heads(copy.deepcopy(dense), plan)
    loaded = load_pruned(tmp_path / "out")
    with torch.no_grad():
        inputs = tiny_inputs(seed=3)
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_without_repair_the_model_is_the_plain_pruned_one(tmp_path):
    dense = tiny_decoder("qwen3", "Qwen3ForCausalLM")
    report = shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=6, batches=tiny_batches(2),
                              repair=False, progress=False)
    assert report["repair"] is None and report["heads_after"] == report["heads_before"] - 6
    plan = select_gqa(torch.tensor(report["scores"]), kv_maps(dense), prune=6)
    model = prune_heads(copy.deepcopy(dense), plan)
    with torch.no_grad():
        inputs = tiny_inputs(seed=4)
        torch.testing.assert_close(load_pruned(tmp_path / "out")(**inputs).logits, model(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)


def test_one_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    dense = tiny_decoder("llama", "LlamaForCausalLM", tie_word_embeddings=True)
    load = offload._load_layer
    seen = []

    def counting(ckpt, model, index, *args):
        layer = load(ckpt, model, index, *args)
        embeddings = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        seen.append((index, materialised_layers(model), all(w.is_meta for w in embeddings)))
        return layer

    monkeypatch.setattr(offload, "_load_layer", counting)
    report = shrink_layerwise(_dense_dir(tmp_path, dense, shard=True), tmp_path / "out", prune=0.5,
                              batches=tiny_batches(4), progress=False)
    layers = dense.config.num_hidden_layers
    assert [i for i, _, _ in seen] == list(range(layers)) * 2  # scoring, then pruning
    assert max(n for _, n, _ in seen) == 1 and report["max_layers_in_memory"] == 1
    assert all(meta for _, _, meta in seen)  # the embedding tables are never read whole


def _one_line_refusal(out, match, **kwargs):
    with pytest.raises(HeadslimError, match=match) as err:
        shrink_layerwise(out=out, progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    batches = tiny_batches(2)
    out = tmp_path / "out"
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src = _dense_dir(tmp_path, dense)

    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((src / "config.json").read_text())
    _one_line_refusal(out, "no model weights", model_dir=empty, prune=0.5, batches=batches)

    pickled = tmp_path / "pickle-only"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle: never unpickled")
    _one_line_refusal(out, "pickle", model_dir=pickled, prune=0.5, batches=batches)

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.2.self_attn.q_proj.weight"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    _one_line_refusal(out, "q_proj.weight is missing", model_dir=partial, prune=0.5, batches=batches)

    bare_gpt2 = _dense_dir(tmp_path / "g", tiny_decoder("gpt2", "GPT2Model"))
    _one_line_refusal(out, "causal LMs", model_dir=bare_gpt2, prune=0.5, batches=batches)
    bare = _dense_dir(tmp_path / "bare", tiny_decoder("llama", "LlamaModel"))
    _one_line_refusal(out, "causal LMs", model_dir=bare, prune=0.5, batches=batches)
    mixed = tiny_decoder("qwen2", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    _one_line_refusal(out, "sliding_attention", model_dir=_dense_dir(tmp_path / "mixed", mixed), prune=0.5,
                      batches=batches)
    _one_line_refusal(out, "--gqa", model_dir=src, prune=0.5, batches=batches, gqa="nope")
    _one_line_refusal(out, "--prune", model_dir=src, prune=1.5, batches=batches)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HeadslimError, match="exists"):
        shrink_layerwise(src, out, prune=0.5, batches=batches, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src = _dense_dir(tmp_path, dense)
    write = offload._write_layer
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return write(*args)

    monkeypatch.setattr(offload, "_write_layer", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        shrink_layerwise(src, tmp_path / "out", prune=0.5, batches=tiny_batches(4), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no output, no temp dir beside it


def test_index_and_plan_files(tmp_path):
    dense = tiny_decoder("llama", "LlamaForCausalLM", tie_word_embeddings=True)
    shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=0.5, batches=tiny_batches(4),
                     progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied, as save_pretrained writes
    plan = json.loads((tmp_path / "out" / "headslim_plan.json").read_text())
    assert plan["provenance"]["method"] == "function-norm" and plan["provenance"]["layerwise"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["headslim"]["attention"]["kept_heads"] == plan["attention"]["kept_heads"]


def _cli_model(tmp_path, model=None):
    """A tiny Llama (or ``model``) with a tokenizer that fits its vocabulary, and a calibration text file."""
    from tests.test_export import _tiny_tokenizer

    src = _dense_dir(tmp_path, model if model is not None else tiny_decoder("llama", "LlamaForCausalLM"))
    _tiny_tokenizer(src)
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(f"the {w} of it said {i} and that was on the {w}" for i, w in
                               enumerate(["cat", "dog", "bird", "fish", "tree", "car", "boat", "house"])) + "\n")
    return src, texts


def test_cli_layerwise_shrink_writes_what_the_api_writes(tmp_path, capsys):
    from headslim.checkpoints import load_tokenizer
    from headslim.cli import main
    from headslim.data import batches, load_texts, sample

    src, texts = _cli_model(tmp_path)
    argv = ["shrink", str(src), "--layerwise", "--prune", "0.5", "--gqa", "ragged", "--calib", str(texts),
            "--batch-size", "2", "--max-length", "16", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "function-norm (layer at a time, at most 1 layer in memory), 8 calibration samples" in out
    assert "repair: " in out and f"wrote {tmp_path / 'cli'}" in out

    data = sample(load_texts(str(texts)), 128, 0)  # the CLI's default sample for --layerwise (all 8 here)
    calib = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
             for b in batches(data, load_tokenizer(src, pad=True), batch_size=2, max_length=16)]
    report = shrink_layerwise(src, tmp_path / "api", prune=0.5, batches=calib, gqa="ragged", progress=False)
    cli = load_pruned(tmp_path / "cli")
    assert cli.headslim_plan.kept_heads == report["plan"]["attention"]["kept_heads"]
    with torch.no_grad():
        inputs = tiny_inputs(seed=5)
        torch.testing.assert_close(cli(**inputs).logits, load_pruned(tmp_path / "api")(**inputs).logits)
    assert load_tokenizer(tmp_path / "cli").get_vocab() == load_tokenizer(src).get_vocab()


@pytest.mark.parametrize("extra,match", [(["--method", "gradient"], "--method gradient"),
                                         (["--prune-ffn", "0.2", "--ffn-method", "fisher"], "--ffn-method fisher"),
                                         (["--objective", "task"], "--objective task")])
def test_cli_layerwise_refusals_are_one_line(tmp_path, capsys, extra, match):
    from headslim.cli import main

    src, texts = _cli_model(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    assert main(["shrink", str(src), "--layerwise", "--calib", str(texts), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headslim: error: --layerwise does not take") and match in err and "\n" not in err
    assert not out.exists()


def test_output_loads_with_auto_model_for_causal_lm(tmp_path):
    """The shards and config written layer by layer are what the stock loader reads (after ``import headslim``)."""
    from transformers import AutoModelForCausalLM

    dense = tiny_decoder("qwen3", "Qwen3ForCausalLM")
    shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=0.5, batches=tiny_batches(4), gqa="ragged",
                     progress=False)
    stock, ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out"), load_pruned(tmp_path / "out")
    assert get_adapter(stock).num_heads(stock) == get_adapter(ours).num_heads(ours) != get_adapter(dense).num_heads(dense)
    with torch.no_grad():
        inputs = tiny_inputs(seed=1)
        torch.testing.assert_close(stock(**inputs).logits, ours(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("limit", [0, 4000])
def test_spilled_streams_give_the_same_model_and_leave_no_files(tmp_path, limit):
    """Streams kept on disk (all of them, or past a few kB) give the weights and decisions of the
    in-memory run; the spill directory is gone afterwards."""
    from safetensors.torch import load_file

    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src = _dense_dir(tmp_path, dense)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    kw = dict(prune=0.5, batches=tiny_batches(5), progress=False)
    memory = shrink_layerwise(src, tmp_path / "memory", **kw)
    spilled = shrink_layerwise(src, tmp_path / "spilled", stream_memory=limit, spill_dir=spill_dir, **kw)
    assert spilled["spill"]["files"] > 0 and spilled["spill"]["peak_on_disk_bytes"] > 0
    assert memory["spill"] == {"limit_bytes": None, "peak_on_disk_bytes": 0, "files": 0}
    assert spilled["repair"] == memory["repair"] and spilled["scores"] == memory["scores"]
    for shard in sorted((tmp_path / "memory").glob("*.safetensors")):
        a, b = load_file(shard), load_file(tmp_path / "spilled" / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(spill_dir.iterdir()) == []


def test_interrupted_spilled_run_leaves_no_files(tmp_path, monkeypatch):
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src = _dense_dir(tmp_path, dense)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    write = offload._write_layer
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(*args)

    monkeypatch.setattr(offload, "_write_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shrink_layerwise(src, tmp_path / "out", prune=0.5, batches=tiny_batches(4), progress=False, stream_memory=0,
                         spill_dir=spill_dir)
    assert list(spill_dir.iterdir()) == [] and not (tmp_path / "out").exists()


def test_spill_store_round_trip_and_budget(tmp_path):
    from headslim.layerwise import Spill, Store

    with Spill(100, tmp_path) as spill:
        store = Store(spill, [torch.arange(10, dtype=torch.float32), torch.ones(20, dtype=torch.bfloat16)])
        store.append(torch.zeros(3, 4))  # 48 bytes: past the 100-byte budget (40 + 40 held)
        assert spill.held == 80 and spill.on_disk == 48 and spill.files_written == 1
        assert torch.equal(store[0], torch.arange(10, dtype=torch.float32)) and store[1].dtype == torch.bfloat16
        assert torch.equal(store[2], torch.zeros(3, 4)) and len(list(store)) == 3
        store.clear()
        assert spill.held == 0 and spill.on_disk == 0 and list(spill.dir.iterdir()) == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(HeadslimError, match="stream memory must be >= 0"):
        Spill(-1)


def test_cli_stream_memory_spills_on_both_paths(tmp_path, capsys):
    from headslim.cli import main
    from safetensors.torch import load_file

    src, texts = _cli_model(tmp_path)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    argv = ["shrink", str(src), "--prune", "0.5", "--calib", str(texts), "--batch-size", "2", "--max-length", "16",
            "--no-progress", "--json"]
    spilled = [*argv, "--stream-memory", "0", "--spill-dir", str(spill_dir)]
    assert main([*spilled, "--layerwise", "--out", str(tmp_path / "cli")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spill"]["files"] > 0 and report["spill"]["limit_bytes"] == 0
    assert list(spill_dir.iterdir()) == []
    # the in-memory path: repair's streams spilled, the same model as without
    assert main([*spilled, "--out", str(tmp_path / "plain")]) == 0
    spill = json.loads(capsys.readouterr().out)["repair"]["spill"]
    assert spill["files"] > 0 and spill["limit_bytes"] == 0 and spill["peak_on_disk_bytes"] > 0
    assert list(spill_dir.iterdir()) == []
    assert main([*argv, "--out", str(tmp_path / "memory")]) == 0
    assert "spill" not in json.loads(capsys.readouterr().out)["repair"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "memory"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for extra, match in [(["--stream-memory", "-1"], "--stream-memory must be >= 0 GiB, not -1.0"),
                         (["--spill-dir", str(tmp_path / "nowhere")], "is not a directory"),
                         (["--work-dir", str(tmp_path / "w")], "--work-dir applies to --layerwise only")]:
        assert main([*argv, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("headslim: error: ") and match in err and "\n" not in err
        assert not (tmp_path / "bad").exists() and not (tmp_path / "w").exists()


# ---- --work-dir: an interrupted run resumes ----------------------------------------------------------


def _interrupt_at(monkeypatch, n: int):
    """Ctrl-C when the ``n``-th layer is read (pass 1 reads each layer once, then pass 2 once more)."""
    load, calls = offload._load_layer, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return load(*args)

    monkeypatch.setattr(offload, "_load_layer", interrupted)


def _same_shards(a, b) -> None:
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((a / "model.safetensors.index.json").read_text()) == \
        json.loads((b / "model.safetensors.index.json").read_text())


def _whole_and_resumed(tmp_path, monkeypatch, stops, **kw):
    """``(src, whole, resumed)``: a 3-layer tiny Llama shrunk layer at a time in one go, and again
    interrupted at each layer read in ``stops`` (:func:`_interrupt_at`) then resumed from its work dir;
    both runs' shards are checked equal."""
    src, work = _dense_dir(tmp_path, tiny_decoder("llama", "LlamaForCausalLM", num_hidden_layers=3)), tmp_path / "work"
    whole = shrink_layerwise(src, tmp_path / "whole", **kw)
    for stop in stops:
        _interrupt_at(monkeypatch, stop)
        with pytest.raises(KeyboardInterrupt):
            shrink_layerwise(src, tmp_path / "out", work_dir=work, **kw)
        monkeypatch.undo()
    resumed = shrink_layerwise(src, tmp_path / "out", work_dir=work, **kw)
    _same_shards(tmp_path / "whole", tmp_path / "out")
    return src, whole, resumed


# 4 layers: interrupted while scoring layer 2 (pass 1), pruning layer 0 and layer 2 (pass 2), twice in a row,
# and with every stream spilled to disk
@pytest.mark.parametrize("stops,stream_memory", [([3], None), ([5], None), ([7], None), ([3, 4], None), ([6], 0)])
def test_interrupted_run_resumes_from_the_work_dir_and_equals_an_uninterrupted_one(tmp_path, monkeypatch, stops,
                                                                                    stream_memory):
    dense = tiny_decoder("llama", "LlamaForCausalLM", num_hidden_layers=4)
    src = _dense_dir(tmp_path, dense)
    kw = dict(prune=0.5, batches=tiny_batches(5), gqa="ragged", progress=False, stream_memory=stream_memory)
    whole = shrink_layerwise(src, tmp_path / "whole", **kw)
    work = tmp_path / "work"
    done = []
    for stop in stops:
        _interrupt_at(monkeypatch, stop)
        with pytest.raises(KeyboardInterrupt):
            shrink_layerwise(src, tmp_path / "out", work_dir=work, **kw)
        monkeypatch.undo()
        assert not (tmp_path / "out").exists() and (work / "headslim-work.json").is_file()
        state = json.loads((work / "headslim-work.json").read_text())["state"]
        done.append((state["pass"], state["layers_done"]))
        assert not [p for p in work.iterdir() if p.name.endswith(".partial")]
    resumed = shrink_layerwise(src, tmp_path / "out", work_dir=work, **kw)
    assert (resumed["resumed"]["pass"], resumed["resumed"]["layers_done"]) == done[-1]
    assert resumed["scores"] == whole["scores"] and resumed["repair"] == whole["repair"]
    assert resumed["plan"]["attention"] == whole["plan"]["attention"]
    _same_shards(tmp_path / "whole", tmp_path / "out")
    assert not work.exists()  # the run made it, so the run removes it
    assert whole["resumed"] is None


def test_work_dir_states_by_pass_and_a_second_interrupt(tmp_path, monkeypatch):
    """Which layer the committed state names, for the interrupts of the test above (4 layers, 4 + 4 reads)."""
    dense = tiny_decoder("llama", "LlamaForCausalLM", num_hidden_layers=4)
    src, work = _dense_dir(tmp_path, dense), tmp_path / "work"
    kw = dict(prune=0.5, batches=tiny_batches(5), progress=False, work_dir=work)
    expected = {3: (1, 2), 5: (2, 0), 7: (2, 2)}  # read n fails: layers before it are done
    for stop, (pass_, layers_done) in expected.items():
        _interrupt_at(monkeypatch, stop)
        with pytest.raises(KeyboardInterrupt):
            shrink_layerwise(src, tmp_path / "out", **kw)
        monkeypatch.undo()
        state = json.loads((work / "headslim-work.json").read_text())["state"]
        assert (state["pass"], state["layers_done"]) == (pass_, layers_done)
        streams = sorted(p.name for p in work.glob("streams-*"))
        assert streams == ([f"streams-{pass_}-{layers_done}.safetensors"] if layers_done else [])
        assert sorted(p.name for p in work.glob("model-*")) == [f"model-{i + 1:05d}-of-00005.safetensors"
                                                               for i in range(layers_done if pass_ == 2 else 0)]
        import shutil
        shutil.rmtree(work)


def test_work_dir_refusals_are_one_line_and_touch_nothing(tmp_path, monkeypatch):
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src, work = _dense_dir(tmp_path, dense), tmp_path / "work"
    kw = dict(batches=tiny_batches(4), progress=False)
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        shrink_layerwise(src, tmp_path / "out", prune=0.5, work_dir=work, **kw)
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    with pytest.raises(HeadslimError, match=r"holds a run with other prune; rerun with the same") as e:
        shrink_layerwise(src, tmp_path / "out", prune=0.25, work_dir=work, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(HeadslimError, match="other calibration batches"):
        shrink_layerwise(src, tmp_path / "out", prune=0.5, work_dir=work, batches=tiny_batches(3), progress=False)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before and not (tmp_path / "out").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HeadslimError, match="is not empty and holds no headslim run"):
        shrink_layerwise(src, tmp_path / "out", prune=0.5, work_dir=foreign, **kw)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    for bad, match in [(tmp_path / "out", "must be separate directories"),
                       (tmp_path / "out" / "w", "must be separate directories"),
                       (src / "w", "inside the model dir")]:
        with pytest.raises(HeadslimError, match=match):
            shrink_layerwise(src, tmp_path / "out", prune=0.5, work_dir=bad, **kw)
        assert not bad.exists()
    assert not (tmp_path / "out").exists()


def test_an_empty_work_dir_the_user_made_stays_and_is_empty_after(tmp_path):
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src, work = _dense_dir(tmp_path, dense), tmp_path / "work"
    work.mkdir()
    report = shrink_layerwise(src, tmp_path / "out", prune=0.5, batches=tiny_batches(4), progress=False, work_dir=work)
    assert report["resumed"] is None and work.is_dir() and list(work.iterdir()) == []
    assert load_pruned(tmp_path / "out").headslim_plan.kept_heads == report["plan"]["attention"]["kept_heads"]


def test_undone_repair_with_a_work_dir_leaves_its_linked_shards_alone(tmp_path, monkeypatch):
    """When the final check undoes the repair, the output's shards are rewritten as new files: the work
    dir's (hard-linked) copies are not changed under it."""
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src, work = _dense_dir(tmp_path, dense), tmp_path / "work"
    kw = dict(prune=0.5, batches=tiny_batches(4), progress=False)
    monkeypatch.setattr(offload, "_mean_kls", lambda ref, others, *a: [1.0, 2.0])  # repair made it worse
    plain = shrink_layerwise(src, tmp_path / "plain", repair=True, **kw)
    assert not plain["repair"]["applied"]
    restore, seen = offload._restore_projection, {}

    def spying(path, *args):
        seen[path.name] = (work / path.name).read_bytes()
        restore(path, *args)
        assert (work / path.name).read_bytes() == seen[path.name]  # the work dir's copy is untouched

    monkeypatch.setattr(offload, "_restore_projection", spying)
    worked = shrink_layerwise(src, tmp_path / "worked", work_dir=work, **kw)
    assert seen and worked["repair"] == plain["repair"]
    _same_shards(tmp_path / "plain", tmp_path / "worked")


def test_cli_work_dir_interrupt_says_how_to_resume_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    from headslim.cli import main

    src, texts = _cli_model(tmp_path)
    work, out = tmp_path / "work", tmp_path / "cli"
    argv = ["shrink", str(src), "--layerwise", "--prune", "0.5", "--calib", str(texts), "--batch-size", "2",
            "--max-length", "16", "--out", str(out), "--no-progress", "--work-dir", str(work)]
    _interrupt_at(monkeypatch, 3)  # 3 layers: scoring layer 2
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"finished layers are kept in {work}; run the same command again to resume" in err and not out.exists()
    monkeypatch.undo()
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out and not work.exists()
    assert main([*argv[:-2], "--out", str(tmp_path / "plain")]) == 0  # the same run without a work dir
    _same_shards(tmp_path / "plain", out)


# ---- FFN neurons on the layer-at-a-time path ------------------------------------------------------


@torch.no_grad()
def _reference_neuron_scores(model, batches) -> torch.Tensor:
    """Each FFN neuron's ``||W_down[:, j]||^2 sum_t a_j(t)^2`` over real tokens, from hooks on the whole model."""
    adapter = get_adapter(model)
    blocks = adapter.mlp_blocks(model)
    widths = adapter.num_neurons(model)
    scores = torch.zeros(len(blocks), max(widths), dtype=torch.float64)
    for mask, got in _inputs_of(model, [adapter.down_proj(b) for b in blocks], batches):
        for layer, block in enumerate(blocks):
            w = weight_out_in(adapter.down_proj(block)).double()  # (d, F)
            a = got[layer][mask].double()  # (N, F)
            for j in range(widths[layer]):  # the contribution itself, not the factored form
                scores[layer, j] += torch.outer(a[:, j], w[:, j]).pow(2).sum()
    return scores


FFN_CASES = [  # (model_type, class, gqa mode, heads pruned, neurons pruned, min neurons per layer, batches)
    ("llama", "LlamaForCausalLM", "uniform", 0.5, 0.3, 0, 5),
    ("qwen3", "Qwen3ForCausalLM", "ragged", 0, 0.5, 0, 4),  # neurons only
    ("mistral", "MistralForCausalLM", "uniform", 0.25, 0.6, 2, 4),
    ("qwen2", "Qwen2ForCausalLM", "kv-groups", 0.5, "all but one", 0, 5),  # a layer loses its whole FFN
    ("gpt2", "GPT2LMHeadModel", "uniform", 0.5, 0.4, 0, 5),
]


@pytest.mark.parametrize("model_type,class_name,mode,prune,prune_ffn,min_neurons,n_batches", FFN_CASES)
def test_heads_and_ffn_neurons_equal_the_in_memory_path(tmp_path, model_type, class_name, mode, prune, prune_ffn,
                                                        min_neurons, n_batches):
    from headslim.selection import select_plan

    dense = tiny_decoder(model_type, class_name)
    adapter = get_adapter(dense)
    widths = adapter.num_neurons(dense)
    if prune_ffn == "all but one":
        prune_ffn = sum(widths) - 1
    batches = tiny_batches(n_batches)
    src = _dense_dir(tmp_path, dense)
    report = shrink_layerwise(src, tmp_path / "out", prune=prune, prune_ffn=prune_ffn, batches=batches, gqa=mode,
                              min_neurons_per_layer=min_neurons, progress=False)

    heads, neurons = _reference_scores(dense, batches), _reference_neuron_scores(dense, batches)
    torch.testing.assert_close(torch.tensor(report["neuron_scores"], dtype=torch.float64), neurons, rtol=1e-5,
                               atol=1e-9)
    plan = select_plan(heads, adapter.num_heads(dense), prune=prune, kv_head_of_q=kv_maps(dense), gqa=mode,
                       neuron_scores=neurons, num_neurons=widths, prune_ffn=prune_ffn,
                       min_neurons_per_layer=min_neurons)
    assert report["plan"]["attention"]["kept_heads"] == plan.kept_heads
    assert report["plan"]["mlp"]["kept_neurons"] == plan.kept_neurons
    assert report["neurons_after"] == sum(plan.neurons_after) < sum(widths)
    if min_neurons:
        assert min(plan.neurons_after) >= min_neurons
    if isinstance(prune_ffn, int):
        assert sorted(plan.neurons_after)[0] == 0  # the case it stands for

    model = prune_heads(copy.deepcopy(dense), plan)
    expected = repair(model, dense, plan, batches, progress=False)
    got = report["repair"]
    assert [(e["layer"], e["kind"], e["applied"]) for e in got["layers"]] == \
        [(e["layer"], e["kind"], e["applied"]) for e in expected.layers]
    assert any(e["kind"] == "mlp" for e in got["layers"])
    for a, b in zip(got["layers"], expected.layers):
        assert a["val_after"] == pytest.approx(b["val_after"], rel=1e-5)
    assert got["applied"] == expected.applied
    assert got["check"]["before"] == pytest.approx(expected.check["before"], rel=1e-6)
    assert got["check"]["after"] == pytest.approx(expected.check["after"], rel=1e-6)

    loaded = load_pruned(tmp_path / "out")
    assert get_adapter(loaded).num_neurons(loaded) == plan.neurons_after
    with torch.no_grad():
        for seed in range(2):
            inputs = tiny_inputs(seed=seed + 7)
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,class_name", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_undone_repair_restores_the_plain_sliced_down_projections(tmp_path, monkeypatch, model_type, class_name):
    """The undo re-reads the dense projections and slices their input columns (GPT-2: Conv1D rows)."""
    dense = tiny_decoder(model_type, class_name)
    monkeypatch.setattr(offload, "_mean_kls", lambda *args: [0.0, 1.0])  # "repair made it worse"
    report = shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=0.5, prune_ffn=0.5,
                              batches=tiny_batches(5), progress=False)
    assert not report["repair"]["applied"] and any(e["kind"] == "mlp" for e in report["repair"]["layers"])
    from headslim.plan import PrunePlan

    model = prune_heads(copy.deepcopy(dense), PrunePlan.from_dict(report["plan"]))
    with torch.no_grad():
        inputs = tiny_inputs(seed=3)
        torch.testing.assert_close(load_pruned(tmp_path / "out")(**inputs).logits, model(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)


def test_ffn_pruning_resumes_from_a_work_dir(tmp_path, monkeypatch):
    kw = dict(prune=0.5, prune_ffn=0.4, batches=tiny_batches(4), progress=False)
    # scoring layer 1; then, resumed there, pruning layer 2 (reads: 1, 2 scoring, 0, 1, 2)
    _, whole, resumed = _whole_and_resumed(tmp_path, monkeypatch, (2, 5), **kw)
    assert resumed["resumed"] == {"pass": 2, "layers_done": 2}
    assert resumed["neuron_scores"] == whole["neuron_scores"] and resumed["repair"] == whole["repair"]


def test_ffn_refusals_are_one_line(tmp_path):
    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src = _dense_dir(tmp_path, dense)
    total = sum(get_adapter(dense).num_neurons(dense))
    for kwargs, match in [(dict(prune_ffn=1.5), "--prune-ffn 1.5: give a fraction"),
                          (dict(prune_ffn=total, min_neurons_per_layer=1), f"cannot remove {total} of {total} FFN"),
                          (dict(prune_ffn=0.2, min_neurons_per_layer=-1), "--min-neurons-per-layer must be >= 0")]:
        with pytest.raises(HeadslimError, match=match):
            shrink_layerwise(src, tmp_path / "out", prune=0.5, batches=tiny_batches(2), progress=False, **kwargs)
    with pytest.raises(HeadslimError, match="--prune 0 removes no head"):  # --prune 0 without --prune-ffn
        shrink_layerwise(src, tmp_path / "out", prune=0, batches=tiny_batches(2), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_layerwise_prunes_ffn_neurons(tmp_path, capsys):
    from headslim.cli import main

    src, texts = _cli_model(tmp_path)
    argv = ["shrink", str(src), "--layerwise", "--prune", "0", "--prune-ffn", "0.25", "--calib", str(texts),
            "--batch-size", "2", "--max-length", "16", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FFN neurons per layer: [37, 37, 37] -> " in out and "(83 of 111 kept)" in out  # 28 of 111 go
    loaded = load_pruned(tmp_path / "cli")
    assert sum(get_adapter(loaded).num_neurons(loaded)) == 83
    assert get_adapter(loaded).num_heads(loaded) == [8, 8, 8]  # --prune 0: every head stays


# ---- encoders (bare models, sentence embeddings) -------------------------------------------------------

ENCODER_CASES = [  # (model_type, class, heads pruned, neurons pruned, calibration batches)
    ("bert", "BertModel", 0.5, None, 5),
    ("roberta", "RobertaModel", 0.5, 0.3, 4),
    ("distilbert", "DistilBertModel", "all but one", 0.5, 5),  # layers keep no head: bias-only projections
    ("electra", "ElectraModel", 0, "all but one", 5),  # neurons only; layers lose their whole FFN
]


@pytest.mark.parametrize("model_type,class_name,prune,prune_ffn,n_batches", ENCODER_CASES)
def test_encoders_equal_the_in_memory_path(tmp_path, model_type, class_name, prune, prune_ffn, n_batches):
    from headslim.selection import select_plan

    dense = tiny_model(model_type, class_name)
    adapter = get_adapter(dense)
    heads, widths = adapter.num_heads(dense), adapter.num_neurons(dense)
    prune = sum(heads) - 1 if prune == "all but one" else prune
    prune_ffn = sum(widths) - 1 if prune_ffn == "all but one" else prune_ffn
    batches = tiny_batches(n_batches)
    report = shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=prune, prune_ffn=prune_ffn,
                              min_heads_per_layer=0, batches=batches, progress=False)

    scores = _reference_scores(dense, batches)
    torch.testing.assert_close(torch.tensor(report["scores"], dtype=torch.float64), scores, rtol=1e-5, atol=1e-9)
    neurons = _reference_neuron_scores(dense, batches) if prune_ffn is not None else None
    plan = select_plan(scores, heads, prune=prune, min_per_layer=0, kv_head_of_q=kv_maps(dense),
                       neuron_scores=neurons, num_neurons=widths if neurons is not None else None, prune_ffn=prune_ffn)
    assert report["plan"]["attention"]["kept_heads"] == plan.kept_heads
    if prune_ffn is not None:
        assert report["plan"]["mlp"]["kept_neurons"] == plan.kept_neurons

    model = prune_heads(copy.deepcopy(dense), plan)
    expected = repair(model, dense, plan, batches, progress=False)
    got = report["repair"]
    assert [(e["layer"], e["kind"], e["applied"]) for e in got["layers"]] == \
        [(e["layer"], e["kind"], e["applied"]) for e in expected.layers] and got["layers"]
    for a, b in zip(got["layers"], expected.layers):
        assert a["val_after"] == pytest.approx(b["val_after"], rel=1e-5)
    assert got["applied"] == expected.applied
    assert got["check"]["metric"] == expected.check["metric"] == "cosine"
    assert got["check"]["before"] == pytest.approx(expected.check["before"], rel=1e-6)
    assert got["check"]["after"] == pytest.approx(expected.check["after"], rel=1e-6)

    loaded = load_pruned(tmp_path / "out")
    assert type(loaded) is type(dense)
    with torch.no_grad():
        for seed in range(2):
            inputs = tiny_inputs(seed=seed + 7)
            torch.testing.assert_close(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)


def test_encoder_undo_restores_the_plain_sliced_projections_and_refuses_task_heads(tmp_path, monkeypatch):
    dense = tiny_model("bert", "BertModel")
    heads = sum(get_adapter(dense).num_heads(dense))
    monkeypatch.setattr(offload, "_mean_cosines", lambda *args: [0.9, 0.5])  # "repair made it worse"
    report = shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=heads - 1, prune_ffn=0.5,
                              min_heads_per_layer=0, batches=tiny_batches(5), progress=False)
    monkeypatch.undo()
    assert report["repair"]["check"]["after"] == 0.5 and not report["repair"]["applied"]
    assert any(e["heads"] == 0 for e in report["repair"]["layers"] if e["kind"] == "attention")  # bias-only
    from headslim.plan import PrunePlan

    model = prune_heads(copy.deepcopy(dense), PrunePlan.from_dict(report["plan"]))
    with torch.no_grad():
        inputs = tiny_inputs(seed=3)
        torch.testing.assert_close(load_pruned(tmp_path / "out")(**inputs).last_hidden_state,
                                   model(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)
    classifier = _dense_dir(tmp_path / "c", tiny_model("bert", "BertForSequenceClassification"))
    _one_line_refusal(tmp_path / "out2", "BertForSequenceClassification has a task head", model_dir=classifier,
                      prune=0.5, batches=tiny_batches(2))


def test_cli_layerwise_shrinks_a_sentence_embedding_model(tmp_path, capsys):
    from headslim.cli import main

    src, texts = _cli_model(tmp_path, tiny_model("bert", "BertModel"))
    (src / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x.Transformer"},
                                                  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"}]))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    argv = ["shrink", str(src), "--layerwise", "--prune", "0.5", "--prune-ffn", "0.25", "--calib", str(texts),
            "--batch-size", "2", "--max-length", "16", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out calibration embedding cosine to dense" in out
    assert (tmp_path / "cli" / "modules.json").is_file() and (tmp_path / "cli" / "1_Pooling" / "config.json").is_file()
    loaded = load_pruned(tmp_path / "cli")
    dense = tiny_model("bert", "BertModel")
    assert sum(get_adapter(loaded).num_heads(loaded)) == sum(get_adapter(dense).num_heads(dense)) // 2


# ---- obs-local: repair-aware layer-local scores ----------------------------------------------------------


def _reference_sequences(model, batches, ffn: bool, ridge: float = 1e-2):
    """Per kind, per layer: obs_sequence with the identity metric on the projection's input moments over
    real tokens (centred where it has a bias), from hooks on the whole model."""
    from headslim.repair import _has_bias
    from headslim.scoring.reconstruction import obs_sequence

    adapter = get_adapter(model)
    kinds = {"attention": ([adapter.o_proj(b) for b in adapter.attention_blocks(model)], adapter.head_dim(model))}
    if ffn:
        kinds["mlp"] = ([adapter.down_proj(b) for b in adapter.mlp_blocks(model)], 1)
    out = {}
    for kind, (projs, group) in kinds.items():
        xs = [[] for _ in projs]
        with torch.no_grad():
            for mask, got in _inputs_of(model, projs, batches):
                for layer in range(len(projs)):
                    xs[layer].append(got[layer][mask].double())
        seqs = []
        for proj, x in zip(projs, xs):
            x = torch.cat(x)
            sigma = x.T @ x / len(x)
            if _has_bias(proj):
                sigma = sigma - torch.outer(x.mean(0), x.mean(0))
            seqs.append(obs_sequence(sigma, None, weight_out_in(proj), group, ridge))
        out[kind] = seqs
    return out


OBS_CASES = [  # (model_type, class, heads pruned, neurons pruned, gqa mode)
    ("llama", "LlamaForCausalLM", 0.5, 0.3, "uniform"),
    ("qwen3", "Qwen3ForCausalLM", 0.4, None, "ragged"),
    ("gpt2", "GPT2LMHeadModel", 0.5, 0.4, "uniform"),
    ("bert", "BertModel", 0.5, 0.5, "uniform"),
]


@pytest.mark.parametrize("model_type,class_name,prune,prune_ffn,mode", OBS_CASES)
def test_obs_local_scores_plan_and_repair_equal_the_reference(tmp_path, model_type, class_name, prune, prune_ffn,
                                                              mode):
    from headslim.scoring.common import merged_scores
    from headslim.selection import select_plan

    dense = tiny_model(model_type, class_name) if model_type == "bert" else tiny_decoder(model_type, class_name)
    adapter = get_adapter(dense)
    heads, widths = adapter.num_heads(dense), adapter.num_neurons(dense)
    batches = tiny_batches(5)
    report = shrink_layerwise(_dense_dir(tmp_path, dense), tmp_path / "out", prune=prune, prune_ffn=prune_ffn,
                              batches=batches, gqa=mode, method="obs-local", progress=False)
    assert report["plan"]["provenance"]["method"] == "obs-local"

    seqs = _reference_sequences(dense, batches, prune_ffn is not None)
    scores = merged_scores(seqs["attention"], heads, 1).double()
    assert torch.equal(torch.tensor(report["scores"], dtype=torch.float64), scores)  # the same removal order
    neurons = merged_scores(seqs["mlp"], widths, 0).double() if prune_ffn is not None else None
    plan = select_plan(scores, heads, prune=prune, kv_head_of_q=kv_maps(dense), gqa=mode, neuron_scores=neurons,
                       num_neurons=widths if neurons is not None else None, prune_ffn=prune_ffn)
    assert report["plan"]["attention"]["kept_heads"] == plan.kept_heads
    if prune_ffn is not None:
        assert report["plan"]["mlp"]["kept_neurons"] == plan.kept_neurons
        fn = shrink_layerwise(_dense_dir(tmp_path / "f", dense), tmp_path / "fn", prune=prune, prune_ffn=prune_ffn,
                              batches=batches, gqa=mode, progress=False)
        assert fn["plan"]["mlp"]["kept_neurons"] != plan.kept_neurons  # a different scorer, a different choice

    model = prune_heads(copy.deepcopy(dense), plan)
    expected = repair(model, dense, plan, batches, progress=False)
    assert report["repair"]["applied"] == expected.applied
    assert report["repair"]["check"]["after"] == pytest.approx(expected.check["after"], rel=1e-6)
    loaded = load_pruned(tmp_path / "out")
    with torch.no_grad():
        inputs = tiny_inputs(seed=7)
        key = "logits" if adapter.decoder else "last_hidden_state"
        torch.testing.assert_close(getattr(loaded(**inputs), key), getattr(model(**inputs), key), rtol=1e-5, atol=1e-5)


def test_obs_local_resumes_from_a_work_dir_and_the_cli_takes_it(tmp_path, monkeypatch, capsys):
    from headslim.cli import main

    kw = dict(prune=0.5, prune_ffn=0.4, batches=tiny_batches(4), progress=False, method="obs-local")
    # scoring layer 1: layer 0's sequences are in the work dir
    src, whole, resumed = _whole_and_resumed(tmp_path, monkeypatch, (2,), **kw)
    assert resumed["resumed"] == {"pass": 1, "layers_done": 1}
    assert resumed["scores"] == whole["scores"] and resumed["neuron_scores"] == whole["neuron_scores"]
    assert all(resumed["plan"][k] == whole["plan"][k] for k in ("attention", "mlp"))  # not the time it was made
    with pytest.raises(HeadslimError, match="--layerwise scores with function-norm or obs-local"):
        shrink_layerwise(src, tmp_path / "x", **{**kw, "method": "fisher"})

    src2, texts = _cli_model(tmp_path / "c")
    argv = ["shrink", str(src2), "--layerwise", "--method", "obs-local", "--prune", "0.5", "--calib", str(texts),
            "--batch-size", "2", "--max-length", "16", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(argv) == 0
    assert "method: obs-local (layer at a time" in capsys.readouterr().out


def test_device_choice_is_checked_in_one_line(tmp_path, capsys, monkeypatch):
    """--device cpu is the default path; a device this torch lacks is refused before any work (the CUDA
    runs themselves are checked on a GPU machine: bench/gpu_shrink_check.py)."""
    from headslim.cli import main
    from headslim.distributed import device_for

    assert device_for(None) == device_for("cpu") == device_for(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, match in [("cuda", "sees no CUDA device"), ("cuda:1", "sees no CUDA device"),
                        ("gpu", r"must be cpu \(default\) or cuda\[:N\], not .gpu."), ("cuda:x", "must be cpu")]:
        with pytest.raises(HeadslimError, match=match):
            device_for(name)
    src, texts = _cli_model(tmp_path)
    capsys.readouterr()
    argv = ["shrink", str(src), "--prune", "0.5", "--calib", str(texts), "--batch-size", "2", "--max-length", "16",
            "--no-progress", "--device"]
    for extra in ([], ["--layerwise"]):
        assert main([*argv, "cuda", *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "headslim: error: --device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)"
        assert not (tmp_path / "bad").exists()
    monkeypatch.undo()
    assert main([*argv, "cpu", "--layerwise", "--out", str(tmp_path / "cpu"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HeadslimError, match="cuda:3 does not exist"):
        device_for("cuda:3")


# ---- --prune-params: one budget for heads and FFN neurons ------------------------------------------------


@pytest.mark.parametrize("model_type,class_name,method,min_neurons", [
    ("llama", "LlamaForCausalLM", "function-norm", 20),  # neurons capped: the heads take the rest of the budget
    ("bert", "BertModel", "obs-local", 0)])
def test_prune_params_is_the_plan_of_the_counts_it_chose(tmp_path, model_type, class_name, method, min_neurons):
    from headslim.selection import split_params

    dense = tiny_model(model_type, class_name) if model_type == "bert" else tiny_decoder(model_type, class_name)
    src, batches = _dense_dir(tmp_path, dense), tiny_batches(5)
    kw = dict(batches=batches, method=method, gqa="ragged", min_neurons_per_layer=min_neurons, progress=False)
    report = shrink_layerwise(src, tmp_path / "one", prune=0, prune_params=0.4, **kw)
    heads = report["heads_before"] - report["heads_after"]
    neurons = report["neurons_before"] - report["neurons_after"]
    assert heads > 0 and neurons > 0  # both kinds spent the one budget here
    head_params, neuron_params = offload._structure_params(dense, get_adapter(dense))
    assert report["params"]["target"] == 0.4
    assert 0.4 <= report["params"]["removed"] < 0.4 + max(head_params) / (sum(
        n * h for n, h in zip(get_adapter(dense).num_heads(dense), head_params)) + sum(
        w * p for w, p in zip(get_adapter(dense).num_neurons(dense), neuron_params)))
    two = shrink_layerwise(src, tmp_path / "two", prune=heads, prune_ffn=neurons, **kw)
    assert two["plan"]["attention"] == report["plan"]["attention"] and two["plan"]["mlp"] == report["plan"]["mlp"]
    _same_shards(tmp_path / "one", tmp_path / "two")
    # the counts are split_params' on the reported costs (function-norm: the scores themselves)
    if method == "function-norm":
        got = split_params(torch.tensor(report["scores"]), torch.tensor(report["neuron_scores"]),
                           get_adapter(dense).num_heads(dense), get_adapter(dense).num_neurons(dense), fraction=0.4,
                           head_params=head_params, neuron_params=neuron_params, min_neurons_per_layer=min_neurons)
        assert got == (heads, neurons)


def test_prune_params_refusals_and_cli(tmp_path, capsys):
    from headslim.cli import main

    dense = tiny_decoder("llama", "LlamaForCausalLM")
    src = _dense_dir(tmp_path, dense)
    for kwargs, match in [(dict(prune=0.5, prune_params=0.3), "leave out --prune and --prune-ffn"),
                          (dict(prune=0, prune_ffn=0.2, prune_params=0.3), "leave out --prune and --prune-ffn"),
                          (dict(prune=0, prune_params=1.0), r"--prune-params must be a fraction in \(0, 1\)")]:
        with pytest.raises(HeadslimError, match=match):
            shrink_layerwise(src, tmp_path / "out", batches=tiny_batches(2), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    src2, texts = _cli_model(tmp_path / "c")
    capsys.readouterr()
    argv = ["shrink", str(src2), "--prune-params", "0.3", "--calib", str(texts), "--batch-size", "2", "--max-length",
            "16", "--no-progress"]
    for extra, err in [([], "--prune-params applies to --layerwise"),
                       (["--layerwise", "--prune", "0.5"], "leave out --prune and --prune-ffn")]:
        assert main([*argv, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert err in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*argv, "--layerwise", "--out", str(tmp_path / "cli")]) == 0
    assert "parameters of heads and FFN neurons removed: " in capsys.readouterr().out


def test_the_prepared_gpu_check_runs(tmp_path):
    """bench/gpu_shrink_check.py is run blind on a lent GPU with minutes of device time: keep it working
    (here both sides on the CPU, so every row must agree exactly)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_shrink_check", Path(__file__).resolve().parent.parent / "bench" / "gpu_shrink_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--smoke", "--out", str(tmp_path), "--skip", "cli"]) == 0  # cli: minutes on 2 cores
    result = json.loads((tmp_path / "gpu_shrink_check.json").read_text())
    # per model: 2 layer-at-a-time rows, 1 in memory, 2 over a device map (fisher; + FFN magnitude)
    assert len(result["parity"]) == 5 * len(check.CASES) and all(r["ok"] for r in result["parity"])
    assert {r["path"] for r in result["parity"]} == {"layerwise", "in-memory", "device-map"}

"""``headslim bench --task causal-lm`` (``headslim.bench_decoder``): the analytic ideals against
PyTorch's own counts, the ORT decode loop against the PyTorch one, and the run end to end."""

import copy
import json
import re

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from headslim.arch import kv_maps
from headslim.bench import BenchConfig, BenchContext, OrtBackend, bench
from headslim.bench_decoder import TorchDecoderSession, decoder_cost
from headslim.cli import main
from headslim.compat import cache_kwargs, output_cache
from headslim.errors import HeadslimError
from headslim.gqa import select_gqa
from headslim.io import load_model, save_pruned
from headslim.surgery import prune_heads
from tests.conftest import LAYERS, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"), ("qwen3", "Qwen3ForCausalLM")]


def _pair(tmp_path, family="llama", cls="LlamaForCausalLM", mode="ragged", prune=0.4):
    """A dense tiny decoder and a pruned copy (``mode`` GQA selection), saved; returns the two dirs."""
    model = tiny_decoder(family, cls)
    maps = kv_maps(model)
    scores = torch.rand(LAYERS, len(maps[0]), generator=torch.Generator().manual_seed(1))
    plan = select_gqa(scores, maps, prune=prune, mode=mode, min_per_layer=1)
    model.save_pretrained(tmp_path / "dense")
    save_pruned(prune_heads(copy.deepcopy(model), plan), tmp_path / "pruned", plan)
    return tmp_path / "dense", tmp_path / "pruned"


@pytest.mark.parametrize("family,cls", FAMILIES)
def test_prefill_flops_equal_torch_flop_counter(tmp_path, family, cls):
    """Matmul FLOPs are PyTorch's own count of mm/addmm; attention mixing is its bmm count scaled
    from the full T x T square (eager attention computes it all) to the causal half."""
    _, pruned = _pair(tmp_path, family, cls)
    model = load_model(pruned, attn_implementation="eager")
    batch, seq = 2, 7
    ids = torch.randint(1, 50, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # logits at every position
    by_module = counter.get_flop_counts()
    counts = {str(op).split(".")[-1]: n for op, n in by_module["Global"].items()}
    # attention mixing: the bmm of the layers' attention modules (not the rotary embedding's, on 4.x a bmm too)
    mixing = sum(n for name, ops in by_module.items() if re.search(r"\.(self_attn|attn)$", name)
                 for op, n in ops.items() if str(op).endswith("bmm"))
    cost = decoder_cost(model, batch, seq, 1, logits_positions=seq)
    assert cost["prefill_matmul_flops"] == counts.get("mm", 0) + counts.get("addmm", 0)
    assert mixing > 0 and cost["prefill_attention_flops"] * 2 * seq == mixing * (seq + 1)
    # generate's prefill computes the LM head at the last position only
    last = decoder_cost(model, batch, seq, 1, logits_positions=1)
    head = model.get_output_embeddings().weight.numel()
    assert cost["prefill_matmul_flops"] - last["prefill_matmul_flops"] == 2 * batch * (seq - 1) * head


@pytest.mark.parametrize("family,cls", FAMILIES)
def test_decode_bytes_equal_weights_and_the_real_cache(tmp_path, family, cls):
    """Bytes per step = the model's parameters but its input embedding table(s) + the KV cache
    transformers really holds at the mean past length (one step: prompt + 1 positions)."""
    _, pruned = _pair(tmp_path, family, cls)
    model = load_model(pruned)
    batch, prompt = 3, 5
    ids = torch.randint(1, 50, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        step = model(input_ids=ids[:, :1], attention_mask=torch.ones(batch, prompt + 1, dtype=torch.long),
                     use_cache=True, **cache_kwargs(model, output_cache(out)))
    cache = output_cache(step)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)] if hasattr(cache, "layers") \
        else [t for pair in cache for t in pair]
    cache_bytes = sum(t.numel() * t.element_size() for t in tensors)
    assert tensors[0].shape[2] == prompt + 1
    embeddings = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    embeddings.pop(id(model.get_output_embeddings().weight), None)  # a tied table is read whole as the LM head
    params = sum(p.numel() for p in model.parameters())
    cost = decoder_cost(model, batch, prompt, 1)
    assert cost["weight_bytes"] == 4 * (params - sum(embeddings.values()))
    assert cost["kv_cache_bytes_mean"] == cache_bytes
    assert cost["decode_bytes_per_step"] == cost["weight_bytes"] + cache_bytes


def test_ort_decode_loop_picks_the_same_tokens_as_torch(tmp_path):
    """The timed ORT loop (present fed back as past, mask and positions advanced) decodes what
    transformers' cache decodes: same greedy tokens, on the pruned ragged model and the dense one."""
    dense, pruned = _pair(tmp_path)
    ctx = BenchContext(dirs={"dense": dense, "pruned": pruned},
                       models={"dense": load_model(dense), "pruned": load_model(pruned)}, threads=1,
                       tmp=tmp_path / "scratch", task="causal-lm")
    (tmp_path / "scratch").mkdir()
    ort_sessions = OrtBackend("ort-cpu", "fp32", "cpu").prepare(ctx)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for role in ("dense", "pruned"):
        torch_session = TorchDecoderSession(ctx.models[role], "cpu")
        torch_session.run(torch_session.feed(ids, mask), 6)
        ort_session = ort_sessions[role]
        ort_session.run(ort_session.feed(ids, mask), 6)
        assert ort_session.last_tokens.shape == (2, 7)
        np.testing.assert_array_equal(ort_session.last_tokens, torch_session.last_tokens)
    with torch.no_grad():  # and both equal generate's greedy choice
        expected = ctx.models["pruned"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=7,
                                                 min_new_tokens=7, do_sample=False)[:, 9:]
    np.testing.assert_array_equal(ort_sessions["pruned"].last_tokens, expected.numpy())


def test_bench_causal_lm_end_to_end(tmp_path):
    dense, pruned = _pair(tmp_path, mode="kv-groups", prune=0.5)  # every layer fuses into GroupQueryAttention
    config = BenchConfig(backends="torch-sdpa-cpu,ort-cpu,ort-int8-cpu,ort-opt-cpu", batches=(1, 2), prompt=12, new_tokens=3,
                         warmup=1, min_runs=2, min_seconds=0)
    result = bench(pruned, dense, config, out=tmp_path / "out", log=None)
    assert result["settings"]["task"] == "causal-lm"
    points = [p for p in result["points"] if p["status"] == "ok"]
    assert {(p["backend"], p["batch"]) for p in points} == {(b, n) for b in ("torch-sdpa-cpu", "ort-cpu", "ort-int8-cpu",
                                                                       "ort-opt-cpu") for n in (1, 2)}
    for p in points:
        assert p["dense"]["runs"] == p["pruned"]["runs"] >= 2
        assert p["decode_speedup"] == pytest.approx(p["pruned"]["decode_tokens_per_s"] / p["dense"]["decode_tokens_per_s"])
        assert p["analytic"]["ideal_decode_speedup"] > 1 and p["analytic"]["ideal_prefill_speedup"] > 1
        # torch's prefill keeps the LM head at one position, the exported graph at all of them
        assert p["analytic"]["dense"]["logits_positions"] == (12 if p["backend"].startswith("ort") else 1)
    assert result["models"]["pruned"]["cache_kv_heads"] == [1] * LAYERS  # kv-groups: 50 % of 4 q / 2 kv heads
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "byte-ideal" in md and "| ort-cpu | 2 | 12 |" in md
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["points"][0]["new_tokens"] == 3


def test_bench_causal_lm_cli_and_refusals(tmp_path, capsys):
    dense, pruned = _pair(tmp_path)
    args = ["bench", str(pruned), "--baseline", str(dense), "--backend", "torch-eager-cpu", "--batch", "1",
            "--prompt", "6", "--new-tokens", "2", "--runs", "1", "--warmup", "0", "--min-time", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "byte-ideal" in out and "torch-eager-cpu" in out
    # past the model's positions: refused from config.json, before any weights load
    limit = load_model(dense).config.max_position_embeddings
    with pytest.raises(HeadslimError, match="--prompt \\+ --new-tokens"):
        bench(pruned, dense, BenchConfig(backends="torch-eager-cpu", batches=(1,), prompt=limit, new_tokens=1))
    with pytest.raises(HeadslimError, match="--prompt and --new-tokens"):
        BenchConfig(prompt=0)
    # a graph of another model is refused, not timed
    other = tmp_path / "other"
    other.mkdir()
    _, other_pruned = _pair(other, mode="uniform", prune=0.5)
    from headslim.export_decoder import export_decoder

    export_decoder(other_pruned, tmp_path / "other-onnx", generate_tokens=2)
    with pytest.raises(HeadslimError, match="not an export of|does not compute"):
        bench(pruned, dense, BenchConfig(backends="ort-cpu", batches=(1,), prompt=6, new_tokens=1, min_runs=1,
                                         min_seconds=0, onnx_pruned=str(tmp_path / "other-onnx")), log=None)


def test_causal_lm_task_refused_for_an_encoder(tmp_path):
    from tests.conftest import tiny_model

    model = tiny_model("bert", "BertModel")
    model.save_pretrained(tmp_path / "enc")
    with pytest.raises(HeadslimError, match="--task causal-lm needs a decoder"):
        bench(tmp_path / "enc", tmp_path / "enc", BenchConfig(backends="torch-eager-cpu", task="causal-lm"))

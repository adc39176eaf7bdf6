"""Layer-at-a-time streams: they reproduce the model's own forward pass, and repair through them equals
the sequential repair computed with full forward passes per site, at a cost linear in depth."""

import copy
from collections import Counter

import pytest
import torch

from headslim.arch import get_adapter
from headslim.layerwise import Stop, Stream, model_inputs, same_call
from headslim.repair import _add, _capture, _has_bias, _o_weight, _set_o_weight, _site_modules, _solve, repair
from headslim.surgery import prune_heads
from tests.conftest import tiny_batches
from tests.test_mlp import CASES, build, joint_plans


def _last_layer_output(model, batch):
    got = {}
    last = get_adapter(model).layers(model)[-1]
    handle = last.register_forward_hook(lambda m, a, out: got.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(**model_inputs(model, batch))
    handle.remove()
    return got["h"]


@pytest.mark.parametrize("model_type,class_name", CASES)
def test_stream_through_every_layer_is_the_forward_pass(model_type, class_name):
    for model in (build(model_type, class_name), prune_heads(build(model_type, class_name),
                                                             joint_plans(build(model_type, class_name), 1)[1])):
        batches = tiny_batches(2)
        stream = Stream(model, batches)
        for _ in range(len(stream.layers)):
            stream.advance()
        for batch, hidden in zip(batches, stream.hidden):
            torch.testing.assert_close(hidden, _last_layer_output(model, batch), rtol=1e-5, atol=1e-5)


def test_a_model_that_builds_arguments_per_layer_is_recorded_at_every_layer():
    """Qwen2 with sliding-window layers passes them their own mask: equal to the full mask in a batch no
    longer than the window, different in a longer one. Streams must follow the forward pass in both."""
    from tests.conftest import tiny_decoder, tiny_inputs

    model = tiny_decoder("qwen2", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    batches = [tiny_inputs(seq=3, seed=0), tiny_inputs(seq=11, seed=1)]
    stream = Stream(model, batches)
    assert not same_call(stream.calls[1][1], stream.calls[1][0])
    for _ in range(len(stream.layers)):
        stream.advance()
    for batch, hidden in zip(batches, stream.hidden):
        torch.testing.assert_close(hidden, _last_layer_output(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,class_name", CASES)
def test_layers_given_the_same_arguments_are_recorded_from_the_first_batch_only(model_type, class_name):
    """Every supported family builds its mask once: after the first batch, recording stops at layer 0."""
    model = build(model_type, class_name)
    entered = Counter()
    for i, layer in enumerate(get_adapter(model).layers(model)):
        layer.register_forward_pre_hook(lambda mod, a, i=i: entered.update([i]))
    stream = Stream(model, tiny_batches(3))
    assert entered[0] == 3 and all(entered[i] == 1 for i in range(1, len(stream.layers)))
    for calls in stream.calls[1:]:
        assert all(c is calls[0] for c in calls)


def _sites(plan, bias_only: bool):
    """Every projection repair fits, in forward order (a layer that kept nothing: where the family keeps
    a bias-only projection)."""
    sites = []
    for layer, (kept, n) in enumerate(zip(plan.kept_heads, plan.num_heads)):
        if len(kept) < n and (kept or bias_only):
            sites.append((layer, "attention"))
        kept = plan.kept_neurons[layer]
        if len(kept) < plan.num_neurons[layer] and (kept or bias_only):
            sites.append((layer, "mlp"))
    return sites


@torch.no_grad()
def _full_pass_to(model, site, batch):
    """The site's captures from a whole forward pass of ``model`` from its embeddings (the old way)."""
    got, handles = _capture(model, site, want_input=True)
    try:
        model(**model_inputs(model, batch))
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _reference_repair(model, dense, plan, batches, ridge=1e-2):
    """Sequential repair with a full forward pass of both models per site and batch (quadratic in depth)."""
    for site in _sites(plan, get_adapter(model).keeps_bias_projection):
        proj = _site_modules(model, site)[0]
        stats = {}
        for batch in batches:
            mask = batch["attention_mask"].bool()
            ref, cur = _full_pass_to(dense, site, batch), _full_pass_to(model, site, batch)
            kept = plan.kept_heads[site[0]] if site[1] == "attention" else plan.kept_neurons[site[0]]
            x = cur["c"][mask] if kept else cur["c"][mask][:, :0]
            _add(stats, x, (ref["y"] + ref["x"] - cur["x"])[mask], _has_bias(proj))
        _set_o_weight(proj, _solve(stats, _o_weight(proj), ridge, _has_bias(proj)))


@pytest.mark.parametrize("model_type,class_name", CASES)
def test_streamed_repair_equals_the_full_pass_reference(model_type, class_name):
    dense = build(model_type, class_name)
    plan = joint_plans(dense, 2)[2]
    ours, ref = prune_heads(copy.deepcopy(dense), plan), prune_heads(copy.deepcopy(dense), plan)
    batches = tiny_batches(3)
    report = repair(ours, dense, plan, batches, holdout=0.0, check=False, progress=False)
    _reference_repair(ref, dense, plan, batches)
    sites = _sites(plan, get_adapter(dense).keeps_bias_projection)
    assert [(e["layer"], e["kind"]) for e in report.layers] == sites and all(e["applied"] for e in report.layers)
    for site in sites:
        torch.testing.assert_close(_o_weight(_site_modules(ours, site)[0]), _o_weight(_site_modules(ref, site)[0]),
                                   rtol=1e-6, atol=1e-6)


def _layer_runs(depth):
    """How often each layer of the dense and the pruned model runs during one repair, per batch."""
    dense = build("bert", "BertModel")
    dense.config.num_hidden_layers = depth
    layers = get_adapter(dense).layers(dense)
    encoder = dense.base_model.encoder
    encoder.layer = torch.nn.ModuleList([copy.deepcopy(layers[i % len(layers)]) for i in range(depth)])
    heads, widths = get_adapter(dense).num_heads(dense), get_adapter(dense).num_neurons(dense)
    from headslim.plan import PrunePlan

    plan = PrunePlan(heads, [list(range(n - 1)) for n in heads], num_neurons=widths,
                     kept_neurons=[list(range(w // 2)) for w in widths])
    model = prune_heads(copy.deepcopy(dense), plan)
    runs = Counter()
    for name, m in (("dense", dense), ("pruned", model)):
        for i, layer in enumerate(get_adapter(m).layers(m)):
            layer.register_forward_pre_hook(lambda mod, a, name=name, i=i: runs.update([(name, i)]))
    batches = tiny_batches(2)
    repair(model, dense, plan, batches, holdout=0.0, check=False, progress=False)
    return {k: v / len(batches) for k, v in runs.items()}


def test_repair_runs_each_layer_a_fixed_number_of_times_whatever_the_depth():
    shallow, deep = _layer_runs(3), _layer_runs(12)
    # dense: once to carry the stream, and to record the layers' arguments on the first of the two
    # batches only (every layer is given the same ones); pruned: once per site (attention, FFN) and once
    # to carry the stream (layer 0 is also entered, not run, to take its input)
    assert deep[("dense", 0)] == 2 and max(v for (name, i), v in deep.items() if name == "dense" and i > 0) == 1.5
    assert max(v for (name, i), v in deep.items() if name == "pruned" and i > 0) == 3
    assert deep[("pruned", 0)] == 4
    assert sum(deep.values()) / sum(shallow.values()) <= 12 / 3 + 0.01


@pytest.mark.parametrize("model_type,class_name,inputs", [("bert", "BertModel", "pruned"), ("bert", "BertModel", "dense"),
                                                          ("llama", "LlamaForCausalLM", "pruned"),
                                                          ("gpt2", "GPT2LMHeadModel", "dense")])
@pytest.mark.parametrize("limit", [0, 3000])
def test_spilled_repair_gives_the_same_weights_and_report_and_leaves_no_files(tmp_path, model_type, class_name,
                                                                              inputs, limit):
    """Streams, outputs and fit references spilled to files (all of them, or past a small budget)
    round-trip exactly: the same re-fitted weights and decisions as in memory."""
    from headslim.layerwise import Spill

    dense = build(model_type, class_name)
    plan = joint_plans(dense, 2)[2]
    ours, ref = prune_heads(copy.deepcopy(dense), plan), prune_heads(copy.deepcopy(dense), plan)
    batches = tiny_batches(5)
    with Spill(limit, tmp_path) as spill:
        report = repair(ours, dense, plan, batches, inputs=inputs, progress=False, spill=spill)
        assert spill.files_written > 0 and spill.peak_on_disk > 0
    expected = repair(ref, dense, plan, batches, inputs=inputs, progress=False)
    assert report.to_dict() == expected.to_dict() and report.layers
    assert torch.equal(torch.cat([p.flatten() for p in ours.parameters()]),
                       torch.cat([p.flatten() for p in ref.parameters()]))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_spilled_repair_leaves_no_files(tmp_path, monkeypatch):
    import headslim.repair as repair_module
    from headslim.layerwise import Spill

    dense = build("bert", "BertModel")
    plan = joint_plans(dense, 2)[2]
    solve, calls = repair_module._solve, []

    def interrupted(*args, **kwargs):  # Ctrl-C at the second fit, with streams on disk
        calls.append(1)
        if len(calls) == 2:
            assert any(tmp_path.iterdir())
            raise KeyboardInterrupt
        return solve(*args, **kwargs)

    monkeypatch.setattr(repair_module, "_solve", interrupted)
    with pytest.raises(KeyboardInterrupt), Spill(0, tmp_path) as spill:
        repair(prune_heads(copy.deepcopy(dense), plan), dense, plan, tiny_batches(4), progress=False, spill=spill)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []

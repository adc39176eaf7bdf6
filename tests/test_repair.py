"""Repair: the least-squares re-fit never makes a layer's reconstruction worse, keeps shapes, reloads."""

import copy

import pytest
import torch

import headslim
from headslim.errors import HeadslimError
from headslim.arch import get_adapter, kv_maps
from headslim.plan import PrunePlan
from headslim.repair import _add, _solve, repair
from headslim.surgery import prune_heads
from tests.conftest import DEC_HEADS, HEADS, LAYERS, main_output, tiny_decoder, tiny_inputs, tiny_model

PLAN = PrunePlan([HEADS] * LAYERS, [[0, 3], [1], []])  # a layer with no heads left: bias-only repair


def _calib(n=6):
    return [tiny_inputs(seed=i) for i in range(n)]


def _layer_errors(model, dense, batches, inputs, layers=range(LAYERS)):
    """Per layer ``||o_proj(c) - t||^2`` on ``batches``, measured with plain hooks (the reference)."""
    errors = []
    for layer in layers:
        total = 0.0
        for batch in batches:
            got = {}
            hooks = []
            for name, m in (("p", model), ("d", dense)):
                block = m.encoder.layer[layer].attention
                hooks.append(block.register_forward_pre_hook(
                    lambda mod, a, kw, name=name: got.__setitem__(name + "x", a[0] if a else kw["hidden_states"]),
                    with_kwargs=True))
                hooks.append(block.output.dense.register_forward_hook(
                    lambda mod, a, o, name=name: got.update({name + "c": a[0], name + "y": o})))
            with torch.no_grad():
                model(**batch), dense(**batch)
            for h in hooks:
                h.remove()
            mask = batch["attention_mask"].bool()
            if inputs == "pruned":
                target = got["dy"] + got["dx"] - got["px"]
                total += float((got["py"] - target).detach()[mask].pow(2).sum())
            else:
                total += float((got["py"] - got["dy"]).detach()[mask].pow(2).sum())
        errors.append(total)
    return errors


@pytest.mark.parametrize("inputs", ["pruned", "dense"])
def test_reconstruction_error_never_increases(inputs):
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), PLAN)
    unrepaired = copy.deepcopy(pruned)
    report = repair(pruned, dense, PLAN, _calib(), inputs=inputs, check=False, progress=False)
    assert report.applied
    for entry in report.layers:
        assert entry["fit_after"] <= entry["fit_before"] + 1e-9
    if inputs == "dense":  # every layer's fit is independent: compare each with the unrepaired one
        after, before = _layer_errors(pruned, dense, _calib(), inputs), _layer_errors(unrepaired, dense, _calib(), inputs)
        assert all(a <= b * (1 + 1e-6) + 1e-9 for a, b in zip(after, before))
        assert sum(after) < sum(before)
    else:  # sequential: on the repaired model's own inputs, the fitted weights beat the original ones
        after = _layer_errors(pruned, dense, _calib(), inputs)
        swapped = copy.deepcopy(pruned)
        for layer in range(LAYERS):
            ours = swapped.encoder.layer[layer].attention.output.dense
            orig = unrepaired.encoder.layer[layer].attention.output.dense
            ours.load_state_dict(orig.state_dict())
            (before_l,) = _layer_errors(swapped, dense, _calib(), inputs, layers=[layer])
            ours.load_state_dict(pruned.encoder.layer[layer].attention.output.dense.state_dict())
            assert after[layer] <= before_l * (1 + 1e-6) + 1e-9


def test_repair_brings_the_output_closer_to_dense():
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), PLAN)
    batch = tiny_inputs(seed=99)
    with torch.no_grad():
        ref = dense(**batch).last_hidden_state
        before = (pruned(**batch).last_hidden_state - ref).pow(2).mean()
    repair(pruned, dense, PLAN, _calib(8), check=False, progress=False)
    with torch.no_grad():
        after = (pruned(**batch).last_hidden_state - ref).pow(2).mean()
    assert after < before


@pytest.mark.parametrize("class_name", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_check_of_a_task_head_is_the_kl_of_its_predictions(class_name):
    """For a model with a task head the held-out check compares predictions (KL), not hidden states."""
    dense = tiny_model("bert", class_name)
    pruned = prune_heads(copy.deepcopy(dense), PLAN)
    calib = _calib(8)
    _assert_kl_check(dense, pruned, PLAN, calib)


def _assert_kl_check(dense, pruned, plan, calib):
    """Repair's held-out check is the mean KL(dense || pruned) of the predictions (per sample, or per
    real token for a token head or a causal LM), and the repair is kept exactly when it lowers it."""
    val = [calib[3], calib[7]]  # holdout 0.25: every 4th batch

    def kl(model):
        total = count = 0.0
        with torch.no_grad():
            for b in val:
                p = torch.log_softmax(dense(**b).logits.double(), -1)
                q = torch.log_softmax(model(**b).logits.double(), -1)
                per = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
                weight = b["attention_mask"].double() if per.dim() == 2 else torch.ones_like(per)
                total, count = total + float((per * weight).sum()), count + float(weight.sum())
        return total / count

    before = kl(pruned)
    report = repair(pruned, dense, plan, calib, progress=False)
    assert report.check["metric"] == "kl"
    assert report.check["before"] == pytest.approx(before, rel=1e-6)
    if report.applied:  # kept because the predictions got closer
        assert report.check["after"] == pytest.approx(kl(pruned), rel=1e-6) and report.check["after"] < before
    else:  # undone: the predictions are the unrepaired ones again
        assert report.check["after"] >= before and kl(pruned) == pytest.approx(before, rel=1e-9)


def test_check_of_an_encoder_is_the_embedding_cosine():
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), PLAN)
    report = repair(pruned, dense, PLAN, _calib(8), progress=False)
    assert report.check["metric"] == "cosine"
    assert (report.check["after"] > report.check["before"]) == report.applied


def test_solve_matches_plain_least_squares():
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(200, 7, generator=gen), torch.randn(200, 5, generator=gen)
    stats = {}
    _add(stats, x[:120], t[:120])
    _add(stats, x[120:], t[120:])
    w = _solve(stats, torch.zeros(5, 8, dtype=torch.float64), ridge=0.0)  # (d, p + 1): [W | b]
    ones = torch.cat([x, torch.ones(200, 1)], 1).double()
    expected = torch.linalg.lstsq(ones, t.double()).solution.T
    torch.testing.assert_close(w, expected, atol=1e-8, rtol=1e-8)
    # a strong ridge pulls towards the starting weights (the bias is not penalised)
    w0 = torch.randn(5, 8, generator=gen).double()
    far = _solve(stats, w0, ridge=1e6)
    torch.testing.assert_close(far[:, :-1], w0[:, :-1], atol=1e-3, rtol=0)


def test_bias_only_layer_gets_the_mean_target_and_shapes_stay(tmp_path):
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), PLAN)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    bias_before = pruned.encoder.layer[2].attention.output.dense.bias.detach().clone()
    repair(pruned, dense, PLAN, _calib(), inputs="dense", check=False, progress=False)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
    assert not torch.equal(pruned.encoder.layer[2].attention.output.dense.bias, bias_before)
    _assert_reloads(pruned, PLAN, tmp_path / "slim")


def _assert_reloads(model, plan, path):
    """The repaired model, saved and loaded with ``headslim.load_pruned``, computes what it did."""
    headslim.save_pruned(model, path, plan)
    again = headslim.load_pruned(path)
    batch = tiny_inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(main_output(again(**batch)), main_output(model(**batch)))


def test_nothing_to_repair_and_bad_inputs():
    """A plan that removes nothing leaves the model alone; bad options are one-line errors."""
    dense = tiny_model("bert", "BertModel")
    plan = PrunePlan([HEADS] * LAYERS, [list(range(HEADS))] * LAYERS)
    report = repair(prune_heads(copy.deepcopy(dense), plan), dense, plan, _calib(), progress=False)
    assert not report.applied and report.layers == []
    with pytest.raises(HeadslimError, match="repair inputs"):
        repair(dense, dense, PLAN, _calib(), inputs="nope")


def test_shrink_records_repair_and_no_repair_turns_it_off(tmp_path, minilm_dir, capsys):
    from headslim.cli import main

    small = ["--calib-samples", "32", "--eval-samples", "16", "--max-length", "32", "--no-progress",
             "--method", "gradient", "--prune", "0.5", "--batch-size", "8"]
    assert main(["shrink", str(minilm_dir), "--out", str(tmp_path / "on"), *small]) == 0
    text = capsys.readouterr().out
    assert "repair: " in text and "method: gradient" in text
    prov = PrunePlan.load(tmp_path / "on").provenance
    assert prov["repair"]["requested"] and "applied" in prov["repair"] and prov["repair"]["layers"]
    headslim.load_pruned(tmp_path / "on")
    assert main(["shrink", str(minilm_dir), "--out", str(tmp_path / "off"), "--no-repair", *small]) == 0
    assert "repair: off" in capsys.readouterr().out
    assert PrunePlan.load(tmp_path / "off").provenance["repair"] == {"applied": False, "requested": False}


# ---- decoders: pre-LayerNorm residual blocks, o_proj without a bias, GPT-2's Conv1D, GQA -------

# 8 query heads over 2 KV heads: layers 0 and 1 keep ragged groups, layer 2 keeps none
DEC_KEPT = [[0, 1, 5], [2, 3, 4, 6, 7], []]
DECODERS = [("llama", "LlamaForCausalLM", {}), ("llama", "LlamaForCausalLM", {"attention_bias": False}),
            ("qwen3", "Qwen3ForCausalLM", {}), ("gpt2", "GPT2LMHeadModel", {})]


def _decoder_case(model_type, class_name, overrides):
    dense = tiny_decoder(model_type, class_name, **overrides)
    plan = PrunePlan([DEC_HEADS] * LAYERS, DEC_KEPT, kv_head_of_q=kv_maps(dense))
    return dense, prune_heads(copy.deepcopy(dense), plan), plan


def _decoder_errors(model, dense, batches, layer):
    """``||o_proj(c) - t||^2`` of one layer, ``t = y_dense + x_dense - x_pruned`` with ``x`` the residual
    stream entering the decoder layer, from plain hooks."""
    got, hooks = {}, []
    for name, m in (("p", model), ("d", dense)):
        adapter = get_adapter(m)
        block = adapter.attention_blocks(m)[layer]
        hooks.append(block.register_forward_pre_hook(
            lambda mod, a, kw, name=name: got.__setitem__(name + "x", a[0] if a else kw["hidden_states"]),
            with_kwargs=True))
        hooks.append(adapter.o_proj(block).register_forward_hook(
            lambda mod, a, o, name=name: got.__setitem__(name + "y", o)))
    total = 0.0
    try:
        for batch in batches:
            with torch.no_grad():
                model(**batch), dense(**batch)
            mask = batch["attention_mask"].bool()
            total += float((got["py"] - (got["dy"] + got["dx"] - got["px"]))[mask].pow(2).sum())
    finally:
        for h in hooks:
            h.remove()
    return total


@pytest.mark.parametrize("model_type,class_name,overrides", DECODERS)
def test_decoder_repair_lowers_each_layers_error_keeps_shapes_and_reloads(tmp_path, model_type, class_name, overrides):
    dense, pruned, plan = _decoder_case(model_type, class_name, overrides)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    unrepaired = copy.deepcopy(pruned)
    report = repair(pruned, dense, plan, _calib(), check=False, progress=False)
    assert [e["layer"] for e in report.layers] == [0, 1]  # layer 2 has no projection left to fit
    assert report.applied and report.inputs == "pruned"
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
    adapter = get_adapter(pruned)
    if overrides.get("attention_bias") is False:
        assert adapter.o_proj(adapter.attention_blocks(pruned)[0]).bias is None
    applied = {e["layer"]: e["applied"] for e in report.layers}
    for layer in (0, 1):  # on the repaired model's own inputs, its weights beat the unrepaired ones
        ours = adapter.o_proj(adapter.attention_blocks(pruned)[layer])
        fitted = copy.deepcopy(ours.state_dict())
        after = _decoder_errors(pruned, dense, _calib(), layer)
        ours.load_state_dict(adapter.o_proj(adapter.attention_blocks(unrepaired)[layer]).state_dict())
        before = _decoder_errors(pruned, dense, _calib(), layer)
        ours.load_state_dict(fitted)
        assert after < before if applied[layer] else after == before  # a layer the held-out batch refused is unchanged
    _assert_reloads(pruned, plan, tmp_path / "slim")


def test_decoder_check_is_the_kl_of_next_token_predictions():
    dense, pruned, plan = _decoder_case("llama", "LlamaForCausalLM", {"attention_bias": False})
    _assert_kl_check(dense, pruned, plan, _calib(8))

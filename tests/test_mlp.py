"""FFN neurons as prunable structures: joint head + neuron plans are exact and reload, on every family."""

import copy
import json
import random

import pytest
import torch

import headslim
from headslim.arch import ADAPTERS, get_adapter, kv_maps
from headslim.errors import HeadslimError
from headslim.gates import gated
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import (DECODER_CASES, MODEL_CASES, TINY_DECODERS, TINY_MODELS, main_output, tiny_decoder,
                            tiny_inputs, tiny_model)
from tests.conftest import assert_same_model

CASES = [(t, c) for t, c in MODEL_CASES] + sorted({(t, c) for t, c, _ in DECODER_CASES})


def build(model_type: str, class_name: str):
    if model_type in TINY_MODELS:
        return tiny_model(model_type, class_name)
    return tiny_decoder(model_type, class_name)


def joint_plans(model, seed: int) -> list[PrunePlan]:
    """Random head + neuron plans, with layers left with 0 and 1 neurons (and 0 heads)."""
    adapter = get_adapter(model)
    heads, widths = adapter.num_heads(model), adapter.num_neurons(model)
    maps = kv_maps(model) if hasattr(adapter, "kv_maps") and adapter.name != "gpt2" else None
    rng = random.Random(seed)
    plans = [PrunePlan(heads, [list(range(n)) for n in heads], kv_head_of_q=maps, num_neurons=widths,
                       kept_neurons=[[], [3], list(range(0, widths[2], 2))])]  # FFN only: 0, 1, half
    for _ in range(3):
        kept_h = [sorted(rng.sample(range(n), rng.randint(0, n))) for n in heads]
        kept_n = [sorted(rng.sample(range(w), rng.choice([0, 1, rng.randint(0, w)]))) for w in widths]
        plans.append(PrunePlan(heads, kept_h, kv_head_of_q=maps, num_neurons=widths, kept_neurons=kept_n))
    return plans


def test_every_adapter_family_has_neuron_cases():
    assert {t for t, _ in CASES} == set(ADAPTERS) == set(TINY_MODELS) | set(TINY_DECODERS)


@pytest.mark.parametrize("model_type,class_name", CASES)
def test_joint_plan_equals_gated_dense(model_type, class_name):
    dense = build(model_type, class_name)
    inputs = tiny_inputs()
    for plan in joint_plans(dense, seed=len(class_name)):
        with torch.no_grad(), gated(dense, plan.mask(), neurons=plan.neuron_mask()):
            expected = main_output(dense(**inputs))
        pruned = prune_heads(copy.deepcopy(dense), plan)
        adapter = get_adapter(pruned)
        assert adapter.num_neurons(pruned) == plan.neurons_after
        assert adapter.num_heads(pruned) == plan.heads_after
        with torch.no_grad():
            got = main_output(pruned(**inputs))
        assert (got - expected).abs().max().item() <= 1e-5, (plan.kept_heads, plan.neurons_after)


def test_neuron_gates_are_what_removal_computes():
    """The gate is the reference: a zero gate on a neuron equals zeroing its down-projection column."""
    dense = tiny_model("bert", "BertModel")
    inputs = tiny_inputs()
    widths = get_adapter(dense).num_neurons(dense)
    gates = torch.ones(len(widths), max(widths))
    gates[1, 5] = 0.0
    with torch.no_grad(), gated(dense, neurons=gates):
        gated_out = dense(**inputs).last_hidden_state
    edited = copy.deepcopy(dense)
    with torch.no_grad():
        edited.encoder.layer[1].output.dense.weight[:, 5] = 0.0
        assert torch.allclose(edited(**inputs).last_hidden_state, gated_out, atol=1e-6)
        assert not torch.allclose(dense(**inputs).last_hidden_state, gated_out, atol=1e-6)


@pytest.mark.parametrize("model_type,class_name", [("bert", "BertForSequenceClassification"),
                                                   ("roberta", "RobertaModel"),
                                                   ("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                                   ("gpt2", "GPT2LMHeadModel")])
def test_joint_plan_saves_and_reloads(tmp_path, model_type, class_name):
    """Per-layer FFN widths reload with load_pruned on this transformers version (CI runs 4.57 and 5.x)."""
    dense = build(model_type, class_name)
    plan = joint_plans(dense, seed=1)[1]
    pruned = prune_heads(dense, plan)
    save_pruned(pruned, tmp_path / "slim", plan)
    data = json.loads((tmp_path / "slim" / "headslim_plan.json").read_text())
    assert data["format_version"] == 2 and data["mlp"]["kept_neurons"] == plan.kept_neurons
    reloaded = headslim.load_pruned(tmp_path / "slim")
    assert get_adapter(reloaded).num_neurons(reloaded) == plan.neurons_after
    inputs = tiny_inputs()
    with torch.no_grad():
        assert_same_model(reloaded, pruned, main_output(reloaded(**inputs)), main_output(pruned(**inputs)))


def test_format_1_plan_files_still_load():
    old = {"format_version": 1, "num_heads": [4, 4], "kept_heads": [[1], [0, 2]], "provenance": {"method": "x"},
           "kv_head_of_q": [[0, 0, 1, 1]] * 2, "kept_kv_heads": [[0], [0, 1]]}
    plan = PrunePlan.from_dict(old)
    assert plan.kept_heads == [[1], [0, 2]] and plan.num_neurons is None and not plan.prunes_mlp
    again = PrunePlan.from_dict(plan.to_dict())
    assert again == plan


def test_hand_written_mlp_section():
    plan = PrunePlan.from_user({"mlp": {"kept_neurons": {"1": [0, 4]}}}, [4, 4], num_neurons=[8, 8])
    assert plan.kept_heads == [[0, 1, 2, 3]] * 2
    assert plan.kept_neurons == [list(range(8)), [0, 4]]
    with pytest.raises(HeadslimError, match="neuron 9"):
        PrunePlan.from_user({"mlp": {"kept_neurons": [[9], []]}}, [4, 4], num_neurons=[8, 8])
    with pytest.raises(HeadslimError, match="neuron number"):
        PrunePlan.from_user({"mlp": {"kept_neurons": [[0.5], []]}}, [4, 4], num_neurons=[8, 8])
    with pytest.raises(HeadslimError, match="FFN widths"):
        PrunePlan.from_user({"mlp": {"num_neurons": [9, 9], "kept_neurons": [[0], []]}}, [4, 4], num_neurons=[8, 8])


def test_neurons_compose_over_a_pruned_model(tmp_path):
    dense = tiny_model("bert", "BertModel")
    adapter = get_adapter(dense)
    heads, widths = adapter.num_heads(dense), adapter.num_neurons(dense)
    first = PrunePlan(heads, [[0, 1], [2], [0, 3]], num_neurons=widths,
                      kept_neurons=[list(range(10)), list(range(5, 20)), []])
    pruned = prune_heads(copy.deepcopy(dense), first)
    then = PrunePlan(first.heads_after, [[1], [0], [0, 1]], num_neurons=first.neurons_after,
                     kept_neurons=[[0, 9], [], []], provenance={"method": "second"})
    prune_heads(pruned, then)
    composed = pruned.headslim_plan
    assert composed.kept_heads == [[1], [2], [0, 3]] and composed.kept_neurons == [[0, 9], [], []]
    inputs = tiny_inputs()
    with torch.no_grad(), gated(dense, composed.mask(), neurons=composed.neuron_mask()):
        expected = dense(**inputs).last_hidden_state
    with torch.no_grad():
        assert (pruned(**inputs).last_hidden_state - expected).abs().max() <= 1e-5
    save_pruned(pruned, tmp_path / "slim", then)
    reloaded = headslim.load_pruned(tmp_path / "slim")
    with torch.no_grad():
        assert_same_model(reloaded, pruned, reloaded(**inputs).last_hidden_state, pruned(**inputs).last_hidden_state)


def test_plan_for_other_ffn_widths_is_refused():
    dense = tiny_model("bert", "BertModel")
    heads = get_adapter(dense).num_heads(dense)
    with pytest.raises(HeadslimError, match="FFN neurons per layer"):
        prune_heads(dense, PrunePlan(heads, [list(range(n)) for n in heads], num_neurons=[5] * 3,
                                     kept_neurons=[[0]] * 3))


@pytest.mark.parametrize("model_type,class_name", [("bert", "BertModel"), ("llama", "LlamaModel"),
                                                   ("gpt2", "GPT2Model")])
def test_repair_refits_pruned_down_projections(model_type, class_name):
    """Every FFN that lost neurons gets its down projection re-fitted; the pruned model's outputs on
    the calibration batches move towards the dense model's; shapes stay, so the plan still describes it."""
    from headslim.repair import repair
    from tests.conftest import tiny_batches

    dense = build(model_type, class_name)
    adapter = get_adapter(dense)
    heads, widths = adapter.num_heads(dense), adapter.num_neurons(dense)
    maps = kv_maps(dense) if model_type == "llama" else None
    plan = PrunePlan(heads, [list(range(n)) for n in heads], kv_head_of_q=maps, num_neurons=widths,
                     kept_neurons=[list(range(0, w, 3)) for w in widths])
    model = prune_heads(copy.deepcopy(dense), plan)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    calib = tiny_batches(8)

    def error(m):
        with torch.no_grad():
            return sum(float((main_output(m(**b)) - main_output(dense(**b))).pow(2)[b["attention_mask"].bool()].sum())
                       for b in calib)

    before = error(model)
    report = repair(model, dense, plan, calib, holdout=0.0, check=False, progress=False)
    assert {(e["layer"], e["kind"]) for e in report.layers} == {(layer, "mlp") for layer in range(len(widths))}
    assert all(e["applied"] for e in report.layers)
    assert error(model) < 0.9 * before
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_blockwise_path_equals_the_global_greedy_search():
    """The per-layer merge used for FFN neurons is the same path as the heads' global greedy search."""
    from headslim.scoring.fisher import greedy_path
    from headslim.scoring.neurons import blockwise_path

    gen = torch.Generator().manual_seed(0)
    widths = [5, 7, 3, 1]
    blocks = []
    for n in widths:
        g = torch.randn(4, n, generator=gen, dtype=torch.float64)
        blocks.append(g.T @ g)
    width = max(widths)
    curv = torch.zeros(len(widths) * width, len(widths) * width, dtype=torch.float64)
    alive = torch.zeros(len(widths), width, dtype=torch.bool)
    for layer, (b, n) in enumerate(zip(blocks, widths)):
        curv[layer * width:layer * width + n, layer * width:layer * width + n] = b
        alive[layer, :n] = True
    for floor in (0, 1, 2):
        expected = greedy_path(curv, torch.zeros(len(curv), dtype=torch.float64), widths, alive, floor)
        assert [(layer, i) for layer, i, _ in blockwise_path(blocks, widths, floor)] == expected


@pytest.mark.parametrize("method", ["fisher", "gradient", "magnitude", "obs", "random"])
def test_a_dead_neuron_scores_lowest(method):
    """Planted case: a neuron whose down-projection column is zero changes nothing, so every
    data-driven scorer ranks it last (random is only checked for shape)."""
    from headslim.scoring.neurons import score_structures
    from tests.conftest import tiny_batches

    model = tiny_model("bert", "BertModel")
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[:, 7] = 0.0
    scores = score_structures(model, tiny_batches(3), method=method, progress=False)["mlp"]
    widths = get_adapter(model).num_neurons(model)
    assert scores.shape == (len(widths), max(widths))
    if method != "random":
        assert float(scores[1, 7]) == float(scores[1].min())
        if method in ("fisher", "obs"):
            assert float(scores[1, 7]) == float(scores.min())  # the first removal of the whole path


def test_joint_scoring_gives_the_heads_only_ranking():
    """Scoring heads and neurons in one pass does not change the heads' fisher path."""
    from headslim.scoring import score_heads
    from headslim.scoring.neurons import score_structures
    from tests.conftest import tiny_batches

    model = tiny_model("bert", "BertModel")
    calib = tiny_batches(3)
    both = score_structures(model, calib, method="fisher", heads=True, progress=False)
    assert torch.equal(both["attention"], score_heads(model, calib, method="fisher", progress=False))


@pytest.mark.parametrize("prune_heads", ["0.5", "0"])
def test_cli_shrink_with_ffn_neurons(tmp_path, minilm_dir, capsys, prune_heads):
    """``headslim shrink --prune-heads X --prune-ffn 0.3`` on the real MiniLM: the saved plan keeps
    70 % of the neurons, the checkpoint reloads smaller and equals the dense model gated by the plan
    (no repair here, so equality is exact)."""
    from transformers import AutoTokenizer

    from headslim.cli import main

    lines = [f"Sentence number {i} talks about topic {i % 3} at some length." for i in range(40)]
    (tmp_path / "texts.txt").write_text("\n".join(lines))
    out = tmp_path / "slim"
    rc = main(["shrink", str(minilm_dir), "--prune-heads", prune_heads, "--prune-ffn", "0.3", "--no-repair",
               "--calib", str(tmp_path / "texts.txt"), "--out", str(out), "--calib-samples", "24",
               "--eval-samples", "8", "--max-length", "32", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "FFN neurons per layer: [1536, 1536, 1536, 1536, 1536, 1536] ->" in stdout
    plan = PrunePlan.load(out)
    assert sum(plan.neurons_after) == round(0.7 * 6 * 1536)
    assert sum(plan.heads_after) == (36 if prune_heads == "0.5" else 72)
    assert plan.provenance["ffn_method"] == "magnitude"
    dense = headslim.load_model(minilm_dir)
    pruned = headslim.load_pruned(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["Pruned neurons, same answers.", "A longer second sentence pads the first one out."],
              padding=True, return_tensors="pt")
    with torch.no_grad(), gated(dense, plan.mask(), neurons=plan.neuron_mask()):
        expected = dense(**enc).last_hidden_state
    with torch.no_grad():
        assert (pruned(**enc).last_hidden_state - expected).abs().max() <= 1e-4


def test_cli_refuses_a_bad_ffn_target(tmp_path, minilm_dir, capsys):
    from headslim.cli import main

    rc = main(["shrink", str(minilm_dir), "--prune-ffn", "1.5", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--prune-ffn" in capsys.readouterr().err
    rc = main(["shrink", str(minilm_dir), "--prune-ffn", "0.3", "--ffn-method", "entropy",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--ffn-method" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

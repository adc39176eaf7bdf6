"""Surgery is exact: a pruned model equals the dense model with the same heads gated off."""

import copy
import random

import pytest
import torch

from headslim.arch import ADAPTERS, get_adapter
from headslim.errors import HeadslimError
from headslim.gates import gated
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import (HEADS, LAYERS, MODEL_CASES, TINY_DECODERS, TINY_MODELS, main_output, tiny_inputs,
                            tiny_model)
from tests.conftest import assert_same_model


def test_every_adapter_architecture_has_tiny_models():
    """Coverage guard: each model type an adapter claims appears in the equivalence tests
    (encoders here, decoders in tests/test_decoders.py)."""
    assert not set(TINY_MODELS) & set(TINY_DECODERS)
    assert set(TINY_MODELS) | set(TINY_DECODERS) == set(ADAPTERS)


def random_plans(seed: int, n: int = 6) -> list[PrunePlan]:
    rng = random.Random(seed)
    plans = [
        PrunePlan([HEADS] * LAYERS, [[0], [], [1, 3]]),  # one head, zero heads, two heads
        PrunePlan([HEADS] * LAYERS, [[], [], []]),  # every attention block removed
        PrunePlan([HEADS] * LAYERS, [[3], [0, 1, 2, 3], [2]]),
    ]
    for _ in range(n):
        plans.append(PrunePlan([HEADS] * LAYERS, [rng.sample(range(HEADS), rng.randint(0, HEADS)) for _ in range(LAYERS)]))
    return plans


@pytest.mark.parametrize("model_type,class_name", MODEL_CASES)
def test_pruned_equals_gated_dense(model_type, class_name):
    dense = tiny_model(model_type, class_name)
    inputs = tiny_inputs()
    for plan in random_plans(seed=hash(class_name) % 1000):
        with torch.no_grad(), gated(dense, plan.mask()):
            expected = main_output(dense(**inputs))
        pruned = prune_heads(copy.deepcopy(dense), plan)
        assert get_adapter(pruned).num_heads(pruned) == plan.heads_after
        with torch.no_grad():
            got = main_output(pruned(**inputs))
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, plan.kept_heads


def test_gates_change_the_output_and_all_ones_do_not():
    model = tiny_model("bert", "BertModel")
    inputs = tiny_inputs()
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with gated(model, torch.ones(LAYERS, HEADS)):
            ones = model(**inputs).last_hidden_state
        with gated(model, torch.tensor([[1.0, 0, 1, 1]] * LAYERS)):
            off = model(**inputs).last_hidden_state
        after = model(**inputs).last_hidden_state  # hooks removed on exit
    assert torch.equal(plain, ones) and torch.equal(plain, after)
    assert (plain - off).abs().max() > 1e-3


def test_parameter_count_shrinks_by_the_removed_projections():
    model = tiny_model("bert", "BertModel")
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, PrunePlan([HEADS] * LAYERS, [[0, 1], [0, 1, 2, 3], []]))
    head_dim = 32 // HEADS
    # per removed head: Q, K, V rows (3 * (hidden * D + D)) and O columns (hidden * D)
    removed_heads = 2 + 0 + 4
    expected = removed_heads * (3 * (32 * head_dim + head_dim) + 32 * head_dim)
    assert before - sum(p.numel() for p in model.parameters()) == expected


def test_plan_for_another_model_is_refused():
    model = tiny_model("bert", "BertModel")
    with pytest.raises(HeadslimError, match="heads per layer"):
        prune_heads(model, PrunePlan([HEADS] * (LAYERS + 1), [[0]] * (LAYERS + 1)))


def test_gates_of_wrong_shape_are_refused():
    model = tiny_model("bert", "BertModel")
    with pytest.raises(HeadslimError, match="gates must have shape"):
        with gated(model, torch.ones(LAYERS + 1, HEADS)):
            pass


def test_unsupported_architecture_lists_supported():
    import transformers

    config = transformers.T5Config(num_layers=1, num_heads=2, d_model=8, vocab_size=10)
    with pytest.raises(HeadslimError, match="unsupported architecture 't5'; supported model types: bert"):
        get_adapter(config)


@pytest.mark.parametrize("model_type,class_name", [("bert", "BertModel"), ("llama", "LlamaForCausalLM"),
                                                   ("gpt2", "GPT2LMHeadModel")])
def test_pruning_a_pruned_model_composes_and_the_checkpoint_reloads(tmp_path, model_type, class_name):
    """Pruning twice through the API saves one plan over the dense heads, which load_pruned and
    inspect accept, and the model equals the dense one gated by the composed plan."""
    import headslim
    from headslim.cli import main
    from headslim.arch import kv_maps
    from headslim.io import save_pruned
    from tests.conftest import tiny_decoder

    if model_type in TINY_MODELS:
        dense, inputs = tiny_model(model_type, class_name), tiny_inputs()
    else:
        dense, inputs = tiny_decoder(model_type, class_name), {"input_ids": tiny_inputs()["input_ids"]}
    maps = kv_maps(dense) if model_type == "llama" else None
    n = get_adapter(dense).num_heads(dense)
    first = PrunePlan(n, [list(range(n[0])), list(range(1, n[1])), [0, 1, n[2] - 1]], kv_head_of_q=maps)
    pruned = prune_heads(copy.deepcopy(dense), first)
    now = get_adapter(pruned).num_heads(pruned)
    then = PrunePlan(now, [[0, 2], list(range(now[1])), [1]], {"method": "second"},
                     kv_head_of_q=kv_maps(pruned) if maps else None)
    prune_heads(pruned, then)
    composed = pruned.headslim_plan
    assert composed.num_heads == n
    assert composed.kept_heads == [[0, 2], list(range(1, n[1])), [1]]
    with torch.no_grad(), gated(dense, composed.mask()):
        expected = main_output(dense(**inputs))
    with torch.no_grad():
        assert (main_output(pruned(**inputs)) - expected).abs().max() <= 1e-5
    save_pruned(pruned, tmp_path / "slim", then)
    saved = PrunePlan.load(tmp_path / "slim")
    assert saved.kept_heads == composed.kept_heads and saved.provenance["steps"][-1]["method"] == "second"
    reloaded = headslim.load_pruned(tmp_path / "slim")
    with torch.no_grad():
        assert_same_model(reloaded, pruned, main_output(reloaded(**inputs)), main_output(pruned(**inputs)))
    assert main(["inspect", str(tmp_path / "slim")]) == 0


def test_a_dense_plan_on_a_pruned_model_is_refused():
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(dense, PrunePlan([HEADS] * LAYERS, [[0, 1], [2], [3]]))
    with pytest.raises(HeadslimError, match="heads per layer"):
        prune_heads(pruned, PrunePlan([HEADS] * LAYERS, [[0], [0], [0]]))

"""Save / load round trips, stock loading on 4.x, and refusal of unsafe or broken checkpoints."""

import copy

import pytest
import torch

import headslim
from headslim.errors import HeadslimError
from headslim.io import atomic_output_dir, load_model, save_pruned
from headslim.plan import PLAN_FILE, PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import HEADS, LAYERS, MODEL_CASES, TF_MAJOR, main_output, tiny_inputs, tiny_model
from tests.conftest import assert_same_model

PLANS = [
    PrunePlan([HEADS] * LAYERS, [[1], [0, 2, 3], [3]]),
    PrunePlan([HEADS] * LAYERS, [[0, 1], [], [2]]),  # a layer with no heads
]


@pytest.mark.parametrize("model_type,class_name", MODEL_CASES)
@pytest.mark.parametrize("plan", PLANS, ids=["min1", "zero-head-layer"])
def test_save_load_round_trip(tmp_path, model_type, class_name, plan):
    pruned = prune_heads(tiny_model(model_type, class_name), plan)
    save_pruned(pruned, tmp_path / "slim", plan)
    assert {"model.safetensors", "config.json", PLAN_FILE} <= {p.name for p in (tmp_path / "slim").iterdir()}
    reloaded = headslim.load_pruned(tmp_path / "slim")
    assert type(reloaded) is type(pruned)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert_same_model(reloaded, pruned, main_output(reloaded(**inputs)), main_output(pruned(**inputs)))
    assert PrunePlan.load(tmp_path / "slim").kept_heads == plan.kept_heads


@pytest.mark.skipif(TF_MAJOR >= 5, reason="transformers 5 removed config.pruned_heads")
@pytest.mark.parametrize("model_type,class_name", MODEL_CASES)
def test_stock_from_pretrained_loads_it_on_4x(tmp_path, model_type, class_name):
    import transformers

    plan = PLANS[0]
    pruned = prune_heads(tiny_model(model_type, class_name), plan)
    save_pruned(pruned, tmp_path / "slim", plan)
    stock = getattr(transformers, class_name).from_pretrained(tmp_path / "slim").eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        assert (main_output(stock(**inputs)) - main_output(pruned(**inputs))).abs().max() <= 1e-6


def _dense_dir(tmp_path, name="dense"):
    model = tiny_model("bert", "BertForSequenceClassification")
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def test_load_model_dense(tmp_path):
    path, model = _dense_dir(tmp_path)
    loaded = load_model(path)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert_same_model(loaded, model, loaded(**inputs).logits, model(**inputs).logits)


def test_corrupt_safetensors_is_refused(tmp_path):
    path, _ = _dense_dir(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(HeadslimError, match="corrupt or not a safetensors file"):
        load_model(path)


def test_missing_weights_are_refused(tmp_path):
    path, _ = _dense_dir(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(HeadslimError, match="no model weights"):
        load_model(path)


def test_pickle_only_needs_explicit_flag(tmp_path):
    path, model = _dense_dir(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(HeadslimError, match="only has pickle weights"):
        load_model(path)
    loaded = load_model(path, allow_pickle=True)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert_same_model(loaded, model, loaded(**inputs).logits, model(**inputs).logits)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(HeadslimError, match="not a model directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(HeadslimError, match="no config.json"):
        load_model(tmp_path)


def test_pruned_weights_that_do_not_match_the_plan(tmp_path):
    plan = PLANS[0]
    save_pruned(prune_heads(tiny_model("bert", "BertModel"), plan), tmp_path / "slim", plan)
    PrunePlan([HEADS] * LAYERS, [[0, 1], [0], [0]]).save(tmp_path / "slim" / PLAN_FILE)
    with pytest.raises(HeadslimError, match="do not match its prune plan"):
        headslim.load_pruned(tmp_path / "slim")


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_and_input(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(HeadslimError, match="exists; pass --overwrite"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    with pytest.raises(HeadslimError, match="inside the input"):
        with atomic_output_dir(tmp_path / "out" / "sub", inputs=(tmp_path / "out",)):
            pass
    with pytest.raises(HeadslimError, match="not written by headslim"):
        with atomic_output_dir(tmp_path / "out", overwrite=True):
            pass
    (tmp_path / "out" / ".headslim-output").write_text("")  # as if headslim had written it
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".headslim-output", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

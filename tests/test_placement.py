"""--device-map auto (headslim.placement): a model over several devices with accelerate's hooks.

CI has no GPU, so here every map is CPU-only with accelerate's hooks forced on (the same hooks, the same
per-layer input moves, the same dense copy and save path as a GPU/CPU split); the split over a GPU and
the CPU itself is checked on a GPU machine by bench/gpu_shrink_check.py."""

import copy
import json

import pytest
import torch

from headslim.errors import HeadslimError
from headslim.io import load_pruned
from headslim.pipeline import PruneConfig, prune_model
from headslim.placement import parse_max_memory, place, plan_device_map, split_map, summary
from tests.conftest import tiny_batches, tiny_decoder, tiny_inputs, tiny_model


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_type,class_name", [("bert", "BertModel"), ("llama", "LlamaForCausalLM"),
                                                   ("gpt2", "GPT2LMHeadModel")])
def test_a_hooked_model_prunes_and_repairs_as_a_plain_one(tmp_path, one_thread, model_type, class_name):
    from headslim.io import save_pruned

    dense = tiny_model(model_type, class_name) if model_type == "bert" else tiny_decoder(model_type, class_name)
    batches = tiny_batches(6)
    config = PruneConfig(prune=0.5, prune_ffn=0.3, progress=False)
    plain = prune_model(copy.deepcopy(dense), batches, config)
    hooked = copy.deepcopy(dense)
    used = place(hooked, split_map(hooked, ["cpu", "cpu"]), force_hooks=True)
    layers = [k for k in used if ".layer" in k or ".h." in k or "layers." in k]
    assert len(layers) == dense.config.num_hidden_layers and hasattr(hooked, "_hf_hook")
    assert hasattr(get_layer(hooked, layers[0]), "_hf_hook")  # accelerate's per-layer hook is on
    got = prune_model(hooked, batches, config)
    assert got.plan.kept_heads == plain.plan.kept_heads and got.plan.kept_neurons == plain.plan.kept_neurons
    assert got.repair["applied"] == plain.repair["applied"] and got.repair["check"] == plain.repair["check"]
    probe = tiny_inputs(seed=5)
    torch.testing.assert_close(_outputs(got.model, probe), _outputs(plain.model, probe), rtol=0, atol=0)
    save_pruned(got.model, tmp_path / "out", got.plan)  # save_pretrained of a dispatched model
    torch.testing.assert_close(_outputs(load_pruned(tmp_path / "out"), probe), _outputs(plain.model, probe),
                               rtol=0, atol=1e-6)


def get_layer(model, name):
    return model.get_submodule(name)


def test_split_map_covers_the_model_in_contiguous_runs():
    model = tiny_decoder("llama", "LlamaForCausalLM")
    n = model.config.num_hidden_layers
    m = split_map(model, ["a", "b"])
    layer_devices = [m[f"model.layers.{i}"] for i in range(n)]
    assert layer_devices == ["a" if 2 * i < n else "b" for i in range(n)] and "b" in layer_devices
    assert m["model.embed_tokens"] == m["model.norm"] == "a"
    from accelerate.utils import check_device_map

    check_device_map(model, m)  # every parameter has a device
    assert summary({"x": 0, "y": 0, "z": "cpu"}) == {"cuda:0": 2, "cpu": 1}


def test_auto_on_a_machine_without_gpus_is_the_cpu(one_thread):
    model = tiny_model("bert", "BertModel")
    assert set(plan_device_map(model).values()) == {"cpu"}
    used = place(model, "auto")
    assert summary(used) == {"cpu": len(used)} and not hasattr(model, "_hf_hook")  # no hooks for one device
    with pytest.raises(HeadslimError, match="does not fit in the memory --device-map may use"):
        plan_device_map(model, {"cpu": 1000})  # 1000 bytes: accelerate would put it on the disk


def test_max_memory_is_parsed_or_refused_in_one_line(monkeypatch):
    assert parse_max_memory("cpu=1.5GiB") == {"cpu": int(1.5 * 2**30)}
    assert parse_max_memory(None) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_max_memory("0=20GiB, cuda:1=500MB,cpu=64GiB") == {0: 20 * 2**30, 1: 500 * 10**6, "cpu": 64 * 2**30}
    for text, match in [("0=20", "not a size with a unit"), ("gpu0=1GiB", "devices are GPU numbers"),
                        ("2=1GiB", "names GPU 2, but this machine has 2 CUDA devices"), ("20GiB", "DEVICE=SIZE"),
                        ("cpu=1GiB,cpu=2GiB", "names cpu twice")]:
        with pytest.raises(HeadslimError, match=match):
            parse_max_memory(text)


def test_cli_device_map_auto_equals_the_plain_run_and_refusals_are_one_line(tmp_path, capsys):
    from headslim.cli import main
    from tests.test_offload import _cli_model

    src, texts = _cli_model(tmp_path, tiny_model("bert", "BertModel"))
    argv = ["shrink", str(src), "--prune", "0.5", "--calib", str(texts), "--batch-size", "2", "--max-length", "16",
            "--no-progress", "--json"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--device-map", "auto", "--max-memory", "cpu=4GiB", "--out", str(tmp_path / "auto")]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["device_map"] == {"cpu": 1} and plain["device_map"] is None
    assert auto["plan"]["attention"] == plain["plan"]["attention"] and auto["quality"] == plain["quality"]
    recorded = json.loads((tmp_path / "auto" / "headslim_plan.json").read_text())["provenance"]["device_map"]
    assert recorded == {"cpu": 1}
    for extra, match in [(["--device-map", "auto", "--device", "cuda"], "leave out --device"),
                         (["--max-memory", "cpu=1GiB"], "--max-memory applies to --device-map"),
                         (["--device-map", "auto", "--layerwise"], "--layerwise holds one layer at a time"),
                         (["--device-map", "auto", "--max-memory", "cpu=1"], "not a size with a unit"),
                         (["--device-map", "balanced"], "--device-map must be auto, not 'balanced'")]:
        assert main([*argv, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("headslim: error: ") and match in err and "\n" not in err
        assert not (tmp_path / "bad").exists()


def test_the_budget_leaves_room_for_repairs_copy_and_the_activations(monkeypatch):
    import accelerate
    import accelerate.utils

    from headslim.placement import DEFAULT_SHARE

    seen = []

    def infer(model, max_memory, no_split_module_classes):
        seen.append(dict(max_memory))
        return {"": "cpu"}

    monkeypatch.setattr(accelerate, "infer_auto_device_map", infer)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda given=None: given or {"cpu": 1000})
    model = tiny_model("bert", "BertModel")
    plan_device_map(model)  # free memory: a share for weights, halved for the model and its dense copy
    plan_device_map(model, {"cpu": 1000})  # given: halved only
    plan_device_map(model, {"cpu": 1000}, copies=1)  # no repair: no copy
    assert seen == [{"cpu": int(1000 * DEFAULT_SHARE) // 2}, {"cpu": 500}, {"cpu": 1000}]

"""headslim.latency: the table's arithmetic, the cache, tiny real measurements and the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch

from headslim import latency
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.flops import LayerShape
from headslim.latency import LatencyTable, measure_table
from tests.conftest import tiny_model

ENCODER = LayerShape(hidden=32, head_dim=8, intermediate=64, heads=(4, 4))
DECODER = LayerShape(hidden=32, head_dim=8, intermediate=64, heads=(4, 4), kv_heads=(2, 2), mlp_matrices=3)
FAST = dict(batch=1, seq=8, threads=1, min_time=0.002, progress=False)


def hand_table(**over) -> LatencyTable:
    fields = dict(runtime="ort-cpu", batch=1, seq=128, threads=2, machine={"cpu": "test", "cores": 2},
                  versions={"torch": "x"}, layer={"hidden": 32, "head_dim": 8, "heads": 4, "intermediate": 256},
                  attention_ms={0: 0.1, 1: 1.0, 2: 1.5, 4: 2.5},
                  ffn_ms={0: 0.2, 64: 1.0, 128: 2.5, 192: 2.0, 256: 3.0})  # 128 planted slower than 192
    return LatencyTable(**{**fields, **over})


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSLIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "NOISY_MARGIN", math.inf)  # cache even when other tests keep the CPU busy
    return tmp_path / "cache" / "latency"


@pytest.fixture
def timer_calls(monkeypatch):
    """Counts the timing loops run (the real one runs)."""
    calls = []
    real = latency._time_variants

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "_time_variants", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# arithmetic on a hand-made table


def test_interpolation_is_exact_at_measured_points_and_linear_between():
    t = hand_table()
    for h, ms in t.attention_ms.items():
        assert t.attention(h) == ms
    for n, ms in t.ffn_ms.items():
        assert t.ffn(n) == ms
    assert t.attention(3) == pytest.approx(2.0)  # between 2 (1.5) and 4 (2.5)
    assert t.attention(0.5) == pytest.approx(0.55)
    assert t.ffn(32) == pytest.approx(0.6)
    assert t.ffn(160) == pytest.approx(2.25)
    assert t.layer_ms(4, 256) == pytest.approx(5.5)
    for bad in (lambda: t.attention(5), lambda: t.ffn(-1), lambda: t.ffn(257)):
        with pytest.raises(HeadslimError, match="outside the measured range"):
            bad()


def test_model_ms_and_speedup():
    t = hand_table()
    assert t.model_ms([4, 2], [256, 64]) == pytest.approx(5.5 + 2.5)
    assert t.speedup([4, 4], [256, 256], [2, 0], [64, 0]) == pytest.approx(11.0 / (2.5 + 0.3))
    assert t.speedup(4, 256, [2, 0], [64, 0]) == pytest.approx(11.0 / 2.8)  # one count for every layer
    assert t.speedup(4, 256, 4, 256) == pytest.approx(1.0)
    assert math.isinf(hand_table(attention_ms={0: 0.0, 4: 1.0}, ffn_ms={0: 0.0, 256: 1.0}).speedup(4, 256, 0, 0))
    with pytest.raises(HeadslimError, match="one per layer"):
        t.model_ms([4, 4], [256])


def test_fast_neuron_counts_skip_a_planted_slow_count():
    t = hand_table()
    assert t.fast_neuron_counts() == [0, 64, 192, 256]  # 128 is slower than 192
    assert t.round_neurons(100) == 192 and t.round_neurons(64) == 64 and t.round_neurons(1) == 64
    assert t.fast_neuron_counts(tol=0.3) == [0, 64, 128, 192, 256]  # 2.5 <= 1.3 * 2.0
    with pytest.raises(HeadslimError):
        t.round_neurons(300)
    md = t.markdown()
    assert "| 128 | 2.5000 | 83 % |  |" in md and "| 192 | 2.0000 | 67 % | yes |" in md
    assert "Fast neuron counts (no larger measured count is faster): 0, 64, 192, 256" in md


def test_dict_round_trip_through_json():
    t = hand_table(key="abc", created="now")
    back = LatencyTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and back.attention(3) == t.attention(3)


def test_grids_and_kv_pricing():
    g = latency.default_neuron_grid(1536)
    assert g[0] == 0 and g[-1] == 1536 and all(n % 8 == 0 for n in g)
    assert set(range(0, 1537, 64)) <= set(g) and {736, 744, 800, 1120, 1184} <= set(g) and len(g) == 41
    assert latency.default_neuron_grid(37) == [0, 8, 16, 24, 32, 37]
    layer = latency.describe_layer(DECODER)
    assert layer["kv_heads"] == 2 and layer["kv_heads_for"] == {"0": 0, "1": 1, "2": 1, "3": 2, "4": 2}
    assert latency.describe_layer(ENCODER)["kv_heads_for"] == {str(h): h for h in range(5)}


# ---------------------------------------------------------------------------------------------
# measuring and the cache


def test_cache_returns_the_same_table_without_measuring(cache_dir, timer_calls):
    first = measure_table(ENCODER, runtime="torch-cpu", **FAST)
    assert not first.cached and len(timer_calls) == 1
    assert first.cache_path and first.cache_path.startswith(str(cache_dir))
    assert [p.name for p in cache_dir.iterdir()] == [f"{first.key}.json"]  # no temp file left behind
    second = measure_table(ENCODER, runtime="torch-cpu", **FAST)
    assert second.cached and len(timer_calls) == 1  # not measured again
    assert second.attention_ms == first.attention_ms and second.ffn_ms == first.ffn_ms
    assert second.key == first.key and second.overhead_ms == first.overhead_ms
    # another input shape or grid is another table; cache=False measures and writes nothing
    other = measure_table(ENCODER, runtime="torch-cpu", heads=[0, 4], neurons=[0, 64], **FAST)
    assert not other.cached and other.key != first.key and len(timer_calls) == 2
    fresh = measure_table(ENCODER, runtime="torch-cpu", cache=False, **FAST)
    assert not fresh.cached and fresh.cache_path is None and len(timer_calls) == 3
    assert len(list(cache_dir.iterdir())) == 2


def test_cache_key_depends_on_every_setting():
    base = dict(machine={"cpu": "a"}, runtime="ort-cpu", batch=1, seq=128, threads=2,
                layer=latency.describe_layer(ENCODER), heads=[0, 1], neurons=[0, 64], versions={"torch": "2"})
    key = latency.cache_key(**base)
    assert key == latency.cache_key(**dict(base))
    for change in (dict(runtime="torch-cpu"), dict(batch=32), dict(seq=64), dict(threads=1),
                   dict(layer=latency.describe_layer(DECODER)), dict(neurons=[0, 32, 64]),
                   dict(machine={"cpu": "b"}), dict(versions={"torch": "3"})):
        assert latency.cache_key(**{**base, **change}) != key, change


def test_corrupt_cache_file_is_measured_again(cache_dir, timer_calls):
    first = measure_table(ENCODER, runtime="torch-cpu", heads=[0, 4], neurons=[0, 64], **FAST)
    with open(first.cache_path, "w") as f:
        f.write("{not json")
    again = measure_table(ENCODER, runtime="torch-cpu", heads=[0, 4], neurons=[0, 64], **FAST)
    assert not again.cached and len(timer_calls) == 2
    assert LatencyTable.from_dict(json.loads(open(again.cache_path).read())).key == first.key


def test_a_table_timed_on_a_busy_machine_is_not_cached(cache_dir, monkeypatch, capsys):
    clock = iter([100.0, 100.0 + 1e6])  # other programs "used" a million CPU seconds meanwhile
    monkeypatch.setattr(latency, "_cpu_busy_seconds", lambda: next(clock))
    monkeypatch.setattr(latency, "NOISY_MARGIN", 0.25)
    t = measure_table(ENCODER, runtime="torch-cpu", heads=[0, 4], neurons=[0, 64], **FAST)
    assert t.competing_cores > 1 and t.cache_path is None and not cache_dir.exists()
    assert "the numbers are noisy and not cached" in capsys.readouterr().err
    assert "other programs used" in t.markdown()


@pytest.mark.parametrize("runtime,shape", [("torch-cpu", ENCODER), ("torch-cpu", DECODER), ("ort-cpu", ENCODER),
                                           ("ort-cpu", DECODER), ("ort-int8-cpu", ENCODER)])
def test_real_tiny_measurement(cache_dir, runtime, shape):
    t = measure_table(shape, runtime=runtime, batch=2, seq=8, threads=1, min_time=0.002, progress=False)
    assert t.runtime == runtime and (t.batch, t.seq, t.threads) == (2, 8, 1)
    assert sorted(t.attention_ms) == [0, 1, 2, 3, 4]
    assert sorted(t.ffn_ms) == latency.default_neuron_grid(64)
    values = [*t.attention_ms.values(), *t.ffn_ms.values()]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert t.attention_ms[4] > 0 and t.ffn_ms[64] > 0 and t.overhead_ms > 0 and t.runs >= latency.MIN_RUNS
    assert t.machine["cpu"] and t.machine["cores"] >= 1 and t.versions["torch"] == torch.__version__
    assert t.competing_cores is None or t.competing_cores >= 0
    assert 1 <= t.chain <= latency.MAX_CHAIN and f"({t.chain} block" in t.markdown()
    assert t.fast_neuron_counts()[-1] == 64 and t.speedup(4, 64, 2, 32) > 0
    md = t.markdown()
    assert f"### Layer latency: {runtime}, batch 2 x seq 8, 1 threads" in md and "| 0 |" in md


def test_zero_heads_and_zero_neurons_are_real_blocks():
    layer = latency.describe_layer(ENCODER)
    x = torch.randn(2, 8, 32)
    att, ffn = latency._build(layer, "attention", 0, 8, 0), latency._build(layer, "ffn", 0, 8, 0)
    with torch.no_grad():
        for block, bias in ((att, att.o_bias), (ffn, ffn.out_bias)):  # LayerNorm(x + b_out)
            assert torch.allclose(block(x), torch.nn.functional.layer_norm(x + bias, (32,), eps=1e-12), atol=1e-5)
    dec = latency.describe_layer(DECODER)
    for kind in ("attention", "ffn"):  # a pre-norm block with nothing left is the identity
        assert torch.equal(latency._build(dec, kind, 0, 8, 0)(x), x)
    chained = latency._build(layer, "ffn", 64, 8, 0, chain=3)  # one call runs the block 3 times
    with torch.no_grad():
        once = chained.block
        assert torch.allclose(chained(x), once(once(once(x))))
    assert latency._build(layer, "empty", 0, 8, 0, chain=3)(x) is x
    gqa = latency._build(dec, "attention", 3, 8, 0)
    assert (gqa.kv, gqa.kv_index.tolist()) == (2, [0, 0, 1])
    assert gqa(x).shape == x.shape


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(runtime="tpu"), "unknown runtime 'tpu'; choose one of: torch-cpu, ort-cpu"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(seq=-1), "seq must be a positive integer"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(heads=[0, 5]), r"head counts must lie in 0..4"),
    (dict(neurons=[65]), r"neuron counts must lie in 0..64"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, match, cache_dir):
    with pytest.raises(HeadslimError, match=match) as info:
        measure_table(ENCODER, **{**dict(progress=False), **kwargs})
    assert "\n" not in str(info.value)


def test_cuda_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HeadslimError, match="runtime cuda needs a CUDA GPU"):
        measure_table(ENCODER, runtime="cuda", progress=False)


def test_import_stays_cheap():
    code = "import sys, headslim.latency; print([m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def tiny_dir(tmp_path):
    tiny_model("bert", "BertModel").save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_cli_prints_a_table_per_shape(tiny_dir, cache_dir, capsys):
    args = ["latency", str(tiny_dir), "--runtime", "torch-cpu", "--batch", "1,2", "--seq", "8", "--threads", "1",
            "--min-time", "0.002", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("| heads | attention ms | vs 4 heads |") == 2 and "| neurons | FFN ms | vs 37 | fast |" in out
    assert "batch 1 x seq 8" in out and "batch 2 x seq 8" in out
    assert out.count(f"cache: {cache_dir}") == 2
    assert main([*args, "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert [t["cached"] for t in tables] == [True, True] and [t["batch"] for t in tables] == [1, 2]
    assert sorted(map(int, tables[0]["ffn_ms"])) == [0, 8, 16, 24, 32, 37]


@pytest.mark.parametrize("extra,match", [
    (["--runtime", "tpu"], "unknown runtime 'tpu'"),
    (["--batch", "0"], "batch must be a positive integer"),
    (["--seq", "65"], "--seq 65 is longer than the model allows"),
])
def test_cli_bad_input_is_one_line(tiny_dir, cache_dir, capsys, extra, match):
    assert main(["latency", str(tiny_dir), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_cli_missing_model_dir(tmp_path, capsys):
    assert main(["latency", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not a model directory" in err and err.count("\n") == 1

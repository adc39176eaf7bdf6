"""``headslim sweep``: one scoring pass, every ratio evaluated and timed, files written."""

import json

import pytest

import headslim
import headslim.scoring
from headslim.arch import get_adapter
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.evaluate import EvalConfig, evaluate
from headslim.pipeline import ShrinkConfig, shrink
from headslim.plan import PrunePlan
from headslim.selection import select_heads
from headslim.sweep import SweepConfig, pareto_front, sweep
from tests.conftest import DEC_HEADS, DEC_KV, HEADS, LAYERS, tiny_decoder
from tests.test_bench import save_pair, tiny_tokenizer
from tests.test_evaluate import write_labelled

FAST = dict(warmup=0, min_runs=2, min_seconds=0.0, batch=2, seq=8, threads=1, progress=False, repair=False)


@pytest.fixture
def dense_and_data(tmp_path):
    dense_dir, _ = save_pair(tmp_path)
    data = write_labelled(tmp_path / "topics.csv")
    return dense_dir, data


def test_pareto_front():
    assert pareto_front([(10, 0.9), (5, 0.8), (6, 0.7), (12, 0.9), (5, 0.8)]) == [True, True, False, False, True]
    # perplexity: lower is better
    assert pareto_front([(10, 5.0), (5, 6.0), (6, 7.0)], higher_is_better=False) == [True, True, False]


def test_sweep_scores_once_and_writes_its_files(dense_and_data, tmp_path, monkeypatch):
    dense_dir, data = dense_and_data
    calls, real = [], headslim.scoring.score_heads

    def counting(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append(scores)
        return scores

    monkeypatch.setattr(headslim.scoring, "score_heads", counting)
    out = tmp_path / "sweep-out"
    config = SweepConfig(ratios=(0.25, 0.5, 0.75), calib=str(data), calib_samples=12,
                         eval=EvalConfig(data=str(data), k=3), save_models=True, **FAST)
    result = sweep(dense_dir, out, config, log=None)
    assert len(calls) == 1  # one scoring pass for three ratios
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    assert [r["prune"] for r in rows] == [0, 0.25, 0.5, 0.75]
    assert [r["heads"] for r in rows] == [12, 9, 6, 3]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"] > rows[3]["params"]
    for r, ratio in zip(rows[1:], (0.25, 0.5, 0.75)):  # each ratio = selection from the same scores
        assert r["kept_heads"] == select_heads(calls[0], [HEADS] * LAYERS, prune=ratio).kept_heads
        assert r["latency"]["dense"]["runs"] >= 2 and r["latency"]["pruned"]["runs"] >= 2
        assert r["ideal_speedup"] > 1
    assert rows[0]["quality"] == rows[0]["metrics"]["knn_accuracy"]["dense"]
    assert saved["quality_metric"] == "k-NN accuracy (k=3)"
    assert any(r["pareto"] for r in rows) and all(isinstance(r["pareto"], bool) for r in rows)
    # the saved 50 % model evaluates to the numbers in the table
    again = evaluate(out / "models" / "prune-0.5", dense_dir, EvalConfig(data=str(data), k=3))["metrics"]
    assert again["cosine"]["mean"] == pytest.approx(rows[2]["metrics"]["cosine"]["mean"], abs=1e-6)
    # k-NN accuracy is discrete: on these 8 texts a near-tie can flip under the ~1e-7 float differences
    # between the in-memory and the reloaded model (the cosine above pins the model down)
    n_test = again["knn_accuracy"]["n_test"]
    assert abs(again["knn_accuracy"]["pruned"] - rows[2]["quality"]) <= 1 / n_test + 1e-9
    md = (out / "sweep.md").read_text()
    assert "| 0.5 | 6 |" in md and "pareto" in md
    pytest.importorskip("matplotlib")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_without_latency_with_repair(dense_and_data, tmp_path):
    pytest.importorskip("headslim.repair")
    dense_dir, data = dense_and_data
    result = sweep(dense_dir, tmp_path / "o", SweepConfig(ratios=(0.5,), calib=str(data), calib_samples=8,
                                                          method="random", backend="none",
                                                          eval=EvalConfig(data=str(data), k=3),
                                                          **{**FAST, "repair": True}), log=None)
    assert [r["latency"] for r in result["rows"]] == [None, None]
    assert "applied" in result["rows"][1]["repair"]
    assert not (tmp_path / "o" / "pareto.png").exists() and (tmp_path / "o" / "sweep.md").is_file()


def test_sweep_bad_input(dense_and_data, tmp_path):
    dense_dir, data = dense_and_data
    with pytest.raises(HeadslimError, match="unknown backend 'tensorrt'"):
        SweepConfig(backend="tensorrt")
    with pytest.raises(HeadslimError, match="--prune 1.5"):
        SweepConfig(ratios=(0.5, 1.5))
    with pytest.raises(HeadslimError, match="unknown scoring method"):
        SweepConfig(method="oracle")
    (tmp_path / "p").mkdir()
    _, pruned_dir = save_pair(tmp_path / "p")
    with pytest.raises(HeadslimError, match="already pruned"):
        sweep(pruned_dir, tmp_path / "o", SweepConfig(calib=str(data), **FAST), log=None)
    assert not (tmp_path / "o").exists()


def test_sweep_cli(dense_and_data, tmp_path, capsys):
    dense_dir, data = dense_and_data
    out = tmp_path / "cli-out"
    code = main(["sweep", str(dense_dir), "--prune", "0.25,6", "--calib", str(data), "--calib-samples", "8",
                 "--data", str(data), "--k", "3", "--method", "random", "--batch", "1", "--seq", "8", "--warmup", "0",
                 "--runs", "2", "--min-time", "0", "--no-progress", "--no-repair", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "k-NN accuracy" in printed and "speed-up" in printed
    assert [r["heads"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == [12, 9, 6]
    capsys.readouterr()
    assert main(["sweep", str(dense_dir), "--prune", "0.5", "--calib", str(data), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


# ---- the plan shrink would choose: GQA selection, iterative scorers, FFN neurons -----------------

@pytest.fixture
def llama_and_data(tmp_path):
    """A tiny GQA Llama (3 layers of 8 query heads over 2 KV heads) with a tokenizer, and texts."""
    model_dir = tmp_path / "llama"
    tiny_decoder("llama", "LlamaForCausalLM").save_pretrained(str(model_dir))
    tiny_tokenizer(tmp_path).save_pretrained(str(model_dir))
    return model_dir, write_labelled(tmp_path / "texts.csv")


def counting_scorer(monkeypatch):
    """Replace ``headslim.scoring.score_heads`` by a wrapper that records every call's target and scores."""
    calls, real = [], headslim.scoring.score_heads

    def counting(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append((kwargs.get("prune"), scores))
        return scores

    monkeypatch.setattr(headslim.scoring, "score_heads", counting)
    return calls


def assert_standard_gqa(kept_heads):
    """Every layer keeps the same number of query heads in each KV group it keeps (plain GQA kernels)."""
    group = DEC_HEADS // DEC_KV
    for kept in kept_heads:
        per_kv = [sum(1 for h in kept if h // group == kv) for kv in range(DEC_KV)]
        assert len({n for n in per_kv if n}) <= 1, kept_heads


def test_sweep_of_a_gqa_decoder_selects_as_shrink(llama_and_data, tmp_path):
    model_dir, data = llama_and_data
    config = SweepConfig(ratios=(0.25, 0.5), calib=str(data), calib_samples=12, backend="none",
                         eval=EvalConfig(data=str(data)), save_models=True, **FAST)
    result = sweep(model_dir, tmp_path / "o", config, log=None)
    rows = result["rows"]
    assert result["task"] == "causal-lm" and [r["heads"] for r in rows] == [24, 18, 12]
    for row in rows[1:]:  # default --gqa uniform: standard GQA at every ratio, as shrink's default
        assert_standard_gqa(row["kept_heads"])
    for row in rows[1:]:
        plan = PrunePlan.load(tmp_path / "o" / "models" / f"prune-{row['prune']:g}")
        assert plan.provenance["gqa"] == "uniform" and plan.kv_head_of_q is not None
        assert row["kv_heads_per_layer"] == [len(k) for k in plan.kv_heads_after]
    slim = shrink(model_dir, tmp_path / "slim", ShrinkConfig(prune=0.5, calib=str(data), calib_samples=12,
                                                             eval_data=str(data), batch_size=EvalConfig().batch_size,
                                                             repair=False, progress=False))
    assert slim.plan["attention"]["kept_heads"] == rows[2]["kept_heads"]


@pytest.mark.parametrize("gqa,passes", [("uniform", 2), ("ragged", 1)])
def test_sweep_iterative_on_a_gqa_decoder(llama_and_data, tmp_path, monkeypatch, gqa, passes):
    # iterative's path to the largest ratio answers a smaller ratio's top-k (ragged) selection exactly, but the
    # uniform selection reads the order of the heads still kept, which depends on where the path stopped:
    # one pass per ratio there, with that ratio as the target (as shrink runs it)
    model_dir, data = llama_and_data
    calls = counting_scorer(monkeypatch)
    config = SweepConfig(ratios=(0.25, 0.5), method="iterative:magnitude", gqa=gqa, step=0.25, calib=str(data),
                         calib_samples=8, backend="none", eval=EvalConfig(data=str(data)), **FAST)
    rows = sweep(model_dir, tmp_path / "o", config, log=None)["rows"]
    assert [r["heads"] for r in rows] == [24, 18, 12]
    assert [prune for prune, _ in calls] == ([0.25, 0.5] if passes == 2 else [0.5])
    if gqa == "uniform":
        for row in rows[1:]:
            assert_standard_gqa(row["kept_heads"])


def test_sweep_iterative_fisher(dense_and_data, tmp_path, monkeypatch):
    dense_dir, data = dense_and_data
    calls = counting_scorer(monkeypatch)
    code = main(["sweep", str(dense_dir), "--prune", "0.25,6", "--method", "iterative:fisher",
                 "--calib", str(data), "--calib-samples", "8", "--data", str(data), "--k", "3", "--backend", "none",
                 "--no-progress", "--no-repair", "--save-models", "--json", "--out", str(tmp_path / "o")])
    assert code == 0
    rows = json.loads((tmp_path / "o" / "sweep.json").read_text())["rows"]
    assert [r["heads"] for r in rows] == [12, 9, 6]
    assert [prune for prune, _ in calls] == [6]  # one path, to the ratio that removes the most heads
    assert PrunePlan.load(tmp_path / "o" / "models" / "prune-6").provenance["method"] == "iterative:fisher"
    # ... and answers the smaller ratio exactly: shrink there runs its own path, stopped at 3 heads
    slim = shrink(dense_dir, tmp_path / "slim", ShrinkConfig(prune=0.25, method="iterative:fisher",
                                                             calib=str(data), calib_samples=8, eval_data=str(data),
                                                             batch_size=EvalConfig().batch_size, repair=False,
                                                             progress=False))
    assert calls[-1][0] == 0.25 and slim.plan["attention"]["kept_heads"] == rows[1]["kept_heads"]


def test_sweep_prunes_ffn_neurons(dense_and_data, tmp_path):
    dense_dir, data = dense_and_data
    out = tmp_path / "o"
    config = SweepConfig(ratios=(0.25, 0.5), prune_ffn=(0.25, 0.5), ffn_method="fisher", calib=str(data),
                         calib_samples=12, backend="none", eval=EvalConfig(data=str(data), k=3), save_models=True,
                         **{**FAST, "repair": True})
    rows = sweep(dense_dir, out, config, log=None)["rows"]
    width = [37] * LAYERS  # tests/conftest.py: intermediate_size 37
    assert [r["heads"] for r in rows] == [12, 9, 6]
    assert [r["neurons"] for r in rows] == [111, 111 - 28, 111 - 56] and rows[0]["neurons_per_layer"] == width
    assert [r["prune_ffn"] for r in rows] == [0, 0.25, 0.5]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    for row in rows[1:]:
        plan = PrunePlan.load(out / "models" / f"prune-{row['prune']:g}")
        assert plan.neurons_after == row["neurons_per_layer"] and plan.num_neurons == width
        assert plan.provenance["ffn_method"] == "fisher" and plan.provenance["scored_together"] is True
        model = headslim.load_pruned(out / "models" / f"prune-{row['prune']:g}")  # reloads at its FFN widths
        assert get_adapter(model).num_neurons(model) == plan.neurons_after
        assert "applied" in row["repair"]
    again = evaluate(out / "models" / "prune-0.5", dense_dir, EvalConfig(data=str(data), k=3))["metrics"]
    assert again["cosine"]["mean"] == pytest.approx(rows[2]["metrics"]["cosine"]["mean"], abs=1e-6)
    # the plan shrink chooses with the same settings (heads and neurons scored in the same passes)
    slim = shrink(dense_dir, tmp_path / "slim", ShrinkConfig(prune=0.5, prune_ffn=0.5, ffn_method="fisher", calib=str(data),
                                                             calib_samples=12, eval_data=str(data),
                                                             batch_size=EvalConfig().batch_size, repair=False,
                                                             progress=False))
    assert slim.plan["attention"]["kept_heads"] == rows[2]["kept_heads"]
    assert slim.plan["mlp"]["kept_neurons"] == plan.kept_neurons


def test_sweep_cli_one_ffn_target_for_every_ratio(dense_and_data, tmp_path, monkeypatch):
    dense_dir, data = dense_and_data
    calls = counting_scorer(monkeypatch)
    code = main(["sweep", str(dense_dir), "--prune", "0.25,0.5", "--prune-ffn", "0.5", "--ffn-method", "magnitude",
                 "--calib", str(data), "--calib-samples", "8", "--data", str(data), "--k", "3", "--backend", "none",
                 "--no-progress", "--no-repair", "--out", str(tmp_path / "o")])
    assert code == 0
    rows = json.loads((tmp_path / "o" / "sweep.json").read_text())["rows"]
    assert [r["heads"] for r in rows] == [12, 9, 6] and [r["neurons"] for r in rows] == [111, 55, 55]
    assert len(calls) == 1  # heads (fisher) once; neurons (magnitude) once, apart


def test_sweep_bad_targets(llama_and_data, tmp_path, monkeypatch):
    with pytest.raises(HeadslimError, match="--prune-ffn lists 3 values for 2"):
        SweepConfig(ratios=(0.25, 0.5), prune_ffn=(0.1, 0.2, 0.3))
    with pytest.raises(HeadslimError, match="--prune-ffn 1.5"):
        SweepConfig(prune_ffn=1.5)
    with pytest.raises(HeadslimError, match="--ffn-method must be one of"):
        SweepConfig(prune_ffn=0.2, ffn_method="entropy")
    with pytest.raises(HeadslimError, match="--gqa must be one of"):
        SweepConfig(gqa="diagonal")
    with pytest.raises(HeadslimError, match="iterative needs a one-shot base scorer"):
        SweepConfig(method="iterative:learned")
    with pytest.raises(HeadslimError, match="--step must be in"):
        SweepConfig(method="iterative", step=0)
    model_dir, data = llama_and_data

    def no_scoring(*args, **kwargs):
        raise AssertionError("refused only after the scoring pass")

    monkeypatch.setattr(headslim.scoring, "score_heads", no_scoring)
    base = dict(calib=str(data), calib_samples=8, backend="none", eval=EvalConfig(data=str(data)), **FAST)
    # 3 layers of 2 KV groups of 4: --gqa uniform removes 0, 2, 4, 5, 6 or 7 heads a layer
    for ratios, message in [((3,), "--gqa uniform cannot remove exactly 3 of 24 heads"),
                            ((2, 0.125), "--prune 2 and 0.125 both remove 2 of the model's 24 heads"),
                            ((0.04,), "--prune 0.04 removes no head with --gqa uniform")]:
        with pytest.raises(HeadslimError, match=message):
            sweep(model_dir, tmp_path / "o", SweepConfig(ratios=ratios, **base), log=None)
    with pytest.raises(HeadslimError, match="--prune-ffn 1000: the model has 111 FFN neurons"):
        sweep(model_dir, tmp_path / "o", SweepConfig(ratios=(0.5,), prune_ffn=1000, **base), log=None)
    assert not (tmp_path / "o").exists()


def test_every_sweep_option_reaches_its_config_field(monkeypatch, capsys):
    from dataclasses import fields

    import headslim.sweep
    from tests.test_cli import _options

    renamed = {"prune", "max_length", "runs", "min_time"}  # ratios, calib_max_length (and eval's), min_runs, min_seconds
    known = {f.name for f in fields(SweepConfig)} | {f.name for f in fields(EvalConfig)} | renamed
    # args -> config copies by name: an option without a field of its name would be dropped silently
    assert _options("sweep") - {"model", "out", "json", "overwrite"} <= known
    captured = []
    monkeypatch.setattr(headslim.sweep, "sweep", lambda model, out, config, **kw: captured.append(config) or {})
    assert main(["sweep", "m", "--prune", "0.2,3", "--max-length", "16", "--runs", "4", "--min-time", "0",
                 "--no-repair", "--no-progress", "--k", "3", "--backend", "none", "--json"]) == 0
    config = captured[0]
    assert (config.ratios, config.calib_max_length, config.eval.max_length, config.min_runs, config.min_seconds,
            config.repair, config.progress, config.eval.k) == ((0.2, 3), 16, 16, 4, 0.0, False, False, 3)


# ---- speed-up targets: one SpeedTarget, one scoring pass, the plan shrink chooses, timed on the runtime ---------

REST_MS = 1.0  # per sample: the embeddings, pooler and call overhead no pruning touches


def stand_in_runtime(monkeypatch) -> list:
    """A runtime whose per-layer tables are linear (``tests.test_budget.Table``) and whose whole-model time is
    the tables' sum for the written checkpoint's plan plus a fixed rest: timing is a benchmark's job, and with
    these stand-ins the calibrated estimates are exact. Returns the dirs timed against the dense model."""
    from pathlib import Path

    import headslim.latency
    import headslim.speedup
    from tests.test_budget import Table

    def table(shape, *, runtime, batch, seq, **kw):
        return Table(a=0.1 * batch, ffn=lambda n: 0.004 * batch * n, batch=batch, seq=seq)

    timed = []

    def time_pair(dense_dir, pruned_dir, runtime, shapes, **kw):
        timed.append(Path(pruned_dir))
        plan = PrunePlan.load(pruned_dir)
        out = []
        for batch, seq in shapes:
            t = table(None, runtime=runtime, batch=batch, seq=seq)
            dense_ms = REST_MS * batch + t.model_ms(plan.num_heads, plan.num_neurons)
            pruned_ms = REST_MS * batch + t.model_ms(plan.heads_after, plan.neurons_after)
            out.append({"batch": batch, "seq": seq, "dense_ms": dense_ms, "pruned_ms": pruned_ms,
                        "speedup": dense_ms / pruned_ms})
        return out

    monkeypatch.setattr(headslim.latency, "measure_table", table)
    monkeypatch.setattr(headslim.speedup, "time_pair", time_pair)
    monkeypatch.setattr(headslim.speedup, "export_for", lambda *a, **k: None)
    return timed


def counting_structures(monkeypatch) -> list:
    """Count the calls of ``headslim.scoring.neurons.score_structures`` (the speed-up targets' costs)."""
    import headslim.scoring.neurons

    calls, real = [], headslim.scoring.neurons.score_structures

    def counting(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(headslim.scoring.neurons, "score_structures", counting)
    return calls


SPEED = dict(runtime="torch-cpu", shapes="1x16,4x16")


def test_sweep_to_speedup_targets_plans_as_shrink_and_measures(dense_and_data, tmp_path, monkeypatch):
    """Two reachable targets and one beyond the tables: every reachable target gets the plan shrink
    --target-speedup chooses on its own (its own scoring pass, its own head price), measured on the runtime
    from the written checkpoint; the unreachable one is a row saying why, and the sweep goes on."""
    from headslim import report

    dense_dir, data = dense_and_data
    timed = stand_in_runtime(monkeypatch)
    calls = counting_structures(monkeypatch)
    out = tmp_path / "o"
    # 16 texts in batches of 4: 3 batches to score on, the 4th to fit the head price on (as shrink splits them)
    config = SweepConfig(target_speedups=(1.3, 3.0, 1.6), calib=str(data), calib_samples=16,
                         eval=EvalConfig(data=str(data), k=3, batch_size=4), save_models=True, **SPEED, **FAST)
    result = sweep(dense_dir, out, config, log=None)
    assert calls == ["obs"]  # one scoring pass for three targets
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    assert [r["target"] for r in rows] == [1.0, 1.3, 3.0, 1.6]
    assert saved["settings"]["target_speedups"] == [1.3, 3.0, 1.6] and saved["settings"]["ratios"] == []
    assert saved["settings"]["shapes"] == [[1, 16], [4, 16]]
    assert set(rows[2]) == {"target", "unreachable"}  # the reason: shrink's own, checked below
    assert [m["speedup"] for m in rows[0]["measured"]] == [1.0, 1.0]
    assert rows[0]["heads"] == HEADS * LAYERS and rows[0]["neurons"] == 37 * LAYERS
    for row in (rows[1], rows[3]):
        target = row["target"]
        pruned_dir = out / "models" / f"target-{target:g}"
        plan = PrunePlan.load(pruned_dir)
        assert row["heads_per_layer"] == plan.heads_after and row["neurons_per_layer"] == plan.neurons_after
        assert row["heads"] == sum(plan.heads_after) and row["kept_heads"] == plan.kept_heads
        # measured afresh on the written checkpoint, at every shape, against the dense model
        assert [(m["batch"], m["seq"]) for m in row["measured"]] == [(1, 16), (4, 16)]
        assert row["met"] and all(m["speedup"] >= target for m in row["measured"])
        assert all(m["speedup"] == pytest.approx(m["dense_ms"] / m["pruned_ms"], rel=1e-3) for m in row["measured"])
        assert row["estimated"] == pytest.approx([m["speedup"] for m in row["measured"]], rel=1e-3)  # exact stand-ins
        assert row["planned"]["met"] and row["planned"]["exchange"] > 0
        assert any(p.name == pruned_dir.name for p in timed)
        assert plan.provenance["speed_target"]["target"] == target
        # the library path: shrink at this target scores and fits the head price itself
        slim = shrink(dense_dir, tmp_path / f"slim-{target:g}",
                      ShrinkConfig(target_speedup=target, calib=str(data), calib_samples=16, eval_data=str(data),
                                   batch_size=4, threads=1, repair=False, progress=False, **SPEED))
        assert slim.plan["attention"]["kept_heads"] == plan.kept_heads
        assert slim.plan["mlp"]["kept_neurons"] == plan.kept_neurons
    assert rows[3]["heads"] + rows[3]["neurons"] < rows[1]["heads"] + rows[1]["neurons"]
    assert calls.count("obs") == 3  # shrink scored once per target; the sweep once for all
    with pytest.raises(HeadslimError) as unreachable:
        shrink(dense_dir, tmp_path / "slim-3", ShrinkConfig(target_speedup=3.0, calib=str(data), calib_samples=16,
                                                            eval_data=str(data), batch_size=4, repair=False,
                                                            progress=False, **SPEED))
    assert str(unreachable.value) == rows[2]["unreachable"]
    for i in range(2):  # a Pareto front per shape; the fastest result is on it
        assert [r["pareto"][i] for r in (rows[0], rows[1], rows[3])][-1] is True
    md = (out / "sweep.md").read_text()
    assert "| 3 | unreachable |" in md and "| 1.3 |" in md and "speed-up b4 s16" in md
    table = report.sweep_table(result)
    assert f"target 3: unreachable: {rows[2]['unreachable']}" in table and "dense" in table
    pytest.importorskip("matplotlib")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_target_sweep_leaves_nothing_and_closes_its_speed_target(dense_and_data, tmp_path,
                                                                                 monkeypatch):
    import headslim.speedup

    dense_dir, data = dense_and_data
    stand_in_runtime(monkeypatch)
    closed, real_close = [], headslim.speedup.SpeedTarget.close

    def close(self):
        closed.append(self._tmp.name)
        real_close(self)

    def interrupted(self, pruned_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(headslim.speedup.SpeedTarget, "close", close)
    monkeypatch.setattr(headslim.speedup.SpeedTarget, "measure", interrupted)
    config = SweepConfig(target_speedups=(1.3,), calib=str(data), calib_samples=8, exchange=1.0,
                         eval=EvalConfig(data=str(data), k=3), **SPEED, **FAST)
    with pytest.raises(KeyboardInterrupt):
        sweep(dense_dir, tmp_path / "o", config, log=None)
    assert not (tmp_path / "o").exists() and list(tmp_path.glob("*o.tmp*")) == []
    assert len(closed) == 1 and not __import__("os").path.exists(closed[0])


def test_sweep_refuses_bad_speed_targets_before_loading(tmp_path, monkeypatch, capsys):
    import headslim.io

    def no_loading(*args, **kwargs):
        raise AssertionError("refused only after the model loaded")

    monkeypatch.setattr(headslim.io, "load_model", no_loading)
    for args, message in ((["--prune", "0.3"], "leave out --prune and --prune-ffn"),
                          (["--prune-ffn", "0.3"], "leave out --prune and --prune-ffn"),
                          (["--target-speedup", "1.5,2,1.5"], "--target-speedup lists 1.5 twice"),
                          (["--target-speedup", "1.2,0.9"], "--target-speedup must be a number above 1, not 0.9"),
                          (["--target-speedup", "1"], "above 1, not 1.0"),
                          (["--runtime", "tpu"], "--runtime"), (["--shapes", "1by128"], "BATCHxSEQ"),
                          (["--speed-method", "magnitude"], "obs, fisher or gradient"),
                          (["--exchange", "0"], "--exchange"), (["--threads", "0"], "--threads")):
        rc = main(["sweep", "no-such-model", "--target-speedup", "1.5", *args, "--out", str(tmp_path / "o"),
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "o").exists()
    with pytest.raises(HeadslimError, match="needs at least one speed-up"):
        SweepConfig(target_speedups=())
    with pytest.raises(HeadslimError, match="leave out --prune and --prune-ffn"):
        SweepConfig(target_speedups=(1.5,), prune_ffn=0.2)


def test_sweep_cli_speed_options_reach_the_config(monkeypatch):
    import headslim.sweep

    captured = []
    monkeypatch.setattr(headslim.sweep, "sweep", lambda model, out, config, **kw: captured.append(config) or {})
    assert main(["sweep", "m", "--target-speedup", "1.5,2", "--target-structures", "heads", "--speed-method", "fisher",
                 "--exchange", "4", "--runtime", "torch-cpu", "--shapes", "1x16,8x32", "--threads", "2",
                 "--min-time", "0.5", "--json"]) == 0
    config = captured[0]
    assert (config.target_speedups, config.ratios, config.target_structures, config.speed_method, config.exchange,
            config.runtime, config.shapes) == ((1.5, 2.0), (), "heads", "fisher", 4.0, "torch-cpu", ((1, 16), (8, 32)))
    at = config.shrink_config(2.0)  # what shrink --target-speedup 2 runs with these settings
    assert (at.target_speedup, at.prune, at.threads, at.measure_seconds, at.shapes) == (2.0, 0, 2, 0.5, config.shapes)
    assert main(["sweep", "m", "--prune", "0.2", "--json"]) == 0 and captured[1].target_speedups is None
    assert captured[1].ratios == (0.2,)
    assert main(["sweep", "m", "--json"]) == 0 and captured[2].ratios == (0.1, 0.3, 0.5, 0.7)


def test_sweep_to_speedup_targets_refuses_gqa_before_timing(llama_and_data, tmp_path, monkeypatch):
    import headslim.latency

    def no_tables(*args, **kwargs):
        raise AssertionError("latency tables measured for a model that cannot be planned")

    monkeypatch.setattr(headslim.latency, "measure_table", no_tables)
    model_dir, data = llama_and_data
    config = SweepConfig(target_speedups=(1.5,), calib=str(data), calib_samples=8, eval=EvalConfig(data=str(data)),
                         **SPEED, **FAST)
    with pytest.raises(HeadslimError, match="does not plan grouped-query"):
        sweep(model_dir, tmp_path / "o", config, log=None)
    assert not (tmp_path / "o").exists()

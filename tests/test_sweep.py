"""``headslim sweep``: one scoring pass, every ratio evaluated and timed, files written."""

import json

import pytest

import headslim.scoring
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.evaluate import EvalConfig, evaluate
from headslim.selection import select_heads
from headslim.sweep import SweepConfig, pareto_front, sweep
from tests.conftest import HEADS, LAYERS
from tests.test_bench import save_pair
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

"""Inputs that used to give a wrong result with exit 0, or a traceback: each is now refused in one line
(exit 2, nothing written) or, for repair on tiny calibration data, checked and reported."""

import copy
import json
import math

import pytest
import torch

import headslim
import headslim.io
from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.plan import PLAN_FILE, PrunePlan
from headslim.repair import repair
from headslim.surgery import prune_heads
from tests.conftest import HEADS, LAYERS, TF_MAJOR, tiny_decoder, tiny_inputs, tiny_model
from tests.test_bench import WORDS, save_pair
from tests.test_evaluate import write_labelled

TOTAL = HEADS * LAYERS  # 12 heads in the tiny models
SMALL = ["--calib-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-progress", "--method", "gradient"]
REPAIR_PLAN = PrunePlan([HEADS] * LAYERS, [[0, 3], [1], [2]])


def _expect_error(argv, match, capsys, out=None) -> str:
    """``main(argv)`` exits 2 with one ``headslim: error:`` line containing ``match``, writing nothing at ``out``."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("headslim: error: ") and len(err.splitlines()) == 1, err
    assert match in err, err
    if out is not None:
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def _texts(path, n: int):
    """``n`` lines of words the tiny tokenizer knows."""
    path.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6 + i % 5)) for i in range(n)))
    return path


@pytest.fixture
def pair(tmp_path):
    """A tiny dense BERT (64 positions, 12 heads, with tokenizer) and a pruned copy of it."""
    return save_pair(tmp_path)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any checkpoint's weights are loaded: the check must come before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(headslim.io, "load_model", refuse)
    monkeypatch.setattr(headslim.io, "load_pruned", refuse)


# ---- A1: repair on too little calibration data ------------------------------------------------

def test_repair_on_one_batch_is_checked_on_held_out_samples():
    """One batch of 3 used to leave no held-out batch, so the repair was kept unchecked."""
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), REPAIR_PLAN)
    report = repair(pruned, dense, REPAIR_PLAN, [tiny_inputs(batch=3)], progress=False)
    assert report.held_out["unit"] == "samples" and report.held_out["n_held_out"] >= 1
    assert report.check["n_held_out"] == report.held_out["n_held_out"]
    assert (report.check["after"] > report.check["before"]) == report.applied
    assert "held-out" in report.warning and not report.skipped


def test_repair_on_one_sample_is_skipped_and_says_so():
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), REPAIR_PLAN)
    before = copy.deepcopy(pruned.state_dict())
    one = {k: v[:1] for k, v in tiny_inputs().items()}
    report = repair(pruned, dense, REPAIR_PLAN, [one], progress=False)
    assert not report.applied and "1 calibration sample" in report.skipped and report.warning
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())


def test_repair_with_enough_batches_is_unchanged():
    """Normal sizes keep holding out every 4th batch."""
    dense = tiny_model("bert", "BertModel")
    pruned = prune_heads(copy.deepcopy(dense), REPAIR_PLAN)
    report = repair(pruned, dense, REPAIR_PLAN, [tiny_inputs(seed=i) for i in range(8)], progress=False)
    assert report.held_out == {"unit": "batches", "n_fit": 6, "n_held_out": 2}
    assert report.check["n_held_out"] == 2 and not report.warning and not report.skipped


def test_shrink_on_five_lines_warns_and_reports_the_checked_repair(tmp_path, pair, capsys):
    dense_dir, _ = pair
    calib = _texts(tmp_path / "five.txt", 5)
    capsys.readouterr()
    rc = main(["shrink", str(dense_dir), "--prune", "0.5", "--calib", str(calib), "--out", str(tmp_path / "o"), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("headslim: warning:")]
    assert len(warnings) == 1 and "calibration" in warnings[0], captured.err
    r = PrunePlan.load(tmp_path / "o").provenance["repair"]
    assert r["check"] or r["skipped"]  # never kept without a held-out check
    assert "held-out" in captured.out.split("repair: ")[1].splitlines()[0]


def test_shrink_on_one_line_skips_repair_and_says_so(tmp_path, pair, capsys):
    dense_dir, _ = pair
    calib = _texts(tmp_path / "one.txt", 1)
    capsys.readouterr()
    rc = main(["shrink", str(dense_dir), "--prune", "0.5", "--calib", str(calib), "--out", str(tmp_path / "o"), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err.count("headslim: warning: repair skipped") == 1, captured.err
    assert "repair: skipped (1 calibration sample" in captured.out
    r = PrunePlan.load(tmp_path / "o").provenance["repair"]
    assert r["skipped"] and not r["applied"] and not r["layers"]


# ---- A2: non-finite weights, scores, outputs --------------------------------------------------

def _poison(path, key_part="query.weight"):
    """Overwrite one weight of ``path/model.safetensors`` with NaN; returns its name."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    key = next(k for k in sorted(state) if key_part in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return key


def test_nan_weights_of_a_dense_checkpoint_are_refused(tmp_path, pair, capsys):
    dense_dir, _ = pair
    key = _poison(dense_dir)
    with pytest.raises(HeadslimError, match="NaN or Inf") as e:
        headslim.load_model(dense_dir)
    assert key in str(e.value) and "\n" not in str(e.value)
    _expect_error(["shrink", str(dense_dir), "--out", str(tmp_path / "o"), "--calib", str(_texts(tmp_path / "t.txt", 20)),
                   *SMALL], "NaN or Inf", capsys, tmp_path / "o")


def test_inf_weights_of_a_pruned_checkpoint_are_refused(pair):
    from safetensors.torch import load_file, save_file

    _, pruned_dir = pair
    state = load_file(str(pruned_dir / "model.safetensors"))
    key = next(k for k in sorted(state) if k.endswith("dense.bias"))
    state[key][0] = float("inf")
    save_file(state, str(pruned_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HeadslimError, match="NaN or Inf"):
        headslim.load_pruned(pruned_dir)


def test_nan_scores_are_refused(tmp_path, pair, capsys, monkeypatch):
    import headslim.scoring

    dense_dir, _ = pair
    real = headslim.scoring.score_heads
    monkeypatch.setattr(headslim.scoring, "score_heads", lambda *a, **k: real(*a, **k) * float("nan"))
    calib = str(_texts(tmp_path / "t.txt", 20))
    _expect_error(["shrink", str(dense_dir), "--out", str(tmp_path / "o"), "--calib", calib, *SMALL],
                  "scores are not finite", capsys, tmp_path / "o")
    _expect_error(["sweep", str(dense_dir), "--out", str(tmp_path / "s"), "--calib", calib, "--prune", "0.5",
                   "--backend", "none", "--data", str(write_labelled(tmp_path / "d.csv")), "--max-length", "32",
                   "--no-progress"], "scores are not finite", capsys, tmp_path / "s")


def test_non_finite_outputs_of_the_pruned_model_are_refused(tmp_path, pair, capsys, monkeypatch):
    import headslim.surgery

    dense_dir, _ = pair
    real = headslim.surgery.prune_heads

    def prune_and_break(model, plan):  # finite weights can still overflow: here one weight is NaN
        real(model, plan)
        with torch.no_grad():
            model.encoder.layer[2].output.dense.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(headslim.surgery, "prune_heads", prune_and_break)
    _expect_error(["shrink", str(dense_dir), "--out", str(tmp_path / "o"), "--calib", str(_texts(tmp_path / "t.txt", 20)),
                   "--no-repair", *SMALL], "outputs of the pruned model are not finite", capsys, tmp_path / "o")


def test_eval_refuses_non_finite_outputs(tmp_path, pair, capsys, monkeypatch):
    import headslim.quality

    dense_dir, pruned_dir = pair
    real = headslim.quality.embeddings
    monkeypatch.setattr(headslim.quality, "embeddings", lambda *a, **k: real(*a, **k) * float("nan"))
    _expect_error(["eval", str(pruned_dir), "--baseline", str(dense_dir), "--data", str(write_labelled(tmp_path / "d.csv")),
                   "--out", str(tmp_path / "e")], "are not finite", capsys, tmp_path / "e")


# ---- A3: prune targets that remove nothing, non-integer heads in plans -------------------------

def test_a_fraction_that_removes_no_head_is_refused(tmp_path, pair, capsys, no_weights):
    dense_dir, _ = pair
    err = _expect_error(["shrink", str(dense_dir), "--prune", "1e-9", "--out", str(tmp_path / "o"), *SMALL],
                        "removes no head", capsys, tmp_path / "o")
    assert "1e-09" in err and f"{TOTAL} heads" in err
    _expect_error(["sweep", str(dense_dir), "--prune", "1e-9,0.5", "--out", str(tmp_path / "s"), "--backend", "none"],
                  "removes no head", capsys, tmp_path / "s")


@pytest.mark.parametrize("head", [0.7, True, 1.0, "a", "1"])
def test_plan_heads_must_be_integers(tmp_path, pair, capsys, head):
    dense_dir, _ = pair
    with pytest.raises(HeadslimError, match="not a head number"):
        PrunePlan.from_user({"kept_heads": [[0, head], [0], [0]]}, [HEADS] * LAYERS)
    with pytest.raises(HeadslimError, match="not a head number"):
        PrunePlan.from_dict({"num_heads": [HEADS] * LAYERS, "kept_heads": [[0, head], [0], [0]]})
    (tmp_path / "plan.json").write_text(json.dumps({"kept_heads": {"0": [head, 2]}}))
    _expect_error(["shrink", str(dense_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o"),
                   *SMALL], "not a head number", capsys, tmp_path / "o")


# ---- B: plan files that used to raise tracebacks ----------------------------------------------

BAD_PLANS = [
    ({"kept_heads": [[0], None, [1]]}, "layer 1"),
    ({"kept_heads": 3}, "'kept_heads' must be"),
    ({"kept_heads": [0, 1, 2]}, "layer 0"),
    ({"kept_heads": "abc"}, "'kept_heads' must be"),
    ({"kept_heads": {"0": None}}, "layer 0"),
    ({"kept_heads": {"0": 3}}, "layer 0"),
    ({"num_heads": "abc", "kept_heads": [[0], [0], [0]]}, "num_heads"),
    ({"num_heads": ["a", 4, 4], "kept_heads": [[0], [0], [0]]}, "num_heads"),
    ({"num_heads": [4, 4, 4], "kept_heads": [[0], [0], [0]], "format_version": "x"}, "format_version"),
    ({"num_heads": [4, 4, 4], "kept_heads": [[0], [0], [0]], "provenance": [1]}, "provenance"),
]


@pytest.mark.parametrize("data,match", BAD_PLANS)
def test_bad_plan_files_are_one_line_errors(tmp_path, pair, capsys, data, match):
    dense_dir, pruned_dir = pair
    (tmp_path / "plan.json").write_text(json.dumps(data))
    _expect_error(["shrink", str(dense_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o"),
                   *SMALL], match, capsys, tmp_path / "o")
    full = {"num_heads": [HEADS] * LAYERS, **data}
    (pruned_dir / PLAN_FILE).write_text(json.dumps(full))
    with pytest.raises(HeadslimError, match="plan") as e:
        headslim.load_pruned(pruned_dir)
    assert "\n" not in str(e.value)


def test_bad_kv_rows_are_one_line_errors():
    maps = [[0, 0, 1, 1]] * 2
    for kv in ([[0, "x"], [0]], [None, [0]], 5):
        with pytest.raises(HeadslimError, match="kept_kv_heads"):
            PrunePlan([4, 4], [[0, 1], [0]], kv_head_of_q=maps, kept_kv_heads=kv)
    for bad in ([[0, 0, 1, 0.5], [0, 0, 1, 1]], [None, [0, 0, 1, 1]]):
        with pytest.raises(HeadslimError, match="kv_head_of_q"):
            PrunePlan([4, 4], [[0, 1], [0]], kv_head_of_q=bad)


def test_plan_file_that_is_not_utf8(tmp_path, pair, capsys):
    dense_dir, pruned_dir = pair
    (tmp_path / "plan.json").write_bytes(b'{"kept_heads": "\xff"}')
    _expect_error(["shrink", str(dense_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o"),
                   *SMALL], "not UTF-8", capsys, tmp_path / "o")
    (pruned_dir / PLAN_FILE).write_bytes(b'{"kept_heads": "\xff"}')
    with pytest.raises(HeadslimError, match="not UTF-8"):
        headslim.load_pruned(pruned_dir)


# ---- B: calibration files that are not UTF-8 ----------------------------------------------------

@pytest.mark.parametrize("name,content,offset", [
    ("d.csv", b"text,label\nhello,a\ncaf\xe9 au lait,b\n", 22),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 28),
    ("d.txt", b"first line\nsecond \xff line\n", 18),
])
def test_non_utf8_data_is_refused_with_the_byte_offset(tmp_path, pair, capsys, name, content, offset):
    from headslim.data import load_texts

    (tmp_path / name).write_bytes(content)
    with pytest.raises(HeadslimError, match=f"{name} is not UTF-8 text: invalid byte 0x.. at byte offset {offset}"):
        load_texts(tmp_path / name)
    dense_dir, _ = pair
    _expect_error(["shrink", str(dense_dir), "--calib", str(tmp_path / name), "--out", str(tmp_path / "o"), *SMALL],
                  f"at byte offset {offset}", capsys, tmp_path / "o")


def test_utf8_with_byte_order_mark_reads(tmp_path):
    from headslim.data import load_texts

    (tmp_path / "d.csv").write_bytes("\ufefftext,label\ncafé,a\n".encode("utf-8"))
    assert load_texts(tmp_path / "d.csv").texts == ["café"]


# ---- B: lengths and targets checked from config.json, before any weights load -------------------

def test_max_length_beyond_the_positions_is_refused_early(tmp_path, pair, capsys, no_weights):
    dense_dir, pruned_dir = pair
    calib = str(_texts(tmp_path / "t.txt", 20))
    data = str(write_labelled(tmp_path / "d.csv"))
    cases = [
        (["shrink", str(dense_dir), "--calib", calib, "--out", str(tmp_path / "o"), *SMALL, "--max-length", "65"],
         "--max-length 65", tmp_path / "o"),
        (["sweep", str(dense_dir), "--calib", calib, "--prune", "0.5", "--backend", "none", "--max-length", "65",
          "--out", str(tmp_path / "s")], "--max-length 65", tmp_path / "s"),
        (["sweep", str(dense_dir), "--calib", calib, "--prune", "0.5", "--seq", "65", "--max-length", "32",
          "--out", str(tmp_path / "s")], "--seq 65", tmp_path / "s"),
        (["eval", str(pruned_dir), "--baseline", str(dense_dir), "--data", data, "--max-length", "65",
          "--out", str(tmp_path / "e")], "--max-length 65", tmp_path / "e"),
        (["bench", str(pruned_dir), "--baseline", str(dense_dir), "--backend", "torch-eager-cpu", "--seq", "8,65",
          "--out", str(tmp_path / "b")], "--seq 65", tmp_path / "b"),
        (["export", str(dense_dir), "--max-length", "65", "--out", str(tmp_path / "x")], "--max-length 65",
         tmp_path / "x"),
    ]
    for argv, match, out in cases:
        err = _expect_error(argv, match, capsys, out)
        assert "64" in err


def test_roberta_positions_exclude_the_padding_offset(tmp_path, capsys, no_weights):
    model = tiny_model("roberta", "RobertaModel")  # 64 positions, pad id 1: 62 tokens fit
    model.save_pretrained(str(tmp_path / "rob"))
    err = _expect_error(["export", str(tmp_path / "rob"), "--max-length", "63", "--out", str(tmp_path / "x")],
                        "--max-length 63", capsys, tmp_path / "x")
    assert "62" in err


def test_default_max_length_fits_a_short_model(tmp_path, pair, capsys):
    """The default of 128 tokens becomes the model's limit (64 here) rather than an error."""
    dense_dir, _ = pair
    rc = main(["shrink", str(dense_dir), "--calib", str(_texts(tmp_path / "t.txt", 20)), "--out", str(tmp_path / "o"),
               "--no-progress", "--method", "gradient", "--no-repair"])
    assert rc == 0, capsys.readouterr().err
    assert PrunePlan.load(tmp_path / "o").provenance["calibration"]["max_length"] == 64


def test_too_many_heads_is_refused_before_loading(tmp_path, pair, capsys, no_weights):
    dense_dir, _ = pair
    _expect_error(["shrink", str(dense_dir), "--prune", "1000", "--out", str(tmp_path / "o"), *SMALL],
                  f"the model has {TOTAL} heads", capsys, tmp_path / "o")
    _expect_error(["sweep", str(dense_dir), "--prune", "0.5,1000", "--out", str(tmp_path / "s"), "--backend", "none"],
                  f"the model has {TOTAL} heads", capsys, tmp_path / "s")


@pytest.mark.parametrize("ratios,match", [("0.5,0.5", "twice"), ("0.5,6", "both remove 6"),
                                          ("0.5,0.52", "both remove 6")])
def test_sweep_ratios_that_repeat_are_refused(tmp_path, pair, capsys, no_weights, ratios, match):
    dense_dir, _ = pair
    _expect_error(["sweep", str(dense_dir), "--prune", ratios, "--out", str(tmp_path / "s"), "--backend", "none"],
                  match, capsys, tmp_path / "s")


# ---- B: a pruned dir without its plan; decoder export --------------------------------------------

def test_pruned_dir_without_its_plan_file(tmp_path, pair, capsys):
    _, pruned_dir = pair
    (pruned_dir / PLAN_FILE).unlink()
    if TF_MAJOR < 5:  # 4.x rebuilds pruned shapes from config.pruned_heads: without it, nothing says pruned
        config = json.loads((pruned_dir / "config.json").read_text())
        config.pop("pruned_heads", None)
        (pruned_dir / "config.json").write_text(json.dumps(config))
    err = _expect_error(["inspect", str(pruned_dir)], "looks pruned", capsys)
    assert PLAN_FILE in err and "above report" not in err


def _decoder_dirs(tmp_path):
    from headslim.arch import kv_maps

    model = tiny_decoder("llama", "LlamaForCausalLM")
    model.save_pretrained(str(tmp_path / "dense-llama"))
    plan = PrunePlan([8] * LAYERS, [[0, 1, 2, 3], [0, 1, 4, 5], list(range(8))], kv_head_of_q=kv_maps(model))
    headslim.save_pruned(prune_heads(copy.deepcopy(model), plan), tmp_path / "pruned-llama", plan)
    return tmp_path / "dense-llama", tmp_path / "pruned-llama"


def test_decoder_export_options_are_refused_from_config_alone(tmp_path, capsys, no_weights):
    dense, pruned = _decoder_dirs(tmp_path)
    for src in (pruned, dense):
        err = _expect_error(["export", str(src), "--out", str(tmp_path / "x"), "--exporter", "dynamo"],
                            "decoder export does not take --exporter dynamo yet", capsys, tmp_path / "x")
        assert "optimum" not in err


def test_finite_checkpoints_still_load(pair):
    """Guard against the load check changing what loads: a finite checkpoint still round-trips."""
    dense_dir, pruned_dir = pair
    inputs = tiny_inputs()
    with torch.no_grad():
        out = headslim.load_pruned(pruned_dir)(**inputs).last_hidden_state
    assert math.isfinite(float(out.sum()))
    assert headslim.load_model(dense_dir) is not None

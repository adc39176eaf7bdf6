"""``headslim.pipeline.prune_model``: the one pruning path that ``shrink``, ``sweep`` and ``bench/`` share."""

import ast
from pathlib import Path

import pytest
import torch

import headslim
import headslim.scoring
from headslim.checkpoints import load_tokenizer
from headslim.data import batches, load_texts, sample
from headslim.errors import HeadslimError
from headslim.evaluate import EvalConfig
from headslim.io import load_model
from headslim.pipeline import PruneConfig, Scores, ShrinkConfig, prune_model, shared_scores, shrink
from headslim.plan import PrunePlan
from headslim.selection import select_heads
from headslim.sweep import SweepConfig, sweep
from tests.conftest import HEADS, LAYERS, tiny_batches, tiny_decoder, tiny_model
from tests.test_bench import save_pair, tiny_tokenizer
from tests.test_evaluate import write_labelled


@pytest.fixture(params=["bert", "llama"])
def model_and_data(request, tmp_path):
    """A tiny checkpoint with a tokenizer (BERT encoder, or a GQA Llama: 8 query heads over 2 KV heads), texts."""
    if request.param == "bert":
        model_dir, _ = save_pair(tmp_path)
    else:
        model_dir = tmp_path / "llama"
        tiny_decoder("llama", "LlamaForCausalLM").save_pretrained(str(model_dir))
        tiny_tokenizer(tmp_path).save_pretrained(str(model_dir))
    return request.param, model_dir, write_labelled(tmp_path / "texts.csv")


def calibration(model_dir, source, n: int, *, batch_size: int, max_length: int, objective: str = "dense"):
    """The calibration batches ``shrink`` and ``sweep`` build from ``source`` (``eval_data`` given: no split)."""
    texts = sample(load_texts(str(source), require_labels=objective == "task"), n, 0)
    return batches(texts, load_tokenizer(model_dir, pad=True), batch_size=batch_size, max_length=max_length)


def assert_same_model(result, saved_dir):
    """``result`` (a PruneResult) holds the plan and the weights of the checkpoint saved in ``saved_dir``."""
    saved = PrunePlan.load(saved_dir)
    assert result.plan.kept_heads == saved.kept_heads and result.plan.kept_neurons == saved.kept_neurons
    for key in ("method", "objective", "prune", "scores", "gqa", "ffn_method", "prune_ffn", "scored_together", "repair"):
        assert result.plan.provenance.get(key) == saved.provenance.get(key), key
    reloaded = headslim.load_pruned(saved_dir).state_dict()
    state = result.model.state_dict()
    assert set(state) == set(reloaded)
    for name, value in state.items():
        assert torch.equal(value, reloaded[name]), name


def test_prune_model_is_what_shrink_writes(model_and_data, tmp_path):
    case, model_dir, data = model_and_data
    settings = dict(prune=0.5, calib=str(data), calib_samples=12, eval_data=str(data), max_length=32, progress=False)
    if case == "bert":
        settings.update(prune_ffn=0.25, ffn_method="fisher")  # heads and neurons in the same backward passes
    else:
        settings.update(objective="task")  # next-token labels added by prune_model; --gqa uniform selection
    config = ShrinkConfig(**settings)
    written = shrink(model_dir, tmp_path / "slim", config)
    assert written.repair["requested"] and written.plan["provenance"]["repair"] == written.repair

    model = load_model(model_dir)
    result = prune_model(model, calibration(model_dir, data, 12, batch_size=config.batch_size, max_length=32,
                                            objective=config.objective), config)
    assert result.model is model  # pruned in place
    assert result.plan.heads_after == written.heads_after and result.repair == written.repair
    if case == "llama":
        assert result.plan.provenance["gqa"] == "uniform" and result.plan.kv_head_of_q is not None
    assert_same_model(result, tmp_path / "slim")


def test_a_sweep_ratio_is_prune_model_at_that_ratio(model_and_data, tmp_path):
    case, model_dir, data = model_and_data
    if case == "bert":  # one scoring pass for every ratio (heads and neurons together): the deepest ratio's plan
        extra, ratio = dict(prune_ffn=0.25, ffn_method="fisher"), 0.5
    else:  # iterative on a --gqa uniform selection is scored at each ratio: the smaller one
        extra, ratio = dict(method="iterative:magnitude", step=0.25), 0.25
    config = SweepConfig(ratios=(0.25, 0.5), calib=str(data), calib_samples=12, calib_max_length=32, backend="none",
                         eval=EvalConfig(data=str(data), k=3, max_length=32), save_models=True, repair=True,
                         progress=False, **extra)
    rows = sweep(model_dir, tmp_path / "o", config, log=None)["rows"]

    model = load_model(model_dir)
    result = prune_model(model, calibration(model_dir, data, 12, batch_size=config.eval.batch_size, max_length=32),
                         config.shrink_config(ratio))
    row = next(r for r in rows if r["prune"] == ratio)
    assert row["kept_heads"] == result.plan.kept_heads and row["repair"] == result.repair
    assert_same_model(result, tmp_path / "o" / "models" / f"prune-{ratio:g}")


# ---- the API in memory -----------------------------------------------------------------------

@pytest.fixture
def no_scoring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scored although the scores or the plan were given")

    monkeypatch.setattr(headslim.scoring, "score_heads", refuse)


def test_a_given_plan_is_applied_and_repaired_without_scoring(no_scoring):
    model = tiny_model("bert", "BertModel")
    plan = PrunePlan([HEADS] * LAYERS, [[0, 1], [2], list(range(HEADS))], {"method": "hand-written"})
    result = prune_model(model, tiny_batches(4), PruneConfig(progress=False), plan=plan)
    assert result.plan is plan and [layer.attention.self.num_attention_heads for layer in model.encoder.layer] == [2, 1, 4]
    assert plan.provenance["method"] == "hand-written" and plan.provenance["repair"] is result.repair
    assert result.repair["requested"] and "applied" in result.repair and set(result.seconds) == {"score", "repair"}


def test_given_scores_are_selected_from_not_scored_again(no_scoring):
    scores = torch.rand(LAYERS, HEADS, generator=torch.Generator().manual_seed(0))
    result = prune_model(tiny_model("bert", "BertModel"), None, PruneConfig(prune=6, repair=False),
                         scores=Scores(heads=scores))
    assert result.plan.kept_heads == select_heads(scores, [HEADS] * LAYERS, prune=6).kept_heads
    assert result.repair == {"applied": False, "requested": False}
    assert result.plan.provenance["method"] == "fisher" and "headslim_version" in result.plan.provenance


def test_shared_scores_leave_target_dependent_heads_to_each_target():
    model, calib = tiny_model("bert", "BertModel"), tiny_batches(2)
    shared = shared_scores(model, calib, PruneConfig(method="magnitude"), (0.25, 6))
    assert shared.heads.shape == (LAYERS, HEADS) and shared.neurons is None
    assert shared_scores(model, calib, PruneConfig(method="learned"), (0.25, 0.5)).heads is None


def test_a_speed_target_needs_its_latency_tables():
    with pytest.raises(HeadslimError, match="pass speed="):
        prune_model(tiny_model("bert", "BertModel"), tiny_batches(2), PruneConfig(target_speedup=1.5))


def test_prune_model_is_public():
    import headslim.pipeline as pipeline

    for name in ("prune_model", "PruneConfig", "PruneResult"):
        assert getattr(headslim, name) is getattr(pipeline, name) and name in headslim.__all__


def test_shrink_config_is_a_prune_config():
    assert isinstance(ShrinkConfig(), PruneConfig)
    assert ShrinkConfig(plan="p.json", method="no-such-scorer").plan == "p.json"  # a plan is applied, not scored
    with pytest.raises(HeadslimError, match="unknown scoring method"):
        PruneConfig(method="no-such-scorer")
    assert PruneConfig(prune=0, prune_ffn=0.3).ffn_method == "magnitude"


# ---- no import cycles ------------------------------------------------------------------------

def import_cycles() -> list[set[str]]:
    """Strongly connected groups of headslim modules that import each other (at the top or in a function)."""
    root = Path(headslim.__file__).parent
    modules = {".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in root.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    reach = {m: set() for m in graph}
    for m in graph:  # transitive closure by search from every module (a few dozen modules)
        todo = list(graph[m])
        while todo:
            n = todo.pop()
            if n not in reach[m]:
                reach[m].add(n)
                todo.extend(graph[n])
    cycles = []
    for m in sorted(graph):
        group = {m} | {n for n in reach[m] if m in reach[n]}
        if len(group) > 1 and group not in cycles:
            cycles.append(group)
    return cycles


def test_no_import_cycles():
    # cli imports sweep (not the reverse), bench and evaluate share headslim.checkpoints, gqa and
    # selection share headslim.plan (heads_to_prune), the scorers share headslim.scoring.common (SCORERS)
    assert import_cycles() == []

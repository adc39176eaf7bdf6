"""Decoder LLMs: pruned == gated dense (logits, greedy generation with the KV cache), GQA modes, reload."""

import copy
import json
import random
from pathlib import Path

import pytest
import torch

import headslim
from headslim.arch import get_adapter, kv_maps
from headslim.compat import cache_kwargs, output_cache
from headslim.data import causal_lm_batches
from headslim.errors import HeadslimError
from headslim.gates import gated
from headslim.gqa import GQA_MODES, feasible_counts, select_gqa
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.arch.ragged import eager_reference, gather_kv, kv_offsets, ragged_attention_forward
from headslim.scoring import score_heads
from headslim.surgery import prune_heads
from tests.conftest import DEC_HEADS, DECODER_CASES, LAYERS, TF_MAJOR, TINY_DECODERS, VOCAB, main_output, tiny_decoder
from tests.conftest import assert_same_model

pytestmark = pytest.mark.usefixtures("one_thread")


CASE_IDS = [f"{cls}-kv{kv}" if kv else cls for _, cls, kv in DECODER_CASES]


def test_every_decoder_family_is_in_the_cases():
    assert {t for t, _, _ in DECODER_CASES} == set(TINY_DECODERS)


def dec_inputs(batch: int = 3, seq: int = 9, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as for generation
    if batch > 2:
        mask[2, : seq - 2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def plans_for(model, mode: str, seed: int) -> list[PrunePlan]:
    """Plans ``select_gqa`` makes from random scores, with and without empty layers."""
    rng = random.Random(seed)
    maps = kv_maps(model)
    plans = []
    for i, (prune, floor) in enumerate(((0.3, 1), (0.6, 0), (0.8, 0))):
        scores = torch.rand(LAYERS, DEC_HEADS, generator=torch.Generator().manual_seed(seed * 10 + i))
        if floor == 0:
            scores[rng.randrange(LAYERS)] *= 0.01  # make one layer likely to go entirely
        plans.append(select_gqa(scores, maps, prune=prune, mode=mode, min_per_layer=floor))
    return plans


def hand_plans(model) -> list[PrunePlan]:
    maps = kv_maps(model)
    n = [len(m) for m in maps]
    return [
        PrunePlan(n, [[0], [], [1, 2, n[2] - 1]], kv_head_of_q=maps),  # one head, no heads, ragged
        PrunePlan(n, [[], [], []], kv_head_of_q=maps),  # every attention block removed
        PrunePlan(n, [[], [0, 3], [1, 2, n[2] - 1]], kv_head_of_q=maps),  # layer 0 (the cache's length) empty
    ]


def _attn(layer):
    return getattr(layer, "self_attn", None) or layer.attn


@pytest.mark.parametrize("mode", GQA_MODES)
@pytest.mark.parametrize("model_type,class_name,num_kv", DECODER_CASES, ids=CASE_IDS)
def test_pruned_equals_gated_dense(model_type, class_name, num_kv, mode):
    dense = tiny_decoder(model_type, class_name, num_kv)
    inputs = dec_inputs()
    plans = plans_for(dense, mode, seed=len(class_name) + (num_kv or 0))
    if mode == "ragged":
        plans += hand_plans(dense)
    for plan in plans:
        with torch.no_grad(), gated(dense, plan.mask()):
            expected = main_output(dense(**inputs))
        pruned = prune_heads(copy.deepcopy(dense), plan)
        adapter = get_adapter(pruned)
        assert adapter.num_heads(pruned) == plan.heads_after
        for layer, (block, kept_kv, m) in enumerate(zip(adapter.attention_blocks(pruned), plan.kv_heads_after,
                                                        kv_maps(pruned))):
            attn = _attn(block)
            ragged = "headslim_kv_head_of_q" in attn._buffers
            if hasattr(attn, "k_proj"):  # the KV heads no kept query head reads are gone
                assert attn.k_proj.out_features == len(kept_kv) * attn.head_dim
            if mode != "ragged":  # standard GQA shapes: no gather, stock kernels
                assert not ragged
                offsets = kv_offsets(m)
                assert len({b - a for a, b in zip(offsets, offsets[1:])}) <= 1
        with torch.no_grad():
            got = main_output(pruned(**inputs))
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, (mode, plan.kept_heads)


NEW_TOKENS = 40  # long enough that a wrong cache length shows up (at 20, GPT-2 once passed with one)


def _generate(model, inputs, new_tokens: int = NEW_TOKENS):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          use_cache=True, pad_token_id=0)


LM_CASES = [(c, i) for c, i in zip(DECODER_CASES, CASE_IDS) if c[1].endswith(("ForCausalLM", "LMHeadModel"))]
LM_PARAMS = dict(argnames="model_type,class_name,num_kv", argvalues=[c for c, _ in LM_CASES],
                 ids=[i for _, i in LM_CASES])


def lm_plans(dense) -> list[PrunePlan]:
    """Empty layer 0 (transformers reads the cached length there) + ragged; no attention at all; uniform."""
    return [hand_plans(dense)[2], hand_plans(dense)[1], plans_for(dense, "uniform", seed=1)[1]]


@pytest.mark.parametrize(**LM_PARAMS)
def test_prefill_fills_every_layers_cache(model_type, class_name, num_kv):
    """After a prefill every layer's cache holds the prompt, a layer without heads included."""
    dense = tiny_decoder(model_type, class_name, num_kv)
    inputs = dec_inputs(batch=2, seq=7)
    for plan in lm_plans(dense):
        pruned = prune_heads(copy.deepcopy(dense), plan)
        with torch.no_grad():
            cache = output_cache(pruned(**inputs, use_cache=True))
        assert [cache.get_seq_length(i) for i in range(LAYERS)] == [7] * LAYERS, plan.kept_heads


@pytest.mark.parametrize(**LM_PARAMS)
def test_prefill_then_decode_step_equals_full_forward(model_type, class_name, num_kv):
    """A hand-written prefill + one decode step against the cache gives the full forward's logits."""
    dense = tiny_decoder(model_type, class_name, num_kv)
    for padded in (False, True):
        inputs = dec_inputs(batch=2, seq=7)
        if not padded:
            inputs["attention_mask"].fill_(1)
        for plan in lm_plans(dense):
            pruned = prune_heads(copy.deepcopy(dense), plan)
            with torch.no_grad():
                full = pruned(**inputs).logits[:, -2:]  # (B, 2, V)
                prefix = {k: v[:, :-1] for k, v in inputs.items()}
                first = pruned(**prefix, use_cache=True)
                step = pruned(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"],
                              use_cache=True, **cache_kwargs(pruned, output_cache(first)))
            assert (first.logits[:, -1] - full[:, 0]).abs().max().item() <= 1e-5
            assert (step.logits[:, -1] - full[:, 1]).abs().max().item() <= 1e-5, (padded, plan.kept_heads)


@pytest.mark.parametrize(**LM_PARAMS)
def test_greedy_generation_matches_gated_dense(model_type, class_name, num_kv):
    dense = tiny_decoder(model_type, class_name, num_kv)
    inputs = dec_inputs(batch=2, seq=7)  # row 1 is left-padded
    for plan in lm_plans(dense):
        with torch.no_grad(), gated(dense, plan.mask()):
            expected = _generate(dense, inputs)
        pruned = prune_heads(copy.deepcopy(dense), plan)
        with torch.no_grad():
            got = _generate(pruned, inputs)
        assert got.shape == (2, 7 + NEW_TOKENS)
        assert torch.equal(got, expected), plan.kept_heads


@pytest.mark.parametrize("model_type,class_name,num_kv", DECODER_CASES, ids=CASE_IDS)
def test_save_load_round_trip(tmp_path, model_type, class_name, num_kv):
    dense = tiny_decoder(model_type, class_name, num_kv)
    plan = hand_plans(dense)[0]
    pruned = prune_heads(dense, plan)
    save_pruned(pruned, tmp_path / "slim", plan)
    reloaded = headslim.load_pruned(tmp_path / "slim")
    assert type(reloaded) is type(pruned)
    assert kv_maps(reloaded) == kv_maps(pruned)
    saved = PrunePlan.load(tmp_path / "slim")
    assert saved.kept_heads == plan.kept_heads and saved.kv_heads_after == plan.kv_heads_after
    inputs = dec_inputs()
    with torch.no_grad():
        assert_same_model(reloaded, pruned, main_output(reloaded(**inputs)), main_output(pruned(**inputs)))
        if hasattr(pruned, "generate") and class_name.endswith(("ForCausalLM", "LMHeadModel")):
            short = dec_inputs(batch=2, seq=5)
            assert torch.equal(_generate(reloaded, short, 20), _generate(pruned, short, 20))


GPT2_PLAN = [[0, 5], [1, 2, 3, 4, 5, 6, 7], [7]]
TF4_PYTHON = Path(__file__).resolve().parents[1] / ".venv-tf4" / "bin" / "python"  # make test builds it first


def _save_pruned_gpt2(out):
    dense = tiny_decoder("gpt2", "GPT2LMHeadModel")
    plan = PrunePlan([DEC_HEADS] * LAYERS, GPT2_PLAN)
    pruned = prune_heads(dense, plan)
    save_pruned(pruned, out, plan)
    return pruned, plan


def test_pruned_gpt2_config_records_pruned_heads_on_every_version(tmp_path):
    """4.x rebuilds a pruned GPT-2 from ``config.pruned_heads``: it must be written under 5.x too."""
    _, plan = _save_pruned_gpt2(tmp_path / "slim")
    written = json.loads((tmp_path / "slim" / "config.json").read_text())["pruned_heads"]
    assert {int(k): v for k, v in written.items()} == plan.pruned_heads


@pytest.mark.skipif(TF_MAJOR >= 5, reason="transformers 5 removed config.pruned_heads")
def test_stock_from_pretrained_loads_pruned_gpt2_on_4x(tmp_path):
    import transformers

    pruned, _ = _save_pruned_gpt2(tmp_path / "slim")
    stock = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "slim").eval()
    inputs = dec_inputs()
    with torch.no_grad():
        assert (stock(**inputs).logits - pruned(**inputs).logits).abs().max() <= 1e-6


@pytest.mark.skipif(TF_MAJOR < 5 or not TF4_PYTHON.exists(), reason="needs transformers 5 here and .venv-tf4")
def test_gpt2_pruned_on_5x_loads_with_stock_from_pretrained_on_4x(tmp_path):
    """The cross-version case users hit: prune under 5.x, load with plain transformers 4.57."""
    import subprocess
    import sys

    pruned, _ = _save_pruned_gpt2(tmp_path / "slim")
    inputs = dec_inputs()
    with torch.no_grad():
        torch.save({**inputs, "logits": pruned(**inputs).logits}, tmp_path / "ref.pt")
    script = (
        "import sys, torch, transformers\n"
        "assert transformers.__version__.startswith('4.'), transformers.__version__\n"
        "ref = torch.load(sys.argv[2])\n"
        "m = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=ref['input_ids'], attention_mask=ref['attention_mask']).logits\n"
        "print((out - ref['logits']).abs().max().item())\n"
    )
    done = subprocess.run([str(TF4_PYTHON), "-c", script, str(tmp_path / "slim"), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-6


def test_ragged_path_matches_with_eager_attention():
    dense = tiny_decoder("qwen3", "Qwen3ForCausalLM", attn_implementation="eager")
    plan = hand_plans(dense)[0]
    with torch.no_grad(), gated(dense, plan.mask()):
        expected = dense(**dec_inputs()).logits
    pruned = prune_heads(copy.deepcopy(dense), plan)
    assert pruned.config._attn_implementation == "eager"
    with torch.no_grad():
        assert (pruned(**dec_inputs()).logits - expected).abs().max() <= 1e-5


def test_ragged_attention_equals_reference_and_sdpa():
    """The gather path against a per-head loop in plain PyTorch, irregular group sizes."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 7, 8, generator=gen)  # (B, n_q, T, D)
    k = torch.randn(2, 3, 7, 8, generator=gen)  # (B, n_kv, S, D)
    v = torch.randn(2, 3, 7, 8, generator=gen)
    kv_of_q = torch.tensor([0, 0, 0, 1, 2, 2])
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]  # (1, 1, T, S)
    heads = []
    for h in range(6):  # one query head at a time, reading its own KV head
        s = (q[:, h] @ k[:, kv_of_q[h]].transpose(-1, -2) / 8 ** 0.5).masked_fill(~causal[0], float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[:, kv_of_q[h]])  # (B, T, D)
    ref = torch.stack(heads, dim=2)  # (B, T, n_q, D)
    gk, gv = gather_kv(k, v, kv_of_q)
    out, _ = eager_reference(q, gk, gv, causal, scaling=8 ** -0.5)
    assert (out - ref).abs().max() <= 1e-5

    class Module(torch.nn.Module):
        is_causal = True

        def __init__(self, base):
            super().__init__()
            from headslim.arch.ragged import RaggedConfig

            self.config = RaggedConfig(type("C", (), {"_attn_implementation": base})())
            self.register_buffer("headslim_kv_head_of_q", kv_of_q)

    for base in ("eager", "sdpa"):
        out, _ = ragged_attention_forward(Module(base), q, k, v, causal, scaling=8 ** -0.5)
        assert (out - ref).abs().max() <= 1e-5, base


# ---- selection under GQA constraints ----

MAPS = [[0, 0, 0, 0, 1, 1, 1, 1]] * 3


def test_uniform_keeps_the_same_number_per_kv_head():
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(3))
    plan = select_gqa(scores, MAPS, prune=12, mode="uniform")
    for kept in plan.kept_heads:
        per_kv = [sum(1 for h in kept if h // 4 == j) for j in range(2)]
        assert len({c for c in per_kv if c}) == 1
    assert sum(plan.heads_after) == 24 - 12
    assert plan.provenance["gqa"] == "uniform"


def test_kv_groups_remove_whole_groups_and_prefer_low_scores():
    scores = torch.ones(3, 8)
    scores[1, 4:] = 0.01  # layer 1's second KV group matters least
    plan = select_gqa(scores, MAPS, prune=4, mode="kv-groups")
    assert plan.kept_heads[1] == [0, 1, 2, 3] and plan.heads_after == [8, 4, 8]
    assert plan.kv_heads_after == [[0, 1], [0], [0, 1]]


def test_ragged_is_the_global_ranking():
    scores = torch.arange(24, dtype=torch.float).reshape(3, 8)
    plan = select_gqa(scores, MAPS, prune=5, mode="ragged", min_per_layer=0)
    assert plan.kept_heads[0] == [5, 6, 7]
    from headslim.selection import select_heads

    noisy = torch.rand(3, 8, generator=torch.Generator().manual_seed(7))
    for floor in (0, 1, 3):
        expected = select_heads(noisy, [8] * 3, prune=11, min_per_layer=floor).kept_heads
        assert select_gqa(noisy, MAPS, prune=11, mode="ragged", min_per_layer=floor).kept_heads == expected


def test_uniform_target_that_cannot_be_met_names_the_nearest_counts():
    # kv-groups removes multiples of 4; uniform of 2 per layer here (2 KV heads, equal counts)
    with pytest.raises(HeadslimError,
                       match=r"--gqa kv-groups cannot remove exactly 5 of 24 heads .*nearest feasible counts are 4 and 8"):
        select_gqa(torch.rand(3, 8), MAPS, prune=5, mode="kv-groups")
    with pytest.raises(HeadslimError,
                       match=r"--gqa uniform cannot remove exactly 23 of 24 .* nearest feasible counts are 21$"):
        select_gqa(torch.rand(3, 8), MAPS, prune=23, mode="uniform")
    assert feasible_counts([[0, 0, 1, 1]], mode="uniform") == [0, 2, 3]


def test_fraction_rounds_to_a_feasible_count_and_says_so():
    plan = select_gqa(torch.rand(3, 8), MAPS, prune=0.25, mode="kv-groups")  # 6 heads -> 4 or 8
    assert 24 - sum(plan.heads_after) in (4, 8)
    assert plan.provenance["heads_requested"] == 6


def test_unknown_mode_is_refused():
    with pytest.raises(HeadslimError, match="unknown --gqa mode 'blocks'; available: uniform, kv-groups, ragged"):
        select_gqa(torch.rand(3, 8), MAPS, prune=2, mode="blocks")


# ---- plans ----

def test_plan_keeping_a_query_head_without_its_kv_head_is_refused():
    with pytest.raises(HeadslimError, match="plan: layer 0 keeps query head 5 but not its KV head 1"):
        PrunePlan([8], [[0, 5]], kv_head_of_q=[MAPS[0]], kept_kv_heads=[[0]])
    with pytest.raises(HeadslimError, match="'kept_kv_heads' needs 'kv_head_of_q'"):
        PrunePlan([8], [[0]], kept_kv_heads=[[0]])
    with pytest.raises(HeadslimError, match="non-decreasing"):
        PrunePlan([4], [[0]], kv_head_of_q=[[1, 0, 0, 0]])
    with pytest.raises(HeadslimError, match="keeps query head 5 but not its KV head 1"):
        PrunePlan.from_user({"kept_heads": {"0": [0, 5]}, "kept_kv_heads": {"0": [0]}}, [8, 8], kv_head_of_q=MAPS[:2])


def test_plan_for_another_kv_layout_is_refused():
    """Surgery follows the model's own query->KV map, so a plan written for another layout is refused."""
    model = tiny_decoder("llama", "LlamaForCausalLM", num_kv_heads=2)
    maps = kv_maps(model)
    n = [len(m) for m in maps]
    other = [[0] * len(m) for m in maps]  # the same head counts, one KV head
    with pytest.raises(HeadslimError, match=r"plan is for a model whose layer 0 maps query heads to KV heads as \[0, 0"):
        prune_heads(model, PrunePlan(n, [[0]] * len(n), kv_head_of_q=other))
    assert kv_maps(model) == maps  # nothing was cut
    prune_heads(model, PrunePlan(n, [[0]] * len(n), kv_head_of_q=maps))  # its own layout is fine
    assert [len(m) for m in kv_maps(model)] == [1] * len(n)


def test_plan_json_round_trip_and_old_plans_still_load(tmp_path):
    plan = PrunePlan([8], [[0, 5]], kv_head_of_q=[MAPS[0]])
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["attention"]["kept_kv_heads"] == [[0, 1]]
    loaded = PrunePlan.load(tmp_path / "p.json")
    assert (loaded.kept_heads, loaded.kv_head_of_q, loaded.kv_heads_after) == ([[0, 5]], [MAPS[0]], [[0, 1]])
    old = {"format_version": 1, "num_heads": [4], "kept_heads": [[1]], "provenance": {}}
    assert PrunePlan.from_dict(old).kv_head_of_q is None


# ---- bad models ----

def test_gpt2_cross_attention_is_refused():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, add_cross_attention=True)
    with pytest.raises(HeadslimError, match="cross-attention layers are not supported"):
        get_adapter(config)


def test_unknown_attention_module_is_refused():
    model = tiny_decoder("llama", "LlamaForCausalLM")
    model.model.layers[1].self_attn = torch.nn.Identity()
    with pytest.raises(HeadslimError, match="layer 1 has an attention variant headslim does not handle"):
        get_adapter(model).num_heads(model)


# ---- scoring objectives and perplexity ----

@pytest.mark.parametrize("model_type,class_name", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
@pytest.mark.parametrize("objective", ["task", "dense"])
def test_scorers_work_on_decoders(model_type, class_name, objective):
    model = tiny_decoder(model_type, class_name)
    batches = [dec_inputs(seed=s) for s in range(2)]
    if objective == "task":
        batches = list(causal_lm_batches(batches))
    scores = score_heads(model, batches, objective=objective, progress=False)
    assert scores.shape == (LAYERS, DEC_HEADS) and torch.isfinite(scores).all() and (scores > 0).all()
    plan = select_gqa(scores, kv_maps(model), prune=0.5, mode="uniform")
    assert sum(plan.heads_after) == LAYERS * DEC_HEADS // 2


def test_causal_lm_labels_and_perplexity_of_a_pruned_decoder():
    """``causal_lm_batches`` gives the model's own loss; ``headslim eval``'s perplexity runs on pruned decoders."""
    evaluate = pytest.importorskip("headslim.evaluate")
    model = tiny_decoder("llama", "LlamaForCausalLM")
    full = {"input_ids": dec_inputs()["input_ids"], "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    (labelled,) = causal_lm_batches([full])
    with torch.no_grad():
        loss = model(**labelled).loss
    assert evaluate.perplexity(model, [full])[0] == pytest.approx(float(loss.exp()), rel=1e-5)
    padded = dec_inputs()
    assert next(causal_lm_batches([padded]))["labels"][1, :3].eq(-100).all()
    plan = hand_plans(model)[2]
    with gated(model, plan.mask()):
        expected = evaluate.perplexity(model, [padded])[0]
    pruned = prune_heads(copy.deepcopy(model), plan)
    assert evaluate.perplexity(pruned, [padded])[0] == pytest.approx(expected, rel=1e-5)

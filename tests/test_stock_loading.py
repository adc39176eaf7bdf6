"""Pruned dirs through the stock entry points: AutoModel*, pipeline, SentenceTransformer, Trainer.

After ``import headslim`` (this file imports it), the Auto classes rebuild the shapes recorded in
config.json on transformers 4.57 and 5.x; without it, 4.x's stock loaders still read
``config.pruned_heads`` (checked in a subprocess that never imports headslim).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import headslim
from headslim.arch import kv_maps
from headslim.autoload import CONFIG_KEY
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import HEADS, LAYERS, TF_MAJOR, TINY_MODELS, main_output, tiny_decoder, tiny_inputs, tiny_model
from tests.conftest import assert_same_model

INTER = 37  # TINY.intermediate
NEURONS = [list(range(0, INTER, 2)), [], list(range(5, INTER))]  # every other one, none, all but five


def _auto(class_name: str):
    for suffix, auto in (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForTokenClassification", "AutoModelForTokenClassification"),
                         ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForCausalLM", "AutoModelForCausalLM"),
                         ("LMHeadModel", "AutoModelForCausalLM")):
        if class_name.endswith(suffix):
            return getattr(transformers, auto)
    return transformers.AutoModel


def _encoder_plan(ffn: bool) -> PrunePlan:
    extra = dict(num_neurons=[INTER] * LAYERS, kept_neurons=NEURONS) if ffn else {}
    return PrunePlan([HEADS] * LAYERS, [[1], [0, 2, 3], [3]], **extra)


# every encoder family with its bare model and a task head
ENCODER_CASES = [(t, c) for t, (_, _, classes) in TINY_MODELS.items() for c in classes[:2]]


@pytest.mark.parametrize("model_type,class_name", ENCODER_CASES)
def test_auto_classes_rebuild_pruned_encoders(tmp_path, model_type, class_name):
    plan = PrunePlan([HEADS] * LAYERS, [[1], [], [0, 2, 3]], num_neurons=[INTER] * LAYERS, kept_neurons=NEURONS)
    save_pruned(prune_heads(tiny_model(model_type, class_name), plan), tmp_path / "slim", plan)
    ref = headslim.load_pruned(tmp_path / "slim")
    auto = _auto(class_name).from_pretrained(tmp_path / "slim").eval()
    assert type(auto).__name__ == class_name and isinstance(auto, getattr(transformers, class_name))
    inputs = tiny_inputs()
    with torch.no_grad():
        assert (main_output(auto(**inputs)) - main_output(ref(**inputs))).abs().max() <= 1e-6


def _decoder_dir(tmp_path, model_type, class_name):
    model = tiny_decoder(model_type, class_name)
    n = headslim.get_adapter(model).num_heads(model)
    maps = kv_maps(model) if model_type != "gpt2" else None
    kept = [[0, 1, n[1] - 1], [], [2, 3]]  # ragged over the KV heads, no heads, two
    inter = headslim.get_adapter(model).num_neurons(model)
    plan = PrunePlan(n, kept, kv_head_of_q=maps, num_neurons=inter,
                     kept_neurons=[list(range(0, inter[0], 3)), list(range(inter[1])), []])
    save_pruned(prune_heads(model, plan), tmp_path / "slim", plan)
    return tmp_path / "slim"


@pytest.mark.parametrize("model_type,class_name", [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                                   ("gpt2", "GPT2LMHeadModel")])
def test_auto_causal_lm_rebuilds_pruned_decoders(tmp_path, model_type, class_name):
    path = _decoder_dir(tmp_path, model_type, class_name)
    ref = headslim.load_pruned(path)
    auto = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tiny_inputs()["input_ids"]
    with torch.no_grad():
        assert (auto(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-6
        out = auto.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(out, ref.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))


@pytest.fixture(scope="module")
def slim_minilm(tmp_path_factory, minilm_dir):
    """The bundled MiniLM with heads and FFN neurons removed (a zero-head layer among them), saved by headslim."""
    from transformers import AutoTokenizer

    model = headslim.load_model(minilm_dir)
    kept = [list(range(0, 12, 2)), [], list(range(12)), [1, 5, 7], list(range(11)), [0]]
    plan = PrunePlan([12] * 6, kept, num_neurons=[1536] * 6, kept_neurons=[list(range(0, 1536, 2))] * 6)
    out = tmp_path_factory.mktemp("st") / "slim"
    save_pruned(prune_heads(model, plan), out, plan, tokenizer=AutoTokenizer.from_pretrained(minilm_dir),
                source=minilm_dir)
    return out


TEXTS = ["headslim removes attention heads.", "A second, somewhat longer sentence to embed here."]


def _mean_pooled(model, path):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def test_sentence_transformer_and_pipeline_load_pruned_minilm(slim_minilm):
    from sentence_transformers import SentenceTransformer

    ref = headslim.load_pruned(slim_minilm)
    st = SentenceTransformer(str(slim_minilm), device="cpu")
    emb = torch.as_tensor(st.encode(TEXTS))
    assert (emb - _mean_pooled(ref, slim_minilm)).abs().max() <= 1e-6
    features = transformers.pipeline("feature-extraction", model=str(slim_minilm), device="cpu")
    hidden = torch.tensor(features(TEXTS[0])[0])
    batch = transformers.AutoTokenizer.from_pretrained(slim_minilm)(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        assert (hidden - ref(**batch).last_hidden_state[0]).abs().max() <= 1e-5


def test_dense_models_load_as_stock_after_import(tmp_path):
    model = tiny_model("bert", "BertForSequenceClassification")
    model.save_pretrained(tmp_path / "dense")
    auto = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    stock = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    assert type(auto) is not type(stock)  # headslim's registered class ...
    assert CONFIG_KEY not in json.loads((tmp_path / "dense" / "config.json").read_text())
    inputs = tiny_inputs()
    with torch.no_grad():  # ... computes exactly what the stock class does
        assert_same_model(auto, stock, auto(**inputs).logits, stock(**inputs).logits)
    assert auto.state_dict().keys() == stock.state_dict().keys()


_STOCK_SCRIPT = textwrap.dedent("""
    import sys, torch, transformers
    path, out = sys.argv[1], sys.argv[2]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert not any(m == "headslim" or m.startswith("headslim.") for m in sys.modules)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (2, 9), generator=gen)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
""")


@pytest.mark.parametrize("ffn", [False, True], ids=["heads", "heads+ffn"])
def test_stock_loading_without_headslim(tmp_path, ffn):
    """4.x without headslim: config.pruned_heads rebuilds head-pruned shapes (not pruned FFNs); 5.x cannot."""
    plan = _encoder_plan(ffn)
    save_pruned(prune_heads(tiny_model("bert", "BertForSequenceClassification"), plan), tmp_path / "slim", plan)
    run = subprocess.run([sys.executable, "-c", _STOCK_SCRIPT, str(tmp_path / "slim"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if TF_MAJOR >= 5 or ffn:
        assert run.returncode != 0 and "size" in run.stderr.lower(), run.stderr[-2000:]
        return
    assert run.returncode == 0, run.stderr[-2000:]
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = headslim.load_pruned(tmp_path / "slim")(input_ids=ids).logits
    assert (torch.load(tmp_path / "out.pt") - want).abs().max() <= 1e-6


def test_trainer_fine_tune_round_trip(tmp_path):
    from transformers import Trainer, TrainingArguments

    plan = _encoder_plan(ffn=True)
    save_pruned(prune_heads(tiny_model("bert", "BertForSequenceClassification"), plan), tmp_path / "slim", plan)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "slim")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{**{k: v[i] for k, v in tiny_inputs(seed=s).items()}, "labels": torch.tensor(i)}
            for s in range(4) for i in range(3)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    model.save_pretrained(tmp_path / "tuned")
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert saved[CONFIG_KEY] == json.loads((tmp_path / "slim" / "config.json").read_text())[CONFIG_KEY]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "tuned").eval()
    model.eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        assert_same_model(reloaded, model, reloaded(**inputs).logits, model(**inputs).logits)


def test_import_headslim_stays_light():
    code = "import sys, headslim; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_per_layer_config_is_not_written_while_stock_rejects_it(tmp_path):
    """transformers 5.24's ``per_layer_config`` with per-layer head counts makes ``AutoConfig`` itself fail
    (LlamaConfig's validation reads the global ``num_attention_heads``, which then raises), so headslim does
    not write it: it would break every loader of the dir. This fails once transformers accepts it."""
    path = _decoder_dir(tmp_path, "llama", "LlamaForCausalLM")
    config = json.loads((path / "config.json").read_text())
    assert "per_layer_config" not in config and CONFIG_KEY in config
    plan = PrunePlan.load(path)
    config["per_layer_config"] = {str(i): {"num_attention_heads": len(q), "num_key_value_heads": len(kv)}
                                  for i, (q, kv) in enumerate(zip(plan.kept_heads, plan.kv_heads_after))}
    (path / "config.json").write_text(json.dumps(config))
    if TF_MAJOR >= 5:
        with pytest.raises(Exception, match="per-layer attribute"):
            transformers.AutoConfig.from_pretrained(path)
        return
    ids = tiny_inputs()["input_ids"]  # 4.x: an inert extra key; both loaders still rebuild the dir
    with torch.no_grad():
        want = headslim.load_pruned(path)(input_ids=ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-6

"""``headslim eval``: quality metrics on known inputs, every task, bad input."""

import copy
import json
import math
import random

import pytest
import torch
import transformers

from headslim.cli import main
from headslim.errors import HeadslimError
from headslim.evaluate import EvalConfig, evaluate, knn_predict, macro_f1
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import HEADS, LAYERS, VOCAB
from tests.test_bench import PLAN, WORDS, save_pair, tiny_tokenizer


def write_labelled(path, n: int = 40, labels=("sport", "tech", "politics"), seed: int = 0, column: str = "label"):
    """A CSV whose texts use a different word range per label (so a k-NN can find the topic)."""
    rng = random.Random(seed)
    span = len(WORDS) // len(labels)
    lines = [f"text,{column}"]
    for i in range(n):
        c = i % len(labels)
        words = [WORDS[c * span + rng.randrange(span)] for _ in range(rng.randint(3, 9))]
        lines.append(f"{' '.join(words)},{labels[c]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_knn_and_macro_f1_on_known_inputs():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])  # (5, 2)
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.5]])  # (3, 2)
    assert knn_predict(train, labels, test, k=1).tolist() == [0, 1, 0]
    assert knn_predict(train, labels, test, k=5).tolist() == [1, 1, 1]  # majority of all five
    # 2 vs 2 votes: the side with the larger summed similarity wins
    assert knn_predict(train[:4], labels[:4], torch.tensor([[1.0, 0.2]]), k=4).tolist() == [0]
    pred, truth = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 2 fp 1 fn 0 -> 0.8
    assert macro_f1(pred, truth) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert macro_f1(truth, truth) == 1.0


def test_identical_embedding_models_agree(tmp_path):
    dense_dir, _ = save_pair(tmp_path)
    data = write_labelled(tmp_path / "topics.csv")
    result = evaluate(dense_dir, dense_dir, EvalConfig(data=str(data), k=3))
    m = result["metrics"]
    assert result["task"] == "embedding"
    assert m["cosine"]["mean"] == pytest.approx(1.0, abs=1e-5) and m["cosine"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert m["cosine"]["n"] == 8  # every 5th of 40 rows is evaluated, the rest fit the k-NN
    knn = m["knn_accuracy"]
    assert knn["n_train"] == 32 and knn["dense"] == knn["pruned"] and knn["delta"] == 0


def test_pruned_embedding_model(tmp_path):
    dense_dir, pruned_dir = save_pair(tmp_path)
    data = write_labelled(tmp_path / "topics.csv")
    out = tmp_path / "eval-out"
    result = evaluate(pruned_dir, dense_dir, EvalConfig(data=str(data), train_data=str(data), k=3), out=out)
    m = result["metrics"]
    assert m["cosine"]["min"] <= m["cosine"]["mean"] < 0.9999  # heads were removed: outputs moved
    assert m["knn_accuracy"]["n_train"] == m["knn_accuracy"]["n_test"] == 40
    assert json.loads((out / "eval.json").read_text())["metrics"] == json.loads(json.dumps(m))
    assert "knn_accuracy.pruned" in (out / "eval.md").read_text()


def _classifier_pair(tmp_path):
    dense_dir, pruned_dir = save_pair(tmp_path, "BertForSequenceClassification")
    return dense_dir, pruned_dir


def test_classification_metrics(tmp_path):
    from headslim.data import batches, load_texts
    from headslim.evaluate import predictions
    from headslim.io import load_model

    dense_dir, pruned_dir = _classifier_pair(tmp_path)
    data = write_labelled(tmp_path / "cls.csv", labels=("LABEL_0", "LABEL_1", "LABEL_2"))
    same = evaluate(dense_dir, dense_dir, EvalConfig(data=str(data)))["metrics"]
    assert same["agreement"] == 1.0 and same["accuracy"]["dense"] == same["accuracy"]["pruned"]
    result = evaluate(pruned_dir, dense_dir, EvalConfig(data=str(data), batch_size=7))
    assert result["task"] == "classification"
    m = result["metrics"]
    # the same numbers from predictions computed here
    texts = load_texts(data, require_labels=True)
    tok = tiny_tokenizer(tmp_path)
    truth = torch.tensor(texts.labels)  # label names sort as LABEL_0..2 = the model's ids
    p_dense = predictions(load_model(dense_dir), batches(texts, tok))
    p_pruned = predictions(load_model(pruned_dir), batches(texts, tok))
    assert m["n"] == 40
    assert m["accuracy"]["dense"] == pytest.approx(float((p_dense == truth).float().mean()))
    assert m["accuracy"]["pruned"] == pytest.approx(float((p_pruned == truth).float().mean()))
    assert m["agreement"] == pytest.approx(float((p_dense == p_pruned).float().mean()))
    assert m["macro_f1"]["pruned"] == pytest.approx(macro_f1(p_pruned, truth))


def test_labels_missing_from_a_labelled_file(tmp_path, capsys):
    dense_dir, pruned_dir = _classifier_pair(tmp_path)
    plain = tmp_path / "plain.csv"
    plain.write_text("text\nw1 w2\nw3 w4\n")
    with pytest.raises(HeadslimError, match="has no label column"):
        evaluate(pruned_dir, dense_dir, EvalConfig(data=str(plain)))
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"text": "w1 w2", "label": "LABEL_0"}\n{"text": "w3", "label": ""}\n')
    capsys.readouterr()  # drop progress bars of the fixtures' saves (transformers 5.x)
    assert main(["eval", str(pruned_dir), "--baseline", str(dense_dir), "--data", str(holes)]) == 2
    err = capsys.readouterr().err
    assert "no value in label column" in err and err.count("\n") == 1


def test_labels_the_model_does_not_know(tmp_path):
    dense_dir, pruned_dir = _classifier_pair(tmp_path)
    data = write_labelled(tmp_path / "cls.csv", labels=("cats", "dogs", "fish"))
    with pytest.raises(HeadslimError, match="label 'cats' in .* is not one of the model's labels"):
        evaluate(pruned_dir, dense_dir, EvalConfig(data=str(data)))


def test_numeric_labels_map_to_class_ids(tmp_path):
    dense_dir, _ = _classifier_pair(tmp_path)
    data = write_labelled(tmp_path / "cls.csv", labels=("0", "1", "2"))
    assert evaluate(dense_dir, dense_dir, EvalConfig(data=str(data)))["metrics"]["agreement"] == 1.0


def test_causal_lm_perplexity(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=37, max_position_embeddings=64,
                                     is_decoder=True)
    config.architectures = ["BertLMHeadModel"]
    torch.manual_seed(0)
    model = transformers.BertLMHeadModel(config).eval()
    dense_dir, pruned_dir = tmp_path / "lm", tmp_path / "lm-slim"
    model.save_pretrained(str(dense_dir))
    tok.save_pretrained(str(dense_dir))
    save_pruned(prune_heads(copy.deepcopy(model), PLAN), pruned_dir, PrunePlan(PLAN.num_heads, PLAN.kept_heads),
                tokenizer=tok, source=dense_dir)
    text = tmp_path / "held_out.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(7)) for _ in range(6)) + "\n")
    result = evaluate(pruned_dir, dense_dir, EvalConfig(data=str(text)))
    assert result["task"] == "causal-lm"
    ppl = result["metrics"]["perplexity"]
    # reference: the model's own shifted LM loss on equal-length, unpadded rows
    ids = tok([ln for ln in text.read_text().splitlines()], return_tensors="pt")["input_ids"]  # (6, 9)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert result["metrics"]["tokens"] == ids.shape[0] * (ids.shape[1] - 1)
    assert ppl["dense"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert ppl["ratio"] == pytest.approx(ppl["pruned"] / ppl["dense"]) and ppl["pruned"] != ppl["dense"]


def test_task_that_does_not_fit_the_model(tmp_path):
    dense_dir, pruned_dir = save_pair(tmp_path)
    data = write_labelled(tmp_path / "cls.csv")
    with pytest.raises(HeadslimError, match="needs a sequence classifier"):
        evaluate(pruned_dir, dense_dir, EvalConfig(data=str(data), task="classification"))
    with pytest.raises(HeadslimError, match="unknown task"):
        EvalConfig(task="translation")


def test_eval_cli(tmp_path, capsys):
    dense_dir, pruned_dir = save_pair(tmp_path)
    data = write_labelled(tmp_path / "topics.csv")
    assert main(["eval", str(pruned_dir), "--data", str(data), "--k", "3"]) == 0  # baseline from the plan
    out = capsys.readouterr().out
    assert "cosine.mean" in out and "knn_accuracy.pruned" in out


def test_bbc_news_knn_on_minilm(minilm_dir, tmp_path):
    """The default path: BBC News topics, k-NN fitted on the train split (small subsets here).

    The pruned dir has no tokenizer files: the baseline's tokenizer must be used.
    """
    from headslim.io import load_model
    from headslim.surgery import prune_heads as prune

    model = load_model(minilm_dir)
    plan = PrunePlan([12] * 6, [list(range(6))] * 6)
    slim = tmp_path / "slim"
    save_pruned(prune(model, plan), slim, plan, source=minilm_dir)
    result = evaluate(slim, minilm_dir, EvalConfig(eval_samples=24, train_samples=60, max_length=64))
    m = result["metrics"]
    assert "bbc-news:test" in result["data"] and "bbc-news:train" in result["data"]
    assert m["knn_accuracy"]["n_test"] == 24 and m["knn_accuracy"]["n_train"] == 60
    assert m["knn_accuracy"]["dense"] > 0.5  # real topics: far above the 0.2 of chance
    assert 0.3 < m["cosine"]["mean"] < 0.9999


def test_decoder_perplexity_with_padding(tmp_path):
    """A Llama causal LM with grouped-query heads pruned unevenly, texts of different lengths in padded
    batches: the same perplexity as the model's own loss on each text alone (no padding)."""
    from headslim.io import load_model
    from tests.conftest import tiny_decoder

    tok = tiny_tokenizer(tmp_path)
    model = tiny_decoder("llama", "LlamaForCausalLM")
    dense_dir, pruned_dir = tmp_path / "llama", tmp_path / "llama-slim"
    model.save_pretrained(str(dense_dir))
    tok.save_pretrained(str(dense_dir))
    heads = [model.config.num_attention_heads] * model.config.num_hidden_layers
    plan = PrunePlan(heads, [[0], [], [1, heads[2] - 1]])
    save_pruned(prune_heads(copy.deepcopy(model), plan), pruned_dir, plan, tokenizer=tok, source=dense_dir)
    text = tmp_path / "held_out.txt"
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(7)]
    text.write_text("\n".join(lines) + "\n")
    result = evaluate(pruned_dir, dense_dir, EvalConfig(data=str(text), batch_size=3))
    assert result["task"] == "causal-lm"
    for role, d in (("dense", dense_dir), ("pruned", pruned_dir)):
        lm = load_model(d)
        nll, count = 0.0, 0
        with torch.no_grad():
            for line in lines:
                ids = tok(line, return_tensors="pt")["input_ids"]  # (1, T)
                nll += float(lm(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
        assert result["metrics"]["perplexity"][role] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result["metrics"]["tokens"] == count

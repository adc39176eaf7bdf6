"""Calibration data readers."""

import json

import pytest

from headslim.data import bbc_news, load_texts, sample
from headslim.errors import HeadslimError


def test_text_file_one_sample_per_line(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\n  second line  \n")
    data = load_texts(tmp_path / "t.txt")
    assert data.texts == ["first line", "second line"] and data.labels is None


def test_csv_with_text_and_label_columns(tmp_path):
    (tmp_path / "d.csv").write_text("id,sentence,category\n1,hello there,b\n2,general kenobi,a\n")
    data = load_texts(tmp_path / "d.csv")
    assert data.texts == ["hello there", "general kenobi"]
    assert data.label_names == ["a", "b"] and data.labels == [1, 0]


def test_jsonl_with_named_columns(tmp_path):
    rows = [{"body": "x y", "y": 1}, {"body": "z", "y": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_texts(tmp_path / "d.jsonl", text_column="body", label_column="y")
    assert data.texts == ["x y", "z"] and data.labels == [1, 0]


@pytest.mark.parametrize("content,name,match", [
    ("", "e.txt", "is empty"),
    ("\n\n", "e.txt", "is empty"),
    ("id,other\n1,2\n", "d.csv", "no text column"),
    ("text,label\nhello,\n", "d.csv", "no value in label column"),
    ('{"text": "a"}\nnot json\n', "d.jsonl", "d.jsonl:2 is not valid JSON"),
])
def test_bad_files(tmp_path, content, name, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(HeadslimError, match=match):
        load_texts(tmp_path / name)


def test_missing_file_and_missing_labels(tmp_path):
    with pytest.raises(HeadslimError, match="not found"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "t.txt").write_text("a\n")
    with pytest.raises(HeadslimError, match="has no label column"):
        load_texts(tmp_path / "t.txt", require_labels=True)


def test_bbc_news_split_is_fixed_and_disjoint():
    train, test = bbc_news("train"), bbc_news("test")
    assert train.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(train) + len(test) == len(bbc_news("all")) >= 2100  # 2,225 files, some of them duplicates
    assert 0.19 < len(test) / (len(train) + len(test)) < 0.21
    assert not set(train.texts) & set(test.texts)
    assert load_texts("bbc-news").source == "bbc-news:train"


def test_sample_is_reproducible():
    data = bbc_news("test")
    assert sample(data, 10, seed=1).texts == sample(data, 10, seed=1).texts
    assert sample(data, 10, seed=1).texts != sample(data, 10, seed=2).texts
    assert len(sample(data, 10_000)) == len(data)


def test_batches_pass_only_what_the_model_accepts(tmp_path):
    """A DistilBERT model given a BERT tokenizer: ``token_type_ids`` is dropped (4.x would raise on it),
    labels are kept; a BERT model keeps them."""
    import torch
    import transformers
    from conftest import VOCAB, tiny_model

    from headslim.data import TextData, batches, forward_inputs

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]))
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    data = TextData(["w1 w2 w3", "w4", "w5 w6"], [0, 2, 1], ["a", "b", "c"], "test")
    assert "token_type_ids" in next(iter(batches(data, tok)))  # no model: every tokenizer output

    distil = tiny_model("distilbert", "DistilBertForSequenceClassification")
    assert {"input_ids", "attention_mask", "labels"} <= forward_inputs(distil)
    assert "token_type_ids" not in forward_inputs(distil)
    got = list(batches(data, tok, batch_size=2, model=distil))
    assert [sorted(b) for b in got] == [["attention_mask", "input_ids", "labels"]] * 2
    with torch.no_grad():
        assert distil(**got[0]).loss is not None

    bert = tiny_model("bert", "BertModel")
    assert "token_type_ids" in next(iter(batches(data, tok, model=bert)))

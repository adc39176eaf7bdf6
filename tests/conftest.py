"""Tiny random-initialised models of every architecture the adapters support."""

from __future__ import annotations

import pytest
import torch
import transformers

TF_MAJOR = int(transformers.__version__.split(".")[0])

HIDDEN, HEADS, LAYERS, VOCAB = 32, 4, 3, 99
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, num_labels=3)

# model_type -> (config class, extra config kwargs, model classes covering the task heads)
TINY_MODELS = {
    "bert": (transformers.BertConfig, {}, ["BertModel", "BertForSequenceClassification", "BertForMaskedLM",
                                           "BertForTokenClassification"]),
    "roberta": (transformers.RobertaConfig, {"pad_token_id": 1},
                ["RobertaModel", "RobertaForSequenceClassification", "RobertaForMaskedLM"]),
    "xlm-roberta": (transformers.XLMRobertaConfig, {"pad_token_id": 1},
                    ["XLMRobertaModel", "XLMRobertaForSequenceClassification"]),
    "electra": (transformers.ElectraConfig, {"embedding_size": 16},
                ["ElectraModel", "ElectraForSequenceClassification", "ElectraForPreTraining"]),
}

MODEL_CASES = [(t, cls) for t, (_, _, classes) in TINY_MODELS.items() for cls in classes]


def tiny_model(model_type: str, class_name: str, seed: int = 0):
    config_cls, extra, _ = TINY_MODELS[model_type]
    config = config_cls(**_COMMON, **extra)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).eval()


def tiny_inputs(batch: int = 3, seq: int = 11, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 4 :] = 0  # a padded row
    mask[2, 2:] = 0  # a mostly padded row
    return {"input_ids": ids, "attention_mask": mask}


def tiny_batches(n: int = 3, labels: bool = False) -> list[dict]:
    """``n`` batches of :func:`tiny_inputs` (seeds 0..n-1), with 3-class labels when asked."""
    out = []
    for i in range(n):
        batch = tiny_inputs(seed=i)
        if labels:
            batch["labels"] = torch.tensor([0, 1, 2])
        out.append(batch)
    return out


def main_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError("no logits or last_hidden_state")


@pytest.fixture(scope="session")
def minilm_dir():
    from headslim.io import bundled_model_dir

    return bundled_model_dir()


# Decoder LLMs (headslim.decoders): model_type -> (config class, config kwargs, model classes).
# GQA: 8 query heads of head_dim 8 over 2 KV heads; DECODER_CASES adds num_kv_heads = 1 and = 8,
# Qwen3's explicit head_dim (q width 64 != hidden 32) and Mistral's sliding window.
DEC_HEADS, DEC_KV = 8, 2
_DEC_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=DEC_HEADS,
                   num_key_value_heads=DEC_KV, intermediate_size=37, max_position_embeddings=64,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_DECODERS = {
    "llama": (transformers.LlamaConfig, {**_DEC_COMMON, "head_dim": 8, "attention_bias": True},
              ["LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification"]),
    "mistral": (transformers.MistralConfig, {**_DEC_COMMON, "head_dim": 8, "sliding_window": 5},
                ["MistralForCausalLM"]),
    "qwen2": (transformers.Qwen2Config, {**_DEC_COMMON}, ["Qwen2ForCausalLM"]),
    "qwen3": (transformers.Qwen3Config, {**_DEC_COMMON, "head_dim": 8}, ["Qwen3ForCausalLM"]),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=DEC_HEADS,
                                           n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2),
             ["GPT2LMHeadModel", "GPT2Model"]),
}
# (model_type, class name, num_key_value_heads or None for the family default)
DECODER_CASES = [(t, cls, None) for t, (_, _, classes) in TINY_DECODERS.items() for cls in classes] + [
    ("llama", "LlamaForCausalLM", 1),
    ("llama", "LlamaForCausalLM", DEC_HEADS),
    ("qwen3", "Qwen3ForCausalLM", 1),
]


def tiny_decoder(model_type: str, class_name: str, num_kv_heads: int | None = None, seed: int = 0, **overrides):
    config_cls, extra, _ = TINY_DECODERS[model_type]
    kwargs = {**extra, **overrides}
    if num_kv_heads is not None:
        kwargs["num_key_value_heads"] = num_kv_heads
    config = config_cls(**kwargs)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).eval()

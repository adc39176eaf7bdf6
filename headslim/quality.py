"""Quality of a pruned model against its dense original: sentence-embedding cosine."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pooling_mode(model_dir: str | Path | None) -> str:
    """``mean`` or ``cls``: read from a sentence-transformers ``*_Pooling/config.json`` if present."""
    if model_dir is not None:
        for cfg in sorted(Path(model_dir).glob("*_Pooling/config.json")):
            try:
                if json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
                    return "cls"
            except json.JSONDecodeError:
                pass
    return "mean"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Sentence embeddings ``(B, d)`` from hidden states ``(B, T, d)``: mean over real tokens, or the first."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def embeddings(model, batches, *, pooling: str = "mean") -> torch.Tensor:
    """Sentence embeddings ``(N, d)``: mean over real tokens (or the first token) of the last layer."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]  # (B, T, d)
        out.append(pool(hidden, inputs["attention_mask"], pooling).float().cpu())
    return torch.cat(out)


def embedding_cosine(dense_emb: torch.Tensor, pruned_emb: torch.Tensor) -> dict:
    """Mean and minimum cosine similarity between matching rows."""
    cos = torch.nn.functional.cosine_similarity(dense_emb, pruned_emb, dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n": int(cos.numel())}


def count_parameters(model) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total

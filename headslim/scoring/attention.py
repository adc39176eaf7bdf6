"""``entropy`` and ``confidence``: attention-distribution statistics (Voita et al. 2019), label-free.

``confidence`` of a head is the mean, over real query tokens, of its largest attention weight; Voita
et al. found confident heads to be the specialised, important ones. ``entropy`` scores a head by
minus the mean entropy of its attention distributions (peaked = important). The objective is ignored.

transformers' SDPA / flash paths return no attention weights, so the weights are recomputed here
from the queries and keys captured by forward hooks on the Q and K projections:
``softmax(Q K^T / sqrt(D) + padding mask)`` (``Adapter.query_key``: bidirectional encoders), the same
softmax the eager path computes (a test checks that parity).
"""

from __future__ import annotations

import math

import torch

from headslim.arch import get_adapter
from headslim.errors import HeadslimError
from headslim.scoring.common import finish, run_hooked


def attention_probs(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor, n: int,
                    head_dim: int) -> torch.Tensor:
    """Attention weights ``(B, n, T, T)`` from Q/K projection outputs ``(B, T, n * D)`` and mask ``(B, T)``."""
    q = q.unflatten(-1, (n, head_dim)).transpose(1, 2).float()  # (B, n, T, D)
    k = k.unflatten(-1, (n, head_dim)).transpose(1, 2).float()  # (B, n, T, D)
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (B, n, T, T)
    pad = attention_mask[:, None, None, :] == 0  # (B, 1, 1, T)
    return torch.softmax(logits.masked_fill(pad, float("-inf")), dim=-1)


def _qk(adapter, block):
    # Bidirectional attention with absolute positions only: decoders need causal masks and rotary positions.
    qk = adapter.query_key(block)
    if qk is None:
        raise HeadslimError(f"entropy / confidence support bidirectional encoders only, not {adapter.name!r}")
    return qk


@torch.no_grad()
def _statistic(model, batches, statistic: str, progress: bool) -> torch.Tensor:
    adapter = get_adapter(model)
    heads = adapter.num_heads(model)
    head_dim = adapter.head_dim(model)
    sums = torch.zeros(len(heads), max(heads), dtype=torch.float64)
    captured, state, handles = {}, {}, []

    def grab(name, layer):
        def hook(module, args, output):
            captured[(name, layer)] = output
        return hook

    for layer, (block, n) in enumerate(zip(adapter.attention_blocks(model), heads)):
        if n == 0:
            continue
        q_proj, k_proj = _qk(adapter, block)
        handles.append(q_proj.register_forward_hook(grab("q", layer)))
        handles.append(k_proj.register_forward_hook(grab("k", layer)))

        def on_output(module, args, layer=layer, n=n):
            mask = state["mask"].to(args[0].device)  # (B, T), on this layer's device (--device-map)
            p = attention_probs(captured.pop(("q", layer)), captured.pop(("k", layer)), mask, n, head_dim)
            if statistic == "confidence":
                per_query = p.amax(-1)  # (B, n, T)
            else:
                per_query = (p * p.clamp_min(1e-12).log()).sum(-1)  # (B, n, T): minus the entropy
            real = mask[:, None, :].to(per_query.dtype)  # (B, 1, T)
            sums[layer, :n] += (per_query * real).sum((0, 2)).double().cpu()

        handles.append(adapter.o_proj(block).register_forward_pre_hook(on_output))
    tokens = run_hooked(model, batches, handles, state, f"scoring heads ({statistic})", progress)
    return finish(sums / tokens, heads)


def score_confidence(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                     **options) -> torch.Tensor:
    """Mean max attention weight per head ``(layers, max_heads)`` (Voita et al.'s confidence).

    Example:
        >>> scores = score_confidence(model, calib_batches)    # doctest: +SKIP
    """
    return _statistic(model, batches, "confidence", progress)


def score_entropy(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                  **options) -> torch.Tensor:
    """Minus the mean attention entropy per head ``(layers, max_heads)``: peaked heads score high.

    Example:
        >>> scores = score_entropy(model, calib_batches)    # doctest: +SKIP
    """
    return _statistic(model, batches, "entropy", progress)

"""Analytic cost of an encoder: parameters and FLOPs per input shape, from head counts and the config.

What pruning heads changes is the attention of each layer: the Q/O projections shrink with the
query-head count, K/V with the KV heads still read (grouped-query attention), and the two ``T x T``
attention matmuls with the query heads. The feed-forward block (two matrices, three when gated as
in Llama) does not change.
Counts cover the encoder layers (attention + feed-forward); embeddings, pooler and task heads are
left out: they are the same in the dense and the pruned model and small for these shapes. A FLOP
is one multiply or one add (a multiply-accumulate is 2 FLOPs); softmax, LayerNorm and biases are
ignored (they are O(T) or O(T*d) per layer, not O(T*d^2) or O(T^2*d)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from headslim.arch import get_adapter


@dataclass(frozen=True)
class LayerShape:
    """What the cost of a BERT-style encoder depends on.

    Args:
        hidden: model width ``d``.
        head_dim: width of one head ``d_h``.
        intermediate: feed-forward width.
        heads: query heads per layer (after pruning, possibly 0).
        kv_heads: key/value heads per layer (grouped-query attention); ``None`` = ``heads``.
        mlp_matrices: 2 for ``W_out(act(W_in x))``, 3 for gated feed-forward blocks (``Adapter.gated_mlp``).
    """

    hidden: int
    head_dim: int
    intermediate: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...] | None = None
    mlp_matrices: int = 2

    @property
    def kv(self) -> tuple[int, ...]:
        return self.heads if self.kv_heads is None else self.kv_heads

    @classmethod
    def from_model(cls, model) -> "LayerShape":
        """Read the shape of a (dense or pruned) model through its adapter."""
        adapter = get_adapter(model)
        cfg = model.config
        heads = tuple(adapter.num_heads(model))
        kv = tuple(len(set(m)) for m in adapter.kv_maps(model))  # the KV heads the kept query heads still read
        return cls(hidden=int(cfg.hidden_size), head_dim=int(adapter.head_dim(model)),
                   intermediate=adapter.intermediate_size(cfg), heads=heads, kv_heads=None if kv == heads else kv,
                   mlp_matrices=3 if adapter.gated_mlp else 2)


def encoder_params(shape: LayerShape) -> dict:
    """Parameters of BERT-style layers (weights and biases of attention, feed-forward, two LayerNorms).

    Exact for the BERT family; for decoders (no biases, RMSNorm) the weights are exact and biases
    and norms approximate: use the counted parameters there.

    Example:
        >>> encoder_params(LayerShape(384, 32, 1536, (12,) * 6))["total"]
        10646784
    """
    d, dh, ff = shape.hidden, shape.head_dim, shape.intermediate
    attention = 0
    for h, kv in zip(shape.heads, shape.kv):
        q, k = h * dh, kv * dh
        attention += (d * q + q) + 2 * (d * k + k) + q * d + d  # Q, K, V rows + biases; O columns + bias
    per_layer_rest = shape.mlp_matrices * d * ff + (shape.mlp_matrices - 1) * ff + d + 2 * 2 * d  # FFN, 2 norms
    rest = per_layer_rest * len(shape.heads)
    return {"attention": attention, "other": rest, "total": attention + rest}


def encoder_flops(shape: LayerShape, batch: int, seq: int) -> dict:
    """FLOPs of one forward pass of the encoder layers on ``batch`` sequences of ``seq`` tokens.

    Example:
        >>> f = encoder_flops(LayerShape(384, 32, 1536, (12,) * 6), batch=1, seq=128)
        >>> f["total"] == f["attention"] + f["feed_forward"]
        True
    """
    d, dh, ff = shape.hidden, shape.head_dim, shape.intermediate
    tokens = batch * seq
    attention = 0
    for h, kv in zip(shape.heads, shape.kv):
        proj = 2 * tokens * d * dh * (2 * h + 2 * kv)  # Q, O: (N, d) x (d, h*dh); K, V: (N, d) x (d, kv*dh)
        mix = 2 * 2 * batch * h * seq * seq * dh  # Q K^T and P V: (B, h, T, dh) x (B, h, dh, T) each
        attention += proj + mix
    feed_forward = 2 * shape.mlp_matrices * tokens * d * ff * len(shape.heads)  # (N, d) x (d, ff) etc.
    return {"attention": attention, "feed_forward": feed_forward, "total": attention + feed_forward}


def compare(dense: LayerShape, pruned: LayerShape, batch: int, seq: int) -> dict:
    """Dense and pruned FLOPs for one shape and the ideal speed-up (dense / pruned FLOPs).

    Example:
        >>> dense = LayerShape(384, 32, 1536, (12,) * 6)
        >>> pruned = LayerShape(384, 32, 1536, (6,) * 6)
        >>> compare(dense, pruned, 1, 128)["ideal_speedup"] > 1
        True
    """
    fd, fp = encoder_flops(dense, batch, seq), encoder_flops(pruned, batch, seq)
    return {
        "dense_flops": fd["total"], "pruned_flops": fp["total"],
        "dense_attention_flops": fd["attention"], "pruned_attention_flops": fp["attention"],
        "ideal_speedup": fd["total"] / fp["total"] if fp["total"] else float("inf"),
    }


def describe(shape: LayerShape) -> dict:
    """JSON-ready description of a shape, with its analytic encoder parameters."""
    return {**asdict(shape), "heads": list(shape.heads), "kv_heads": list(shape.kv),
            "encoder_params": encoder_params(shape)}

"""Decoder LLM adapters: Llama, Mistral, Qwen2, Qwen3 (grouped-query attention, RoPE) and GPT-2.

The "block" an adapter hands out is the decoder layer (it owns the attention module, which surgery
may replace). Llama-family attention modules are stock transformers modules after pruning:

* q/o keep the kept query heads, k/v the KV heads those read; Qwen3's ``q_norm``/``k_norm`` act on
  ``head_dim`` and survive unchanged; RoPE is per head and needs nothing.
* uniform groups (``k`` query heads per kept KV head) set ``num_key_value_groups = k``: every
  standard kernel applies;
* anything else is ragged: the module gets a ``headslim_kv_head_of_q`` buffer and routes to
  ``headslim.ragged.ragged_attention_forward`` through transformers' attention registry;
* no heads: ``headslim.ragged.NoHeadsDecoderAttention`` (adds ``o_proj``'s bias, or nothing).

GPT-2 is multi-head: its fused ``c_attn`` Conv1D keeps the Q, K and V column blocks of the kept heads
and ``c_proj`` the matching rows. ``config.pruned_heads`` is also written (under any version) so
stock ``from_pretrained`` on 4.x rebuilds a GPT-2 whose layers all keep a head.

The config stays that of the dense model; ``headslim.load_pruned`` re-applies the saved plan.
(transformers 5.x has ``per_layer_config`` on configs, but the modeling code of these families never
reads it, so stock ``from_pretrained`` cannot build per-layer head counts for them.)

This module imports no torch at import time (``headslim.adapters`` registers it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headslim.errors import HeadslimError

if TYPE_CHECKING:
    from torch import nn


def _kv_map_of(attn) -> list[int]:
    """Current query-head → KV-head map of a Llama-family attention module."""
    from headslim.ragged import NoHeadsDecoderAttention

    if isinstance(attn, NoHeadsDecoderAttention):
        return []
    if "headslim_kv_head_of_q" in attn._buffers:
        return [int(k) for k in attn.headslim_kv_head_of_q.tolist()]
    n_q = attn.q_proj.out_features // attn.head_dim
    return [h // attn.num_key_value_groups for h in range(n_q)]


class LlamaFamilyAdapter:
    """Llama, Mistral, Qwen2, Qwen3: ``base_model.layers[i].self_attn.{q,k,v,o}_proj``, GQA."""

    name = "llama-family"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def check(self, config) -> None:
        """One-line error for variants the adapter does not handle."""
        if getattr(config, "is_heterogeneous", False):
            raise HeadslimError(f"{config.model_type}: heterogeneous per-layer configs are not supported")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        layers = getattr(model.base_model, "layers", None)
        if layers is None:
            raise HeadslimError(f"{type(model).__name__}: no decoder layers at base_model.layers")
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not (all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                                    or getattr(attn, "num_heads", None) == 0):
                raise HeadslimError(
                    f"{type(model).__name__}: layer {i} has an attention variant headslim does not handle "
                    "(expected self_attn.q_proj/k_proj/v_proj/o_proj)"
                )
        return list(layers)

    attention_blocks = layers

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_blocks(model)[0].self_attn.head_dim

    def num_heads(self, model: nn.Module) -> list[int]:
        return [len(_kv_map_of(layer.self_attn)) for layer in self.attention_blocks(model)]

    def kv_maps(self, model: nn.Module) -> list[list[int]]:
        """Per layer, the KV head each current query head reads (non-decreasing)."""
        return [_kv_map_of(layer.self_attn) for layer in self.attention_blocks(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.self_attn.o_proj

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        """Keep only query heads ``keep`` (current indices) of one decoder layer, in place."""
        from headslim.modules import head_rows, slice_linear
        from headslim.ragged import NoHeadsDecoderAttention, make_ragged, uniform_groups

        attn = block.self_attn
        head_dim = attn.head_dim
        kv_map = _kv_map_of(attn)
        if not keep:
            o = attn.o_proj
            block.self_attn = NoHeadsDecoderAttention(attn.layer_idx, o.out_features, head_dim, o.bias)
            return
        kept_kv = sorted({kv_map[h] for h in keep})
        new_map = [kept_kv.index(kv_map[h]) for h in keep]  # non-decreasing: keep is sorted
        attn.q_proj = slice_linear(attn.q_proj, head_rows(keep, head_dim), dim=0)
        attn.k_proj = slice_linear(attn.k_proj, head_rows(kept_kv, head_dim), dim=0)
        attn.v_proj = slice_linear(attn.v_proj, head_rows(kept_kv, head_dim), dim=0)
        attn.o_proj = slice_linear(attn.o_proj, head_rows(keep, head_dim), dim=1)
        groups = uniform_groups(new_map)
        if groups is not None:
            make_ragged(attn, None)
            attn.num_key_value_groups = groups
        else:
            make_ragged(attn, new_map)

    # FFN neurons of the gated MLP: ``gate_proj`` and ``up_proj`` rows, ``down_proj`` columns.
    def mlp_blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.layers(model)

    def num_neurons(self, model: nn.Module) -> list[int]:
        return [getattr(getattr(layer.mlp, "down_proj", None), "in_features", 0) for layer in self.mlp_blocks(model)]

    def down_proj(self, block: nn.Module) -> nn.Module:
        return block.mlp.down_proj

    def mlp_residual(self, block: nn.Module) -> tuple[nn.Module, int]:
        """Pre-norm: the residual the MLP output is added to is what ``post_attention_layernorm`` reads."""
        return block.post_attention_layernorm, 0

    def prune_mlp(self, block: nn.Module, keep: list[int]) -> None:
        """Keep only FFN neurons ``keep`` (current indices, sorted) of one decoder layer, in place."""
        import torch

        from headslim.modules import NoNeuronsMLP, slice_linear

        mlp = block.mlp
        if not keep:
            block.mlp = NoNeuronsMLP(mlp.down_proj.out_features, mlp.down_proj.bias)
            return
        index = torch.tensor(keep, dtype=torch.long)
        mlp.gate_proj = slice_linear(mlp.gate_proj, index, dim=0)
        mlp.up_proj = slice_linear(mlp.up_proj, index, dim=0)
        mlp.down_proj = slice_linear(mlp.down_proj, index, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)

    def update_config(self, model: nn.Module, pruned: dict[int, list[int]]) -> None:
        """Nothing: the config stays dense and ``load_pruned`` re-applies the plan."""


class GPT2Adapter:
    """GPT-2: ``transformer.h[i].attn`` with fused ``c_attn`` (Q|K|V column blocks) and ``c_proj``."""

    name = "gpt2"
    model_types = ("gpt2",)

    def check(self, config) -> None:
        if getattr(config, "add_cross_attention", False):
            raise HeadslimError("gpt2 with add_cross_attention=True: cross-attention layers are not supported")

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(model.base_model, "h", None)
        if blocks is None:
            raise HeadslimError(f"{type(model).__name__}: no GPT-2 blocks at base_model.h")
        return list(blocks)

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_blocks(model)[0].attn.head_dim

    def num_heads(self, model: nn.Module) -> list[int]:
        return [block.attn.num_heads for block in self.attention_blocks(model)]

    def kv_maps(self, model: nn.Module) -> list[list[int]]:
        return [list(range(n)) for n in self.num_heads(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.attn.c_proj

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        import torch

        from headslim.modules import head_rows
        from headslim.ragged import NoHeadsDecoderAttention

        attn = block.attn
        head_dim, split = attn.head_dim, attn.split_size
        if not keep:
            block.attn = NoHeadsDecoderAttention(attn.layer_idx, attn.c_proj.nf, head_dim, attn.c_proj.bias)
            return
        rows = head_rows(keep, head_dim)
        cols = torch.cat([rows, rows + split, rows + 2 * split])  # Q | K | V blocks of c_attn's output
        attn.c_attn = _slice_conv1d(attn.c_attn, cols, dim=1)
        attn.c_proj = _slice_conv1d(attn.c_proj, rows, dim=0)
        attn.num_heads = len(keep)
        attn.split_size = len(keep) * head_dim

    # FFN neurons: ``mlp.c_fc`` output columns and ``mlp.c_proj`` input rows (Conv1D: weight (in, out)).
    def mlp_blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.attention_blocks(model)

    def num_neurons(self, model: nn.Module) -> list[int]:
        return [getattr(getattr(block.mlp, "c_fc", None), "nf", 0) for block in self.mlp_blocks(model)]

    def down_proj(self, block: nn.Module) -> nn.Module:
        return block.mlp.c_proj

    def mlp_residual(self, block: nn.Module) -> tuple[nn.Module, int]:
        return block.ln_2, 0

    def prune_mlp(self, block: nn.Module, keep: list[int]) -> None:
        import torch

        from headslim.modules import NoNeuronsMLP

        mlp = block.mlp
        if not keep:
            block.mlp = NoNeuronsMLP(mlp.c_proj.nf, mlp.c_proj.bias)
            return
        index = torch.tensor(keep, dtype=torch.long)
        mlp.c_fc = _slice_conv1d(mlp.c_fc, index, dim=1)
        mlp.c_proj = _slice_conv1d(mlp.c_proj, index, dim=0)

    def update_config(self, model: nn.Module, pruned: dict[int, list[int]]) -> None:
        """``config.pruned_heads`` lets stock ``from_pretrained`` on 4.x rebuild the shapes.

        Written whatever version prunes (a checkpoint pruned under 5.x must load on 4.x too; 5.x
        itself ignores the key), and only when every layer keeps a head (4.x's own pruning cannot
        express an empty layer).
        """
        n = model.config.n_head
        if all(len(v) < n for v in pruned.values()):
            model.config.pruned_heads = {int(k): list(v) for k, v in pruned.items() if v}
            for layer, heads in pruned.items():
                attn = self.attention_blocks(model)[layer].attn
                if hasattr(attn, "pruned_heads"):
                    attn.pruned_heads = set(heads)
        else:
            model.config.pruned_heads = {}


def _slice_conv1d(layer, index, dim: int):
    """A new transformers ``Conv1D`` (weight ``(in, out)``) keeping inputs (``dim=0``) or outputs (``dim=1``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    weight = layer.weight.detach().index_select(dim, index.to(layer.weight.device)).clone()  # (in', out')
    new = Conv1D(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        bias = layer.bias.detach()
        new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 1 else bias)
    return new


def kv_maps(model) -> list[list[int]]:
    """Per layer, the KV head of every current query head; identity for multi-head models.

    Example:
        >>> kv_maps(tiny_llama)          # 4 query heads, 2 KV heads, 2 layers   # doctest: +SKIP
        [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    from headslim.adapters import get_adapter

    adapter = get_adapter(model)
    if hasattr(adapter, "kv_maps"):
        return adapter.kv_maps(model)
    return [list(range(n)) for n in adapter.num_heads(model)]


def causal_lm_batches(batches):
    """Batches for ``score_heads(objective="task")`` on a causal LM: next-token labels = input_ids.

    Padding positions get label -100 (ignored by the loss); a text column's class labels, if any,
    are dropped. Wraps any iterable of tokenised batches (``headslim.data.batches``).

    Example:
        >>> scores = score_heads(model, causal_lm_batches(batches(data, tok)), objective="task")  # doctest: +SKIP
    """
    for batch in batches:
        batch = dict(batch)
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        yield batch


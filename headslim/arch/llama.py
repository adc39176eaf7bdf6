"""Llama, Mistral, Qwen2, Qwen3: decoder LLMs with grouped-query attention, RoPE and a gated MLP.

The "block" the adapter hands out is the decoder layer (it owns the attention module, which surgery
may replace). Attention modules are stock transformers modules after pruning:

* q/o keep the kept query heads, k/v the KV heads those read; Qwen3's ``q_norm``/``k_norm`` act on
  ``head_dim`` and survive unchanged; RoPE is per head and needs nothing.
* uniform groups (``k`` query heads per kept KV head) set ``num_key_value_groups = k``: every
  standard kernel applies;
* anything else is ragged: the module gets a ``headslim_kv_head_of_q`` buffer and routes to
  ``headslim.arch.ragged.ragged_attention_forward`` through transformers' attention registry;
* no heads: ``headslim.arch.stubs.NoHeadsDecoderAttention`` (adds ``o_proj``'s bias, or nothing).

The config stays that of the dense model; ``headslim.load_pruned`` re-applies the saved plan.
(transformers 5.x has ``per_layer_config`` on configs, but the modeling code of these families never
reads it, so stock ``from_pretrained`` cannot build per-layer head counts for them.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headslim.arch.base import TINY, Adapter, ExportSpec, TinyConfig, register_adapter
from headslim.errors import HeadslimError

if TYPE_CHECKING:
    from torch import nn

_DECODER = dict(vocab_size=TINY.vocab, hidden_size=TINY.hidden, num_hidden_layers=TINY.layers,
                num_attention_heads=TINY.decoder_heads, num_key_value_heads=TINY.kv_heads,
                intermediate_size=TINY.intermediate, max_position_embeddings=TINY.positions,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _kv_map_of(attn) -> list[int]:
    """Current query-head → KV-head map of a Llama-family attention module."""
    from headslim.arch.stubs import NoHeadsDecoderAttention

    if isinstance(attn, NoHeadsDecoderAttention):
        return []
    if "headslim_kv_head_of_q" in attn._buffers:
        return [int(k) for k in attn.headslim_kv_head_of_q.tolist()]
    n_q = attn.q_proj.out_features // attn.head_dim
    return [h // attn.num_key_value_groups for h in range(n_q)]


@register_adapter
class LlamaFamilyAdapter(Adapter):
    """Llama, Mistral, Qwen2, Qwen3: ``base_model.layers[i].self_attn.{q,k,v,o}_proj``, GQA."""

    name = "llama-family"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    decoder = True
    gated_mlp = True

    def check(self, config) -> None:
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

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.layers(model)

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_blocks(model)[0].self_attn.head_dim

    def num_heads(self, model: nn.Module) -> list[int]:
        return [len(_kv_map_of(layer.self_attn)) for layer in self.attention_blocks(model)]

    def kv_maps(self, model: nn.Module) -> list[list[int]]:
        return [_kv_map_of(layer.self_attn) for layer in self.attention_blocks(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.self_attn.o_proj

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        from headslim.arch.ragged import make_ragged, uniform_groups
        from headslim.arch.stubs import NoHeadsDecoderAttention, head_rows, slice_linear

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
        import torch

        from headslim.arch.stubs import NoNeuronsMLP, slice_linear

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

    def intermediate_size(self, config) -> int:
        return int(config.intermediate_size)

    def export_spec(self, model_type: str) -> ExportSpec:
        return ExportSpec(("input_ids", "attention_mask", "position_ids"), decoder_layout="llama")

    def export_embed(self, model, input_ids, position_ids):
        x = model.base_model.embed_tokens(input_ids)  # (B, T, d)
        return x, model.base_model.rotary_emb(x, position_ids)

    def export_layer(self, block, info, x, rotary, mask, past, attend):
        """Pre-RMSNorm, q/k/v, Qwen3's q/k norms over ``head_dim``, RoPE, attention with the cache, o, gated MLP."""
        h = block.input_layernorm(x)
        attn = block.self_attn
        present = None
        if info.n_q == 0:
            a = attn(h)[0]  # NoHeadsDecoderAttention: o_proj's bias, or nothing
        else:
            b, t, d = h.shape[0], h.shape[1], info.head_dim
            q = attn.q_proj(h).view(b, t, info.n_q, d)
            k = attn.k_proj(h).view(b, t, info.n_kv, d)
            v = attn.v_proj(h).view(b, t, info.n_kv, d).transpose(1, 2)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
            cos, sin = (r.unsqueeze(1) for r in rotary)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out, present = attend(info, q, k, v, past, mask, getattr(attn, "scaling", d ** -0.5))
            a = attn.o_proj(out)
        x = x + a
        return x + block.mlp(block.post_attention_layernorm(x)), present

    def export_final(self, model, x):
        return model.base_model.norm(x)

    def sliding_window(self, block: nn.Module, config) -> int | None:
        # Qwen2/Qwen3 keep it per layer on the module (None for full-attention layers); Mistral reads
        # config.sliding_window in every layer
        attn = block.self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(config, "sliding_window", None)

    def tiny_configs(self) -> list[TinyConfig]:
        # 8 query heads of head_dim 8 over 2 KV heads; Qwen3's q width 64 != hidden 32, Mistral's
        # sliding window, Llama's biases
        return [
            TinyConfig("llama", "LlamaConfig", {**_DECODER, "head_dim": 8, "attention_bias": True},
                       ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification")),
            TinyConfig("mistral", "MistralConfig", {**_DECODER, "head_dim": 8, "sliding_window": 5},
                       ("MistralForCausalLM",)),
            TinyConfig("qwen2", "Qwen2Config", dict(_DECODER), ("Qwen2ForCausalLM",)),
            TinyConfig("qwen3", "Qwen3Config", {**_DECODER, "head_dim": 8}, ("Qwen3ForCausalLM",)),
        ]


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

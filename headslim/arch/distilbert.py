"""DistilBERT: a post-LayerNorm encoder whose attention module owns its output projection.

Every layer is ``base_model.transformer.layer[i]`` (a ``TransformerBlock``):

* attention ``.attention`` with ``q_lin``/``k_lin``/``v_lin`` (heads are contiguous row blocks) and
  ``out_lin`` (columns); its forward reads ``n_heads`` and ``dim`` on transformers 4.x
  (``dim_per_head = dim // n_heads``) and ``attention_head_size`` on 5.x, so surgery sets all three
  to the kept heads; 4.x's ``pruned_heads`` bookkeeping is kept as well;
* ``sa_layer_norm(attention(x) + x)``, then ``output_layer_norm(ffn(h) + h)``: the FFN's residual is
  its own input, so ``mlp_residual`` is ``(layer.ffn, 0)``; FFN neurons are ``ffn.lin1`` rows and
  ``ffn.lin2`` columns.

A layer with no heads (no neurons) keeps ``out_lin`` (``lin2``) as a bias-only projection inside a
stand-in (``headslim.arch.stubs``), so checkpoint keys and repair work as in BERT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headslim.arch.base import TINY, Adapter, ExportSpec, TinyConfig, register_adapter

if TYPE_CHECKING:
    from torch import nn


@register_adapter
class DistilBertAdapter(Adapter):
    """DistilBERT: ``base_model.transformer.layer[i].attention.{q,k,v,out}_lin`` and ``.ffn.lin{1,2}``."""

    name = "distilbert"
    model_types = ("distilbert",)
    keeps_bias_projection = True

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.transformer.layer)

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.layers(model)

    def head_dim(self, model: nn.Module) -> int:
        return int(self.attention_blocks(model)[0].attention.attention_head_size)

    def num_heads(self, model: nn.Module) -> list[int]:
        return [int(block.attention.n_heads) for block in self.attention_blocks(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.attention.out_lin

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        from headslim.arch.stubs import NoHeadsAttention, head_rows, slice_linear

        attn = block.attention
        head_dim = int(attn.attention_head_size)
        if not keep:
            out = attn.out_lin
            bias = out.bias if out.bias is not None else out.weight.new_zeros(out.out_features)
            block.attention = NoHeadsAttention("out_lin", bias, head_dim)
            return
        rows = head_rows(keep, head_dim)
        attn.q_lin = slice_linear(attn.q_lin, rows, dim=0)
        attn.k_lin = slice_linear(attn.k_lin, rows, dim=0)
        attn.v_lin = slice_linear(attn.v_lin, rows, dim=0)
        attn.out_lin = slice_linear(attn.out_lin, rows, dim=1)
        attn.n_heads = len(keep)
        attn.dim = len(keep) * head_dim  # 4.x: dim_per_head = dim // n_heads

    def query_key(self, block: nn.Module):
        return block.attention.q_lin, block.attention.k_lin

    def kernel_attention(self, block: nn.Module):
        """``block.attention`` (``MultiHeadSelfAttention`` / ``DistilBertSdpaAttention`` on 4.x)."""
        from headslim.arch.stubs import NoHeadsAttention
        from headslim.kernels.wiring import distilbert_attention_forward

        attn = block.attention
        return None if isinstance(attn, NoHeadsAttention) else (attn, distilbert_attention_forward)

    # FFN neurons: ``ffn.lin1`` rows and ``ffn.lin2`` columns.
    def mlp_blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.attention_blocks(model)

    def num_neurons(self, model: nn.Module) -> list[int]:
        return [getattr(getattr(block.ffn, "lin1", None), "out_features", 0) for block in self.mlp_blocks(model)]

    def down_proj(self, block: nn.Module) -> nn.Module:
        return block.ffn.lin2

    def mlp_residual(self, block: nn.Module) -> tuple[nn.Module, int]:
        """``output_layer_norm(ffn(h) + h)``: the residual is the FFN's own input."""
        return block.ffn, 0

    def prune_mlp(self, block: nn.Module, keep: list[int]) -> None:
        import torch

        from headslim.arch.stubs import NoNeuronsFFN, slice_linear

        ffn = block.ffn
        if not keep:
            out = ffn.lin2
            bias = out.bias if out.bias is not None else out.weight.new_zeros(out.out_features)
            block.ffn = NoNeuronsFFN("lin2", bias)
            return
        index = torch.tensor(keep, dtype=torch.long)
        ffn.lin1 = slice_linear(ffn.lin1, index, dim=0)
        ffn.lin2 = slice_linear(ffn.lin2, index, dim=1)

    def update_config(self, model: nn.Module, pruned: dict[int, list[int]]) -> None:
        """``config.pruned_heads`` lets stock ``from_pretrained`` on 4.x rebuild the shapes; 5.x ignores it.

        Written only when every layer keeps a head: 4.x's DistilBERT attention divides by its head
        count, so a layer with none cannot be built there (``headslim.load_pruned`` can).
        """
        n = int(model.config.n_heads)
        every_layer_keeps_one = all(len(v) < n for v in pruned.values())
        model.config.pruned_heads = {int(k): list(v) for k, v in pruned.items() if v} if every_layer_keeps_one else {}
        for layer, heads in pruned.items():
            attn = self.attention_blocks(model)[layer].attention
            if hasattr(attn, "pruned_heads"):  # transformers 4.x bookkeeping
                attn.pruned_heads = set(heads)

    def intermediate_size(self, config) -> int:
        return int(config.hidden_dim)

    def export_spec(self, model_type: str) -> ExportSpec:
        # optimum's DistilBERT config takes no token_type_ids; the export graph's attention is the
        # classic BERT pattern, which ORT's "bert" optimizer fuses
        return ExportSpec(("input_ids", "attention_mask"), optimizer_model_type="bert")

    def prepare_export(self, model: nn.Module, slot) -> None:
        from headslim.arch.stubs import NoHeadsAttention
        from headslim.onnx_utils import ExportSelfAttention

        for block in self.attention_blocks(model):
            attn = block.attention
            if isinstance(attn, NoHeadsAttention):
                continue  # returns out_lin's bias: sa_layer_norm(b + x), no attention subgraph
            block.attention = ExportSelfAttention(attn.q_lin, attn.k_lin, attn.v_lin, int(attn.n_heads),
                                                  int(attn.attention_head_size), slot, out=attn.out_lin)

    def tiny_configs(self) -> list[TinyConfig]:
        kwargs = dict(vocab_size=TINY.vocab, dim=TINY.hidden, n_layers=TINY.layers, n_heads=TINY.heads,
                      hidden_dim=TINY.intermediate, max_position_embeddings=TINY.positions, dropout=0.0,
                      attention_dropout=0.0, qa_dropout=0.0, seq_classif_dropout=0.0, num_labels=TINY.labels)
        return [TinyConfig("distilbert", "DistilBertConfig", kwargs,
                           ("DistilBertModel", "DistilBertForSequenceClassification", "DistilBertForMaskedLM",
                            "DistilBertForTokenClassification"))]

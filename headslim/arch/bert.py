"""BERT and its close relatives: BERT, RoBERTa, XLM-RoBERTa, ELECTRA (MiniLM checkpoints are BERT).

Every layer is ``base_model.encoder.layer[i]``: attention ``.attention`` with ``.self.{query,key,value}``
and ``.output.dense`` as the output projection (heads are contiguous row blocks), FFN
``.intermediate.dense`` (rows) and ``.output.dense`` (columns), both post-LayerNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headslim.arch.base import TINY, Adapter, ExportSpec, TinyConfig, register_adapter
from headslim.errors import HeadslimError

if TYPE_CHECKING:
    from torch import nn

_ENCODER = dict(vocab_size=TINY.vocab, hidden_size=TINY.hidden, num_hidden_layers=TINY.layers,
                num_attention_heads=TINY.heads, intermediate_size=TINY.intermediate,
                max_position_embeddings=TINY.positions, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                num_labels=TINY.labels)
# positions start after the pad id in these (``create_position_ids_from_input_ids``)
_PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta")


@register_adapter
class BertFamilyAdapter(Adapter):
    """BERT, RoBERTa, XLM-RoBERTa, ELECTRA: ``base_model.encoder.layer[i].attention``."""

    name = "bert-family"
    model_types = ("bert", "roberta", "xlm-roberta", "electra")
    keeps_bias_projection = True

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.encoder.layer)

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in self.layers(model)]

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_blocks(model)[0].self.attention_head_size

    def num_heads(self, model: nn.Module) -> list[int]:
        return [block.self.num_attention_heads for block in self.attention_blocks(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.output.dense

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        from headslim.arch.stubs import BiasOnly, NoHeadsSelfAttention, head_rows, slice_linear

        attn = block.self
        head_dim = attn.attention_head_size
        if not keep:
            dense = block.output.dense
            bias = dense.bias if dense.bias is not None else dense.weight.new_zeros(dense.out_features)
            block.self = NoHeadsSelfAttention(head_dim)
            block.output.dense = BiasOnly(bias)
            return
        rows = head_rows(keep, head_dim)
        attn.query = slice_linear(attn.query, rows, dim=0)
        attn.key = slice_linear(attn.key, rows, dim=0)
        attn.value = slice_linear(attn.value, rows, dim=0)
        block.output.dense = slice_linear(block.output.dense, rows, dim=1)
        attn.num_attention_heads = len(keep)
        attn.all_head_size = len(keep) * head_dim

    def query_key(self, block: nn.Module):
        return block.self.query, block.self.key

    def kernel_attention(self, block: nn.Module):
        """``block.self`` (``BertSelfAttention`` / ``BertSdpaSelfAttention`` on 4.x)."""
        from headslim.arch.stubs import NoHeadsSelfAttention
        from headslim.kernels.wiring import bert_self_attention_forward

        attn = block.self
        return None if isinstance(attn, NoHeadsSelfAttention) else (attn, bert_self_attention_forward)

    # FFN neurons: ``layer.intermediate.dense`` rows and ``layer.output.dense`` columns.
    def mlp_blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.layers(model)

    def num_neurons(self, model: nn.Module) -> list[int]:
        return [getattr(layer.intermediate, "dense", layer.intermediate).out_features
                for layer in self.mlp_blocks(model)]

    def down_proj(self, block: nn.Module) -> nn.Module:
        return block.output.dense

    def mlp_residual(self, block: nn.Module) -> tuple[nn.Module, int]:
        """Where the residual the FFN output is added to enters: ``BertOutput(h, input_tensor)``."""
        return block.output, 1

    def prune_mlp(self, block: nn.Module, keep: list[int]) -> None:
        import torch

        from headslim.arch.stubs import BiasOnly, NoNeurons, slice_linear

        out = block.output.dense
        if not keep:
            bias = out.bias if out.bias is not None else out.weight.new_zeros(out.out_features)
            block.intermediate = NoNeurons()
            block.output.dense = BiasOnly(bias)
            return
        index = torch.tensor(keep, dtype=torch.long)
        block.intermediate.dense = slice_linear(block.intermediate.dense, index, dim=0)
        block.output.dense = slice_linear(out, index, dim=1)

    def update_config(self, model: nn.Module, pruned: dict[int, list[int]]) -> None:
        """Record the removed heads where transformers 4.x's own loader looks for them.

        ``config.pruned_heads`` lets stock ``AutoModel.from_pretrained`` on 4.x rebuild the
        smaller shapes; 5.x ignores it (use ``headslim.load_pruned``).
        """
        model.config.pruned_heads = {int(k): list(v) for k, v in pruned.items() if v}
        for layer, heads in pruned.items():
            block = self.attention_blocks(model)[layer]
            if hasattr(block, "pruned_heads"):  # transformers 4.x bookkeeping
                block.pruned_heads = set(heads)

    def intermediate_size(self, config) -> int:
        return int(config.intermediate_size)

    def position_offset(self, config) -> int:
        if config.model_type in _PADDING_OFFSET_TYPES:
            return int(getattr(config, "pad_token_id", 1) or 0) + 1
        return 0

    # export
    def export_spec(self, model_type: str) -> ExportSpec:
        # as optimum names the inputs: its BERT and ELECTRA configs take token_type_ids, its RoBERTa
        # and XLM-RoBERTa configs do not (their tokenizers never produce them)
        inputs = ("input_ids", "attention_mask")
        if model_type not in _PADDING_OFFSET_TYPES:
            inputs += ("token_type_ids",)
        return ExportSpec(inputs, optimizer_model_type="bert")

    def prepare_export(self, model: nn.Module, slot) -> None:
        from headslim.arch.stubs import BiasOnly, NoHeadsSelfAttention
        from headslim.onnx_utils import BiasResidualNorm, ExportSelfAttention

        config = model.config
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise HeadslimError(f"export supports absolute position embeddings only, not "
                                f"{config.position_embedding_type!r}")
        if getattr(config, "is_decoder", False):
            raise HeadslimError("export supports encoders only; this config has is_decoder=True")
        for block in self.attention_blocks(model):
            attn = block.self
            if isinstance(attn, NoHeadsSelfAttention):
                if not isinstance(block.output.dense, BiasOnly):
                    raise HeadslimError("a layer with no heads has no bias-only output projection")
                # LayerNorm(x + b_O): no expanded bias in the graph
                block.output = BiasResidualNorm(block.output.dense.bias, block.output.LayerNorm)
            else:
                block.self = ExportSelfAttention(attn.query, attn.key, attn.value, int(attn.num_attention_heads),
                                                 int(attn.attention_head_size), slot)

    def tiny_configs(self) -> list[TinyConfig]:
        return [
            TinyConfig("bert", "BertConfig", dict(_ENCODER),
                       ("BertModel", "BertForSequenceClassification", "BertForMaskedLM", "BertForTokenClassification")),
            TinyConfig("roberta", "RobertaConfig", {**_ENCODER, "pad_token_id": 1},
                       ("RobertaModel", "RobertaForSequenceClassification", "RobertaForMaskedLM")),
            TinyConfig("xlm-roberta", "XLMRobertaConfig", {**_ENCODER, "pad_token_id": 1},
                       ("XLMRobertaModel", "XLMRobertaForSequenceClassification")),
            TinyConfig("electra", "ElectraConfig", {**_ENCODER, "embedding_size": 16},
                       ("ElectraModel", "ElectraForSequenceClassification", "ElectraForPreTraining")),
        ]

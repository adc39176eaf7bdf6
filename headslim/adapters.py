"""Architecture adapters: the only code that knows where Q/K/V/O live in a model family.

Everyone else asks the adapter: the gates, the scorers, surgery and save/load. A new architecture
is one new adapter registered in ``ADAPTERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headslim.errors import HeadslimError

if TYPE_CHECKING:
    from torch import nn


class BertFamilyAdapter:
    """BERT and its close relatives: RoBERTa, XLM-RoBERTa, ELECTRA (and MiniLM, which is BERT).

    Every layer is ``base_model.encoder.layer[i].attention`` with ``.self.{query,key,value}`` and
    ``.output.dense`` as the output projection, heads laid out as contiguous row blocks.
    """

    name = "bert-family"
    model_types = ("bert", "roberta", "xlm-roberta", "electra")

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in model.base_model.encoder.layer]

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_blocks(model)[0].self.attention_head_size

    def num_heads(self, model: nn.Module) -> list[int]:
        return [block.self.num_attention_heads for block in self.attention_blocks(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.output.dense

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        """Keep only heads ``keep`` (current indices, sorted) of one attention block, in place."""
        from headslim.modules import BiasOnly, NoHeadsSelfAttention, head_rows, slice_linear

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

    # FFN neurons: ``layer.intermediate.dense`` rows and ``layer.output.dense`` columns.
    def mlp_blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.encoder.layer)

    def num_neurons(self, model: nn.Module) -> list[int]:
        return [getattr(layer.intermediate, "dense", layer.intermediate).out_features
                for layer in self.mlp_blocks(model)]

    def down_proj(self, block: nn.Module) -> nn.Module:
        return block.output.dense

    def mlp_residual(self, block: nn.Module) -> tuple[nn.Module, int]:
        """Where the residual the FFN output is added to enters: ``BertOutput(h, input_tensor)``."""
        return block.output, 1

    def prune_mlp(self, block: nn.Module, keep: list[int]) -> None:
        """Keep only FFN neurons ``keep`` (current indices, sorted) of one layer, in place."""
        import torch

        from headslim.modules import BiasOnly, NoNeurons, slice_linear

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


def _decoder_adapters() -> tuple:
    from headslim.decoders import GPT2Adapter, LlamaFamilyAdapter

    return LlamaFamilyAdapter(), GPT2Adapter()


ADAPTERS = {t: adapter for adapter in (BertFamilyAdapter(), *_decoder_adapters()) for t in adapter.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> BertFamilyAdapter:
    """The adapter for a model or config; a one-line error lists what is supported otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise HeadslimError(
            f"unsupported architecture {model_type!r}; supported model types: "
            + ", ".join(supported_model_types())
        )
    adapter = ADAPTERS[model_type]
    if hasattr(adapter, "check"):  # variants of a family the adapter does not handle
        adapter.check(config)
    return adapter

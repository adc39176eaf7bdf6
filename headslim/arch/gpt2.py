"""GPT-2: multi-head decoder whose projections are transformers' ``Conv1D`` (weight stored ``(in, out)``).

Attention: the fused ``c_attn`` keeps the Q, K and V column blocks of the kept heads and ``c_proj``
the matching rows. FFN: ``mlp.c_fc`` output columns and ``mlp.c_proj`` input rows.
``config.pruned_heads`` is also written (under any version) so stock ``from_pretrained`` on 4.x
rebuilds a GPT-2 whose layers all keep a head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headslim.arch.base import TINY, Adapter, ExportSpec, TinyConfig, register_adapter
from headslim.errors import HeadslimError

if TYPE_CHECKING:
    from torch import nn


@register_adapter
class GPT2Adapter(Adapter):
    """GPT-2: ``transformer.h[i].attn`` with fused ``c_attn`` (Q|K|V column blocks) and ``c_proj``."""

    name = "gpt2"
    model_types = ("gpt2",)
    decoder = True

    def check(self, config) -> None:
        if getattr(config, "add_cross_attention", False):
            raise HeadslimError("gpt2 with add_cross_attention=True: cross-attention layers are not supported")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return self.attention_blocks(model)

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(model.base_model, "h", None)
        if blocks is None:
            raise HeadslimError(f"{type(model).__name__}: no GPT-2 blocks at base_model.h")
        return list(blocks)

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_blocks(model)[0].attn.head_dim

    def num_heads(self, model: nn.Module) -> list[int]:
        return [block.attn.num_heads for block in self.attention_blocks(model)]

    def o_proj(self, block: nn.Module) -> nn.Module:
        return block.attn.c_proj

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        import torch

        from headslim.arch.stubs import NoHeadsDecoderAttention, head_rows

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

        from headslim.arch.stubs import NoNeuronsMLP

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

    def intermediate_size(self, config) -> int:
        return int(getattr(config, "n_inner", None) or 4 * config.n_embd)

    def export_spec(self, model_type: str) -> ExportSpec:
        return ExportSpec(("input_ids", "attention_mask", "position_ids"), decoder_layout="gpt2")

    def export_embed(self, model, input_ids, position_ids):
        return model.base_model.wte(input_ids) + model.base_model.wpe(position_ids), None

    def export_layer(self, block, info, x, rotary, mask, past, attend):
        """ln_1, the fused ``c_attn`` split into q/k/v, attention with the cache, ``c_proj``, ln_2 + MLP."""
        h = block.ln_1(x)
        attn = block.attn
        present = None
        if info.n_q == 0:
            a = attn(h)[0]
        else:
            b, t, d = h.shape[0], h.shape[1], info.head_dim
            q, k, v = attn.c_attn(h).split(info.n_q * d, dim=2)
            q, k, v = (z.view(b, t, info.n_q, d).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
            scaling = d ** -0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
            if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
                scaling /= float(info.index + 1)
            out, present = attend(info, q, k, v, past, mask, scaling)
            a = attn.c_proj(out)
        x = x + a
        return x + block.mlp(block.ln_2(x)), present

    def export_final(self, model, x):
        return model.base_model.ln_f(x)

    def transposed(self, proj: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(proj, Conv1D)

    def tiny_configs(self) -> list[TinyConfig]:
        kwargs = dict(vocab_size=TINY.vocab, n_embd=TINY.hidden, n_layer=TINY.layers, n_head=TINY.decoder_heads,
                      n_positions=TINY.positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return [TinyConfig("gpt2", "GPT2Config", kwargs, ("GPT2LMHeadModel", "GPT2Model"))]


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

"""``magnitude``: the norm of each head's contribution to its layer's output (function norm).

A head's contribution to the attention block output is ``O_h c_h`` (its slice of the output
projection times its context vector). The score is the root-mean-square of ``||O_h c_h||`` over the
real tokens of the calibration set: label-free and cheap (one forward pass), as in Lin et al.'s
identity priors where a module whose function norm is small is removable. The objective is ignored.
"""

from __future__ import annotations

import torch

from headslim.arch import get_adapter, weight_out_in
from headslim.scoring.common import finish, run_hooked


def o_weight(o_proj) -> torch.Tensor:
    """The output projection's weight as ``(d_out, n * D)``, whatever its layout (GPT-2 stores it transposed)."""
    return weight_out_in(o_proj)


@torch.no_grad()
def score_magnitude(model, batches, *, objective: str = "dense", seed: int = 0, progress: bool = True,
                    **options) -> torch.Tensor:
    """RMS norm of every head's output contribution ``(layers, max_heads)``.

    Example:
        >>> scores = score_magnitude(model, calib_batches)    # doctest: +SKIP
    """
    adapter = get_adapter(model)
    heads = adapter.num_heads(model)
    head_dim = adapter.head_dim(model)
    sums = torch.zeros(len(heads), max(heads), dtype=torch.float64)
    state = {}
    handles = []
    for layer, (block, n) in enumerate(zip(adapter.attention_blocks(model), heads)):
        if n == 0:
            continue
        o_proj = adapter.o_proj(block)

        def hook(module, args, layer=layer, n=n):
            ctx = args[0].unflatten(-1, (n, head_dim))  # (B, T, n, D)
            w = o_weight(module).unflatten(1, (n, head_dim))  # (d, n, D)
            contrib = torch.einsum("btnk,dnk->btnd", ctx, w)  # (B, T, n, d)
            sq = contrib.float().pow(2).sum(-1)  # (B, T, n)
            sums[layer, :n] += (sq * state["mask"][..., None].to(device=sq.device, dtype=sq.dtype)).sum((0, 1)).double().cpu()  # (n,)

        handles.append(o_proj.register_forward_pre_hook(hook))
    tokens = run_hooked(model, batches, handles, state, "scoring heads (magnitude)", progress)
    return finish((sums / tokens).sqrt(), heads)

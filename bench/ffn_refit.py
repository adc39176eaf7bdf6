"""Experiment (not in the library): after repair, also re-fit each BERT layer's FFN output projection.

Repair (``headslim.repair``) re-fits the attention output projection of every pruned layer. This goes
one step further, layer by layer in order: the FFN's down-projection ``W2`` (``output.dense``) of layer
``l`` is re-fitted by ridge least squares (towards its current weights) so that
``W2 h_pruned + b + a_pruned`` matches the dense layer's pre-LayerNorm output ``W2 h_dense + b + a_dense``
on the calibration tokens (``h``: the FFN's intermediate activations, ``a``: its residual input), i.e.
the FFN also absorbs the drift in the residual stream. Used by ``knn_loo.py --repair-ffn``.
"""

from __future__ import annotations

import torch


class _Stop(Exception):
    pass


def _encoder_layers(model):
    base = getattr(model, "bert", model)
    return base.encoder.layer


@torch.no_grad()
def _capture(model, layer_index: int, batches: list, stop: bool) -> list:
    """Per batch, ``(h, a, mask)`` at layer ``layer_index``'s FFN output module."""
    out_mod = _encoder_layers(model)[layer_index].output
    got = []

    def hook(module, args):
        got.append((args[0].double(), args[1].double()))
        if stop:
            raise _Stop

    handle = out_mod.register_forward_pre_hook(hook)
    try:
        for b in batches:
            try:
                model(**{k: v for k, v in b.items() if k != "labels"})
            except _Stop:
                pass
    finally:
        handle.remove()
    return [(h, a, b["attention_mask"].bool()) for (h, a), b in zip(got, batches)]


@torch.no_grad()
def refit_ffn(model, dense, batches: list, ridge: float = 1e-2) -> list[float]:
    """Re-fit every layer's FFN down-projection in place; returns each layer's relative error after."""
    errors = []
    for i, (layer_p, layer_d) in enumerate(zip(_encoder_layers(model), _encoder_layers(dense))):
        dense_in = _capture(dense, i, batches, stop=True)
        pruned_in = _capture(model, i, batches, stop=True)
        w2 = layer_d.output.dense
        width = w2.in_features + 1
        xtx = torch.zeros(width, width, dtype=torch.float64)
        xtt = torch.zeros(width, w2.out_features, dtype=torch.float64)
        tt = 0.0
        for (hd, ad, mask), (hp, ap, _) in zip(dense_in, pruned_in):
            target = (hd @ w2.weight.double().T + w2.bias.double() + ad - ap)[mask]  # (N, d)
            x = torch.cat([hp[mask], torch.ones(len(target), 1, dtype=torch.float64)], dim=1)
            xtx += x.T @ x
            xtt += x.T @ target
            tt += float(target.pow(2).sum())
        mod = layer_p.output.dense
        w0 = torch.cat([mod.weight.double(), mod.bias.double()[:, None]], dim=1).T  # (width, d)
        lam = ridge * float(xtx.diagonal().mean())
        reg = lam * torch.eye(width, dtype=torch.float64)
        w = torch.linalg.solve(xtx + reg, xtt + reg @ w0)
        err = float((w * (xtx @ w)).sum() - 2 * (w * xtt).sum() + tt) / max(tt, 1e-30)
        errors.append(err)
        mod.weight.copy_(w[:-1].T.to(mod.weight.dtype))
        mod.bias.copy_(w[-1].to(mod.bias.dtype))
    return errors

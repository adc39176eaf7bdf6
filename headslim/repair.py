"""Retraining-free repair: re-fit each pruned output projection by ridge least squares.

The sites are every attention output projection (O) of a layer that lost heads and every FFN down
projection of a layer that lost neurons, in forward order; what follows is written for O, and holds
for a down projection with "kept neurons' activations" for "context vectors of the kept heads" and
the FFN's residual input (where the adapter's ``mlp_residual`` says it enters) for the block input.

After surgery, layer ``l`` computes ``y = W c + b`` from the context vectors ``c`` of the heads it
kept (``W``: ``(d, k * D)``). Repair chooses ``W, b`` so that ``y`` best matches what the dense model
computes at that point, on calibration tokens (Kwon et al. 2022's mask tuning generalised from one
scale per head to the whole projection; FLAP's bias compensation is the bias-only case, and the
only one for a layer that kept no head). Only weight values change: shapes, the plan and
``headslim.load_pruned`` are untouched.

Inputs and target (``inputs``):
    ``pruned`` (default, sequential): ``c`` comes from the pruned model whose earlier layers are
        already repaired, and the target is the dense block's pre-LayerNorm output minus the pruned
        residual, ``t = (y_dense + x_dense) - x_pruned``: the fit also absorbs the drift that earlier
        layers left in the residual stream, so ``LayerNorm(W c + b + x_pruned)`` matches the dense layer.
        ``x`` is the residual stream entering the block: the attention block's input in BERT
        (post-LayerNorm, ``LN(x + y)``) and the decoder layer's input in Llama-family and GPT-2 models
        (pre-LayerNorm, ``x + y``); the same target serves both.
    ``dense``: ``c`` is the dense model's context of the kept heads and ``t = y_dense`` (every
        layer fitted independently on dense activations).

The solve is ridge-regularised towards the current weights, ``min ||X w - t||^2 + lam ||w - w0||^2``
(bias unpenalised, ``lam = ridge * mean diag(X^T X)``), in float64. A share of the calibration
batches is held out: a layer keeps its new weights only if they lower the reconstruction error on
them (then it is re-fitted on all batches), and, with ``check``, the whole repair is undone when it
does not bring the model's held-out outputs closer to the dense model's (mean embedding cosine; for a
task head or a causal LM, mean ``KL(dense || pruned)`` of its predictions, since its hidden states
are not its output).

Cost: each layer's inputs (the dense model's, and the pruned model's through the layers already
repaired) are computed once and carried forward (``headslim.layerwise``): the dense model runs every
layer twice per batch (once to record what the model passes its layers, once to carry the stream), the
pruned model once per fitted site and once to carry it, so repair costs a few forward passes whatever
the depth. The fit's moments are accumulated per site, so memory is the two streams plus one layer's
references. Under ``torchrun`` each rank runs its own batches and the moments (and the held-out
check's sums) are summed over the ranks before each solve (``headslim.distributed``).

With too few batches to hold one out (fewer than ``1 / holdout``: 4 by default), the same share of
*samples* is held out instead, split off every batch: a fit on a handful of texts overfits easily
(all-MiniLM-L6-v2 at 50 % calibrated on 5 lines scored cosine 0.577 repaired, 0.794 without, when
such a repair was kept unchecked), so it is never kept without a check. A single calibration sample
leaves nothing to check on: repair is skipped. Either case sets ``RepairReport.warning``.

Projections without a bias (Llama-family ``o_proj``) are fitted without one, so the checkpoint keeps
its shapes; a projection stored ``(in, out)`` (GPT-2's) is read and written through
``headslim.arch.weight_out_in``. A layer that lost every head is left as it is when its family keeps
no projection there (decoders); BERT and DistilBERT keep a bias-only one, which is re-fitted
(``Adapter.keeps_bias_projection``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from headslim import distributed
from headslim.arch import get_adapter, set_weight_out_in, weight_out_in
from headslim.errors import HeadslimError
from headslim.layerwise import Spill, Stop, Store, Stream
from headslim.plan import PrunePlan
from headslim.scoring.common import fidelity

INPUTS = ("pruned", "dense")


@dataclass
class RepairReport:
    """What repair did: per-layer relative reconstruction errors and the held-out check.

    ``layers``: one dict per refitted layer with ``fit_before/fit_after`` (on the fitting batches)
    and ``val_before/val_after`` (held-out), each ``||y - t||^2 / ||t||^2``, and ``applied``.
    ``check``: the held-out distance to dense ``before`` and ``after`` repair, and its ``metric``:
    ``cosine`` (mean embedding cosine, higher is closer) or ``kl`` (a task head's mean KL, lower is closer).
    ``held_out``: how the calibration data was split: ``unit`` (``batches``, or ``samples`` when there
    were too few batches), ``n_fit`` and ``n_held_out`` of that unit.
    ``skipped``: why nothing was fitted, when the data was too small to check a repair (else empty).
    ``warning``: a one-line note for the user when the calibration data was too small for the usual split.
    """

    applied: bool
    inputs: str
    ridge: float
    layers: list = field(default_factory=list)
    check: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)
    skipped: str = ""
    warning: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _has_bias(o_proj) -> bool:
    return getattr(o_proj, "bias", None) is not None


def _o_weight(o_proj) -> torch.Tensor:
    """``[W | b]`` as ``(d, p + 1)`` float64 on the CPU (where the moments and the solve are), or ``W``
    ``(d, p)`` for a projection without a bias (``p = 0``: a bias-only projection)."""
    cols = []
    if getattr(o_proj, "in_features", None) != 0 and hasattr(o_proj, "weight"):
        cols.append(weight_out_in(o_proj).detach().double().cpu())  # (d, p)
    if _has_bias(o_proj):
        cols.append(o_proj.bias.detach().double().cpu()[:, None])
    return torch.cat(cols, dim=1)


def _set_o_weight(o_proj, w: torch.Tensor) -> None:
    with torch.no_grad():
        bias = _has_bias(o_proj)
        if getattr(o_proj, "in_features", None) != 0 and hasattr(o_proj, "weight"):
            set_weight_out_in(o_proj, w[:, :-1] if bias else w)  # (d, p)
        if bias:
            o_proj.bias.copy_(w[:, -1].to(o_proj.bias.dtype))


def _error(w: torch.Tensor, stats: dict) -> float:
    """``||X w^T - T||^2`` from the moments ``A = X^T X``, ``B = X^T T``, ``C = ||T||^2``."""
    a, b, c = stats["A"], stats["B"], stats["C"]
    return float((w @ a * w).sum() - 2 * (w * b.T).sum() + c)


def _empty(w0: torch.Tensor) -> dict:
    """Zero moments for a projection whose current ``[W | b]`` is ``w0`` ``(d, q)``."""
    d, q = w0.shape
    return {"A": torch.zeros(q, q, dtype=torch.float64), "B": torch.zeros(q, d, dtype=torch.float64), "C": 0.0}


def _solve(stats: dict, w0: torch.Tensor, ridge: float, bias: bool = True) -> torch.Tensor:
    a, b = stats["A"], stats["B"]  # (p+1, p+1), (p+1, d); (p, p), (p, d) without a bias
    p = a.shape[0] - int(bias)
    reg = torch.zeros_like(a)
    if p > 0:
        lam = ridge * float(a.diagonal()[:p].mean().clamp_min(1e-12))
        reg[:p, :p] = torch.eye(p, dtype=a.dtype) * lam
    rhs = b + reg @ w0.T  # (p+1, d)
    return torch.linalg.solve(a + reg, rhs).T  # (d, p [+ 1])


def _add(stats: dict, x: torch.Tensor, t: torch.Tensor, bias: bool = True) -> None:
    """Accumulate moments of rows ``x`` ``(N, p)`` (a ones column is appended for a bias) and targets ``t`` ``(N, d)``."""
    x = x.double()
    if bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], dim=1)
    t = t.double()
    stats["A"] = stats.get("A", 0) + (x.T @ x).cpu()
    stats["B"] = stats.get("B", 0) + (x.T @ t).cpu()
    stats["C"] = stats.get("C", 0) + float(t.pow(2).sum())


def _site_modules(model, site: tuple[int, str]):
    """``(output projection, module whose input is the residual, which positional input)`` of a site:
    ``(layer, "attention")`` (O; the attention block's input) or ``(layer, "mlp")`` (the down
    projection; where the adapter says the residual the FFN output is added to enters)."""
    adapter = get_adapter(model)
    layer, kind = site
    if kind == "attention":
        block = adapter.attention_blocks(model)[layer]
        return adapter.o_proj(block), block, 0
    block = adapter.mlp_blocks(model)[layer]
    residual, index = adapter.mlp_residual(block)
    return adapter.down_proj(block), residual, index


def _capture(model, site: tuple[int, str], want_input: bool, stop: bool = True):
    """Hooks on one site: record the projection input/output and the residual input (then stop the
    pass, with ``stop``)."""
    proj, residual, index = _site_modules(model, site)
    got: dict = {}

    def pre_residual(module, args, kwargs):
        got["x"] = args[index] if len(args) > index else kwargs["hidden_states"]  # (B, T, d) residual

    def on_proj(module, args, output):
        got["c"] = args[0]  # (B, T, p): context of the kept heads, or kept neurons' activations
        got["y"] = output  # (B, T, d)
        if stop:
            raise Stop

    handles = [proj.register_forward_hook(on_proj)]
    if want_input:
        handles.append(residual.register_forward_pre_hook(pre_residual, with_kwargs=True))
    return got, handles


@torch.no_grad()
def _run_layer(stream, index: int, sites: list, want_input: bool, stop: bool):
    """Run the stream's current layer on batch ``index`` with every site of ``sites`` captured:
    ``(output or None when stopped, {site: captured})``."""
    hooks = {site: _capture(stream.model, site, want_input, stop) for site in sites}
    out = None
    try:
        out = stream.run(index)
    except Stop:
        pass
    finally:
        for _, handles in hooks.values():
            for h in handles:
                h.remove()
    for site, (got, _) in hooks.items():
        if "y" not in got:
            raise HeadslimError(f"repair: the output projection of layer {site[0]}'s {site[1]} did not run")
    return out, {site: got for site, (got, _) in hooks.items()}


def _split(batches: list, holdout: float) -> tuple[list, list, dict]:
    """The batches to fit on and to hold out: ``(batches, is_held_out, held_out)``.

    Every ``round(1 / holdout)``-th batch is held out; with fewer batches than that, every such
    sample instead (at least one), each batch split into its fitted and its held-out rows. ``holdout``
    0 holds nothing out (the caller turns the checks off).
    """
    every = round(1 / holdout) if holdout > 0 else 0
    if not every:
        return batches, [False] * len(batches), {"unit": "none", "n_fit": len(batches), "n_held_out": 0}
    if len(batches) >= every:
        is_val = [i % every == every - 1 for i in range(len(batches))]
        return batches, is_val, {"unit": "batches", "n_fit": is_val.count(False), "n_held_out": is_val.count(True)}
    sizes = [len(b["attention_mask"]) for b in batches]
    total = sum(sizes)
    val = [i % every == every - 1 for i in range(total)]
    if not any(val) and total >= 2:
        val[-1] = True
    out, is_val, start = [], [], 0
    for batch, size in zip(batches, sizes):
        flags = torch.tensor(val[start:start + size])
        start += size
        for held in (False, True):
            rows = (flags == held).nonzero().flatten().to(batch["attention_mask"].device)
            if len(rows):
                out.append({k: v.index_select(0, rows) for k, v in batch.items()})
                is_val.append(held)
    return out, is_val, {"unit": "samples", "n_fit": val.count(False), "n_held_out": val.count(True)}


def site_columns(kind: str, kept: list[int], head_dim: int) -> torch.Tensor:
    """The dense output projection's input columns a site keeps: the kept heads' ``head_dim`` columns
    each (``attention``), or the kept neurons (``mlp``)."""
    from headslim.arch.stubs import head_rows

    return head_rows(kept, head_dim) if kind == "attention" else torch.tensor(kept, dtype=torch.long)


def repair_sites(plan: PrunePlan, bias_only_ok: bool) -> list[tuple[int, str]]:
    """``(layer, kind)`` of every output projection a repair re-fits: each that lost heads (``attention``)
    or FFN neurons (``mlp``), unless it lost all of them and the family keeps no bias-only projection."""
    sites = []
    for layer, (kept, n) in enumerate(zip(plan.kept_heads, plan.num_heads)):
        if len(kept) < n and (kept or bias_only_ok):
            sites.append((layer, "attention"))
        if plan.num_neurons is not None:
            kept_n, width = plan.kept_neurons[layer], plan.num_neurons[layer]
            if len(kept_n) < width and (kept_n or bias_only_ok):
                sites.append((layer, "mlp"))
    return sites


def repair(model, dense, plan: PrunePlan, batches, *, inputs: str = "pruned", ridge: float = 1e-2,
           holdout: float = 0.25, check: bool = True, progress: bool = True, spill: Spill | None = None) -> RepairReport:
    """Re-fit the output projection of every layer that lost heads, in place; see the module docstring.

    Args:
        model: the pruned model (after ``prune_heads(model, plan)``); only weight values change.
        dense: its dense original (unchanged).
        plan: the plan that was applied (which dense heads each layer kept).
        batches: calibration batches (dicts of tensors); a list or a re-iterable.
        inputs: ``pruned`` (sequential: inputs from the already repaired earlier layers) or ``dense``.
        ridge: regularisation towards the current weights, relative to the mean feature energy.
        holdout: share of the batches (of the samples, with fewer than ``1 / holdout`` batches) held
            out to decide per layer (and overall) whether to keep it; 0 turns both checks off.
        check: undo everything when the held-out outputs do not get closer to dense (``RepairReport.check``).
        progress: show a progress bar over layers.
        spill: where the carried streams (and a layer's outputs and fit references) go past its
            memory budget (:class:`headslim.layerwise.Spill`); None: all in memory.

    Returns: a :class:`RepairReport`.

    Example:
        >>> dense = copy.deepcopy(model); prune_heads(model, plan)        # doctest: +SKIP
        >>> repair(model, dense, plan, calib_batches).applied            # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    if inputs not in INPUTS:
        raise HeadslimError(f"repair inputs must be one of {', '.join(INPUTS)}, not {inputs!r}")
    if ridge < 0 or not 0.0 <= holdout < 1.0:
        raise HeadslimError("repair needs ridge >= 0 and holdout in [0, 1)")
    adapter = get_adapter(model)
    head_dim = adapter.head_dim(dense)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    if not batches:
        raise HeadslimError("repair needs calibration batches")
    n_batches, n_samples = len(batches), sum(len(b["attention_mask"]) for b in batches)
    batches, is_val, held_out = _split(batches, holdout)
    val_batches = [b for b, v in zip(batches, is_val) if v]
    report = RepairReport(applied=False, inputs=inputs, ridge=ridge, held_out=held_out)
    # a decoder layer that lost every head (or FFN neuron) has no output projection left (its bias stays)
    sites = repair_sites(plan, adapter.keeps_bias_projection)
    if not sites:
        return report
    if holdout > 0 and not val_batches:
        report.skipped = f"{n_samples} calibration sample leaves none to hold out to check the repair on"
        report.warning = f"repair skipped: {report.skipped}; give more calibration data"
        return report
    if held_out["unit"] == "samples":
        n_val = held_out["n_held_out"]
        report.warning = (f"calibration data is small ({n_samples} samples in {n_batches} "
                          f"batch{'es' if n_batches > 1 else ''}): repair is checked on {n_val} held-out "
                          f"sample{'s' if n_val > 1 else ''} instead of held-out batches")
    proj = {site: _site_modules(model, site)[0] for site in sites}
    originals = {site: _o_weight(proj[site]) for site in sites}
    checked = check and bool(val_batches)
    dense_cache: dict = {}  # the held-out check's dense embeddings, computed once for before and after
    if checked:
        metric, before = fidelity(model, dense, val_batches, dense_cache)
    # under torchrun each rank fits on its own batches and the moments are summed over the ranks
    distributed.check_batches(len(batches))
    own = [i for i in range(len(batches)) if distributed.mine(i)]
    local, local_val = [batches[i] for i in own], [is_val[i] for i in own]
    # every layer's inputs computed once and carried forward: the dense model's stream, and the pruned
    # model's through the layers already repaired (cost linear in depth, not quadratic)
    dense_stream = Stream(dense, local, spill=spill)
    pruned_stream = Stream(model, local, calls=dense_stream.calls, spill=spill) if inputs == "pruned" else None
    masks = [batch["attention_mask"].bool() for batch in local]  # (B, T)
    bar = tqdm(total=len(sites), desc="repairing layers", unit="projection", disable=not progress, leave=False)
    last = max(layer for layer, _ in sites)
    with torch.no_grad():
        for layer in range(last + 1):
            here = [site for site in sites if site[0] == layer]
            refs, outputs, widths = {site: Store(spill) for site in here}, Store(spill), {}
            for i, mask in enumerate(masks):  # the dense layer once: every site's reference and its output
                out, got = _run_layer(dense_stream, i, here, want_input=inputs == "pruned", stop=False)
                outputs.append(out)
                for site in here:
                    g = got[site]
                    m = mask.to(g["y"].device)  # --device-map: the layer's device, not the inputs'
                    if inputs == "pruned":
                        # the residual can be captured on its way in, before accelerate moves it to the layer
                        refs[site].append((g["y"] + g["x"].to(g["y"].device))[m])  # (N, d)
                    else:  # [c | y], (N, p_dense + d): one stored tensor per batch
                        widths[site] = g["c"].shape[-1]
                        refs[site].append(torch.cat([g["c"][m], g["y"][m].to(g["c"].dtype)], dim=1))
                del got
            for site in here:
                _, kind = site
                bias = _has_bias(proj[site])
                kept = plan.kept_heads[layer] if kind == "attention" else plan.kept_neurons[layer]
                w0 = originals[site]
                fit, val = _empty(w0), _empty(w0)
                for i, (mask, v) in enumerate(zip(masks, local_val)):
                    if inputs == "pruned":
                        cur = _run_layer(pruned_stream, i, [site], want_input=True, stop=True)[1][site]
                        m = mask.to(cur["c"].device)
                        x = cur["c"][m] if kept else cur["c"][m][:, :0]  # (N, p)
                        t = refs[site][i].to(x.device) - cur["x"].to(x.device)[m]  # (N, d): y_dense + x_dense - x_pruned
                    else:
                        cols = site_columns(kind, kept, head_dim)
                        c, t = refs[site][i].split([widths[site], refs[site].meta(i)[1][1] - widths[site]], dim=1)
                        x = c[:, cols.to(c.device)]  # (N, p)
                    _add(val if v else fit, x, t, bias)
                refs[site].clear()
                for stats in (fit, val):
                    stats["A"], stats["B"], stats["C"] = distributed.all_sum(stats["A"], stats["B"], stats["C"])
                w_fit = _solve(fit, w0, ridge, bias)
                entry = {"layer": layer, "kind": kind, ("heads" if kind == "attention" else "neurons"): len(kept),
                         "fit_before": _error(w0, fit) / max(fit["C"], 1e-30),
                         "fit_after": _error(w_fit, fit) / max(fit["C"], 1e-30)}
                apply = True
                if any(is_val):
                    entry["val_before"] = _error(w0, val) / max(val["C"], 1e-30)
                    entry["val_after"] = _error(w_fit, val) / max(val["C"], 1e-30)
                    apply = entry["val_after"] < entry["val_before"]
                    if apply:  # refit on every batch now that the held-out ones have done their job
                        w_fit = _solve({k: fit[k] + val[k] for k in fit}, w0, ridge, bias)
                entry["applied"] = bool(apply)
                if apply:
                    _set_o_weight(proj[site], w_fit)
                report.layers.append(entry)
                bar.update()
            if layer < last:
                dense_stream.advance(outputs)
                if pruned_stream is not None:
                    pruned_stream.advance()
    bar.close()
    report.applied = any(e["applied"] for e in report.layers)
    if checked:  # recorded even when no layer kept its fit: the report says the repair was checked
        after = fidelity(model, dense, val_batches, dense_cache)[1] if report.applied else before
        report.check = {"metric": metric, "before": before, "after": after, "n_batches": len(val_batches),
                        "n_held_out": held_out["n_held_out"], "unit": held_out["unit"]}
        if report.applied and ((after <= before) if metric == "cosine" else (after >= before)):
            for site in sites:
                _set_o_weight(proj[site], originals[site])
            report.applied = False
            for e in report.layers:
                e["applied"] = False
    return report

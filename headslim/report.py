"""Tables (terminal and Markdown) and PNG plots for ``bench``, ``eval`` and ``sweep`` results.

matplotlib is imported only when a plot is drawn, with the non-interactive Agg backend; without
matplotlib the plot is left out (the function returns ``None``) and everything else is written.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def text_table(headers: list[str], rows: list[list]) -> str:
    """A right-aligned plain-text table.

    Example:
        >>> print(text_table(["a", "bb"], [[1, 2.5]]))
        a     bb
        1  2.500
    """
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"
    return "-" if v is None else str(v)


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (and no display needed on servers)
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# bench

BENCH_HEADERS = ["backend", "batch", "seq", "dense p50 ms", "pruned p50 ms", "pruned/dense", "speed-up",
                 "ideal", "dense p90", "pruned p90", "dense samples/s", "pruned samples/s", "runs"]


DECODER_HEADERS = ["backend", "batch", "prompt", "dense prefill ms", "pruned prefill ms", "prefill x", "FLOP-ideal",
                   "dense tok/s", "pruned tok/s", "decode x", "byte-ideal", "runs"]


def _causal_lm(result: dict) -> bool:
    return result.get("settings", {}).get("task") == "causal-lm"


def _decoder_rows(result: dict) -> list[list]:
    """Prefill p50 (ms) and decode tokens/s (median run), dense vs pruned, with their ideals."""
    rows = []
    for p in result["points"]:
        a = p["analytic"]
        if p.get("status") != "ok":
            rows.append([p["backend"], p["batch"], p["prompt"], "failed", "", "", a["ideal_prefill_speedup"], "", "",
                         "", a["ideal_decode_speedup"], ""])
            continue
        d, q = p["dense"], p["pruned"]
        rows.append([p["backend"], p["batch"], p["prompt"], d["prefill_p50_ms"], q["prefill_p50_ms"],
                     p["prefill_speedup"], a["ideal_prefill_speedup"], d["decode_tokens_per_s"],
                     q["decode_tokens_per_s"], p["decode_speedup"], a["ideal_decode_speedup"],
                     f"{d['runs']}/{q['runs']}"])
    return rows


def _bench_rows(result: dict) -> list[list]:
    rows = []
    for p in result["points"]:
        if p.get("status") != "ok":
            rows.append([p["backend"], p["batch"], p["seq"], "failed", "", "", "", p["analytic"]["ideal_speedup"],
                         "", "", "", "", ""])
            continue
        d, q = p["dense"], p["pruned"]
        rows.append([p["backend"], p["batch"], p["seq"], d["p50_ms"], q["p50_ms"], p["ratio_p50"], p["speedup_p50"],
                     p["analytic"]["ideal_speedup"], d["p90_ms"], q["p90_ms"], d["samples_per_s"],
                     q["samples_per_s"], f"{d['runs']}/{q['runs']}"])
    return rows


def _skipped(result: dict) -> list[str]:
    lines = [f"{b['name']}: {b['status']}: {b['reason']}" for b in result["backends"] if b["status"] != "ok"]
    lines += [f"{p['backend']} batch {p['batch']} {'prompt ' + str(p['prompt']) if 'prompt' in p else 'seq ' + str(p['seq'])}: "
              f"failed: {p['reason']}" for p in result["points"] if p.get("status") != "ok"]
    return lines


def bench_table(result: dict) -> str:
    """The terminal table of a bench result, with skipped backends listed below it."""
    m = result["models"]
    head = (f"dense {m['dense']['path']} ({m['dense']['params']:,} params, {sum(m['dense']['heads'])} heads) vs "
            f"pruned {m['pruned']['path']} ({m['pruned']['params']:,} params, {sum(m['pruned']['heads'])} heads); "
            f"{result['settings']['threads']} threads")
    if _causal_lm(result):
        head += f"; {result['settings']['run']}"
        lines = [head, text_table(DECODER_HEADERS, _decoder_rows(result))]
    else:
        lines = [head, text_table(BENCH_HEADERS, _bench_rows(result))]
    lines += _skipped(result)
    return "\n".join(lines)


def bench_markdown(result: dict, plot_name: str | None = None) -> str:
    """A Markdown report: machine, settings, models, the table, skipped backends and the plot."""
    mach, s, m = result["machine"], result["settings"], result["models"]
    versions = ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
    out = [
        "# headslim bench", "",
        f"Measured {result['created']} on {mach['cpu']} ({mach['usable_cores']} usable of {mach['logical_cores']} "
        f"logical cores){'; GPU ' + mach['gpu'] if mach.get('gpu') else ''}; {mach['platform']}.", "",
        f"Versions: {versions}.", "",
        f"Settings: torch/triton in {s.get('dtype', 'float32')}, {s['threads']} threads, {s['warmup']} warm-up runs, at least {s['min_runs']} runs and "
        f"{s['min_seconds']} s per point, {s['inputs']}, {s['order']}.", "",
        markdown_table(["model", "path", "parameters", "heads", "layer params (analytic)"],
                       [[role, f"`{m[role]['path']}`", f"{m[role]['params']:,}", sum(m[role]["heads"]),
                         f"{m[role]['encoder_params']['total']:,}"] for role in ("dense", "pruned")]), "",
    ]
    if _causal_lm(result):
        kv = ", ".join(f"{role} {m[role]['cache_kv_heads']}" for role in ("dense", "pruned"))
        out += [f"Each run: {s['run']}. Prefill: p50 in ms, x = dense / pruned, FLOP-ideal = dense / pruned "
                "prefill FLOPs (LM head at the positions the backend computes: the last one in torch, as "
                "generate does; every prompt position in the exported ONNX graph). Decode: tokens/s of the median "
                "run (batch x new tokens / decode time), x = pruned / dense, byte-ideal = dense / pruned bytes read "
                "per step (weights + KV cache at the mean past length; decode at small batch is memory-bound).", "",
                f"KV heads cached per layer: {kv}.", "",
                markdown_table(DECODER_HEADERS, _decoder_rows(result)), ""]
    else:
        out += ["Latency in ms (p50/p90 per forward pass); speed-up = dense p50 / pruned p50; ideal = dense / pruned "
                "encoder FLOPs.", "",
                markdown_table(BENCH_HEADERS, _bench_rows(result)), ""]
    skipped = _skipped(result)
    if skipped:
        out += ["Not measured:", ""] + [f"- {line}" for line in skipped] + [""]
    if plot_name:
        out += [f"![speed-up per shape]({plot_name})", ""]
    return "\n".join(out)


def bench_plot(result: dict, path: Path) -> Path | None:
    """Measured speed-up per shape for every backend, with the ideal (FLOP) speed-up as a dashed line."""
    plt = _pyplot()
    points = [p for p in result["points"] if p.get("status") == "ok"]
    if plt is None or not points or _causal_lm(result):  # the decoder table carries two ratios per point
        return None
    shapes = sorted({(p["seq"], p["batch"]) for p in result["points"]})
    labels = [f"b{b}\ns{s}" for s, b in shapes]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shapes) + 3), 4.5))
    for name in dict.fromkeys(p["backend"] for p in points):
        xs = [shapes.index((p["seq"], p["batch"])) for p in points if p["backend"] == name]
        ys = [p["speedup_p50"] for p in points if p["backend"] == name]
        ax.plot(xs, ys, marker="o", label=name)
    ideal = {(p["seq"], p["batch"]): p["analytic"]["ideal_speedup"] for p in result["points"]}
    ax.plot(range(len(shapes)), [ideal[s] for s in shapes], "k--x", label="ideal (FLOPs)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(shapes)), labels)
    ax.set_ylabel("speed-up (dense p50 / pruned p50)")
    ax.set_title(f"pruned {sum(result['models']['pruned']['heads'])} vs dense "
                 f"{sum(result['models']['dense']['heads'])} heads, {result['settings']['threads']} threads")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# eval

def eval_rows(result: dict) -> list[list]:
    """``[metric, value]`` rows of an eval result (numbers only, nested dicts flattened)."""
    rows = []
    for key, value in result["metrics"].items():
        if isinstance(value, dict):
            rows += [[f"{key}.{k}", v] for k, v in value.items() if isinstance(v, (int, float))]
        elif isinstance(value, (int, float)):
            rows.append([key, value])
    return rows


def eval_markdown(result: dict) -> str:
    return "\n".join([
        "# headslim eval", "",
        f"Task: {result['task']}; pruned `{result['pruned']}` vs dense `{result['baseline']}`; data: {result['data']}.", "",
        markdown_table(["metric", "value"], eval_rows(result)), "",
    ])


# ----------------------------------------------------------------------------------------------
# sweep

SWEEP_HEADERS = ["prune", "heads", "params", "quality", "dense p50 ms", "pruned p50 ms", "speed-up", "ideal", "pareto"]


def _sweep_rows(result: dict) -> list[list]:
    rows = []
    for r in result["rows"]:
        lat = r.get("latency") or {}
        rows.append([f"{r['prune']:g}", r["heads"], f"{r['params']:,}", r["quality"], lat.get("dense_p50_ms"),
                     lat.get("pruned_p50_ms"), lat.get("speedup_p50"), r.get("ideal_speedup"),
                     "yes" if r.get("pareto") else ""])
    return rows


def _by_target(result: dict) -> bool:
    """Whether the sweep was of speed-up targets (``--target-speedup``) rather than ratios."""
    return result["settings"].get("target_speedups") is not None


def _target_headers(result: dict) -> list[str]:
    shapes = [f"speed-up b{b} s{s}" for b, s in result["settings"]["shapes"]]
    return ["target", *shapes, "estimated", "met", "quality", "heads", "neurons", "params", "pareto (per shape)"]


def _target_rows(result: dict) -> list[list]:
    """One row per target: measured speed-up per shape (dense p50 / pruned p50), the planner's estimates
    (per shape, joined), whether every shape met the target, quality, heads and FFN neurons kept."""
    n_shapes, rows = len(result["settings"]["shapes"]), []
    for i, r in enumerate(result["rows"]):
        if "unreachable" in r:
            rows.append([f"{r['target']:g}", "unreachable"] + [""] * (n_shapes + 6))
            continue
        dense = i == 0
        speeds = [m["speedup"] for m in r["measured"]] if r.get("measured") else [None] * n_shapes
        estimated = "-" if dense else " / ".join(f"{e:.2f}" for e in r["estimated"])
        rows.append(["dense" if dense else f"{r['target']:g}", *speeds, estimated,
                     "" if dense else "yes" if r["met"] else "no", r["quality"], r["heads"], r["neurons"],
                     f"{r['params']:,}", " / ".join("yes" if on else "no" for on in r.get("pareto", []))])
    return rows


def _unreachable(result: dict) -> list[str]:
    return [f"target {r['target']:g}: unreachable: {r['unreachable']}" for r in result["rows"] if "unreachable" in r]


def sweep_table(result: dict) -> str:
    if _by_target(result):
        runtime = result["settings"]["runtime"]
        return "\n".join([f"quality = {result['quality_metric']}; speed-up = dense p50 / pruned p50 on {runtime}, "
                          "interleaved", text_table(_target_headers(result), _target_rows(result)),
                          *_unreachable(result)])
    return f"quality = {result['quality_metric']}\n" + text_table(SWEEP_HEADERS, _sweep_rows(result))


def sweep_markdown(result: dict, plot_name: str | None = None) -> str:
    if _by_target(result):
        return _target_markdown(result, plot_name)
    s = result["settings"]
    out = [
        "# headslim sweep", "",
        f"Model `{result['model']}`, scored once with {s['method']} on {result['calibration']}; "
        f"quality = {result['quality_metric']} on {result['eval_data']}; latency: {s['backend']}, batch {s['batch']}, "
        f"seq {s['seq']}, {result['threads']} threads, dense and pruned interleaved.", "",
        markdown_table(SWEEP_HEADERS, _sweep_rows(result)), "",
    ]
    if result.get("notes"):
        out += [f"- {n}" for n in result["notes"]] + [""]
    if plot_name:
        out += [f"![quality vs latency]({plot_name})", ""]
    return "\n".join(out)


def _target_markdown(result: dict, plot_name: str | None) -> str:
    s, speed = result["settings"], result.get("speed", {})
    structures = {"both": "heads and FFN neurons", "heads": "heads", "ffn": "FFN neurons"}[s["target_structures"]]
    exchange = "fitted per target" if s["exchange"] is None else f"{s['exchange']:g}"
    dense_ms = ", ".join(f"{m['dense_ms']:.2f} ms at batch {m['batch']} x seq {m['seq']}"
                         for m in result["rows"][0].get("measured") or [])
    out = [
        "# headslim sweep: speed-up targets", "",
        f"Model `{result['model']}`; {structures} priced by latency tables on {s['runtime']} and by "
        f"{s['speed_method']} costs, scored once on {result['calibration']} (head price {exchange}); "
        f"quality = {result['quality_metric']} on {result['eval_data']}. Speed-up = dense p50 / pruned p50 of the "
        f"written checkpoint, interleaved on {s['runtime']}, {result['threads']} threads; estimated = the "
        "planner's, per shape; met = every shape reached the target.", "",
        markdown_table(_target_headers(result), _target_rows(result)), "",
    ]
    if dense_ms:
        out += [f"Dense: {dense_ms} (median of its runs beside every target).", ""]
    if speed.get("tables"):
        out += ["Latency tables: " + ", ".join(f"`{t}`" for t in speed["tables"]) + ".", ""]
    notes = _unreachable(result) + result.get("notes", [])
    if notes:
        out += [f"- {n}" for n in notes] + [""]
    if plot_name:
        out += [f"![quality vs measured speed-up]({plot_name})", ""]
    return "\n".join(out)


def _target_plot(result: dict, path: Path, plt) -> Path | None:
    """Quality against measured speed-up, one panel per shape, each with its Pareto front."""
    rows = [r for r in result["rows"] if r.get("measured")]
    if len(rows) < 2:  # the dense row alone: nothing to compare
        return None
    shapes = result["settings"]["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.0 * len(shapes) + 1, 4.5), sharey=True, squeeze=False)
    for i, ((batch, seq), ax) in enumerate(zip(shapes, axes[0])):
        xs, ys = [r["measured"][i]["speedup"] for r in rows], [r["quality"] for r in rows]
        ax.scatter(xs, ys, color="tab:blue", zorder=3)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate("dense" if r is result["rows"][0] else f"{r['target']:g}", (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize="small")
        front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r["pareto"][i])
        ax.plot(*zip(*front), color="tab:orange", marker="o", zorder=4, label="Pareto front")
        ax.set_title(f"batch {batch} x seq {seq}")
        ax.set_xlabel(f"measured speed-up, {result['settings']['runtime']}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(result["quality_metric"])
    axes[0][0].legend(fontsize="small")
    fig.suptitle("headslim sweep: quality vs measured speed-up")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sweep_plot(result: dict, path: Path) -> Path | None:
    """Quality against pruned p50 latency, one point per ratio, the Pareto front joined by a line; for
    speed-up targets, quality against measured speed-up, one panel per shape."""
    plt = _pyplot()
    if _by_target(result):
        return None if plt is None else _target_plot(result, path, plt)
    rows = [r for r in result["rows"] if r.get("latency")]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs, ys = [r["latency"]["pruned_p50_ms"] for r in rows], [r["quality"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate("dense" if r["prune"] == 0 else f"{r['prune']:g}", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize="small")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["latency"]["pruned_p50_ms"])
    ax.plot([r["latency"]["pruned_p50_ms"] for r in front], [r["quality"] for r in front], color="tab:orange",
            marker="o", zorder=4, label="Pareto front")
    ax.set_xlabel(f"latency p50 (ms), {result['settings']['backend']}, batch {result['settings']['batch']}, "
                  f"seq {result['settings']['seq']}")
    ax.set_ylabel(result["quality_metric"])
    ax.set_title("headslim sweep: quality vs latency")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

"""Held-out perplexity of the trained decoder test bed, dense vs pruned (issue 17).

    python bench/decoder_quality.py --model /work/testbed-decoder --out bench/results/decoder_testbed

Drives the real CLI once per cell: ``python -m headslim shrink MODEL --calib bbc-news --method M
--gqa G --prune P [--no-repair] --seed S --calib-samples N --eval-samples E --json``. With
``--calib bbc-news`` shrink calibrates on the BBC *training* articles and reports perplexity on the
BBC *test* articles (``headslim.pipeline._split_eval``), first ``--max-length`` (128) tokens of each.

Rows go to ``OUT/quality.jsonl`` as they finish (a rerun skips rows already there, errors included
unless ``--retry-errors``); ``OUT/quality.md`` is rendered from the file at the end (``--render``
renders only). A cell headslim refuses (a ratio a GQA mode cannot meet, a crash) is a row with the
one-line error. ``random`` is run with several seeds (``--random-seeds``); shrink's ``--seed`` also
draws the calibration subset, so the random rows' spread covers both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from headslim.onnx_utils import cpu_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHOD = "fisher"


def row_key(r: dict) -> tuple:
    return (float(r["prune"]), r["gqa"], r["method"], int(r["seed"]), bool(r["repair"]))


def load_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by an interrupted write: that cell is run again
    return rows


def one_line_error(stderr: str, rc: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("headslim: error:"):
            return ln
    return lines[-1] if lines else f"exit status {rc}, no message"


def run_cell(args, prune: float, gqa: str, method: str, seed: int, repair: bool, work: Path) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"p{prune}_{gqa}_{method}_s{seed}_", dir=work))  # ours to delete
    out = scratch / "slim"
    cmd = [sys.executable, "-m", "headslim", "shrink", str(args.model), "--out", str(out), "--calib", "bbc-news",
           "--method", method, "--gqa", gqa, "--prune", str(prune), "--seed", str(seed),
           "--calib-samples", str(args.calib_samples), "--eval-samples", str(args.eval_samples),
           "--json", "--no-progress"] + ([] if repair else ["--no-repair"])
    row = {"prune": prune, "gqa": gqa, "method": method, "seed": seed, "repair": repair,
           "command": shlex.join(["python"] + cmd[1:])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.cell_timeout,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})  # ./kernels would shadow PyPI `kernels`
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["rc"] = proc.returncode
    warnings = [ln.strip() for ln in proc.stderr.splitlines() if "warning" in ln.lower()]
    if warnings:
        row["warnings"] = warnings[:5]
    if proc.returncode != 0:
        row["error"] = one_line_error(proc.stderr, proc.returncode)
    else:
        try:
            res = json.loads(proc.stdout[proc.stdout.index("{"):])
        except (ValueError, json.JSONDecodeError) as e:
            row["error"] = f"could not read shrink's JSON: {e}"
            res = None
        if res is not None:
            q, plan, rep = res["quality"], res["plan"], res.get("repair", {})
            att = plan.get("attention", plan)
            kv_map = att.get("kv_head_of_q")
            row.update({
                "ppl_dense": q["perplexity_dense"], "ppl_pruned": q["perplexity_pruned"],
                "ppl_ratio": q["perplexity_pruned"] / q["perplexity_dense"],
                "eval_texts": q["n"], "eval_tokens": q["n_tokens"], "eval_source": q["source"],
                "heads_before": res["heads_before"], "heads_after": res["heads_after"],
                "heads_removed": sum(res["heads_before"]) - sum(res["heads_after"]),
                "kv_heads_after": ([len({m[h] for h in kept}) for m, kept in zip(kv_map, att["kept_heads"])]
                                   if kv_map else None),
                "params_before": res["params_before"], "params_after": res["params_after"],
                "calib_source": plan.get("provenance", {}).get("calibration", {}).get("source"),
                "calib_n": plan.get("provenance", {}).get("calibration", {}).get("n_samples"),
                "seconds": res.get("seconds"),
                "repair_applied": bool(rep.get("applied")),
                "repair_layers_applied": sum(1 for e in rep.get("layers", []) if e.get("applied")),
                "repair_layers": len(rep.get("layers", [])),
                "repair_check": rep.get("check"),
                "repair_skipped": rep.get("skipped"),
            })
    shutil.rmtree(scratch, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------------------------
# Rendering


def fmt_cell(rows: list[dict], dense: float | None) -> str:
    ok = [r for r in rows if "ppl_pruned" in r]
    errs = [r for r in rows if "error" in r]
    if not rows:
        return "not run"
    if not ok:
        return "error: " + errs[0]["error"].replace("|", "\\|")
    vals = [r["ppl_pruned"] for r in ok]
    ratio = (lambda v: f" (x{v / dense:.3f})") if dense else (lambda v: "")
    if len(ok) == 1 and not errs:
        s = f"{vals[0]:.2f}{ratio(vals[0])}"
    else:
        m = statistics.fmean(vals)
        s = f"{m:.2f}{ratio(m)} [{min(vals):.2f}-{max(vals):.2f}, n={len(ok)}]"
        if errs:
            s += f"; {len(errs)} error(s)"
    heads = {r["heads_removed"] for r in ok}
    if len(heads) == 1:
        s += f"; -{heads.pop()} h"
    if any(r["repair"] and not r.get("repair_applied") for r in ok):
        n_undone = sum(1 for r in ok if r["repair"] and not r.get("repair_applied"))
        s += f"; repair undone{'' if len(ok) == 1 else f' in {n_undone}'}"
    return s


def render(rows: list[dict], args, total_heads: int | None) -> str:
    import torch
    import transformers

    rows = sorted(rows, key=row_key)
    dense_vals = sorted({round(r["ppl_dense"], 6) for r in rows if "ppl_dense" in r})
    dense = next((r["ppl_dense"] for r in rows if "ppl_dense" in r), None)
    gqas = [g for g in args.gqa if any(r["gqa"] == g for r in rows)]
    order = [DEFAULT_METHOD] + sorted(m for m in args.methods if m not in (DEFAULT_METHOD, "random")) + ["random"]
    methods = [m for m in order if any(r["method"] == m for r in rows)]
    ratios = [p for p in args.ratios if any(float(r["prune"]) == p for r in rows)]
    any_ok = next((r for r in rows if "eval_texts" in r), {})
    cmd = " ".join(["python", "bench/decoder_quality.py", *map(shlex.quote, sys.argv[1:])])
    L = ["# Decoder test bed: held-out perplexity, dense vs pruned (issue 17)", ""]
    L.append(f"- model: `{args.model}` (trained here by `bench/decoder_testbed.py`; see `training.md`; "
             f"not a real pretrained model)")
    L.append(f"- machine: {cpu_name()}, {os.cpu_count()} cores visible, no GPU; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, Python {platform.python_version()}")
    L.append(f"- date: {datetime.date.today().isoformat()}")
    L.append(f"- command: `{cmd}`")
    L.append(f"- each cell: `python -m headslim shrink MODEL --out TMP --calib bbc-news --method M --gqa G --prune P "
             f"--seed S --calib-samples {args.calib_samples} --eval-samples {args.eval_samples} --json --no-progress "
             f"[--no-repair]` (exact command per row in `quality.jsonl`)")
    L.append(f"- calibration: {args.calib_samples} BBC News *training* articles (`--seed` draws them; seed 0 "
             f"except random's seeds {', '.join(map(str, args.random_seeds))}); evaluation: "
             f"{any_ok.get('eval_texts', '?')} texts of `{any_ok.get('eval_source', '?')}`, first 128 tokens each "
             f"({any_ok.get('eval_tokens', '?')} predicted tokens), the same for every row")
    if dense is not None:
        L.append(f"- **dense perplexity: {dense:.3f}**" +
                 ("" if len(dense_vals) <= 1 else f" (rows disagree: {dense_vals})"))
    L.append("")
    L.append("Cells: pruned perplexity (x ratio to dense); `-N h`: query heads headslim removed (of "
             f"{total_heads if total_heads else '?'}); random: mean [min-max, n seeds]; "
             "`repair undone`: shrink's held-out check rejected the re-fit, so the row equals repair off.")
    for p in ratios:
        L += ["", f"## {int(round(p * 100))} % of query heads removed (`--prune {p}`)", ""]
        L.append("| scorer | repair | " + " | ".join(gqas) + " |")
        L.append("|---|---|" + "---|" * len(gqas))
        for m in methods:
            for rep in (True, False):
                cells = []
                for g in gqas:
                    sel = [r for r in rows if float(r["prune"]) == p and r["gqa"] == g and r["method"] == m
                           and bool(r["repair"]) == rep]
                    cells.append(fmt_cell(sel, dense))
                name = m + (" (default)" if m == DEFAULT_METHOD else "")
                L.append(f"| {name} | {'on' if rep else 'off'} | " + " | ".join(cells) + " |")
        # per-layer heads kept, as headslim reported them (one line per gqa mode, from the default's row)
        for g in gqas:
            r = next((r for r in rows if float(r["prune"]) == p and r["gqa"] == g and r["method"] == DEFAULT_METHOD
                      and r["repair"] and "heads_after" in r), None)
            if r:
                kv = f", KV heads kept {r['kv_heads_after']}" if r.get("kv_heads_after") else ""
                L.append(f"\n{g}, {DEFAULT_METHOD}: query heads kept per layer {r['heads_after']}{kv}")
    # computed verdict: default (repair on, as shrink runs by default) vs random's mean and best draw
    L += ["", "## Does the default beat random?", ""]
    verdict_all, lines = True, []
    for rep in (True, False):
        for p in ratios:
            for g in gqas:
                d = [r for r in rows if float(r["prune"]) == p and r["gqa"] == g and r["method"] == DEFAULT_METHOD
                     and bool(r["repair"]) == rep and "ppl_pruned" in r]
                rnd = [r["ppl_pruned"] for r in rows if float(r["prune"]) == p and r["gqa"] == g
                       and r["method"] == "random" and bool(r["repair"]) == rep and "ppl_pruned" in r]
                if not d or not rnd:
                    lines.append(f"- repair {'on' if rep else 'off'}, {int(p * 100)} %, {g}: not comparable "
                                 f"({'no default row' if not d else 'no random row'})")
                    if rep:
                        verdict_all = False
                    continue
                v = d[0]["ppl_pruned"]
                beats_mean, beats_all = v < statistics.fmean(rnd), v < min(rnd)
                if rep and not beats_mean:
                    verdict_all = False
                lines.append(f"- repair {'on' if rep else 'off'}, {int(p * 100)} %, {g}: {DEFAULT_METHOD} {v:.2f} vs "
                             f"random mean {statistics.fmean(rnd):.2f} (best draw {min(rnd):.2f}, n={len(rnd)}): "
                             f"{'beats' if beats_mean else 'does NOT beat'} the mean, "
                             f"{'beats' if beats_all else 'does NOT beat'} every draw")
    L.append(f"**Default (`{DEFAULT_METHOD}`, repair on) beats random's mean at every ratio in every GQA mode: "
             f"{'YES' if verdict_all else 'NO'}** (computed from the rows below; a missing or failed cell counts as no).")
    L.append("")
    L += lines
    errs = [r for r in rows if "error" in r]
    if errs:
        L += ["", "## Errors (one line each)", ""]
        for r in errs:
            L.append(f"- `{r['command']}`: {r['error']}")
    L += ["", "## Every row", "",
          "| prune | gqa | scorer | seed | repair | ppl pruned | x dense | query heads kept per layer | KV heads kept | "
          "repair (layers re-fitted; held-out check before -> after) | s |",
          "|---:|---|---|---:|---|---:|---:|---|---|---|---:|"]
    for r in rows:
        if "ppl_pruned" in r:
            chk = r.get("repair_check") or {}
            if not r["repair"]:
                rep = "off"
            elif r.get("repair_skipped"):
                rep = f"skipped ({r['repair_skipped']})"
            else:
                rep = (f"{'applied' if r.get('repair_applied') else 'undone'} "
                       f"({r.get('repair_layers_applied')}/{r.get('repair_layers')}"
                       + (f"; {chk.get('metric', '?')} {chk.get('before', float('nan')):.4g} -> {chk.get('after', float('nan')):.4g}"
                          if chk else "") + ")")
            L.append(f"| {r['prune']} | {r['gqa']} | {r['method']} | {r['seed']} | {'on' if r['repair'] else 'off'} | "
                     f"{r['ppl_pruned']:.3f} | {r['ppl_pruned'] / r['ppl_dense']:.3f} | {r['heads_after']} | "
                     f"{r.get('kv_heads_after') or '-'} | {rep} | {r.get('wall_s', '')} |")
        else:
            L.append(f"| {r['prune']} | {r['gqa']} | {r['method']} | {r['seed']} | {'on' if r['repair'] else 'off'} | "
                     f"error | | | | {r.get('error', '').replace('|', '/')} | {r.get('wall_s', '')} |")
    secs = [r["wall_s"] for r in rows if "wall_s" in r]
    if secs:
        L += ["", f"{len(rows)} rows, {sum(secs) / 60:.1f} min of shrink runs in all "
                  f"(median {statistics.median(secs):.0f} s per row, wall clock, machine shared)."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/work/testbed-decoder")
    p.add_argument("--out", default=str(REPO / "bench/results/decoder_testbed"))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--gqa", nargs="+", default=["uniform", "kv-groups", "ragged"])
    p.add_argument("--methods", nargs="+", default=["fisher", "random", "obs", "gradient", "magnitude"],
                   help="run in this order, method by method (the table lists them default first, random last)")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=256,
                   help="BBC test articles for the perplexity (shrink's default 256, the same ones in every row; 422 = all)")
    p.add_argument("--cell-timeout", type=float, default=900)
    p.add_argument("--retry-errors", action="store_true")
    p.add_argument("--render", action="store_true", help="only render quality.md from quality.jsonl")
    p.add_argument("--work", default="/tmp/decoder_quality_runs", help="scratch dir for the pruned checkpoints")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "quality.jsonl"
    rows = load_rows(jsonl)
    if not args.render:
        if not Path(args.model, "config.json").is_file():
            print(f"error: {args.model} has no config.json (train it with bench/decoder_testbed.py)", file=sys.stderr)
            return 2
        if args.retry_errors:
            rows = [r for r in rows if "error" not in r]
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = {row_key(r) for r in rows}
        cells = [(pr, g, m, s, rep) for m in args.methods for pr in args.ratios for g in args.gqa
                 for s in (args.random_seeds if m == "random" else [0]) for rep in (True, False)]
        todo = [c for c in cells if (float(c[0]), c[1], c[2], c[3], c[4]) not in done]
        print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {jsonl}, {len(todo)} to run", flush=True)
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for i, (pr, g, m, s, rep) in enumerate(todo, 1):
            try:
                row = run_cell(args, pr, g, m, s, rep, work)
            except subprocess.TimeoutExpired:
                row = {"prune": pr, "gqa": g, "method": m, "seed": s, "repair": rep,
                       "error": f"timed out after {args.cell_timeout:.0f} s"}
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            res = (f"ppl {row['ppl_dense']:.3f} -> {row['ppl_pruned']:.3f}, -{row['heads_removed']} heads, "
                   f"repair {'applied' if row.get('repair_applied') else 'not applied' if rep else 'off'}"
                   if "ppl_pruned" in row else row.get("error"))
            print(f"[{i}/{len(todo)}] prune {pr} {g} {m} seed {s} repair {'on' if rep else 'off'}: {res} "
                  f"({row.get('wall_s', '?')} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
    total_heads = None
    try:
        cfg = json.loads(Path(args.model, "config.json").read_text())
        total_heads = cfg["num_attention_heads"] * cfg["num_hidden_layers"]
    except (OSError, KeyError, ValueError):
        pass
    (out / "quality.md").write_text(render(rows, args, total_heads))
    print(f"wrote {out / 'quality.md'} ({len(rows)} rows)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

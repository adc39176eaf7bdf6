"""The ``headslim`` command line: ``shrink`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from headslim._version import __version__
from headslim.args import add_ffn_arguments, add_speed_arguments, config_from_args, prune_arg
from headslim.data import DEFAULT_CALIB_SAMPLES, TARGET_CALIB_SAMPLES
from headslim.errors import HeadslimError

LAYERWISE_CALIB_SAMPLES = 128  # headslim.offload's (not imported here: it imports torch)

SHRINK_EXAMPLE = """example:
  headslim shrink all-MiniLM-L6-v2 --prune 0.5 --calib bbc-news --out slim/
  headslim shrink PATH/TO/MODEL --prune 36 --calib texts.txt --out slim/ --method random
  headslim shrink all-MiniLM-L6-v2 --prune-heads 0.5 --prune-ffn 0.3 --calib bbc-news --out slim/
  python -c "import headslim; m = headslim.load_pruned('slim/')"
"""


def _add_shrink(sub) -> None:
    p = sub.add_parser("shrink", help="score heads, remove the least important, save a smaller checkpoint",
                       epilog=SHRINK_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="dense checkpoint dir (safetensors), or 'all-MiniLM-L6-v2' for the bundled one")
    req.add_argument("--out", required=True, help="output checkpoint dir (must not exist unless --overwrite)")
    opt = p.add_argument_group("optional")
    opt.add_argument("--prune", "--prune-heads", dest="prune", type=prune_arg, default=None,
                     help="fraction of all heads to remove, in (0, 1), or a whole head count (default 0.5; "
                          "0 with --prune-ffn: FFN neurons only)")
    add_ffn_arguments(opt, prune_arg, "fraction of all FFN neurons to remove, in [0, 1), or a whole neuron count "
                                       "(default: the FFNs are left alone)")
    opt.add_argument("--prune-params", type=float, default=None, metavar="F",
                     help="--layerwise: one budget instead of --prune/--prune-ffn: remove this fraction (0-1) of "
                          "the parameters heads and FFN neurons hold, cheapest first by estimated cost per parameter")
    opt.add_argument("--target-speedup", type=float, default=None,
                     help="plan for this speed-up on --runtime instead of --prune/--prune-ffn: heads and FFN "
                          "neurons ranked together by quality cost per unit of latency saved (per-layer latency "
                          "tables measured on the runtime and cached), then dense and pruned timed side by side")
    add_speed_arguments(opt)
    opt.add_argument("--threads", type=int, default=None, help="CPU threads for latency tables and timings")
    opt.add_argument("--calib", default="bbc-news",
                     help="calibration text: .txt (one sample a line), .csv/.jsonl with a text column, or bbc-news")
    opt.add_argument("--method", default=argparse.SUPPRESS,  # absent: ShrinkConfig's default, or --layerwise's
                     help="scoring method: fisher (default; Fisher / Gauss-Newton with a mask search over each "
                          "layer's heads), fisher-exact (the same search with exact leave-one-out costs per head; "
                          "costs a forward pass per head), obs (fisher's per-layer budgets, heads chosen by their cost after the "
                          "least-squares repair), gradient, ablation, "
                          "iterative (re-score every 10 %% of heads), entropy, confidence, magnitude, learned, "
                          "random, or iterative:<method>; with --layerwise: function-norm (default) or obs-local "
                          "(repair-aware reconstruction error, layer-local)")
    opt.add_argument("--step", type=float, default=0.1,
                     help="iterative: share of all heads removed per round (default 0.1)")
    opt.add_argument("--no-repair", dest="repair", action="store_false",
                     help="skip the least-squares re-fit of pruned layers' output projections")
    opt.add_argument("--repair-inputs", default="pruned", choices=["pruned", "dense"],
                     help="repair fits layer by layer on the repaired pruned model's own activations "
                          "(default) or on the dense model's")
    opt.add_argument("--gqa", default="uniform", choices=["uniform", "kv-groups", "ragged"],
                     help="grouped-query decoders: uniform (default; equal query heads per kept KV head, standard "
                          "kernels apply), kv-groups (whole KV heads) or ragged (any query heads)")
    opt.add_argument("--objective", default="dense", choices=["dense", "task"],
                     help="dense: label-free, keep the dense model's outputs (default); task: the model's loss on labels")
    opt.add_argument("--plan", help="apply this hand-written plan JSON instead of scoring")
    opt.add_argument("--min-heads-per-layer", type=int, default=1, help="heads every layer keeps (default 1; 0 allowed)")
    opt.add_argument("--calib-samples", type=int, default=None,
                     help=f"calibration samples used (default {DEFAULT_CALIB_SAMPLES}; {TARGET_CALIB_SAMPLES} with "
                          f"--target-speedup, {LAYERWISE_CALIB_SAMPLES} with --layerwise; fewer is faster)")
    opt.add_argument("--layerwise", action="store_true",
                     help="models larger than memory (Llama-family and GPT-2 causal LMs, bare BERT-family / DistilBERT "
                          "encoders): one layer's weights in memory at a time "
                          "(read from the safetensors shards, scored layer-locally: --method function-norm or "
                          "obs-local, pruned, repaired and written as its own shard); takes --prune, --prune-ffn or "
                          "--prune-params, --gqa, --no-repair, --min-heads-per-layer, --min-neurons-per-layer, "
                          "--device, --stream-memory, --work-dir and the calibration options")
    opt.add_argument("--device", default="cpu",
                     help="where the model is scored, pruned and repaired: cpu (default) or cuda[:N]; with --layerwise "
                          "one layer at a time is on it; under torchrun, cuda is each rank's cuda:LOCAL_RANK")
    opt.add_argument("--device-map", default=None, metavar="auto",
                     help="auto: the model over every GPU (and the CPU when they are not enough), whole layers per "
                          "device (accelerate), for a model one GPU cannot hold; instead of --device; not with "
                          "--layerwise (one layer at a time needs one device) or torchrun")
    opt.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                     help="--device-map: the weights each device may hold, e.g. 0=20GiB,1=20GiB,cpu=64GiB (default: "
                          "85%% of its free memory); half for the model, half for repair's unpruned copy; "
                          "activations come on top")
    opt.add_argument("--stream-memory", type=float, default=None, metavar="GIB",
                     help="GiB of repair's carried calibration streams kept in memory (both paths); the rest is "
                          "spilled to safetensors files, removed at the end (default: no limit)")
    opt.add_argument("--spill-dir", default=None,
                     help="where the --stream-memory spill directory is made (default: the system's temporary "
                          "directory)")
    opt.add_argument("--work-dir", default=None,
                     help="--layerwise: keep each finished layer here, so that an interrupted run started again with "
                          "the same arguments resumes after it; emptied once the output is written")
    opt.add_argument("--eval-data", help="held-out texts for the quality check (default: see docs)")
    opt.add_argument("--eval-samples", type=int, default=256, help="held-out samples for the check (default 256)")
    opt.add_argument("--max-length", type=int,
                     help="tokens per sample (default 128, or the model's position limit if lower)")
    opt.add_argument("--batch-size", type=int, default=16)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--text-column", help="text column of a CSV/JSONL file")
    opt.add_argument("--label-column", help="label column of a CSV/JSONL file")
    opt.add_argument("--allow-pickle", action="store_true",
                     help="allow pytorch_model.bin weights (loaded with torch.load(weights_only=True))")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    opt.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    opt.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_shrink)


def _print_summary(result) -> None:
    kept = result.plan["attention"]["kept_heads"]
    print(f"{'layer':>5}  {'heads before':>12}  {'heads after':>11}  kept heads")
    for layer, (before, after) in enumerate(zip(result.heads_before, result.heads_after)):
        print(f"{layer:>5}  {before:>12}  {after:>11}  {' '.join(map(str, kept[layer])) or '-'}")
    total_b, total_a = sum(result.heads_before), sum(result.heads_after)
    print(f"{'all':>5}  {total_b:>12}  {total_a:>11}")
    if result.neurons_after is not None:
        print(f"FFN neurons per layer: {result.neurons_before} -> {result.neurons_after} "
              f"({sum(result.neurons_after)} of {sum(result.neurons_before)} kept)")
    pb, pa = result.params_before, result.params_after
    print(f"parameters: {pb:,} -> {pa:,} ({100 * (pa - pb) / pb:+.1f} %)")
    q = result.quality
    if "perplexity_dense" in q:
        print(f"perplexity on {q['n']} held-out texts ({q['source']}): dense {q['perplexity_dense']:.3f}, "
              f"pruned {q['perplexity_pruned']:.3f}")
    else:
        print(f"embedding cosine to dense on {q['n']} held-out texts ({q['source']}): "
              f"mean {q['mean_cosine']:.4f}, min {q['min_cosine']:.4f}")
    prov = result.plan.get("provenance", {})
    print(f"method: {prov.get('method', '?')}, objective {prov.get('objective', '-')}")
    r = result.repair
    if not r.get("requested"):
        print("repair: off (--no-repair)")
    elif r.get("skipped"):
        print(f"repair: skipped ({r['skipped']})")
    else:
        check = r.get("check", {})
        fitted = sum(1 for e in r.get("layers", []) if e.get("applied"))
        what = "KL to dense" if check.get("metric") == "kl" else "cosine"
        n_val = check.get("n_held_out", 0)
        on = f" on {n_val} sample{'s' if n_val != 1 else ''}" if check.get("unit") == "samples" else ""
        where = (f"; held-out calibration {what}{on} {check['before']:.4g} -> {check['after']:.4g}" if check else "")
        state = f"applied to {fitted} of {len(r.get('layers', []))} pruned projections" if r.get("applied") else \
            "not applied (it did not help on held-out calibration data)"
        print(f"repair: {state} (inputs {r.get('inputs')}{where})")
    target = result.speedup
    if target:
        print(f"speed-up target {target['target']} on {target['runtime']} "
              f"({'met' if target['met'] else 'NOT met'} as measured):")
        for shape in target["shapes"]:
            print(f"  batch {shape['batch']:>3} x seq {shape['seq']:>4}: estimated x{shape['estimated_speedup']:.2f}, "
                  f"measured x{shape['measured_speedup']:.2f} (dense {shape['measured_dense_ms']:.2f} ms, "
                  f"pruned {shape['measured_pruned_ms']:.2f} ms, interleaved)")
    if result.device_map:
        print("placed with --device-map: " + ", ".join(f"{n} blocks on {d}" for d, n in result.device_map.items()))
    s = result.seconds
    print(f"time: load {s['load']:.1f} s, scoring {s['score']:.1f} s, repair {s.get('repair', 0.0):.1f} s, "
          f"total {s['total']:.1f} s")
    print(f"wrote {result.out}")


def _run_shrink(args) -> int:
    from headslim.pipeline import ShrinkConfig, shrink

    if args.target_speedup is not None and (args.prune is not None or args.prune_ffn is not None):
        raise HeadslimError("--target-speedup decides what to remove: leave out --prune/--prune-heads and --prune-ffn")
    if args.prune_params is not None:
        if not args.layerwise:
            raise HeadslimError("--prune-params applies to --layerwise (in memory, --target-speedup spends one budget "
                                "on heads and neurons)")
        if args.prune is not None or args.prune_ffn is not None:
            raise HeadslimError("--prune-params decides how many heads and neurons go: leave out --prune and --prune-ffn")
    if args.prune is None:
        args.prune = 0 if args.target_speedup is not None else 0.5  # with --prune-params: unused, not read
    calib_samples_given = args.calib_samples is not None
    if not calib_samples_given:
        args.calib_samples = "auto"
    layer_method = None
    if args.layerwise:  # --layerwise has its own, layer-local scorers; the config's is not read
        layer_method = vars(args).pop("method", None)
    if args.stream_memory is not None and not args.stream_memory >= 0:
        raise HeadslimError(f"--stream-memory must be >= 0 GiB, not {args.stream_memory}")
    limit = None if args.stream_memory is None else int(args.stream_memory * 2**30)  # GiB -> bytes
    config = config_from_args(ShrinkConfig, args, stream_memory=limit)
    from headslim import distributed

    if args.layerwise:
        return _run_layerwise(args, config, calib_samples_given, layer_method)
    if args.work_dir is not None:
        raise HeadslimError("--work-dir applies to --layerwise only (a run without it finishes in one go)")

    if config.device_map is not None and distributed.launched():
        raise HeadslimError("--device-map spreads one model over the devices: run it in one process, not under torchrun")
    if distributed.setup_from_env():  # torchrun: ranks share the calibration batches, rank 0 writes
        if config.target_speedup is not None:
            raise HeadslimError("--target-speedup times models on this machine: run it in one process, not under torchrun")
        if not distributed.is_main():
            config = replace(config, progress=False)
    try:
        result = shrink(args.model, args.out, config)
    finally:
        distributed.teardown()
    if result is None:  # another rank than 0: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_summary(result)
    return 0


def _run_layerwise(args, config, calib_samples_given: bool, method: str | None = None) -> int:
    from headslim import distributed
    from headslim.offload import shrink_from_config

    if "LOCAL_RANK" in os.environ and distributed.launched():
        raise HeadslimError("--layerwise runs in one process, not under torchrun")
    if config.device_map is not None:
        raise HeadslimError("--layerwise holds one layer at a time on --device, for any depth: leave out --device-map")
    if getattr(args, "ffn_method", None) is not None:
        raise HeadslimError(f"--layerwise does not take --ffn-method {args.ffn_method} (it scores FFN neurons "
                            "layer-locally, with the heads' --method)")
    try:
        report = shrink_from_config(args.model, args.out, config, calib_samples_given=calib_samples_given,
                                    stream_memory=config.stream_memory, spill_dir=config.spill_dir,
                                    work_dir=args.work_dir, method=method, prune_params=args.prune_params)
    except KeyboardInterrupt:
        if args.work_dir is not None and (Path(args.work_dir) / "headslim-work.json").is_file():
            print(f"headslim: finished layers are kept in {args.work_dir}; run the same command again to resume",
                  file=sys.stderr)
        raise
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("scores", "neuron_scores")}, indent=2))
        return 0
    kept = report["plan"]["attention"]["kept_heads"]
    before = report["plan"]["attention"]["num_heads"]
    print(f"{'layer':>5}  {'heads before':>12}  {'heads after':>11}  kept heads")
    for layer, (n, k) in enumerate(zip(before, kept)):
        print(f"{layer:>5}  {n:>12}  {len(k):>11}  {' '.join(map(str, k)) or '-'}")
    print(f"{'all':>5}  {report['heads_before']:>12}  {report['heads_after']:>11}")
    mlp = report["plan"].get("mlp")
    if mlp:
        after = [len(k) for k in mlp["kept_neurons"]]
        print(f"FFN neurons per layer: {mlp['num_neurons']} -> {after} ({sum(after)} of {sum(mlp['num_neurons'])} kept)")
    if report["params"]["target"] is not None:
        print(f"parameters of heads and FFN neurons removed: {report['params']['removed']:.1%} "
              f"(--prune-params {report['params']['target']:g})")
    c = report["calibration"]
    print(f"method: {report['plan']['provenance']['method']} (layer at a time, at most "
          f"{report['max_layers_in_memory']} layer in memory), {c['n_samples']} calibration samples of {c['source']}")
    r = report["repair"]
    if r is None:
        print("repair: off (--no-repair)")
    elif r.get("skipped"):
        print(f"repair: skipped ({r['skipped']})")
    else:
        check = r.get("check") or {}
        fitted = sum(1 for e in r.get("layers", []) if e.get("applied"))
        what = "KL to dense" if check.get("metric") == "kl" else "embedding cosine to dense"
        where = (f"; held-out calibration {what} {check['before']:.4g} -> {check['after']:.4g}" if check else "")
        state = f"applied to {fitted} of {len(r.get('layers', []))} pruned projections" if r.get("applied") else \
            "not applied (it did not help on held-out calibration data)"
        print(f"repair: {state}{where}")
    if report.get("resumed"):
        r = report["resumed"]
        print(f"resumed from {args.work_dir}: {'scoring' if r['pass'] == 1 else 'pruning'} had finished "
              f"{r['layers_done']} of {len(before)} layers")
    s = report["seconds"]
    print(f"time: scoring {s['scoring']:.1f} s, pruning + repair + writing {s['pruning']:.1f} s, total {s['total']:.1f} s")
    print(f"wrote {report['out']} ({report['bytes_written']:,} bytes of {report['dtype']} weights)")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="heads per layer and parameters of a checkpoint, and its prune plan")
    p.add_argument("model", help="checkpoint dir (dense or pruned)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from headslim.arch import get_adapter
    from headslim.io import load_model
    from headslim.plan import PLAN_FILE, PrunePlan
    from headslim.quality import count_parameters

    model = load_model(args.model)
    heads = get_adapter(model).num_heads(model)
    print(f"model type: {model.config.model_type} ({type(model).__name__})")
    print(f"heads per layer: {heads} ({sum(heads)} in all)")
    print(f"parameters: {count_parameters(model):,}")
    from headslim.io import resolve_model_path

    plan_file = resolve_model_path(args.model) / PLAN_FILE
    if plan_file.is_file():
        prov = PrunePlan.load(plan_file).provenance
        calib = prov.get("calibration", {})
        print(f"pruned by headslim {prov.get('headslim_version', '?')}: method {prov.get('method', '?')}, "
              f"objective {prov.get('objective', '-')}, calibration {calib.get('source', '?')} "
              f"({calib.get('n_samples', '?')} samples, sha256 {str(calib.get('sha256', '?'))[:12]})")
    return 0


# Sub-commands that live beside the code they drive: each module has ``add_parser(subparsers)``,
# which adds its parser and sets ``func``; importing the module must stay cheap (no torch/onnx).
COMMAND_MODULES = ("headslim.export", "headslim.export_decoder", "headslim.bench", "headslim.evaluate", "headslim.sweep", "headslim.latency")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    import importlib.util

    parser = argparse.ArgumentParser(prog="headslim", description="Remove attention heads and prove the gain.")
    parser.add_argument("--version", action="version", version=f"headslim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_shrink(sub)
    _add_inspect(sub)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:  # modules land with their own issues
            importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0, 2 on a :class:`HeadslimError`, 130 on Ctrl-C, 143 on SIGTERM.

    SIGTERM (``kill``, a container stop, a scheduler's time limit) interrupts the command the way
    Ctrl-C does, so that a half-written output dir is removed instead of being left behind; further
    SIGTERMs are ignored while that clean-up runs. 143 = 128 + 15 is what a shell reports for a kill.
    """
    import signal
    import threading

    args = build_parser().parse_args(argv)
    terminated = []

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        terminated.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # headslim shows its own progress
        return args.func(args)
    except HeadslimError as e:
        print(f"headslim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if terminated:
            print("headslim: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("headslim: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())

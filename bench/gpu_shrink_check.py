"""`shrink --device cuda` checked on a GPU: the same results as on the CPU, and what the GPU saves.

For a session lent a GPU machine (none was when ``--device`` was written; CI never has one). Needs only
torch, transformers, safetensors, accelerate and the ``headslim`` package: random weights and random
token batches, so neither the bundled model nor the BBC corpus has to travel. Never put the repository
root on ``sys.path`` (its ``kernels/`` folder would shadow the PyPI package transformers imports):

    mkdir -p /tmp/site && ln -s $PWD/headslim /tmp/site/headslim && \
        PYTHONPATH=/tmp/site python3 bench/gpu_shrink_check.py --out $OUT     # on the GPU machine
    python bench/gpu_shrink_check.py --smoke --out /tmp/gpu-check            # here: both sides on the CPU

1. **Parity** on tiny random models (Llama with GQA, Qwen3 ragged GQA, GPT-2, BERT), 6 batches of 3 x 11
   tokens, TF32 off:
   - layer at a time: ``shrink_layerwise(device="cpu")`` against ``device=DEVICE``, with
     ``function-norm`` (heads and FFN neurons) and ``obs-local`` (heads): the plans, and the reloaded
     models' outputs (max abs difference, relative to the output's scale);
   - in memory: ``prune_model`` (Fisher scores, repair) on a model on the CPU and on the device: the
     head scores (max abs difference of the scores), the plans, and with the CPU's plan applied on
     both, the repaired outputs.
   - over a device map (``--device-map``): each model's first layers on DEVICE and the rest on the CPU
     (``placement.split_map``), pruned and repaired by every scorer (``MAP_METHODS``), against a plain
     CPU model: the plans and the outputs.
   - the ``headslim shrink`` command (when ``--assets`` holds MiniLM's config and tokenizer and BBC
     text, written here by ``--make-assets``): a MiniLM-shaped random model with ``--device cpu``,
     ``--device DEVICE``, ``--device-map auto`` (a small ``--max-memory`` on the GPU splits it) and
     ``--layerwise`` on both: the same plans, seconds, held-out checks.
2. **Device map at size** (not with ``--smoke``; ``map-speed``): the in-memory shrink of the Llama-3.2-1B
   shape in float32 all on the device, then with ``--device-map auto`` and ``--map-gpu-gib`` (6) GiB for
   the GPU: seconds, peak GPU memory, blocks per device, the same plan or not.
3. **Speed** (not with ``--smoke``): a Llama-3.2-1B-shaped model with random bf16 weights
   (``bench/offload_1b.py``'s writer), ``shrink_layerwise`` at 50 % of the query heads on ``--samples``
   (16) random sequences of 128 tokens, on the device and (unless ``--no-cpu``) on the CPU with all
   cores, one run each: wall seconds, peak GPU memory, the same plan or not. On the 2-core EPYC the
   CPU side took 755 s for 16 articles (``bench/results/offload_1b``): budget the device time for it,
   or pass ``--no-cpu``.

Writes ``gpu_shrink_check.json`` and ``gpu_shrink_check.md`` under ``--out`` after every row (a device
run cut off by its time limit keeps what it measured); a check that raises becomes a row with its error
and the run goes on. Exits 1 when a check fails or raises. Results of the H200 run:
``bench/results/gpu_shrink_check/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

TOL = 2e-3  # relative output difference allowed between the CPU's and the device's float32 arithmetic


def tiny(model_type: str, class_name: str, **overrides):
    import torch
    import transformers

    from headslim.arch import adapters

    for adapter in adapters():
        for tc in adapter.tiny_configs():
            if tc.model_type == model_type:
                config = getattr(transformers, tc.config_class)(**{**tc.kwargs, **overrides})
                config.architectures = [class_name]
                torch.manual_seed(0)
                return getattr(transformers, class_name)(config).eval()
    raise SystemExit(f"no tiny config for {model_type}")


def token_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, seq // 2:] = 0  # a padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def outputs(model, batch) -> "torch.Tensor":
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def rel_diff(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


CASES = [("llama", "LlamaForCausalLM", dict(num_key_value_heads=2)), ("qwen3", "Qwen3ForCausalLM", {}),
         ("gpt2", "GPT2LMHeadModel", {}), ("bert", "BertModel", {})]


def guarded(rows: list, save, info: dict, fn) -> None:
    """Run one check; a failure becomes a row (with its error) instead of ending the run, and the results
    so far are written after every row, so a crash or the device's time limit keeps what was measured."""
    import traceback

    try:
        rows.append({**info, **fn()})
    except Exception as exc:  # noqa: BLE001 - one failed check must not lose the others on a one-shot device run
        rows.append({**info, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=6)})
    save()


def parity(device: str, work: Path, rows: list, save) -> list[dict]:
    import torch

    from headslim.io import load_pruned
    from headslim.offload import shrink_layerwise
    from headslim.pipeline import PruneConfig, prune_model
    from headslim.surgery import prune_heads

    for model_type, class_name, overrides in CASES:
        dense = tiny(model_type, class_name, **overrides)
        src = work / model_type / "dense"
        dense.save_pretrained(str(src))
        batches = token_batches(dense.config.vocab_size, 6, 3, 11)
        probe = token_batches(dense.config.vocab_size, 1, 3, 11, seed=9)[0]
        gqa = "ragged" if model_type == "qwen3" else "uniform"
        for method, ffn in (("function-norm", 0.3), ("obs-local", None)):
            def layerwise(method=method, ffn=ffn):
                got = {}
                for where in ("cpu", device):
                    out = work / model_type / f"{method}-{where.replace(':', '')}"
                    t = time.perf_counter()
                    report = shrink_layerwise(src, out, prune=0.5, prune_ffn=ffn, batches=batches, gqa=gqa,
                                              method=method, device=where, progress=False, overwrite=True)
                    got[where] = (report, outputs(load_pruned(out), probe), time.perf_counter() - t)
                (a, ya, ta), (b, yb, tb) = got["cpu"], got[device]
                same = a["plan"]["attention"] == b["plan"]["attention"] and a["plan"].get("mlp") == b["plan"].get("mlp")
                return {"same_plan": same, "output_rel_diff": rel_diff(ya, yb) if same else None,
                        "check_cpu": (a["repair"] or {}).get("check"),
                        "check_device": (b["repair"] or {}).get("check"),
                        "device_reported": b.get("device"), "seconds_cpu": ta, "seconds_device": tb,
                        "ok": same and rel_diff(ya, yb) < TOL}

            guarded(rows, save, {"path": "layerwise", "model": model_type, "method": method, "prune_ffn": ffn},
                    layerwise)

        def in_memory():
            # Fisher scores and repair, the model on the CPU and on the device
            from headslim.repair import repair

            config = PruneConfig(prune=0.5, progress=False, gqa=gqa)
            res = {where: prune_model(copy.deepcopy(dense).to(where), batches, config) for where in ("cpu", device)}
            same = res["cpu"].plan.kept_heads == res[device].plan.kept_heads
            plan = res["cpu"].plan
            fixed = copy.deepcopy(dense).to(device)
            prune_heads(fixed, plan)
            repair(fixed, copy.deepcopy(dense).to(device), plan, batches, progress=False)
            diff = rel_diff(outputs(res["cpu"].model, probe), outputs(fixed, probe))
            return {"same_plan": same, "output_rel_diff": diff, "ok": diff < TOL,
                    "repair_applied": [res["cpu"].repair.get("applied"), res[device].repair.get("applied")]}

        guarded(rows, save, {"path": "in-memory", "model": model_type, "method": "fisher"}, in_memory)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# head method, FFN method (None: heads only); entropy / confidence are for bidirectional encoders only
MAP_METHODS = [("fisher", None), ("fisher", "magnitude"), ("fisher", "fisher"), ("gradient", "gradient"),
               ("fisher-exact", None), ("obs", "obs"), ("ablation", None), ("iterative:fisher", None),
               ("entropy", None), ("confidence", None), ("magnitude", None), ("learned", None), ("random", "random")]


def device_map_parity(device: str, rows: list, save, methods=MAP_METHODS) -> None:
    """``--device-map``: each tiny model with its first layers (and embeddings) on ``device`` and the
    rest on the CPU (accelerate's hooks move the activations between them), pruned and repaired by
    every scorer, against the same on a plain CPU model: the same plan, outputs within TOL."""
    import torch

    from headslim.pipeline import PruneConfig, prune_model
    from headslim.placement import place, split_map

    index = "cpu" if device == "cpu" else torch.device(device).index or 0
    for model_type, class_name, overrides in CASES:
        dense = tiny(model_type, class_name, **overrides)
        batches = token_batches(dense.config.vocab_size, 6, 3, 11)
        probe = token_batches(dense.config.vocab_size, 1, 3, 11, seed=9)[0]
        gqa = "ragged" if model_type == "qwen3" else "uniform"
        for method, ffn_method in methods:
            if method in ("entropy", "confidence") and model_type != "bert":
                continue

            def run(method=method, ffn_method=ffn_method):
                config = PruneConfig(prune=0.5, prune_ffn=0.3 if ffn_method else None, ffn_method=ffn_method,
                                     method=method, gqa=gqa, progress=False)
                plain = prune_model(copy.deepcopy(dense), batches, config)
                model = copy.deepcopy(dense)
                used = place(model, split_map(model, [index, "cpu"]), force_hooks=True)
                got = prune_model(model, batches, config)
                same = (got.plan.kept_heads == plain.plan.kept_heads
                        and got.plan.kept_neurons == plain.plan.kept_neurons)
                diff = rel_diff(outputs(plain.model, probe), outputs(got.model, probe)) if same else None
                return {"same_plan": same, "output_rel_diff": diff, "ok": same and diff < TOL,
                        "devices": sorted({str(p.device) for p in got.model.parameters()}),
                        "layers_per_device": {str(d): list(used.values()).count(d) for d in set(used.values())},
                        "repair_applied": [plain.repair.get("applied"), got.repair.get("applied")]}

            guarded(rows, save, {"path": "device-map", "model": model_type,
                                 "method": method + (f" + ffn {ffn_method}" if ffn_method else "")}, run)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cli_check(device: str, work: Path, assets: Path, rows: list, save) -> None:
    """The ``headslim shrink`` command itself on a MiniLM-shaped BERT (all-MiniLM-L6-v2's config and
    tokenizer from ``assets``, random weights) and BBC News text (``assets/calib.txt``): ``--device
    cpu`` against ``--device DEVICE``, ``--device-map auto`` (with ``--max-memory`` small enough on the GPU
    to put the last layers on the CPU), and ``--layerwise`` on each device."""
    import contextlib
    import io
    import shutil

    import torch
    import transformers

    from headslim.cli import main as cli

    src = work / "minilm-shaped"
    config = transformers.BertConfig.from_pretrained(str(assets))
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(str(src))
    for f in assets.iterdir():
        if f.is_dir():
            shutil.copytree(f, src / f.name)
        elif f.name not in ("calib.txt", "config.json"):
            shutil.copy(f, src / f.name)
    index = 0 if device == "cpu" else torch.device(device).index or 0
    base = ["shrink", str(src), "--prune", "0.5", "--prune-ffn", "0.3", "--calib", str(assets / "calib.txt"),
            "--calib-samples", "128", "--eval-samples", "64", "--no-progress", "--json"]
    runs = {"cpu": ["--device", "cpu"], "device": ["--device", device],
            "device-map": ["--device-map", "auto", "--max-memory", f"{index}=150MiB,cpu=16GiB"],
            "device-map-free": ["--device-map", "auto"],  # 85 % of what is free: the whole model on the GPU
            "layerwise-cpu": ["--layerwise", "--device", "cpu"], "layerwise-device": ["--layerwise", "--device", device]}
    if device == "cpu":  # --smoke: no GPU to place on
        runs.pop("device-map")
        runs.pop("device-map-free")
    got = {}
    for name, extra in runs.items():
        def run(name=name, extra=extra):
            buf = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                code = cli([*base, *extra, "--out", str(work / f"cli-{name}")])
            if code != 0:
                raise RuntimeError(f"headslim shrink {' '.join(extra)} exited {code}")
            got[name] = json.loads(buf.getvalue())
            ref = got["layerwise-cpu" if name.startswith("layerwise") else "cpu"]
            plan, plan_ref = got[name]["plan"], ref["plan"]
            same = plan["attention"] == plan_ref["attention"] and plan.get("mlp") == plan_ref.get("mlp")
            quality = got[name].get("quality") or (got[name].get("repair") or {}).get("check")  # layerwise: repair's
            return {"same_plan": same, "ok": same, "seconds": time.perf_counter() - t, "quality": quality,
                    "device_map": got[name].get("device_map"), "output_rel_diff": None}

        guarded(rows, save, {"path": "cli", "model": "minilm-shaped", "method": " ".join(extra)}, run)



def llama_1b(work: Path) -> tuple[dict, Path, int]:
    """``bench/offload_1b.py``'s Llama-3.2-1B-shaped checkpoint (random bf16 weights), written once per run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("offload_1b", Path(__file__).with_name("offload_1b.py"))
    offload_1b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(offload_1b)
    src = work / "llama-1b"
    if not (src / "config.json").is_file():
        offload_1b.write_model(src)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return offload_1b.SHAPE, src, size


def map_speed(device: str, work: Path, samples: int, gpu_gib: float, rows: list, save) -> None:
    """The in-memory shrink (Fisher, 50 % of query heads, repair) of the Llama-3.2-1B shape in float32
    (4.3 GiB, and as much again for repair's unpruned copy): all of it on ``device``, then with
    ``--device-map auto`` and ``gpu_gib`` GiB for the GPU, so that layers beyond it stay on the CPU. One
    run each: seconds, peak GPU memory, blocks per device, the same plan or not."""
    import torch

    from headslim.io import load_model
    from headslim.pipeline import PruneConfig, prune_model
    from headslim.placement import parse_max_memory, place, summary

    shape, src, size = llama_1b(work)
    batches = token_batches(shape["vocab_size"], max(1, samples // 4), 4, 128)
    index, gpu = torch.device(device).index or 0, device != "cpu"
    kept = {}
    for name in ("one GPU", "device map"):
        def run(name=name):
            model = load_model(src).float()
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            placed = None
            if name == "one GPU":
                model.to(device)
            else:
                budget = f"{index}={gpu_gib}GiB,cpu=100GiB" if gpu else "cpu=100GiB"
                placed = summary(place(model, "auto", parse_max_memory(budget)))
            result = prune_model(model, batches, PruneConfig(prune=0.5, gqa="uniform", progress=False))
            kept[name] = result.plan.kept_heads
            row = {"seconds": time.perf_counter() - t, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else 0,
                   "model_bytes_float32": sum(p.numel() * 4 for p in model.parameters()), "samples": samples,
                   "placed": placed, "repair_check": result.repair.get("check"),
                   "same_plan_as_one_gpu": kept[name] == kept.get("one GPU"), "ok": kept[name] == kept.get("one GPU")}
            del model, result
            if gpu:
                torch.cuda.empty_cache()
            return row

        guarded(rows, save, {"device": device, "how": name, "max_memory_gpu_gib": gpu_gib if name != "one GPU"
                             else None}, run)


def speed(device: str, work: Path, threads: int, samples: int, cpu: bool, rows: list, save) -> list[dict]:
    import torch

    from headslim.offload import shrink_layerwise

    SHAPE, src, size = llama_1b(work)
    batches = token_batches(SHAPE["vocab_size"], max(1, samples // 4), 4, 128)
    for where in (device, "cpu") if cpu else (device,):
        def run(where=where):
            torch.set_num_threads(threads)
            if where != "cpu":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            report = shrink_layerwise(src, work / f"slim-{where.replace(':', '')}", prune=0.5, gqa="uniform",
                                      device=where, batches=batches, progress=False, overwrite=True)
            return {"seconds": time.perf_counter() - t, "model_bytes": size, "samples": samples,
                    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if where != "cpu" else None,
                    "kept_heads": report["plan"]["attention"]["kept_heads"],
                    "repair_check": (report["repair"] or {}).get("check"), "ok": True}

        guarded(rows, save, {"device": where}, run)
    if cpu and len(rows) == 2 and "kept_heads" in rows[0] and "kept_heads" in rows[1]:
        rows[0]["same_plan_as_cpu"] = rows[0]["kept_heads"] == rows[1]["kept_heads"]
        save()
    return rows


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="both sides on the CPU, no speed run: checks the script")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the CPU side (default: torch's)")
    p.add_argument("--samples", type=int, default=16, help="sequences of 128 tokens for the speed run")
    p.add_argument("--no-cpu", dest="cpu", action="store_false", help="time the speed run on the device only")
    p.add_argument("--assets", type=Path, default=Path(".gpu-assets"),
                   help="all-MiniLM-L6-v2's config and tokenizer files and calib.txt for the CLI check (skipped "
                        "when absent); make it here with --make-assets")
    p.add_argument("--make-assets", action="store_true", help="write --assets from the bundled model and corpus, exit")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: parity, device-map, cli, "
                                              "map-speed, speed")
    p.add_argument("--map-gpu-gib", type=float, default=6.0,
                   help="map-speed: GiB of the GPU --device-map may use (half for the model, half for repair's copy)")
    args = p.parse_args(argv)
    if args.make_assets:
        return make_assets(args.assets)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    device = "cpu" if args.smoke else args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    import transformers

    result["transformers"] = transformers.__version__
    result["parity"] = []

    def save():
        (args.out / "gpu_shrink_check.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"# shrink --device {device} against the CPU", "",
                 f"torch {result['torch']}, transformers {result['transformers']}, GPU {result['gpu']}", "",
                 "| path | model | method | same plan | output rel. diff | ok |", "|---|---|---|---|---:|---|"]
        for r in result["parity"]:
            diff = "-" if r.get("output_rel_diff") is None else f"{r['output_rel_diff']:.1e}"
            lines.append(f"| {r['path']} | {r['model']} | {r['method']} | {r.get('same_plan', r.get('error'))} "
                         f"| {diff} | {r['ok']} |")
        if result.get("cli"):
            lines += ["", "| headslim shrink (MiniLM shape, random weights) | same plan as on the CPU | seconds "
                      "| quality | placed | ok |", "|---|---|---:|---|---|---|"]
            for r in result["cli"]:
                q = r.get("quality") or {}
                qual = ", ".join(f"{k} {v:.4f}" for k, v in q.items() if isinstance(v, float)) if q else "-"
                lines.append(f"| {r['method']} | {r.get('same_plan', r.get('error'))} | {r.get('seconds', 0):.1f} "
                             f"| {qual} | {r.get('device_map') or '-'} | {r['ok']} |")
        for r in result.get("map_speed", []):
            if "error" in r:
                lines.append(f"\nLlama-3.2-1B shape in memory, {r['how']}: {r['error']}")
                continue
            lines.append(f"\nLlama-3.2-1B shape in memory (float32), {r['how']}"
                         f"{'' if r['placed'] is None else ' ' + str(r['placed'])}: {r['seconds']:.1f} s, peak GPU "
                         f"{r['peak_gpu_bytes'] / 2**30:.2f} GiB, same plan as on one GPU: {r['same_plan_as_one_gpu']}")
        for r in result.get("speed", []):
            if "error" in r:
                lines.append(f"\nLlama-3.2-1B shape on {r['device']}: {r['error']}")
                continue
            gpu = "" if r["peak_gpu_bytes"] is None else f", peak GPU {r['peak_gpu_bytes'] / 2**30:.2f} GiB"
            lines.append(f"\nLlama-3.2-1B shape, layer at a time on {r['device']}, {r['samples']} x 128 tokens: "
                         f"{r['seconds']:.1f} s{gpu}")
        (args.out / "gpu_shrink_check.md").write_text("\n".join(lines) + "\n")
        return lines

    with tempfile.TemporaryDirectory(prefix="headslim-gpu-check-") as tmp:
        if "parity" not in skip:
            parity(device, Path(tmp), result["parity"], save)
        if "device-map" not in skip:
            device_map_parity(device, result["parity"], save,
                              methods=MAP_METHODS if not args.smoke else MAP_METHODS[:2])
        print("\n".join(save()[4:]), flush=True)
        if "cli" not in skip and (args.assets / "calib.txt").is_file():
            result["cli"] = []
            cli_check(device, Path(tmp), args.assets, result["cli"], save)
            print("\n".join(save()[-len(result["cli"]) - 2:]), flush=True)
        if not args.smoke and "map-speed" not in skip:
            result["map_speed"] = []
            map_speed(device, Path(tmp), args.samples, args.map_gpu_gib, result["map_speed"], save)
        if not args.smoke and "speed" not in skip:
            result["speed"] = []
            speed(device, Path(tmp), args.threads or torch.get_num_threads(), args.samples, args.cpu,
                  result["speed"], save)
    print("\n".join(save()))
    return 0 if all(r["ok"] for r in result["parity"] + result.get("cli", []) + result.get("map_speed", [])
                    + result.get("speed", [])) else 1


def make_assets(assets: Path) -> int:
    """all-MiniLM-L6-v2's config and tokenizer files (not its weights: 87 MiB, over what a device call carries)
    and 400 BBC News training articles, one per line, for :func:`cli_check` on a machine without them."""
    import shutil

    from headslim.data import load_texts
    from headslim.io import bundled_model_dir

    src = Path(bundled_model_dir())
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "modules.json", "sentence_bert_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, assets / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", assets / "1_Pooling", dirs_exist_ok=True)
    texts = load_texts("bbc-news:train")
    lines = [" ".join(t.split()) for t in list(texts.texts)[:400]]
    (assets / "calib.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {assets} ({sum(f.stat().st_size for f in assets.rglob('*') if f.is_file()) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What spilling the carried streams to disk (``--stream-memory 0``) and keeping a resumable work dir
(``--work-dir``) cost the layer-at-a-time shrink, against the default (streams in memory, nothing kept).

Writes a random Llama-shaped checkpoint (``--shape``: ``small`` by default, hidden 1024, 8 layers,
16 query / 4 KV heads of 64, FFN 4096, vocabulary 32000; or ``1b``, Llama-3.2-1B's shape) with
``bench/offload_1b.py``'s streamed writer, in ``--dtype`` (float32 by default: a CPU without bf16
instructions spends its time on bf16 matmuls otherwise), then runs ``shrink_layerwise`` at 50 % of query
heads on ``--samples`` BBC News articles (the layer-at-a-time default, 128) in a child process per run,
the three modes interleaved for ``--rounds`` rounds (the order rotates each round). Each child
reports wall time, peak RSS (VmHWM) and, for the spill and work-dir runs, the bytes they held on
disk. All three must write the same shards (checked: sha256 of every output file).

    python bench/layerwise_overheads.py --work /tmp/lw --out bench/results/layerwise_overheads

writes ``layerwise_overheads.json`` and ``.md``. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offload_1b  # noqa: E402  (bench/ is not a package)

SHAPES = {"1b": dict(offload_1b.SHAPE),
          "small": {**offload_1b.SHAPE, "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
                    "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 32000, "bos_token_id": 1,
                    "eos_token_id": 2}}
MODES = ("memory", "spill", "work-dir")


def write(path: Path, shape: str, dtype: str) -> int:
    import torch

    offload_1b.SHAPE.clear()
    offload_1b.SHAPE.update(SHAPES[shape])
    size = offload_1b.write_model(path)
    if dtype == "float32":  # rewrite the config's dtype and the weights (streamed as written)
        from headslim.layerwise import write_streamed
        from safetensors import safe_open

        f32 = path / "model.f32.safetensors"
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            tensors = [(k, torch.float32, tuple(f.get_slice(k).get_shape()), (lambda k=k: iter([f.get_tensor(k)])))
                       for k in keys]
            size = write_streamed(f32, tensors)
        f32.replace(path / "model.safetensors")
        cfg = json.loads((path / "config.json").read_text())
        cfg["dtype"] = "float32"
        cfg.pop("torch_dtype", None)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return size


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def child(args) -> dict:
    import threading

    import torch

    from headslim.offload import shrink_layerwise

    torch.set_num_threads(args.threads)
    calib = offload_1b.calibration(args.samples, args.max_length, args.batch_size)
    work = args.work / "workdir"
    spill = args.work / "spill"
    spill.mkdir(exist_ok=True)
    peak_disk, stop = [0], threading.Event()

    def watch():  # what the run holds on disk, sampled
        while not stop.is_set():
            peak_disk[0] = max(peak_disk[0], disk_bytes(work) + disk_bytes(spill))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    kw = {"memory": {}, "spill": {"stream_memory": 0, "spill_dir": spill}, "work-dir": {"work_dir": work}}[args.child]
    t = time.perf_counter()
    report = shrink_layerwise(args.work / "dense", args.work / f"slim-{args.child}", prune=0.5, gqa="uniform",
                              batches=calib, progress=False, overwrite=True, **kw)
    wall = time.perf_counter() - t
    stop.set()
    watcher.join()
    return {"mode": args.child, "wall": wall, "seconds": report["seconds"], "peak_rss_bytes": offload_1b.peak_rss_bytes(),
            "peak_disk_bytes_sampled": peak_disk[0], "spill": report["spill"],
            "repair_applied": report["repair"]["applied"] if report["repair"] else None}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/headslim-layerwise-overheads"))
    p.add_argument("--out", type=Path, default=Path("bench/results/layerwise_overheads"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "dense" / "model.safetensors").is_file():
        write(args.work / "dense", args.shape, args.dtype)
    model_bytes = disk_bytes(args.work / "dense")
    runs = []
    for r in range(args.rounds):
        for mode in MODES[r % 3:] + MODES[:r % 3]:
            cmd = [sys.executable, __file__, "--child", mode, "--work", str(args.work), "--samples", str(args.samples),
                   "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode} child failed:\n{done.stderr[-4000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["round"] = r
            run["digest"] = digest(args.work / f"slim-{mode}")
            runs.append(run)
            print(f"round {r} {mode}: {run['wall']:.1f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"disk {run['peak_disk_bytes_sampled'] / 2**20:.0f} MiB", flush=True)
    same = len({r["digest"] for r in runs}) == 1
    summary = {}
    for mode in MODES:
        walls = [r["wall"] for r in runs if r["mode"] == mode]
        summary[mode] = {"median_wall": statistics.median(walls), "walls": walls,
                         "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs if r["mode"] == mode),
                         "peak_disk_bytes_sampled": max(r["peak_disk_bytes_sampled"] for r in runs if r["mode"] == mode)}
    base = summary["memory"]["median_wall"]
    meta = {"machine": platform.processor() or platform.machine(), "cpu": _cpu(), "date": time.strftime("%Y-%m-%d"),
            "shape": args.shape, "dtype": args.dtype, "model_bytes": model_bytes, "samples": args.samples,
            "max_length": args.max_length, "batch_size": args.batch_size, "threads": args.threads,
            "rounds": args.rounds, "same_output": same}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layerwise_overheads.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs},
                                                                  indent=2) + "\n")
    lines = [f"# Layer-at-a-time shrink: spill and work-dir overheads ({meta['date']}, {meta['cpu']})", "",
             f"Model: random Llama, shape `{args.shape}`, {args.dtype}, {model_bytes / 2**30:.2f} GiB; {args.samples} "
             f"articles x {args.max_length} tokens; {args.rounds} interleaved rounds; same output in every run: {same}.",
             "", "| mode | median wall s | vs memory | walls | peak RSS GiB | peak on disk MiB (sampled) |",
             "|---|---:|---:|---|---:|---:|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['median_wall']:.1f} | {s['median_wall'] / base:.2f} | "
                     f"{', '.join(f'{w:.1f}' for w in s['walls'])} | {s['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{s['peak_disk_bytes_sampled'] / 2**20:.0f} |")
    (args.out / "layerwise_overheads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()

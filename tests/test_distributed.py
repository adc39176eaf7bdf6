"""Data-parallel calibration: two gloo ranks give the plan and weights of one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from headslim.pipeline import PruneConfig, prune_model
from tests.conftest import tiny_batches, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune(config):
    model = tiny_model("bert", "BertModel")
    return prune_model(model, tiny_batches(6), config)


def _rank(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _prune(PruneConfig(prune=0.5, progress=False))
        if rank == 0:
            torch.save({"kept": result.plan.kept_heads, "state": result.model.state_dict(),
                        "repair": result.repair["check"]}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_plan_and_weights(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    one = _prune(PruneConfig(prune=0.5, progress=False))
    assert two["kept"] == one.plan.kept_heads
    assert one.repair["applied"]
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-5, atol=1e-6)  # summation order only
    assert two["repair"]["before"] == pytest.approx(one.repair["check"]["before"], rel=1e-9)


def test_torchrun_shrink_writes_once_with_the_single_process_plan(tmp_path, minilm_dir):
    """What a user runs: ``torchrun --nproc-per-node 2 -m headslim shrink``; rank 0 writes."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"sentence number {i} about {w} and the weather" for i, w in
                               enumerate(["cats", "dogs", "rain", "markets", "football", "music", "trains", "code"] * 2)))
    common = [str(minilm_dir), "--prune", "0.5", "--calib", str(calib), "--batch-size", "4", "--no-progress", "--json"]
    # PYTHONSAFEPATH: `-m` would put the repository root first on sys.path, where ./kernels shadows the
    # PyPI `kernels` that transformers 5.25 imports (tests/conftest.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    single = subprocess.run([sys.executable, "-m", "headslim", "shrink", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "headslim", "shrink", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"heads_after"') == 1  # one report: rank 0's
    one = json.loads((tmp_path / "one" / "headslim_plan.json").read_text())
    two = json.loads((tmp_path / "two" / "headslim_plan.json").read_text())
    assert two["attention"]["kept_heads"] == one["attention"]["kept_heads"]
    assert two["provenance"]["quality"]["mean_cosine"] == pytest.approx(one["provenance"]["quality"]["mean_cosine"],
                                                                       abs=1e-5)

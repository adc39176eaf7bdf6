"""Data-parallel calibration over ``torch.distributed`` ranks (gloo on CPU, NCCL on GPUs).

Under ``torchrun --nproc-per-node N -m headslim shrink ...`` every rank loads the model and the same
calibration batches, but runs only its share of them: batch ``i`` belongs to rank ``i % N``. What a
pass accumulates over batches (the Fisher scorer's curvature and gradient sums, repair's normal
equations ``X^T X``, ``X^T Y`` and ``||Y||^2``, the held-out check's sums) is summed over the ranks
(:func:`all_sum`) before anything is decided, so every rank takes the same decisions and the plan
and weights equal a single process's up to the order of the float64 summation; rank 0 writes.

Everything random that a batch draws is seeded by the batch's own index (``common.gate_gradients``),
so which rank runs a batch does not change what it computes. Outside ``torchrun`` (no process group)
every function here is the single-process identity.
"""

from __future__ import annotations

import os

import torch

from headslim.errors import HeadslimError


DEVICES = "cpu (default) or cuda[:N]"


def device_for(name: str | None) -> torch.device:
    """The device ``--device NAME`` names, checked: ``cpu`` (or None), ``cuda`` (under ``torchrun``,
    ``cuda:LOCAL_RANK``: one GPU per rank; else the current one) or ``cuda:N``; a one-line error for
    anything else, and for CUDA where this torch has none."""
    text = "cpu" if name is None else str(name).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise HeadslimError(f"--device must be {DEVICES}, not {name!r}")
    if not torch.cuda.is_available():
        raise HeadslimError(f"--device {name}: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    index = int(text[5:]) if ":" in text else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    if index >= torch.cuda.device_count():
        raise HeadslimError(f"--device {name}: cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", index)


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether ``torchrun`` started this process as one of several ranks (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): gloo on
    CPU, NCCL when CUDA is present. True when running data-parallel."""
    import torch.distributed as dist

    if not launched():
        return False
    if not dist.is_available():
        raise HeadslimError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return active()


def teardown() -> None:
    """Leave the process group :func:`setup_from_env` joined (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mine(index: int) -> bool:
    """Whether batch ``index`` (its position in the whole calibration list) is this rank's."""
    return index % world_size() == rank()


def all_sum(*values):
    """The sums over ranks of ``values`` (tensors or numbers), in order; the values themselves with one rank.
    Tensors come back on their own device and dtype; numbers as floats."""
    if not active():
        return values if len(values) != 1 else values[0]
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for v in values:
        t = torch.as_tensor(v, dtype=torch.float64).to(device).clone() if not isinstance(v, torch.Tensor) \
            else v.detach().to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(t)
        out.append(float(t) if not isinstance(v, torch.Tensor) else t.to(device=v.device, dtype=v.dtype))
    return tuple(out) if len(out) != 1 else out[0]


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def check_batches(n_batches: int) -> None:
    """Refuse a calibration set that leaves a rank with no batch."""
    if active() and n_batches < world_size():
        raise HeadslimError(f"{n_batches} calibration batches for {world_size()} ranks: every rank needs at least "
                            "one (give more calibration samples, a smaller --batch-size or fewer ranks)")

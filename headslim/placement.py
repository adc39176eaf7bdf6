"""``--device-map auto``: one model over several devices (accelerate), for the in-memory path.

A model too large for one GPU is loaded on the CPU, then placed whole layers at a time over the GPUs
(and the CPU, if they are not enough) by accelerate's ``infer_auto_device_map``, balanced over the GPUs
as transformers' ``device_map="auto"`` is, and dispatched with ``dispatch_model``. Unlike
``from_pretrained(device_map=...)``, the layers placed on the CPU *run* on the CPU (``main_device="cpu"``)
instead of being offloaded to meta tensors and copied to a GPU at every call: surgery and repair
rewrite real weights wherever they are. accelerate's hooks move each layer's inputs to its device and
the model's outputs back to the inputs' device; what headslim runs inside a layer (gates, captured
projection inputs) follows the tensors it meets.

Each device's weights are given half of 85 % of its free memory (or half of its ``--max-memory``), since
repair keeps an unpruned copy beside the model, placed the same way. The budget is for weights, as in accelerate: activations
come on top (2 GiB beyond a 6 GiB budget for a Llama-3.2-1B shape, 4 x 128 tokens, its 128k vocabulary's
log-probabilities: ``bench/results/gpu_shrink_check/map_speed_1b.md``). Disk offload is refused: ``--layerwise`` is the path for a
model larger than every device together.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from headslim.errors import HeadslimError

DEVICE_MAPS = ("auto",)
DEFAULT_SHARE = 0.85  # without --max-memory: the share of each device's free memory given to weights
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def check_device_map(name: str | None) -> None:
    if name is not None and name not in DEVICE_MAPS:
        raise HeadslimError(f"--device-map must be {' or '.join(DEVICE_MAPS)}, not {name!r}")


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: bytes, 1: bytes, "cpu": bytes}``; a one-line error for
    anything else (an unknown device, a size without a unit, a GPU this machine lacks)."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for part in str(text).split(","):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise HeadslimError(f"--max-memory takes DEVICE=SIZE pairs (0=20GiB,cpu=64GiB), not {text!r}")
        if key == "cpu":
            device: int | str = "cpu"
        elif key.removeprefix("cuda:").isdigit():
            device = int(key.removeprefix("cuda:"))
            if device >= torch.cuda.device_count():
                raise HeadslimError(f"--max-memory names GPU {device}, but this machine has "
                                    f"{torch.cuda.device_count()} CUDA devices")
        else:
            raise HeadslimError(f"--max-memory: devices are GPU numbers (0, 1, ...) or cpu, not {key!r}")
        match = _SIZE.match(size)
        if match is None:
            raise HeadslimError(f"--max-memory: {key}={size.strip()!r} is not a size with a unit (20GiB, 500MB)")
        if device in out:
            raise HeadslimError(f"--max-memory names {key} twice")
        out[device] = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    return out


def plan_device_map(model, max_memory: dict | None = None, *, copies: int = 2) -> dict:
    """The device of every block of ``model`` (``{module name: 0 | 1 | ... | "cpu"}``): whole layers
    (``model._no_split_modules``), balanced over the GPUs, each device given ``1 / copies`` of its memory
    (``max_memory`` in bytes, default: ``DEFAULT_SHARE`` of what is free); a one-line error when the model
    needs the disk."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    budget = get_max_memory(dict(max_memory) if max_memory else None)
    # what a device has free is not all for weights: the activations (a decoder's log-probabilities over
    # its vocabulary, the Fisher probe's graph) need room too; a budget given explicitly is taken as is
    share = 1.0 if max_memory else DEFAULT_SHARE
    budget = {k: int(int(v) * share) // copies for k, v in budget.items()}
    gpus = [k for k in budget if k not in ("cpu", "disk", "mps")]
    if len(gpus) > 1:
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    if "disk" in device_map.values():
        share_text = "half of each device's budget, the other half for repair's copy" if copies == 2 else \
            "each device's budget"
        raise HeadslimError(f"the model does not fit in the memory --device-map may use ({share_text}; --max-memory "
                            "names the devices and their sizes): use --layerwise, which holds one layer at a time")
    return device_map


def split_map(model, devices: list) -> dict:
    """An explicit map: the model's layers in contiguous runs over ``devices`` (as ``auto`` places them),
    everything outside the layers (embeddings, final norm, heads) on the first. For tests and checks
    that need a given split (``bench/gpu_shrink_check.py``: half the layers on a GPU, half on the CPU)."""
    from headslim.arch import get_adapter

    names = {id(m): n for n, m in model.named_modules()}
    layers = [names[id(layer)] for layer in get_adapter(model).layers(model)]
    out = {name: devices[i * len(devices) // len(layers)] for i, name in enumerate(layers)}
    for name in [*model.state_dict(), *(n for n, _ in model.named_buffers())]:  # tied weights by both names
        if not any(name.startswith(layer + ".") for layer in layers):
            out.setdefault(name.rpartition(".")[0], devices[0])
    return out


def place(model, device_map: str | dict = "auto", max_memory: dict | None = None, *, copies: int = 2,
          force_hooks: bool = False) -> dict:
    """Spread ``model`` (on the CPU) over the devices ``device_map`` names (``auto``, or an explicit
    ``{module name: device}`` map); returns the map it used.

    With one device in the map (a machine without GPUs, or a model that fits on the first) the model is
    simply moved there, unless ``force_hooks`` (tests: accelerate's hooks on a CPU-only map)."""
    import logging

    from accelerate import dispatch_model

    if isinstance(device_map, dict):
        resolved = dict(device_map)
    else:
        check_device_map(device_map)
        resolved = plan_device_map(model, max_memory, copies=copies)
    devices = set(resolved.values())
    if len(devices) == 1 and not force_hooks:
        only = next(iter(devices))
        model.to(torch.device("cpu") if only == "cpu" else torch.device("cuda", int(only)))
        model.hf_device_map = dict(resolved)
        return resolved
    # accelerate warns that CPU layers were offloaded to the meta device; with main_device="cpu" they
    # are not (they run where they are), so that warning would be wrong here
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        dispatch_model(model, resolved, main_device="cpu",
                       skip_keys=getattr(model, "_skip_keys_device_placement", None), force_hooks=force_hooks)
    finally:
        log.setLevel(level)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:  # never expected: surgery and repair need real weights
        raise HeadslimError(f"--device-map left {len(meta)} weights on the meta device (first: {meta[0]})")
    return resolved


def summary(device_map: dict) -> dict:
    """``{"cuda:0": n_blocks, "cpu": n_blocks}``: how many of the map's blocks each device holds."""
    def name(d):
        return "cpu" if d == "cpu" else f"cuda:{d}" if isinstance(d, int) else str(d)

    return dict(Counter(name(d) for d in device_map.values()))

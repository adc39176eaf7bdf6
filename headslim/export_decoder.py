"""``headslim export`` for decoder LLMs (Llama, Mistral, Qwen2, Qwen3, GPT-2) and ``headslim generate``.

One ONNX graph with a KV cache runs the prefill (past length 0) and every decode step::

    headslim export slim-llama/ --out slim-llama-onnx/
    headslim generate slim-llama-onnx/ --prompt "Once upon a time" --max-new-tokens 40   # greedy, ORT

Graph (the names optimum and onnxruntime-genai use):

* inputs ``input_ids`` (B, T), ``attention_mask`` (B, past + T: 1 = real token, left padding),
  ``position_ids`` (B, T), and for every layer that keeps a head ``past_key_values.{i}.key`` /
  ``past_key_values.{i}.value`` (B, that layer's own KV heads, past, head_dim);
* outputs ``logits`` (B, T, vocab) and ``present.{i}.key`` / ``present.{i}.value`` (B, kv_i, past + T, D).

Batch, sequence and past length are dynamic. How it is built, and why:

* :class:`DecoderExportModule` runs the model's own submodules (embeddings, norms, q/k/v/o
  projections, Qwen3's q/k norms, the rotary embedding, the MLP whatever its width, ``lm_head``)
  with plain tensor ops: concat the past, gather K/V heads per query head by the layer's
  query→KV-head map (``index_select`` with the map as a constant: uniform GQA, kv-groups and ragged
  layers are the same graph), causal + padding (+ sliding window) additive mask, softmax attention.
  transformers' own cache and mask code does not trace to a graph with a dynamic past, and it
  cannot express per-layer KV head counts. Exported with the TorchScript exporter, like the encoder.
* A layer with no heads left has **no** cache tensors: it is left out of the graph's inputs and
  outputs (zero-size tensors are fragile in ORT) and adds only its output bias. The past length
  is read from ``attention_mask``, never from a cache tensor, so even a model with no attention at
  all decodes. ``export_report.json`` lists the layers that have a cache (``cache_layers``).
* A sliding window (Mistral, Qwen2's sliding layers) is applied in the mask: a query at index q
  sees keys ``q - window < k <= q`` (transformers' rule); the full past is kept.

Validation before the output directory appears: logits on a left-padded batch of different
lengths (prefill, and a prefill + multi-token decode against the past) against the PyTorch model
at real tokens, and greedy generation of ``generate_tokens`` new tokens in ONNX Runtime (numpy
loop, :func:`greedy_generate`) equal token for token to ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from headslim.errors import HeadslimError, first_line

REPORT_FILE = "export_report.json"
MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"
OPTIMIZED_FILE = "model_optimized.onnx"
GENAI_FILE = "genai_config.json"
# onnxruntime-genai reads each layer's KV head count from the graph's cache inputs from 0.15 on
# (microsoft/onnxruntime-genai#2214); before, one num_key_value_heads for every layer.
GENAI_PER_LAYER_KV = "0.15"
# genai's own "gpt2" type expects one combined past_%d cache tensor per layer; its generic decoder
# type reads the separate key / value tensors this graph has (checked on 0.18: tokens equal)
GENAI_TYPE = {"gpt2": "decoder"}
ATOL = 1e-4
GENERATE_TOKENS = 40
DEFAULT_OPSET = 17
INPUTS = ("input_ids", "attention_mask", "position_ids")

PROMPTS = [
    "Pruned heads, same answers.",
    "The quick brown fox jumps over the lazy dog while the band plays on.",
    "Export it once, run it anywhere.",
]


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


# --------------------------------------------------------------------------------------------------
# the export module


def _torch():
    import torch

    return torch


@dataclass
class _LayerInfo:
    """One layer as the export module runs it: query heads, own KV heads, the query→KV-head map,
    head width and sliding window (None: full causal). ``n_q == 0``: no attention, no cache."""

    index: int
    n_q: int
    n_kv: int
    kv_map: list[int]
    head_dim: int
    window: int | None


@lru_cache(maxsize=None)
def _module_class():
    """The export module's class, defined on first use so that importing this module (the CLI does)
    does not import torch."""
    from torch import nn

    class DecoderExportModule(nn.Module):
        """``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents)``.

        ``past`` holds a (key, value) pair, each (B, kv_i, past, D), for every layer in
        ``cache_layers`` (the layers that keep a head), in layer order.
        """

        def __init__(self, model):
            super().__init__()
            from headslim.arch import get_adapter

            adapter = get_adapter(model)
            spec = adapter.export_spec(model.config.model_type)
            if not spec.decoder_layout:
                raise HeadslimError(f"no decoder export layout for {model.config.model_type}")
            self.adapter = adapter
            if model.get_output_embeddings() is None:
                raise HeadslimError(f"{type(model).__name__} has no language-model head: decoders export as causal LMs "
                                    "(…ForCausalLM / GPT2LMHeadModel)")
            self.model = model
            self.blocks = adapter.layers(model)
            maps = adapter.kv_maps(model)
            self.layers = []
            for i, (block, kv_map) in enumerate(zip(self.blocks, maps)):
                head_dim = adapter.head_dim(model)
                n_kv = len(set(kv_map))  # surgery keeps exactly the KV heads some query head reads
                self.layers.append(_LayerInfo(i, len(kv_map), n_kv, list(kv_map), head_dim,
                                              adapter.sliding_window(block, model.config) if kv_map else None))
            self.cache_layers = [info.index for info in self.layers if info.n_q > 0]
            self.fused: set[int] = set()  # layers run as ORT GroupQueryAttention (fuse_gqa)
            torch = _torch()
            for info in self.layers:  # the maps as buffers: constants in the graph
                if info.n_q:
                    self.register_buffer(f"kv_map_{info.index}", torch.tensor(info.kv_map, dtype=torch.long),
                                         persistent=False)

        # ---- masks ----------------------------------------------------------------------------------

        def _mask(self, attention_mask, q_len, window: int | None, dtype):
            """Additive mask (B, 1, T, S): causal over the concatenated sequence, padding, sliding window."""
            torch = _torch()
            total = attention_mask.shape[1]
            q_pos = torch.arange(q_len, device=attention_mask.device) + (total - q_len)  # (T,)
            k_pos = torch.arange(total, device=attention_mask.device)  # (S,)
            allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
            if window is not None:
                allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
            allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, S)
            zero = torch.zeros((), dtype=dtype)
            return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))

        def _attend(self, info, q, k, v, past, mask, scaling):
            """q (B, n_q, T, D); this step's k, v (B, n_kv, T, D); past (key, value) (B, n_kv, P, D)
            -> (out (B, T, n_q * D), present (key, value) (B, n_kv, P + T, D))."""
            torch = _torch()
            k = torch.cat([past[0], k], dim=2)  # (B, n_kv, S, D)
            v = torch.cat([past[1], v], dim=2)
            if info.index in self.fused:  # ORT's GroupQueryAttention: the same math in one node
                b, t = q.shape[0], q.shape[2]
                flat = [z.transpose(1, 2).reshape(b, t, z.shape[1] * info.head_dim)
                        for z in (q, k[:, :, -t:], v[:, :, -t:])]  # (B, T, heads * D)
                out, key, value = _gqa_function().apply(*flat, past[0], past[1], self._seqlens_k, self._total,
                                                        mask, info.n_q, info.n_kv, float(scaling))
                return out, (key, value)
            present = (k, v)
            if info.n_kv != info.n_q or info.kv_map != list(range(info.n_q)):
                index = getattr(self, f"kv_map_{info.index}")
                k, v = k.index_select(1, index), v.index_select(1, index)  # (B, n_q, S, D)
            scores = torch.matmul(q, k.transpose(2, 3)) * scaling + mask  # (B, n_q, T, S)
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(weights, v).transpose(1, 2)  # (B, T, n_q, D)
            return out.reshape(out.shape[0], out.shape[1], info.n_q * info.head_dim), present

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # the family's own layer code (headslim.arch: export_embed / export_layer / export_final)
            x, rotary = self.adapter.export_embed(self.model, input_ids, position_ids)  # (B, T, d)
            masks = {w: self._mask(attention_mask, input_ids.shape[1], w, x.dtype)
                     for w in {info.window for info in self.layers if info.n_q}}
            if self.fused:  # GroupQueryAttention's lengths: every row spans the whole (left-padded) total
                torch = _torch()
                total = torch.ones_like(attention_mask[0]).sum()  # the mask's width, traced as a value
                self._total = total.to(torch.int32)  # scalar
                self._seqlens_k = (torch.ones_like(attention_mask[:, 0]) * (total - 1)).to(torch.int32)  # (B,)
            presents = []
            slot = 0
            for block, info in zip(self.blocks, self.layers):
                pair = None
                if info.n_q:
                    pair = (past[2 * slot], past[2 * slot + 1])
                    slot += 1
                x, present = self.adapter.export_layer(block, info, x, rotary, masks.get(info.window), pair,
                                                       self._attend)
                if present is not None:
                    presents.extend(present)
            logits = self.model.get_output_embeddings()(self.adapter.export_final(self.model, x))
            return (logits, *presents)

    return DecoderExportModule


@lru_cache(maxsize=None)
def _gqa_function():
    """``apply(q, k, v, past_key, past_value, seqlens_k, total, mask, n_q, n_kv, scale) -> (out, key, value)``.

    In PyTorch: the plain attention (cache concat, each KV head repeated for its ``n_q / n_kv``
    consecutive query heads, additive ``mask``), so the traced graph computes what the node does.
    In the ONNX graph: one ``com.microsoft.GroupQueryAttention`` node (``do_rotary=0``: q and k come
    rotated; the padding, causal and sliding-window mask as its ``attention_bias``; ``seqlens_k`` =
    total - 1 for every row, as left padding spans the whole width).
    """
    import torch

    class GroupQueryAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, past_key, past_value, seqlens_k, total, mask, n_q, n_kv, scale):
            b, t = q.shape[0], q.shape[1]
            d = q.shape[2] // n_q
            q = q.view(b, t, n_q, d).transpose(1, 2)
            key = torch.cat([past_key, k.view(b, t, n_kv, d).transpose(1, 2)], dim=2)  # (B, n_kv, S, D)
            value = torch.cat([past_value, v.view(b, t, n_kv, d).transpose(1, 2)], dim=2)
            group = n_q // n_kv
            scores = torch.matmul(q, key.repeat_interleave(group, dim=1).transpose(2, 3)) * scale + mask
            out = torch.matmul(torch.softmax(scores, dim=-1), value.repeat_interleave(group, dim=1))
            return out.transpose(1, 2).reshape(b, t, n_q * d), key, value

        @staticmethod
        def symbolic(g, q, k, v, past_key, past_value, seqlens_k, total, mask, n_q, n_kv, scale):
            from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor as none

            # inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
            # cos_cache, sin_cache, position_ids, attention_bias
            return g.op("com.microsoft::GroupQueryAttention", q, k, v, past_key, past_value, seqlens_k, total,
                        none(g), none(g), none(g), mask, num_heads_i=n_q, kv_num_heads_i=n_kv, scale_f=scale,
                        do_rotary_i=0, local_window_size_i=-1, outputs=3)

    return GroupQueryAttention


def fusion_blocker(info) -> str | None:
    """Why ORT's GroupQueryAttention cannot compute this layer, or None when it can: its query heads
    must read their KV heads in equal consecutive groups (``kv_map == [h // (n_q / n_kv)]``: uniform
    GQA, kv-groups, dense multi-head attention; not ragged layers), and ORT's CPU kernel needs a
    head width that is a multiple of 8."""
    if not info.n_q:
        return "no heads"
    group = info.n_q // info.n_kv
    if info.n_q % info.n_kv or info.kv_map != [h // group for h in range(info.n_q)]:
        return f"ragged: {info.n_q} query heads over {info.n_kv} KV heads in unequal groups (map {info.kv_map})"
    if info.head_dim % 8:
        return f"head_dim {info.head_dim} is not a multiple of 8 (GroupQueryAttention's requirement)"
    return None


def build_export_module(model):
    """A ``DecoderExportModule`` around a causal LM (not copied: it shares the weights).

    ``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents)``; ``past``
    holds a (key, value) pair, each (B, kv_i, past, D), for every layer in ``cache_layers`` (the
    layers that keep a head), in layer order.
    """
    return _module_class()(model)


# --------------------------------------------------------------------------------------------------
# running the graph (numpy)


def graph_layout(sess) -> list[tuple[int, int, int]]:
    """(layer, kv heads, head_dim) of every cache input of an ONNX session, in order."""
    out = []
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values.") and inp.name.endswith(".key"):
            out.append((int(inp.name.split(".")[1]), int(inp.shape[1]), int(inp.shape[3])))
    return out


def position_ids_of(mask):
    """transformers' generate rule: cumsum of the mask − 1, padding positions set to 1."""
    import numpy as np

    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def greedy_generate(sess, input_ids, attention_mask, max_new_tokens: int, *, eos_token_id=None,
                    suppress_eos: bool = False, pad_token_id: int = 0):
    """Greedy decoding with the KV cache in ONNX Runtime (numpy).

    Args:
        sess: an ``onnxruntime.InferenceSession`` of a headslim decoder export.
        input_ids, attention_mask: (B, T) int64, left-padded.
        eos_token_id: an id or list of ids; a row that produced one gets ``pad_token_id`` afterwards
            and generation stops when every row has (unless ``suppress_eos``: eos is never chosen,
            as ``min_new_tokens`` does in transformers).

    Returns:
        (B, T + n) int64: the prompt and the new tokens.
    """
    import numpy as np

    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    layout = graph_layout(sess)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    batch = ids.shape[0]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_of(mask)}
    for layer, kv, d in layout:
        for name in past_names(layer):
            feeds[name] = np.zeros((batch, kv, 0, d), dtype=np.float32)
    out_names = [o.name for o in sess.get_outputs()]
    tokens = ids
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        results = dict(zip(out_names, sess.run(None, feeds)))
        logits = results["logits"][:, -1].astype(np.float64)  # (B, V)
        if suppress_eos and eos:
            logits[:, eos] = -np.inf
        nxt = logits.argmax(-1).astype(np.int64)
        nxt = np.where(done, pad_token_id, nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        if eos and not suppress_eos:
            done |= np.isin(nxt, eos)
            if done.all():
                break
        last_pos = feeds["position_ids"][:, -1:]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": last_pos + 1}
        for layer, _, _ in layout:
            for past, present in zip(past_names(layer), present_names(layer)):
                feeds[past] = results[present]
    return tokens


# --------------------------------------------------------------------------------------------------
# export


@dataclass
class DecoderExportConfig:
    """Options of :func:`export_decoder`.

    Args:
        opset: ONNX opset (14-20; default 17).
        atol: logits must satisfy |onnx - torch| <= atol + 1e-4 * |torch| at real tokens.
        generate_tokens: new tokens of the greedy-generation check (>= 1; default 40).
        optimize: also write ``model_optimized.onnx``, where every layer whose query heads read
            their KV heads in equal consecutive groups runs ORT's fused ``GroupQueryAttention``
            (:func:`fusion_blocker`; ragged layers keep the plain attention), validated like the plain graph.
        quantize: ``int8`` to also write ``model_quantized.onnx`` (dynamic int8 weights, the same
            inputs and outputs), judged by its agreement with the fp32 graph (reported, see
            :func:`_int8_agreement`), not by closeness.
        overwrite, allow_pickle: as for the encoder export.
    """

    opset: int = DEFAULT_OPSET
    atol: float = ATOL
    generate_tokens: int = GENERATE_TOKENS
    optimize: bool = False
    quantize: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        if not 14 <= int(self.opset) <= 20:
            raise HeadslimError(f"opset {self.opset} is not supported for decoder export (use 14-20)")
        if not self.atol > 0:
            raise HeadslimError(f"atol must be > 0, not {self.atol}")
        if self.generate_tokens < 1:
            raise HeadslimError(f"generate_tokens must be >= 1, not {self.generate_tokens}")
        if self.quantize not in (None, "int8"):
            raise HeadslimError(f"--quantize supports int8 only, not {self.quantize!r}")


@dataclass
class DecoderExportReport:
    """What :func:`export_decoder` wrote and checked (``export_report.json``)."""

    out: str
    source: str
    model_type: str
    architecture: str
    task: str
    pruned: bool
    heads_per_layer: list[int]
    kv_heads_per_layer: list[int]
    kv_head_of_q: list[list[int]]
    neurons_per_layer: list[int]
    cache_layers: list[int]
    sliding_window: list[int | None]
    inputs: list[str]
    outputs: list[str]
    opset: int
    exporter: str
    graphs: dict[str, str]
    external_data: str | None  # the weights' file beside the graph when the model is over 2 GB, else None
    validation: dict
    calibration: dict
    quantization: dict | None = None  # how the int8 graph was made and its agreement with fp32
    fusion: dict | None = None  # --optimize: which layers run GroupQueryAttention, and why the others do not
    genai: dict | None = None  # genai_config.json: the file, and whether onnxruntime-genai's tokens were checked
    zero_head_layers: str = ("layers with no heads have no past/present tensors (left out of the graph, "
                             "not zero-size); the past length comes from attention_mask")
    versions: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _probes(tokenizer, config):
    """A left-padded batch of 3 prompts of different lengths: token ids and mask (numpy int64)."""
    import numpy as np

    if tokenizer is None:
        rng = np.random.default_rng(0)
        lengths = (9, 5, 7)
        seq = max(lengths)
        ids = rng.integers(3, config.vocab_size, size=(len(lengths), seq)).astype(np.int64)
        mask = np.zeros_like(ids)
        for r, n in enumerate(lengths):
            mask[r, seq - n:] = 1
        pad = getattr(config, "pad_token_id", None) or 0
        return np.where(mask == 1, ids, pad), mask, {"source": "synthetic token ids (no tokenizer)"}
    enc = tokenizer(PROMPTS, padding=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    return ids, mask, {"source": "built-in prompts"}


def load_tokenizer(path: Path):
    """The tokenizer in ``path`` set up for batched generation (left padding, a pad token), or None."""
    from headslim.checkpoints import optional_tokenizer

    tok = optional_tokenizer(path)
    if tok is not None:
        tok.padding_side = "left"
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
    return tok


def _pad_id(config, tokenizer) -> int:
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) else eos
    return int(pad or 0)


def _export_graph(module, path: Path, opset: int) -> tuple[list[str], list[str]]:
    """Trace ``module`` to ``path`` (TorchScript exporter); ``module.fused`` layers become
    ``com.microsoft.GroupQueryAttention`` nodes. Returns the input and output names."""
    import warnings

    torch = _torch()
    batch, seq, past = 2, 3, 4
    ids = torch.randint(3, 10, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    pasts, in_names, out_names = [], list(INPUTS), ["logits"]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    for info in module.layers:
        if not info.n_q:
            continue
        for name in past_names(info.index):
            pasts.append(torch.zeros(batch, info.n_kv, past, info.head_dim))
            in_names.append(name)
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
        for name in present_names(info.index):
            out_names.append(name)
            axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (ids, mask, pos, *pasts), str(path), input_names=in_names,
                              output_names=out_names, dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False,
                              custom_opsets={"com.microsoft": 1} if module.fused else None)
    except HeadslimError:
        raise
    except Exception as e:
        raise HeadslimError(f"torch.onnx.export (torchscript) failed for the decoder: {first_line(e)}") from e
    return in_names, out_names


def _check_logits(sess, model, ids, mask, atol: float, step: int = 3) -> dict:
    """Logits of a prefill, and of a prefill + a ``step``-token decode against the past, vs PyTorch at
    real tokens (``step`` 1 for a fused graph: ORT's GroupQueryAttention takes several new tokens
    with a past at batch size 1 only)."""
    import numpy as np

    torch = _torch()
    pos = position_ids_of(mask)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos)).logits.double().numpy()  # (B, T, V)
    layout = graph_layout(sess)
    out_names = [o.name for o in sess.get_outputs()]
    batch, seq = ids.shape
    split = seq - step

    def run(lo, hi, past):
        feeds = {"input_ids": ids[:, lo:hi], "attention_mask": mask[:, :hi], "position_ids": pos[:, lo:hi]}
        for layer, kv, d in layout:
            for j, name in enumerate(past_names(layer)):
                feeds[name] = past[layer][j] if past else np.zeros((batch, kv, 0, d), dtype=np.float32)
        res = dict(zip(out_names, sess.run(None, feeds)))
        cache = {layer: (res[present_names(layer)[0]], res[present_names(layer)[1]]) for layer, _, _ in layout}
        return res["logits"].astype(np.float64), cache

    full, _ = run(0, seq, None)
    first, cache = run(0, split, None)
    step, _ = run(split, seq, cache)
    real = mask == 1
    result = {}
    for name, got, lo in (("prefill", full, 0), ("prefill+decode", np.concatenate([first, step], axis=1), 0)):
        diff = np.abs(got - ref)[real]
        bound = (atol + 1e-4 * np.abs(ref))[real]
        result[name] = {"max_abs_diff": float(diff.max()), "ok": bool((diff <= bound).all())}
        if not result[name]["ok"]:
            raise HeadslimError(f"ONNX logits differ from PyTorch ({name}, left-padded batch {list(ids.shape)}): "
                                f"max |diff| {diff.max():.2e} > {atol:g} + 1e-4*|ref|")
    result["atol"] = atol
    result["shape"] = [int(batch), int(seq)]
    result["split"] = int(split)
    return result


def _fused_graph(module, tmp: Path, in_names, config, model, ids, mask, pad, options) -> dict:
    """``model_optimized.onnx``: the fusable layers as ``GroupQueryAttention`` nodes, validated as the
    plain graph is (logits, with single-token decode steps; greedy generation). Returns the report's
    ``fusion`` entry (with ``validation`` to move into the report's validation)."""
    import onnx
    import onnxruntime as ort

    from headslim import onnx_utils as ox

    not_fused = {info.index: why for info in module.layers if (why := fusion_blocker(info))}
    fused = [info.index for info in module.layers if info.index not in not_fused]
    entry = {"op": "com.microsoft.GroupQueryAttention", "fused_layers": fused,
             "not_fused": {str(k): v for k, v in not_fused.items()}}
    if not fused:
        entry["reason"] = "no layer can be fused: model_optimized.onnx not written"
        return entry
    path = tmp / OPTIMIZED_FILE
    before = set(tmp.iterdir())
    module.fused = set(fused)
    try:
        _export_graph(module, path, config.opset)
    finally:
        module.fused = set()
    entry["external_data"] = ox.gather_external_data(path, [f for f in tmp.iterdir() if f not in before])
    ox.ensure_inputs(path, in_names, template="input_ids")
    ox.check_graph(path)
    nodes = sum(n.op_type == "GroupQueryAttention" for n in onnx.load(str(path), load_external_data=False).graph.node)
    if nodes != len(fused):
        raise HeadslimError(f"the fused decoder graph has {nodes} GroupQueryAttention nodes, expected {len(fused)}")
    try:
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise HeadslimError(f"onnxruntime cannot load the fused decoder graph: {first_line(e)}") from None
    try:
        entry["validation"] = {"logits": _check_logits(sess, model, ids, mask, config.atol, step=1),
                               "generation": _check_generation(sess, model, ids, mask, config.generate_tokens, pad)}
    except HeadslimError as e:
        raise HeadslimError(f"the fused decoder graph ({OPTIMIZED_FILE}): {e}") from None
    except Exception as e:  # an ORT kernel refusing these shapes
        raise HeadslimError(f"the fused decoder graph ({OPTIMIZED_FILE}) fails in onnxruntime: {first_line(e)}") from None
    return entry


def _eos(model):
    eos = getattr(model.generation_config, "eos_token_id", None)
    return getattr(model.config, "eos_token_id", None) if eos is None else eos


def _prefill_logits(sess, ids, mask):
    """Logits (B, T, V) of one prefill (no past) through an exported graph."""
    import numpy as np

    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_of(mask)}
    for layer, kv, d in graph_layout(sess):
        for name in past_names(layer):
            feeds[name] = np.zeros((ids.shape[0], kv, 0, d), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))["logits"]


def _int8_agreement(sess, qsess, ids, mask, tokens: int, eos, pad: int) -> dict:
    """How far the int8 graph agrees with the fp32 one on the validation prompts (left-padded).

    ``next_token_top1``: share of real prompt positions where both pick the same next token;
    ``greedy_equal_prefix``: per prompt, how many of ``tokens`` greedy new tokens (eos suppressed)
    are equal before the first difference; ``max_abs_logit_diff`` at real positions.
    """
    import numpy as np

    real = mask == 1
    fp, q = _prefill_logits(sess, ids, mask), _prefill_logits(qsess, ids, mask)
    top1 = float((fp.argmax(-1) == q.argmax(-1))[real].mean())
    a = greedy_generate(sess, ids, mask, tokens, eos_token_id=eos, suppress_eos=True, pad_token_id=pad)[:, ids.shape[1]:]
    b = greedy_generate(qsess, ids, mask, tokens, eos_token_id=eos, suppress_eos=True, pad_token_id=pad)[:, ids.shape[1]:]
    prefix = [int(np.cumprod(row).sum()) for row in (a == b)]
    return {"next_token_top1": top1, "max_abs_logit_diff": float(np.abs(fp - q)[real].max()),
            "greedy_equal_prefix": prefix, "greedy_new_tokens": tokens, "prompts": int(ids.shape[0]),
            "prompt_positions": int(real.sum())}


def _check_generation(sess, model, ids, mask, tokens: int, pad: int) -> dict:
    import numpy as np

    torch = _torch()
    from transformers import GenerationConfig

    eos = _eos(model)
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=tokens,
                           min_new_tokens=tokens if eos is not None else 0, pad_token_id=pad, eos_token_id=eos,
                           use_cache=True)
    with torch.no_grad():
        try:
            expected = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                      generation_config=gen).numpy()
        except Exception as e:
            raise HeadslimError(f"the PyTorch model fails to generate: {first_line(e)}") from None
    got = greedy_generate(sess, ids, mask, tokens, eos_token_id=eos, suppress_eos=True, pad_token_id=pad)
    if got.shape != expected.shape or not np.array_equal(got, expected):
        same = int((got[:, ids.shape[1]:] == expected[:, ids.shape[1]:]).all(0).cumprod().sum()) \
            if got.shape == expected.shape else 0
        raise HeadslimError(f"ONNX greedy generation differs from PyTorch's generate after {same} of {tokens} "
                            f"tokens (left-padded batch {list(ids.shape)})")
    return {"new_tokens": tokens, "batch": int(ids.shape[0]), "prompt_lengths": mask.sum(1).tolist(),
            "equal": True, "left_padded": True}


# --------------------------------------------------------------------------------------------------
# onnxruntime-genai


def genai_config(model_config, sess, *, eos, pad: int, filename: str = MODEL_FILE) -> dict:
    """``genai_config.json`` for onnxruntime-genai: the graph's names, shapes and the search defaults.

    ``num_key_value_heads`` / ``num_attention_heads`` are the first cache layer's (genai < 0.15 uses
    them for every layer; from 0.15 each layer's cache shape is read from the graph, so per-layer,
    ragged and zero-head layers work). ``past_present_share_buffer`` is false: the graph concatenates
    the past itself and returns the whole present.
    """
    from headslim.io import position_limit

    layout = graph_layout(sess)
    n_layers = int(getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer"))
    heads = int(getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head"))
    hidden = int(getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd"))
    head_dim = layout[0][2] if layout else int(getattr(model_config, "head_dim", None) or hidden // heads)
    kv = layout[0][1] if layout else int(getattr(model_config, "num_key_value_heads", None) or heads)
    context = position_limit(model_config) or 4096
    bos = getattr(model_config, "bos_token_id", None)
    decoder = {
        "filename": filename,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": head_dim, "hidden_size": hidden, "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_hidden_layers": n_layers,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model = {"type": GENAI_TYPE.get(model_config.model_type, model_config.model_type), "pad_token_id": pad, "vocab_size": int(model_config.vocab_size),
             "context_length": int(context), "decoder": decoder}
    if bos is not None:
        model["bos_token_id"] = bos
    if eos is not None:
        model["eos_token_id"] = eos
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": int(context),
              "min_length": 0, "past_present_share_buffer": False, "early_stopping": True, "top_k": 1,
              "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
              "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
    return {"model": model, "search": search}


def _check_genai(folder: Path, sess, ids, mask, tokens: int, eos, pad: int) -> dict:
    """Greedy tokens from onnxruntime-genai with ``genai_config.json`` against the ORT loop's.

    Each prompt alone (no padding), ``tokens`` new tokens with eos held off (genai's ``min_length``,
    ``suppress_eos`` here). Not installed: says so (the file is written, unchecked).
    """
    import numpy as np

    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"checked": False, "reason": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    version = getattr(og, "__version__", "unknown")

    def run(prompt):
        length = len(prompt) + tokens
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt[None].astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return np.asarray(gen.get_sequence(0), dtype=np.int64)

    equal = []
    try:
        model = og.Model(str(folder))
        prompts = [row[m == 1].astype(np.int64) for row, m in zip(ids, mask)]
        runs = [(prompt, run(prompt)) for prompt in prompts]
    except Exception as e:  # genai raises RuntimeError with its own message
        raise HeadslimError(f"onnxruntime-genai {version} cannot run the export with {GENAI_FILE}: "
                            f"{first_line(e)}") from None
    for prompt, got in runs:
        want = greedy_generate(sess, prompt[None], np.ones((1, len(prompt)), dtype=np.int64), tokens,
                               eos_token_id=eos, suppress_eos=True, pad_token_id=pad)[0]
        if got.shape != want.shape or not np.array_equal(got, want):
            n = min(len(got), len(want)) - len(prompt)
            same = int((got[len(prompt):len(prompt) + n] == want[len(prompt):len(prompt) + n]).cumprod().sum())
            raise HeadslimError(f"onnxruntime-genai {version} generates other tokens than the graph after {same} "
                                f"of {tokens} (prompt of {len(prompt)} tokens)")
        equal.append(len(prompt))
    return {"checked": True, "version": version, "equal": True, "new_tokens": tokens, "prompt_lengths": equal}


def _refuse_short_positions(config, ids, tokens: int) -> None:
    from headslim.io import position_limit

    limit = position_limit(config)
    if limit is not None and ids.shape[1] + tokens > limit:
        raise HeadslimError(f"validation needs {ids.shape[1] + tokens} positions but the model has {limit}; "
                            "lower generate_tokens")


def export_decoder(model_dir: str | Path, out: str | Path, config: DecoderExportConfig | None = None,
                   **options) -> DecoderExportReport:
    """Export a dense or pruned causal LM to one ONNX graph with a KV cache, validated.

    Args:
        model_dir: a headslim pruned dir (``headslim_plan.json``) or a dense Hugging Face dir.
        out: the output directory (must not exist unless ``overwrite``).
        config: a :class:`DecoderExportConfig`, or its fields as keyword ``options``.

    Returns:
        the :class:`DecoderExportReport`, also written to ``out/export_report.json``.

    Raises:
        HeadslimError with a one-line message; nothing is left at ``out`` then.

    Example:
        >>> report = export_decoder("slim-llama/", "slim-llama-onnx/")   # doctest: +SKIP
        >>> report.validation["generation"]["equal"]                      # doctest: +SKIP
        True
    """
    if config is None:
        config = DecoderExportConfig(**options)
    elif options:
        raise HeadslimError("pass either a DecoderExportConfig or keyword options, not both")
    started = time.perf_counter()
    from headslim.arch import get_adapter
    from headslim.onnx_utils import export_versions
    from headslim.io import atomic_output_dir, check_output_dir, load_config, load_model, resolve_model_path
    from headslim.plan import PLAN_FILE

    source = resolve_model_path(model_dir)
    check_output_dir(out, overwrite=config.overwrite, inputs=(source,))
    model_config = load_config(source)
    spec = get_adapter(model_config).export_spec(model_config.model_type)
    if not spec.decoder_layout:
        raise HeadslimError(f"{model_config.model_type} is not a decoder headslim exports")
    model = load_model(source, allow_pickle=config.allow_pickle).float().eval()
    adapter = get_adapter(model)
    module = build_export_module(model).eval()
    tokenizer = load_tokenizer(source)
    ids, mask, calibration = _probes(tokenizer, model.config)
    _refuse_short_positions(model.config, ids, config.generate_tokens)
    pad = _pad_id(model.config, tokenizer)
    pruned = (source / PLAN_FILE).is_file()

    with atomic_output_dir(out, overwrite=config.overwrite, inputs=(source,)) as tmp:
        import onnxruntime as ort

        from headslim import onnx_utils as ox

        path = tmp / MODEL_FILE
        before = set(tmp.iterdir())
        in_names, out_names = _export_graph(module, path, config.opset)
        data_file = ox.gather_external_data(path, [f for f in tmp.iterdir() if f not in before])
        # a model with no heads left never reads attention_mask / position_ids (Llama family): the
        # exporter drops them, but every graph takes the same inputs
        ox.ensure_inputs(path, in_names, template="input_ids")
        ox.check_graph(path)
        options_ = ort.SessionOptions()
        options_.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(path), options_, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise HeadslimError(f"onnxruntime cannot load the exported decoder: {first_line(e)}") from None
        validation = {"logits": _check_logits(sess, model, ids, mask, config.atol),
                      "generation": _check_generation(sess, model, ids, mask, config.generate_tokens, pad)}
        graphs, quantization, fusion = {"fp32-unfused": MODEL_FILE}, None, None
        if config.optimize:
            fusion = _fused_graph(module, tmp, in_names, config, model, ids, mask, pad, options_)
            if fusion["fused_layers"]:
                graphs["fp32-fused"] = OPTIMIZED_FILE
                validation["fused"] = fusion.pop("validation")
        if config.quantize == "int8":
            quantized = tmp / QUANTIZED_FILE
            quantization = ox.quantize_int8(path, quantized)
            ox.ensure_inputs(quantized, in_names, template="input_ids")
            ox.check_graph(quantized)
            try:
                qsess = ort.InferenceSession(str(quantized), options_, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise HeadslimError(f"onnxruntime cannot load the int8 decoder: {first_line(e)}") from None
            quantization["agreement"] = _int8_agreement(sess, qsess, ids, mask, config.generate_tokens,
                                                        _eos(model), pad)
            graphs["int8"] = QUANTIZED_FILE
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / GENAI_FILE).write_text(json.dumps(genai_config(model.config, sess, eos=_eos(model), pad=pad),
                                                 indent=2) + "\n")
        genai = {"file": GENAI_FILE, "graph": MODEL_FILE,
                 "needs": f"onnxruntime-genai >= {GENAI_PER_LAYER_KV}"
                 if len({kv for _, kv, _ in graph_layout(sess)}) > 1 or len(module.cache_layers) < len(module.layers)
                 else "onnxruntime-genai",
                 **_check_genai(tmp, sess, ids, mask, config.generate_tokens, _eos(model), pad)}
        if pruned:
            shutil.copy2(source / PLAN_FILE, tmp / PLAN_FILE)
        calibration["shape"] = list(ids.shape)
        calibration["prompt_lengths"] = mask.sum(1).tolist()
        report = DecoderExportReport(
            out=str(Path(out)), source=str(source), model_type=model_config.model_type,
            architecture=type(model).__name__, task="text-generation-with-past", pruned=pruned,
            heads_per_layer=[i.n_q for i in module.layers], kv_heads_per_layer=[i.n_kv for i in module.layers],
            kv_head_of_q=[i.kv_map for i in module.layers], neurons_per_layer=adapter.num_neurons(model),
            cache_layers=module.cache_layers, sliding_window=[i.window for i in module.layers],
            inputs=in_names, outputs=out_names, opset=config.opset, exporter="torchscript",
            graphs=graphs, external_data=data_file, validation=validation, quantization=quantization,
            fusion=fusion, genai=genai, calibration=calibration, versions=export_versions(),
        )
        report.seconds = round(time.perf_counter() - started, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# headslim generate


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise HeadslimError(f"--ids takes comma-separated token ids, not {text!r}") from None
    if not ids or min(ids) < 0:
        raise HeadslimError(f"--ids takes comma-separated non-negative token ids, not {text!r}")
    return ids


def generate(onnx_dir: str | Path, prompts: list[str] | None = None, ids: list[list[int]] | None = None,
             max_new_tokens: int = 40) -> list[dict]:
    """Greedy decoding of ``prompts`` (or token ``ids``) with a decoder export in ONNX Runtime.

    Returns one dict per prompt: ``prompt``, ``new_ids`` and ``text`` (None without a tokenizer).
    Stops a row at the config's eos token.
    """
    import numpy as np

    path = Path(onnx_dir)
    if not (path / MODEL_FILE).is_file() or not (path / "config.json").is_file():
        raise HeadslimError(f"{path} is not a headslim decoder export (no {MODEL_FILE} / config.json)")
    report = {}
    if (path / REPORT_FILE).is_file():
        report = json.loads((path / REPORT_FILE).read_text())
    if report.get("task") != "text-generation-with-past":
        raise HeadslimError(f"{path} is not a decoder export (headslim generate runs `headslim export` of a decoder)")
    if max_new_tokens < 1:
        raise HeadslimError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    if bool(prompts) == bool(ids):
        raise HeadslimError("give --prompt TEXT (with a tokenizer in the dir) or --ids 1,2,3, not both or neither")
    config = json.loads((path / "config.json").read_text())
    tokenizer = load_tokenizer(path) if prompts else None
    if prompts and tokenizer is None:
        raise HeadslimError(f"{path} has no tokenizer: pass token ids with --ids 1,2,3")
    vocab = int(config.get("vocab_size", 0) or 0)
    if prompts:
        enc = tokenizer(list(prompts), padding=True, return_tensors="np")
        tok_ids, mask = np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64)
        pad = int(tokenizer.pad_token_id or 0)
    else:
        if vocab and max(max(r) for r in ids) >= vocab:
            raise HeadslimError(f"--ids: token ids must be below the vocabulary size {vocab}")
        pad = config.get("pad_token_id")
        pad = 0 if pad is None else int(pad)
        seq = max(len(r) for r in ids)
        tok_ids = np.full((len(ids), seq), pad, dtype=np.int64)
        mask = np.zeros((len(ids), seq), dtype=np.int64)
        for r, row in enumerate(ids):
            tok_ids[r, seq - len(row):] = row
            mask[r, seq - len(row):] = 1
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if limit and tok_ids.shape[1] + max_new_tokens > int(limit):
        raise HeadslimError(f"prompt ({tok_ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed the model's "
                            f"{limit} positions")
    eos = config.get("eos_token_id")
    if (path / "generation_config.json").is_file():
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id", eos)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise HeadslimError(f"onnxruntime cannot load {path / MODEL_FILE}: {first_line(e)}") from None
    tokens = greedy_generate(sess, tok_ids, mask, max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    eos_set = set([] if eos is None else ([eos] if isinstance(eos, int) else eos))
    results = []
    for r in range(tokens.shape[0]):
        new = []
        for t in tokens[r, tok_ids.shape[1]:].tolist():
            new.append(int(t))
            if t in eos_set:
                break
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
        results.append({"prompt": prompts[r] if prompts else ids[r], "new_ids": new, "text": text})
    return results


EXAMPLE = """examples:
  headslim export slim-llama/ --out slim-llama-onnx/
  headslim generate slim-llama-onnx/ --prompt "Once upon a time" --max-new-tokens 40
  headslim generate slim-llama-onnx/ --ids 1,15,27 --ids 1,9 --max-new-tokens 8 --json
"""


def add_parser(subparsers) -> None:
    """Register ``headslim generate`` (called by ``headslim.cli``)."""
    p = subparsers.add_parser("generate", help="greedy text generation with a decoder ONNX export (ONNX Runtime)",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required")
    req.add_argument("model", help="a dir written by `headslim export` from a decoder")
    opt = p.add_argument_group("optional")
    opt.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; needs a tokenizer)")
    opt.add_argument("--ids", action="append", help="comma-separated prompt token ids (repeat for a batch)")
    opt.add_argument("--max-new-tokens", type=int, default=40, help="new tokens per prompt (default 40)")
    opt.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    ids = [_parse_ids(t) for t in args.ids] if args.ids else None
    results = generate(args.model, prompts=args.prompt, ids=ids, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["text"] if r["text"] is not None else ",".join(str(t) for t in r["new_ids"]))
    return 0


def print_summary(report: DecoderExportReport) -> None:
    """The lines ``headslim export`` prints for a decoder."""
    val = report.validation
    print(f"{report.architecture} ({report.model_type}), heads per layer {report.heads_per_layer}, KV heads "
          f"{report.kv_heads_per_layer}, FFN neurons {report.neurons_per_layer}, opset {report.opset}")
    print(f"  KV cache tensors for layers {report.cache_layers} (layers with no heads have none)")
    print(f"  logits vs PyTorch (left-padded batch {val['logits']['shape']}): max |diff| prefill "
          f"{val['logits']['prefill']['max_abs_diff']:.1e}, prefill+decode "
          f"{val['logits']['prefill+decode']['max_abs_diff']:.1e} <= {val['logits']['atol']:g}")
    print(f"  greedy generation: {val['generation']['new_tokens']} new tokens equal to PyTorch's generate "
          f"(batch {val['generation']['batch']}, prompt lengths {val['generation']['prompt_lengths']})")
    if report.fusion is not None:
        f = report.fusion
        if f["fused_layers"]:
            fv = report.validation["fused"]
            print(f"  {OPTIMIZED_FILE}: GroupQueryAttention in layers {f['fused_layers']} "
                  f"({len(f['fused_layers'])} of {len(report.heads_per_layer)}); logits max |diff| prefill "
                  f"{fv['logits']['prefill']['max_abs_diff']:.1e}, prefill+decode "
                  f"{fv['logits']['prefill+decode']['max_abs_diff']:.1e}; greedy generation equal")
        else:
            print(f"  --optimize: {f['reason']}")
        for layer, why in f["not_fused"].items():
            print(f"    layer {layer} not fused: {why}")
    if report.quantization:
        agree = report.quantization["agreement"]
        print(f"  {QUANTIZED_FILE} (int8, {report.quantization['tool']}): next-token top-1 agreement with fp32 "
              f"{agree['next_token_top1']:.3f} over {agree['prompt_positions']} prompt positions; greedy tokens equal "
              f"before the first difference {agree['greedy_equal_prefix']} of {agree['greedy_new_tokens']}")
    if report.genai is not None:
        g = report.genai
        check = (f"onnxruntime-genai {g['version']}: greedy tokens equal to the graph's ({g['new_tokens']} new, "
                 f"prompt lengths {g['prompt_lengths']})" if g.get("checked") else f"not checked: {g['reason']}")
        print(f"  {g['file']} ({g['needs']}): {check}")
    print(f"wrote {report.out} in {report.seconds:.1f} s")

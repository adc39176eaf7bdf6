"""Shrink a model larger than memory: one transformer layer's weights in memory at a time.

:func:`shrink_layerwise` never builds the dense model. Its skeleton is made on the meta device (as
``headslim.load_pruned`` does); weights are read per layer from the memory-mapped safetensors files
(``model.safetensors`` or the shards of ``model.safetensors.index.json``) into the one layer being
worked on, which goes back to the meta device once its shard is written. Outside the layers only the
final norm (and GPT-2's position embeddings) is read whole: the input embedding gives just the rows of
the calibration tokens, and the output embedding (the held-out check's logits) is read in row chunks.

Two passes over the layers:

1. **Score.** The calibration batches are carried layer by layer through the dense model
   (``headslim.layerwise``). A query head's score is the squared norm of its contribution to the
   attention output, ``sum_t ||W_O[:, h] c_h(t)||^2`` over real tokens (the "function norm" of
   Lin et al. 2020): a layer-local quantity, but every layer's contribution lands in the same
   residual stream, so scores of different layers are comparable. The global head budget is then
   split over layers by :func:`headslim.gqa.select_gqa` (GQA modes as for ``shrink``). With
   ``prune_ffn``, each FFN neuron is scored the same way, ``||W_down[:, j]||^2 sum_t a_j(t)^2`` (its
   contribution to the FFN output), and the neuron budget is chosen globally
   (:func:`headslim.selection.select_neurons`), separately from the heads' (two budgets, as
   ``shrink --prune --prune-ffn``). ``method="obs-local"`` instead orders each layer's heads (and
   neurons) by their repair-aware cost: the greedy OBS sequence of
   :func:`headslim.scoring.reconstruction.obs_sequence` with the identity metric, i.e. how much the
   block's output reconstruction error grows when the structure goes and the kept ones are re-fitted
   by least squares (what the repair then does), from the full second moment of the projection's
   input; the layers' sequences are merged by marginal cost (:func:`headslim.scoring.common.merged_scores`).
2. **Prune, repair, write.** Each layer is read again, pruned (``Adapter.prune_block``,
   ``Adapter.prune_mlp``), its output and down projections re-fitted as ``headslim.repair`` does with
   ``inputs="pruned"`` (attention first, then the FFN through the repaired attention; the dense layer's and
   the pruned, already repaired, model's streams carried side by side; the same moments, ridge
   solve and per-layer held-out decision, reusing repair's helpers), and written as its own shard.
   The final held-out check of repair (for a causal LM the mean ``KL(dense || pruned)`` of next-token
   predictions over real held-out tokens, for a bare encoder the mean cosine of the mean-pooled sentence
   embeddings, repaired against unrepaired, as ``headslim.repair`` judges) is computed from carried
   streams too (a third one, the pruned model without repair, on the held-out batches only) with the
   logits built in vocabulary chunks; when the repair does not bring the outputs closer to dense, the
   re-fitted output projections in the written shards are put back to their plain sliced weights.

The result is what ``headslim.repair.repair`` gives in memory for the same plan and batches (parity
test: ``tests/test_offload.py``), written as ``save_pruned`` writes a model (config with headslim's
record, ``headslim_plan.json``, the output marker), sharded: one shard per layer and one for the
weights outside the layers, with ``model.safetensors.index.json``.

Scope: causal LMs of the Llama family (llama, mistral, qwen2, qwen3) and GPT-2 (its ``Conv1D``
projections store weights ``(in, out)``; the undo slices their rows), and bare encoders of the BERT
family and DistilBERT (``AutoModel``, sentence-embedding models; their sentence-transformers files are
copied; a layer that keeps no head keeps a bias-only output projection, re-fitted as in memory).
Models with a task head on an encoder are refused. Every layer must receive the
same call arguments (mask, rotary embeddings), recorded once from layer 0; models that mix full and
sliding-window layers (Qwen2/Qwen3 with ``use_sliding_window``) are refused, a Mistral whose layers all
slide is fine. The carried streams (and a layer's outputs and references) stay in memory up to
``stream_memory`` bytes and go to safetensors files past it (:class:`headslim.layerwise.Spill`).
With ``work_dir``, each finished layer (pass 1: its scores and the dense stream after it; pass 2: its
shard and the three streams after it) is committed to a directory the user named, and a run started
again with the same arguments resumes after the last committed layer (:mod:`headslim.workdir`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from headslim.arch import get_adapter, kv_maps, weight_out_in
from headslim.errors import HeadslimError
from headslim.layerwise import SAFE_DTYPES, Call, Spill, Store, Stream, layer_calls, write_streamed
from headslim.plan import PLAN_FILE, PrunePlan
from headslim.repair import (RepairReport, _add, _error, _has_bias, _o_weight, _run_layer, _set_o_weight,
                             _solve, _split, repair_sites, site_columns)
from headslim.workdir import WorkDir

# adapter name -> the model types it covers, as the refusal names them
FAMILIES = {"llama-family": "llama, mistral, qwen2, qwen3", "gpt2": "gpt2",
            "bert-family": "bert, roberta, xlm-roberta, electra", "distilbert": "distilbert"}
METHOD = "function-norm"  # the default layer-local scorer
OBS_LOCAL = "obs-local"  # repair-aware: each projection's reconstruction error after the re-fit
METHODS = (METHOD, OBS_LOCAL)
SHARD = "model-{:05d}-of-{:05d}.safetensors"
# elements of one temporary block (embedding rows read, logits of a vocabulary chunk): bounded memory
CHUNK_ELEMENTS = 1 << 22
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


# --------------------------------------------------------------------------------------------------
# reading


class Checkpoint:
    """The tensors of a safetensors checkpoint dir, read on demand.

    Each read opens the file with ``safetensors.safe_open`` and closes it again: a mapping left open
    keeps every page read through it resident in this process (its RSS grows to the whole file),
    while a closed one leaves them to the page cache, which the kernel can drop.

    Args:
        path: a checkpoint dir with ``model.safetensors`` or ``model.safetensors.index.json`` (pickle
            weights are refused, never unpickled).
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        from headslim.io import _check_weights, _safetensors_files

        _check_weights(path, allow_pickle=False)  # one-line errors: no weights, pickle weights only
        self.path = path
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in _safetensors_files(path):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in self.where:
                        raise HeadslimError(f"{path}: weight {key} is in two shards")
                    view = f.get_slice(key)
                    self.where[key], self.shapes[key], self.dtypes[key] = str(file), tuple(view.get_shape()), \
                        view.get_dtype()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor (for one layer's weights)."""
        from safetensors import safe_open

        with safe_open(self.where[key], framework="pt") as f:
            return f.get_tensor(key)

    def rows(self, key: str, runs: list[tuple[int, int]]) -> torch.Tensor:
        """Rows ``start:stop`` of each run, concatenated, reading only those."""
        from safetensors import safe_open

        with safe_open(self.where[key], framework="pt") as f:
            view = f.get_slice(key)
            return torch.cat([view[a:b] for a, b in runs])

    def resolve(self, name: str, prefix: str) -> str | None:
        """The checkpoint's key for the model's parameter ``name`` (with or without the base model's
        ``prefix``, as transformers accepts either); None when it has none."""
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in self.where:
                return key
        return None


def _skeleton(config):
    """The model of ``config`` with every parameter on the meta device (buffers, small and computed at
    construction, such as the rotary frequencies, are real)."""
    from accelerate import init_empty_weights

    from headslim.io import _new_model

    with init_empty_weights(include_buffers=False):
        model = _new_model(config)
    return model.eval()


def _to_dtype(model, dtype: torch.dtype) -> None:
    """Every floating parameter of the (meta) skeleton as ``dtype``; the rotary buffers stay as built."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=False)


def _materialise(module: nn.Module, prefix: str, ckpt: Checkpoint, keys: dict, dtype: torch.dtype) -> None:
    """Read ``module``'s parameters (model names ``prefix`` + name) from the checkpoint into it, as ``dtype``."""
    from headslim.io import _refuse_non_finite

    state = {name: ckpt.get(keys[prefix + name]).to(dtype) for name in module.state_dict()}
    _refuse_non_finite(state.items(), ckpt.path)
    module.load_state_dict(state, assign=True)


def _materialise_outside(model, prefixes: list[str], skip: tuple[str, ...], ckpt: Checkpoint, keys: dict,
                         dtype: torch.dtype, device: torch.device) -> None:
    """Read the parameters outside the layers but the embeddings ``skip`` (the final norm; GPT-2's
    position embeddings, ``n_positions x hidden``): the model's own forward up to layer 0 and its final
    norm then run as they are."""
    from headslim.io import _refuse_non_finite

    for name, _ in model.named_parameters():
        if name in skip or name.startswith(tuple(prefixes)):
            continue
        tensor = ckpt.get(keys[name]).to(dtype)
        _refuse_non_finite([(name, tensor)], ckpt.path)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(tensor.to(device), requires_grad=False)


def _load_layer(ckpt: Checkpoint, model, index: int, prefix: str, keys: dict, dtype: torch.dtype) -> nn.Module:
    """Materialise layer ``index`` of ``model`` (its parameters named ``prefix`` + name); the tests wrap
    this to count the layers in memory."""
    layer = get_adapter(model).layers(model)[index]
    _materialise(layer, prefix, ckpt, keys, dtype)
    return layer


def _free(module: nn.Module) -> None:
    """Its parameters back to the meta device: the weights' memory is released. Buffers stay (GPT-2's
    causal-mask buffers under transformers 4.x are built, not read, so a layer read again needs them)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)
    _release_memory()


def _release_memory() -> None:
    """Hand freed heap pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps the pages of freed large temporaries (a layer's activations, repair's moments) in its
    heaps, so without this the resident set grows towards the sum of every layer's peaks instead of
    following what is live.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def materialised_layers(model) -> int:
    """How many of ``model``'s layers hold a parameter that is not on the meta device."""
    return sum(any(not p.is_meta for p in layer.parameters()) for layer in get_adapter(model).layers(model))


def _row_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``ids`` as ``[start, stop)`` runs of consecutive values."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def _embed(ckpt: Checkpoint, key: str, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The input embeddings of ``input_ids`` ``(B, T)`` -> ``(B, T, d)``, reading only the rows they use."""
    ids, inverse = torch.unique(input_ids, return_inverse=True)
    table = ckpt.rows(key, _row_runs(ids.tolist())).to(dtype)  # (U, d)
    return table[inverse]


def _entry(ckpt: Checkpoint, model, keys: dict, embed_key: str, batches: list, dtype: torch.dtype,
           spill: Spill | None = None, device: torch.device = torch.device("cpu"), keep: bool = True):
    """Per batch, the stream entering layer 0 (a :class:`Store` kept by ``spill``; left empty without
    ``keep``: a resumed run takes its streams from the work dir) and the :class:`Call` every layer gets
    (one pass of the skeleton up to layer 0, fed the embeddings of the batch's tokens)."""
    hidden, calls = Store(spill), []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k in ("attention_mask", "position_ids", "token_type_ids")}
        inputs["inputs_embeds"] = _embed(ckpt, keys[embed_key], batch["input_ids"], dtype)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        first, (call,) = layer_calls(model, inputs, every_layer=False)
        if keep:
            hidden.append(first)
        calls.append(call)
    return hidden, calls


class _Carried(Stream):
    """A :class:`Stream` started from given entry states, every layer given the same call.

    Built without ``Stream.__init__``, which runs the model's embeddings (here they are never whole).
    """

    def __init__(self, model, hidden, calls: list[Call], spill: Spill | None = None):  # no super().__init__: it would run the model
        self.model, self.layer, self.spill = model, 0, spill
        self.layers = get_adapter(model).layers(model)
        self.hidden = Store(spill, hidden)
        self.calls = [[call] * len(self.layers) for call in calls]


# --------------------------------------------------------------------------------------------------
# writing


def _row_chunks(ckpt: Checkpoint, key: str, rows_per_chunk: int):
    n = ckpt.shape(key)[0] if ckpt.shape(key) else 0

    def chunks():
        if not ckpt.shape(key):  # a scalar
            yield ckpt.get(key)
            return
        for start in range(0, n, rows_per_chunk):
            yield ckpt.rows(key, [(start, min(start + rows_per_chunk, n))])
    return chunks


def _tensor_chunks(tensor: torch.Tensor):
    """``chunks()`` for :func:`write_streamed`: a tensor in memory, a bounded block of rows at a time."""
    rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(tensor.shape[1:]))) if tensor.dim() else 1

    def chunks():
        if not tensor.dim():
            yield tensor
            return
        for start in range(0, len(tensor), rows):
            yield tensor[start:start + rows]
    return chunks


def _write_layer(path: Path, layer: nn.Module, prefix: str, dtype: torch.dtype) -> int:
    """One layer's shard (``save_file`` would first copy the whole layer into one bytes object)."""
    return write_streamed(path, [(prefix + k, dtype, tuple(v.shape), _tensor_chunks(v.detach()))
                                  for k, v in layer.state_dict().items()])


def _restore_projection(path: Path, name: str, ckpt: Checkpoint, keys: dict, columns: torch.Tensor,
                        transposed: bool = False) -> None:
    """Put the plain sliced output projection ``name`` (the dense one's input ``columns``: the kept
    heads' or neurons', re-read from the checkpoint) back into a written layer shard. ``transposed``:
    the weight is stored ``(in, out)`` (GPT-2's ``Conv1D``), so the columns are its rows."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))  # one layer
    if name + ".weight" in state:  # not in a bias-only projection (an encoder layer that kept no head or neuron)
        weight = ckpt.get(keys[name + ".weight"]).index_select(0 if transposed else 1, columns)  # (d, p) or (p, d)
        state[name + ".weight"] = weight.to(state[name + ".weight"].dtype).contiguous()
    if name + ".bias" in state:  # slicing input columns keeps the dense bias
        state[name + ".bias"] = ckpt.get(keys[name + ".bias"]).to(state[name + ".bias"].dtype).contiguous()
    partial = path.with_name(path.name + ".partial")  # a new file: a work dir's link to the old one keeps it
    save_file(state, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------------
# the held-out check: KL(dense || model) of next-token predictions, vocabulary in chunks


@torch.no_grad()
def _mean_kls(ref: torch.Tensor, others: list[torch.Tensor], head: Callable, vocab: int,
              dtype: torch.dtype) -> list[float]:
    """Mean over tokens of ``KL(softmax(ref W^T) || softmax(x W^T))`` for each ``x`` in ``others``.

    ``ref``, ``others``: final-normed hidden states ``(N, d)`` of real tokens; ``head(a, b)``: rows
    ``a:b`` of the output embedding ``W``. Logits are computed in ``dtype`` (as the model computes
    them) and compared in float64, a chunk of the vocabulary at a time, with running log-sum-exps.
    """
    n = len(ref)
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    on = {"dtype": torch.float64, "device": ref.device}
    m = torch.full((n,), -math.inf, **on)  # running max of the reference logits
    s = torch.zeros(n, **on)  # sum exp(z_ref - m)
    t = [torch.zeros(n, **on) for _ in others]  # sum exp(z_ref - m) (z_ref - z_x)
    lse = [torch.full((n,), -math.inf, **on) for _ in others]
    for start in range(0, vocab, rows):
        w = head(start, min(start + rows, vocab)).to(device=ref.device, dtype=dtype)  # (r, d)
        z = nn.functional.linear(ref, w).double()  # (N, r)
        new_m = torch.maximum(m, z.max(1).values)
        scale, e = torch.exp(m - new_m), torch.exp(z - new_m[:, None])
        s = s * scale + e.sum(1)
        for k, x in enumerate(others):
            zx = nn.functional.linear(x, w).double()  # (N, r)
            t[k] = t[k] * scale + (e * (z - zx)).sum(1)
            lse[k] = torch.logaddexp(lse[k], torch.logsumexp(zx, 1))
        m = new_m
    lse_ref = m + torch.log(s)
    return [float((tk / s - lse_ref + lk).sum()) / max(n, 1) for tk, lk in zip(t, lse)]


def _mean_cosines(ref: torch.Tensor, others: list[torch.Tensor]) -> list[float]:
    """Mean over samples of the cosine between ``ref`` ``(N, d)`` and each of ``others``."""
    return [float(nn.functional.cosine_similarity(ref, x, dim=-1).mean()) for x in others]


def _sequence_costs(sequences: list, counts: list[int]) -> torch.Tensor:
    """``(layers, max count)`` float64: each structure's marginal cost in its layer's greedy removal
    sequence, made non-decreasing along the sequence (a structure never costs less than one removed
    before it), so that taking the cheapest first keeps every layer's removals a prefix of its sequence."""
    costs = torch.zeros(len(counts), max(counts, default=0), dtype=torch.float64)
    for layer, seq in enumerate(sequences):
        running = 0.0
        for index, cost in seq:
            running = max(running, cost)
            costs[layer, index] = running
    return costs


def _structure_params(model, adapter) -> tuple[list[float], list[float]]:
    """Per layer, the parameters one query head and one FFN neuron hold (weights; biases left out): a
    head its Q rows and O columns and its share of its KV head's K and V rows, a neuron its row (two in
    a gated FFN) and its down-projection column. From the (meta) skeleton's shapes."""
    heads, kv, head_dim = adapter.num_heads(model), kv_maps(model), adapter.head_dim(model)
    hidden = [weight_out_in(adapter.o_proj(b)).shape[0] for b in adapter.attention_blocks(model)]
    per_head = [2 * head_dim * d * (1 + len(set(kv[l])) / max(n, 1)) for l, (n, d) in enumerate(zip(heads, hidden))]
    per_neuron = [(3 if adapter.gated_mlp else 2) * d for d in hidden]
    return per_head, per_neuron


def _params_removed(plan: PrunePlan, head_params: list[float], neuron_params: list[float],
                    target: float | None) -> dict:
    """The share of the heads' and FFN neurons' parameters ``plan`` removes (as
    :func:`_structure_params` counts them), and the ``--prune-params`` target if one was given."""
    widths = plan.num_neurons or [0] * len(plan.num_heads)
    kept_n = plan.kept_neurons or [[] for _ in widths]
    total = sum(n * hp + w * np for n, w, hp, np in zip(plan.num_heads, widths, head_params, neuron_params))
    gone = sum((n - len(k)) * hp + (w - len(kn)) * np for n, k, w, kn, hp, np
               in zip(plan.num_heads, plan.kept_heads, widths, kept_n, head_params, neuron_params))
    return {"target": target, "removed": gone / max(total, 1e-30)}


def _pooled(stream: Stream, rows: list[tuple[int, int]], masks: list) -> torch.Tensor:
    """Mean-pooled sentence embeddings ``(N, d)`` float64 of the carried final hidden states: stream item
    ``j`` with batch ``i``'s mask, for each ``(j, i)`` in ``rows``."""
    from headslim.quality import pool

    return torch.cat([pool(stream.hidden[j], masks[i]).double() for j, i in rows])


# --------------------------------------------------------------------------------------------------
# the two passes


@torch.no_grad()
def _score_layer(stream: Stream, block, mlp, adapter, masks: list, n_heads: int, head_dim: int, neurons: bool = False,
                 method: str = METHOD, ridge: float = 1e-2):
    """``(heads, neurons or None, the layer's outputs per batch)``.

    ``function-norm``: heads and neurons are score vectors (float64): each head's summed squared
    contribution ``||W_O[:, h] c_h||^2`` to the attention output over real tokens; with ``neurons``,
    each FFN neuron's to the FFN output, ``||W_down[:, j]||^2 sum_t a_j^2`` (its activation ``a_j``: what
    the down projection reads). ``obs-local``: they are greedy removal sequences ``[(index, marginal
    cost), ...]`` (:func:`headslim.scoring.reconstruction.obs_sequence` with the identity metric): the
    output projection's reconstruction error after the least-squares re-fit the repair makes, from the
    full second moment of its input over real tokens (centred where the projection has a bias, which
    the re-fit also moves)."""
    o_proj = adapter.o_proj(block)
    down = adapter.down_proj(mlp) if neurons else None
    local = method == OBS_LOCAL
    got: dict = {}
    handles = [o_proj.register_forward_pre_hook(lambda module, args: got.__setitem__("c", args[0]))]
    if neurons:
        handles.append(down.register_forward_pre_hook(lambda module, args: got.__setitem__("a", args[0])))
    sums = {key: {"c": 0, "cc": 0, "n": 0} for key in ("c", "a")}  # obs-local: input moments
    if not local:
        w = weight_out_in(o_proj).detach().double()  # (d, H * D)
        w = w.view(w.shape[0], n_heads, head_dim)
        gram = torch.einsum("khd,khe->hde", w, w)  # (H, D, D): W_h^T W_h
        moment = torch.zeros_like(gram)  # (H, D, D): sum_t c_h c_h^T
        if neurons:
            column_norms = weight_out_in(down).detach().double().pow(2).sum(0)  # (F,)
            energy = torch.zeros_like(column_norms)  # (F,): sum_t a_j^2
    outputs = Store(stream.spill)
    try:
        for i, mask in enumerate(masks):
            outputs.append(stream.run(i))
            for key in ("c", "a") if neurons else ("c",):
                x = got.pop(key)[mask].double()  # (N, H * D) or (N, F)
                if local:
                    acc = sums[key]
                    acc["c"], acc["cc"], acc["n"] = acc["c"] + x.sum(0), acc["cc"] + x.T @ x, acc["n"] + len(x)
                elif key == "c":
                    c = x.view(-1, n_heads, head_dim)  # (N, H, D)
                    moment += torch.einsum("nhd,nhe->hde", c, c)
                else:
                    energy += x.pow(2).sum(0)
    finally:
        for handle in handles:
            handle.remove()
    if not local:
        return (gram * moment).sum((1, 2)).cpu(), ((column_norms * energy).cpu() if neurons else None), outputs
    from headslim.scoring.reconstruction import obs_sequence

    def sequence(proj, acc, group):
        n = max(acc["n"], 1)
        sigma = acc["cc"] / n
        if _has_bias(proj):  # the re-fit moves the bias too: what it cannot explain is the centred part
            mean = acc["c"] / n
            sigma = sigma - torch.outer(mean, mean)
        return obs_sequence(sigma.cpu(), None, weight_out_in(proj), group, ridge)

    heads = sequence(o_proj, sums["c"], head_dim)
    neuron_seq = sequence(down, sums["a"], 1) if neurons else None
    return heads, neuron_seq, outputs


def _check_inputs(model_dir, out, *, prune, gqa: str, holdout: float, min_heads_per_layer: int, overwrite: bool,
                  prune_ffn=None, min_neurons_per_layer: int = 0, prune_params: float | None = None):
    """Every check that needs no weights: ``(path, config, adapter)``; one-line errors, nothing written."""
    from headslim.gqa import GQA_MODES
    from headslim.io import _load_config, _model_dir, check_output_dir
    from headslim.pipeline import check_prune_ffn, check_prune_target

    path = _model_dir(model_dir)
    check_output_dir(out, overwrite=overwrite, inputs=(path,))
    if (path / PLAN_FILE).is_file():
        raise HeadslimError(f"{path} is already pruned by headslim; shrink its dense original instead")
    config = _load_config(path)
    adapter = get_adapter(config)
    if adapter.name not in FAMILIES:
        raise HeadslimError(f"layer-at-a-time shrink supports {', '.join(FAMILIES.values())}, not "
                            f"{config.model_type}; use headslim shrink")
    types = getattr(config, "layer_types", None)
    if types and len(set(types)) > 1:
        kinds = ", ".join(sorted(set(types)))
        raise HeadslimError(f"{config.model_type}: layers of different attention types ({kinds}) get different masks; "
                            "layer-at-a-time shrink handles models whose layers all get the same")
    if gqa not in GQA_MODES:
        raise HeadslimError(f"unknown --gqa mode {gqa!r}; available: {', '.join(GQA_MODES)}")
    if not 0.0 <= holdout < 1.0:
        raise HeadslimError("holdout must be in [0, 1)")
    if prune_params is not None:
        if prune != 0 or prune_ffn is not None:
            raise HeadslimError("--prune-params decides how many heads and neurons go: leave out --prune and --prune-ffn")
        if isinstance(prune_params, bool) or not isinstance(prune_params, (int, float)) or not 0 < prune_params < 1:
            raise HeadslimError(f"--prune-params must be a fraction in (0, 1), not {prune_params!r}")
        if min_neurons_per_layer < 0:
            raise HeadslimError(f"--min-neurons-per-layer must be >= 0, not {min_neurons_per_layer}")
    elif prune_ffn is None or prune != 0:  # --prune 0 with --prune-ffn: neurons only
        check_prune_target(prune, config, min_heads_per_layer)
    if prune_ffn is not None:
        check_prune_ffn(prune_ffn, min_neurons_per_layer)
        width, layers = adapter.intermediate_size(config), int(config.num_hidden_layers)
        n = int(round(prune_ffn * width * layers)) if isinstance(prune_ffn, float) else prune_ffn
        if n > width * layers - layers * min(min_neurons_per_layer, width):
            raise HeadslimError(f"cannot remove {n} of {width * layers} FFN neurons while keeping "
                                f"{min_neurons_per_layer} per layer")
    return path, config, adapter


def _weight_keys(ckpt: Checkpoint, model, skip: str | None) -> dict:
    """Model parameter name -> checkpoint key, for every weight the pruned checkpoint holds (all but
    ``skip``, the output embedding when it is tied to the input one); a one-line error for a weight
    the checkpoint lacks or holds in another shape."""
    keys = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if name == skip:
            continue
        key = ckpt.resolve(name, model.base_model_prefix)
        if key is None:
            raise HeadslimError(f"{ckpt.path}: weight {name} is missing from the checkpoint")
        if ckpt.shape(key) != tuple(p.shape):
            raise HeadslimError(f"{ckpt.path}: weight {key} is {ckpt.shape(key)}, the config gives {tuple(p.shape)}")
        keys[name] = key
    return keys


def _fingerprint(path: Path, batches: list, **settings) -> dict:
    """What a work dir's run must match to be resumed: source weights, settings, calibration batches.
    Not the output dir: a resumed run may write elsewhere."""
    from headslim._version import __version__
    from headslim.io import _safetensors_files
    from headslim.workdir import batches_sha256, files_fingerprint

    return {"source model": str(path.resolve()),
            "source weights": files_fingerprint(path, [*_safetensors_files(path), path / "config.json"]),
            **{k.replace("_", " "): (str(v) if isinstance(v, torch.dtype) else v) for k, v in settings.items()},
            "calibration batches": batches_sha256(batches), "headslim version": __version__}


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` a hard link to ``src`` (no copy of the bytes) where the file system allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_side_files(src: Path, dst: Path) -> None:
    """The tokenizer, the generation config and a sentence-transformers pipeline (pooling, normalisation)."""
    from headslim.io import copy_sentence_transformers_files

    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    copy_sentence_transformers_files(src, dst)


def shrink_layerwise(model_dir: str | Path, out: str | Path, *, prune: float | int, batches: list[dict],
                     gqa: str = "uniform", holdout: float = 0.25, repair: bool = True, ridge: float = 1e-2,
                     min_heads_per_layer: int = 1, prune_ffn: float | int | None = None,
                     min_neurons_per_layer: int = 0, dtype: torch.dtype | None = None, overwrite: bool = False,
                     provenance: dict | None = None, progress: bool = True, stream_memory: int | None = None,
                     spill_dir: str | Path | None = None, work_dir: str | Path | None = None,
                     method: str = METHOD, device: str | torch.device | None = None,
                     prune_params: float | None = None) -> dict:
    """Score, select, prune, repair and write a Llama-family or GPT-2 causal LM, or a bare BERT-family /
    DistilBERT encoder, one layer at a time; see the module docstring.

    Args:
        model_dir: dense checkpoint dir (safetensors, one file or sharded).
        out: the pruned checkpoint dir to create (``headslim.load_pruned(out)`` reloads it).
        prune: fraction (float in (0, 1)) or number (int) of query heads to remove.
        batches: tokenised calibration batches (``input_ids``, ``attention_mask``), as ``headslim.data.batches``.
        gqa: ``uniform``, ``kv-groups`` or ``ragged`` (``headslim.gqa``).
        holdout, ridge: as for ``headslim.repair.repair`` (the held-out share decides per layer and
            overall whether the re-fit is kept; 0 keeps every fit unchecked).
        repair: re-fit each pruned layer's output projection.
        min_heads_per_layer: query heads every layer keeps at least.
        prune_ffn: fraction (float in [0, 1)) or number (int) of FFN neurons to remove, scored by the
            function norm of their contribution to the FFN output and chosen globally; their down
            projections are re-fitted as the output projections are. None: the FFNs stay whole.
            With it, ``prune`` may be 0 (neurons only).
        min_neurons_per_layer: FFN neurons every layer keeps at least (0: a layer may lose its FFN).
        dtype: compute and output dtype; None: the checkpoint's (its input embedding's) dtype.
        overwrite: replace an existing ``out`` written by headslim.
        provenance: merged into the plan's provenance (calibration source, ...).
        progress: progress bars over the layers.
        stream_memory: bytes of carried streams (and a layer's outputs and references) kept in memory;
            the rest goes to safetensors files in a directory made under ``spill_dir`` (default: the
            system's temporary directory) and removed at the end, interrupted or not. None: no limit.
        prune_params: instead of ``prune`` / ``prune_ffn`` (give 0 and None), one budget: this fraction
            (in (0, 1)) of the parameters the heads and FFN neurons hold goes, the cheapest first by
            estimated cost per parameter over both kinds (:func:`headslim.selection.split_params`).
        method: the layer-local scorer: ``function-norm`` (default: each structure's own contribution to
            its block's output) or ``obs-local`` (repair-aware: the greedy order in which removing heads,
            or neurons, adds least to the block's reconstruction error after the least-squares re-fit,
            merged over layers by marginal cost; a ``(H * D)^2`` and, with ``prune_ffn``, an ``F^2``
            moment per layer, and an ``O(F^3)`` neuron sequence).
        device: where each layer is scored, pruned and re-fitted (``cpu``, default, or ``cuda[:N]``): the
            one layer in memory and the carried streams are on it (past ``stream_memory``, on disk), the
            weights outside the layers are read from the files and written back from the CPU.
        work_dir: keep each finished layer (its shard, the carried streams, scores and plan) in this
            directory, so that a run interrupted after layer k and started again with the same
            arguments resumes there (:mod:`headslim.workdir`); emptied (and removed when the run made
            it) once ``out`` is written. None: an interrupted run leaves nothing.

    Returns: a JSON-able report: ``plan``, ``scores`` ``(layers, heads)``, ``repair``
    (``RepairReport.to_dict()``, None without repair), ``max_layers_in_memory``, ``seconds``,
    ``bytes_written``, ``dtype``, ``spill`` (``limit_bytes``, ``peak_on_disk_bytes``, ``files``),
    ``resumed`` (None, or the ``pass`` and ``layers_done`` an interrupted run had finished).

    Example:
        >>> report = shrink_layerwise("Llama-3.2-1B/", "slim/", prune=0.5, batches=calib)   # doctest: +SKIP
        >>> model = headslim.load_pruned("slim/")                                         # doctest: +SKIP
    """
    with Spill(stream_memory, spill_dir) as spill:
        report = _shrink_layerwise(model_dir, out, prune=prune, batches=batches, gqa=gqa, holdout=holdout,
                                   repair=repair, ridge=ridge, min_heads_per_layer=min_heads_per_layer,
                                   prune_ffn=prune_ffn, min_neurons_per_layer=min_neurons_per_layer, dtype=dtype,
                                   overwrite=overwrite, provenance=provenance, progress=progress, spill=spill,
                                   work_dir=work_dir, method=method, device=device, prune_params=prune_params)
        report["spill"] = {"limit_bytes": stream_memory, "peak_on_disk_bytes": spill.peak_on_disk,
                           "files": spill.files_written}
        return report


def _shrink_layerwise(model_dir, out, *, prune, batches, gqa, holdout, repair, ridge, min_heads_per_layer, prune_ffn,
                      min_neurons_per_layer, dtype,
                      overwrite, provenance, progress, spill: Spill, work_dir, method, device, prune_params) -> dict:
    from tqdm.auto import tqdm

    from headslim.distributed import device_for

    from headslim.autoload import CONFIG_KEY, config_record
    from headslim.io import atomic_output_dir
    from headslim.pipeline import base_provenance
    from headslim.selection import select_plan

    t0 = time.perf_counter()
    if method not in METHODS:
        raise HeadslimError(f"--layerwise scores with {' or '.join(METHODS)} (layer-local), not --method {method}")
    device = device_for(None if device is None else str(device))
    path, config, adapter = _check_inputs(model_dir, out, prune=prune, gqa=gqa, holdout=holdout,
                                          min_heads_per_layer=min_heads_per_layer, overwrite=overwrite,
                                          prune_ffn=prune_ffn, min_neurons_per_layer=min_neurons_per_layer,
                                          prune_params=prune_params)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    if not batches or any("input_ids" not in b or "attention_mask" not in b for b in batches):
        raise HeadslimError("layer-at-a-time shrink needs calibration batches with input_ids and attention_mask")
    ckpt = Checkpoint(path)
    model = _skeleton(config)
    if adapter.decoder and model.get_output_embeddings() is None:
        raise HeadslimError(f"layer-at-a-time shrink handles causal LMs; {type(model).__name__} has no LM head")
    if not adapter.decoder and model.base_model is not model:
        raise HeadslimError(f"layer-at-a-time shrink handles bare encoders (AutoModel, a sentence-embedding model); "
                            f"{type(model).__name__} has a task head: use headslim shrink")
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(model.get_input_embeddings())] + ".weight"
    head_name = names[id(model.get_output_embeddings())] + ".weight" if adapter.decoder else None
    tied = adapter.decoder and bool(getattr(config, "tie_word_embeddings", False))
    keys = _weight_keys(ckpt, model, head_name if tied else None)
    head_key = keys[embed_name if tied else head_name] if adapter.decoder else None
    if dtype is None:
        dtype = {v: k for k, v in SAFE_DTYPES.items()}.get(ckpt.dtypes[keys[embed_name]], torch.float32)
    if dtype not in SAFE_DTYPES:
        raise HeadslimError(f"dtype {dtype} is not a floating dtype headslim writes")
    _to_dtype(model, dtype)
    layers = adapter.layers(model)
    prefixes = [names[id(layer)] + "." for layer in layers]
    for module in model.modules():  # the skeleton's buffers (rotary frequencies, ...) where the layers run
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)
    _materialise_outside(model, prefixes, (embed_name, head_name), ckpt, keys, dtype, device)
    head_dim, num_heads = adapter.head_dim(model), adapter.num_heads(model)
    head_params, neuron_params = _structure_params(model, adapter)  # of the dense model (the skeleton gets pruned)
    n_layers = len(layers)
    peak = [0]

    def load(index: int) -> nn.Module:
        layer = _load_layer(ckpt, model, index, prefixes[index], keys, dtype).to(device)
        peak[0] = max(peak[0], materialised_layers(model))
        return layer

    def blocks(index: int) -> tuple[nn.Module, nn.Module]:
        """Layer ``index``'s attention block and FFN block, as the adapter names them (the layer itself
        in decoders; ``layer.attention`` and the layer in BERT)."""
        return adapter.attention_blocks(model)[index], adapter.mlp_blocks(model)[index]

    work = None
    if work_dir is not None:
        w, o = Path(work_dir).resolve(), Path(out).resolve()
        if w == o or w.is_relative_to(o) or o.is_relative_to(w):
            raise HeadslimError(f"--work-dir {work_dir} and the output {out} must be separate directories")
        if w.is_relative_to(path.resolve()):
            raise HeadslimError(f"--work-dir {work_dir} is inside the model dir {path}; give one outside it")
        work = WorkDir(work_dir, _fingerprint(path, batches, prune=prune, gqa=gqa, holdout=holdout, repair=repair,
                                              ridge=ridge, min_heads_per_layer=min_heads_per_layer,
                                              prune_ffn=prune_ffn, min_neurons_per_layer=min_neurons_per_layer,
                                              dtype=dtype, method=method, prune_params=prune_params))

    # ---- pass 1: layer-local scores on the dense stream ------------------------------------------
    masks = [b["attention_mask"].bool().to(device) for b in batches]  # (B, T)
    state = work.state if work is not None else None  # what an interrupted run finished
    resumed = None if state is None else {"pass": state["pass"], "layers_done": state["layers_done"]}
    scores = torch.zeros(n_layers, max(num_heads), dtype=torch.float64)
    widths = adapter.num_neurons(model) if prune_ffn is not None or prune_params is not None else None
    neuron_scores = torch.zeros(n_layers, max(widths), dtype=torch.float64) if widths else None
    if state is None or state["pass"] == 1:
        done = 0 if state is None else state["layers_done"]
        hidden, calls = _entry(ckpt, model, keys, embed_name, batches, dtype, spill, device, keep=not done)
        dense = _Carried(model, hidden, calls, spill)
        hidden.clear()
        # obs-local: per layer, the greedy removal sequences [(index, marginal cost), ...] of heads and neurons
        sequences = {"attention": [], "mlp": []}
        if done:
            if method == OBS_LOCAL:
                sequences = {k: [[tuple(x) for x in seq] for seq in v] for k, v in state["sequences"].items()}
            else:
                scores[:done] = torch.tensor(state["scores"], dtype=torch.float64)
                if widths:
                    neuron_scores[:done] = torch.tensor(state["neuron_scores"], dtype=torch.float64)
            dense.hidden.clear()
            dense.hidden, dense.layer = work.streams(spill, device)["dense"], done
        for index in tqdm(range(done, n_layers), desc="scoring layers", unit="layer", initial=done, total=n_layers,
                          disable=not progress, leave=False):
            block = load(index)
            heads, neurons, outputs = _score_layer(dense, *blocks(index), adapter, masks, num_heads[index], head_dim,
                                                   neurons=bool(widths), method=method, ridge=ridge)
            if method == OBS_LOCAL:
                sequences["attention"].append(heads)
                sequences["mlp"].append(neurons)
            else:
                scores[index, :num_heads[index]] = heads
                if widths:
                    neuron_scores[index, :widths[index]] = neurons
            dense.advance(outputs)
            _free(block)
            if work is not None:
                work.commit({"pass": 1, "layers_done": index + 1, "scores": scores[:index + 1].tolist(),
                             "neuron_scores": neuron_scores[:index + 1].tolist() if widths else None,
                             "sequences": sequences}, {"dense": dense.hidden})
        dense.hidden.clear()
        del dense
        head_costs, neuron_costs = scores, neuron_scores  # function-norm: the scores are the costs
        if method == OBS_LOCAL:  # a structure's score: its position in the merged cost-ordered path
            from headslim.scoring.common import merged_scores

            head_costs = _sequence_costs(sequences["attention"], num_heads)
            neuron_costs = _sequence_costs(sequences["mlp"], widths) if widths else None
            scores = merged_scores(sequences["attention"], num_heads, min_heads_per_layer).double()
            if widths:
                neuron_scores = merged_scores(sequences["mlp"], widths, min_neurons_per_layer).double()
        if prune_params is not None:  # one budget: how many heads and neurons, by cost per parameter
            from headslim.selection import split_params

            prune, prune_ffn = split_params(head_costs, neuron_costs, num_heads, widths, fraction=prune_params,
                                            head_params=head_params, neuron_params=neuron_params,
                                            min_heads_per_layer=min_heads_per_layer,
                                            min_neurons_per_layer=min_neurons_per_layer)
        info = {"source_model": str(path), "method": method, "layerwise": True,
                "calibration": {"n_batches": len(batches), "n_samples": sum(len(m) for m in masks),
                                "tokens": int(sum(int(m.sum()) for m in masks))}}
        plan = select_plan(scores, num_heads, prune=prune, min_per_layer=min_heads_per_layer, kv_head_of_q=kv_maps(model),
                           gqa=gqa, neuron_scores=neuron_scores, num_neurons=widths, prune_ffn=prune_ffn,
                           min_neurons_per_layer=min_neurons_per_layer,
                           provenance={**base_provenance(0, **info), **(provenance or {})})
        state = {"pass": 2, "layers_done": 0, "scores": scores.tolist(), "plan": plan.to_dict(),
                 "neuron_scores": neuron_scores.tolist() if widths else None}
        if work is not None:  # the dense stream's file goes: pass 2 starts from the embeddings again
            work.commit(state)
    else:
        scores = torch.tensor(state["scores"], dtype=torch.float64)
        if widths:
            neuron_scores = torch.tensor(state["neuron_scores"], dtype=torch.float64)
        plan = PrunePlan.from_dict(state["plan"])
    t_scored = time.perf_counter()

    # ---- pass 2: prune, repair and write each layer ----------------------------------------------
    kept_neurons = plan.kept_neurons if plan.num_neurons is not None else [None] * n_layers
    sites = repair_sites(plan, adapter.keeps_bias_projection) if repair else []  # (layer, kind) re-fitted
    report = RepairReport(applied=False, inputs="pruned", ridge=ridge) if repair else None
    fit_batches, is_val, held_out = _split(batches, holdout) if repair else (batches, [False] * len(batches), {})
    if report is not None:
        report.held_out = held_out
        n_samples = sum(len(m) for m in masks)
        if sites and holdout > 0 and not any(is_val):
            report.skipped = f"{n_samples} calibration sample leaves none to hold out to check the repair on"
            report.warning = f"repair skipped: {report.skipped}; give more calibration data"
            sites = []
        elif sites and held_out["unit"] == "samples":
            n_val = held_out["n_held_out"]
            report.warning = (f"calibration data is small ({n_samples} samples in {len(batches)} "
                              f"batch{'es' if len(batches) > 1 else ''}): repair is checked on {n_val} held-out "
                              f"sample{'s' if n_val > 1 else ''} instead of held-out batches")
    checked = bool(sites) and any(is_val)
    done = state["layers_done"]
    plain = None
    if sites:
        fit_masks = [b["attention_mask"].bool().to(device) for b in fit_batches]
        hidden, calls = _entry(ckpt, model, keys, embed_name, fit_batches, dtype, spill, device, keep=not done)
        dense, pruned = _Carried(model, hidden, calls, spill), _Carried(model, hidden, calls, spill)
        val_index = [i for i, v in enumerate(is_val) if v]
        # the pruned model without repair, on the held-out batches: the "before" of the final check
        plain = _Carried(model, [hidden[i] for i in val_index] if len(hidden) else [], [calls[i] for i in val_index],
                         spill) if checked else None
        hidden.clear()
        if done:  # the streams after the last layer an interrupted run finished
            saved = work.streams(spill, device)
            for name, stream in (("dense", dense), ("pruned", pruned), ("plain", plain)):
                if stream is not None:
                    stream.hidden.clear()
                    stream.hidden, stream.layer = saved[name], done
    shards = [SHARD.format(i + 1, n_layers + 1) for i in range(n_layers + 1)]
    weight_map: dict[str, str] = state.get("weight_map", {})
    total = state.get("total", 0)
    # layer -> [(name, kind)] of its re-fitted output projections
    fitted: dict[int, list] = {int(k): [tuple(f) for f in v] for k, v in state.get("fitted", {}).items()}
    if report is not None and done:
        report.layers = state["repair_layers"]
    with atomic_output_dir(out, overwrite=overwrite, inputs=(path,)) as tmp:
        where = work.shard if work is not None else (lambda name: tmp / name)
        bar = tqdm(range(done, n_layers), desc="pruning layers", unit="layer", initial=done, total=n_layers,
                   disable=not progress, leave=False)
        for index in bar:
            block = load(index)
            kept, n = plan.kept_heads[index], plan.num_heads[index]
            here = [site for site in ((index, "attention"), (index, "mlp")) if site in sites]
            if sites:
                refs, outputs = {site: Store(spill) for site in here}, Store(spill)
                for i, mask in enumerate(fit_masks):  # the dense layer: its outputs and the fits' references
                    out_i, got = _run_layer(dense, i, here, want_input=True, stop=False)
                    outputs.append(out_i)
                    for site in here:
                        refs[site].append((got[site]["y"] + got[site]["x"])[mask])  # (N, d)
                del got
            if len(kept) < n:
                adapter.prune_block(blocks(index)[0], kept)
            if kept_neurons[index] is not None and len(kept_neurons[index]) < plan.num_neurons[index]:
                adapter.prune_mlp(blocks(index)[1], kept_neurons[index])
            plain_out = None
            for site in here:
                kind = site[1]
                proj = adapter.o_proj(blocks(index)[0]) if kind == "attention" else adapter.down_proj(blocks(index)[1])
                cols = kept if kind == "attention" else kept_neurons[index]
                bias = _has_bias(proj)
                w0 = _o_weight(proj)
                fit, val = {}, {}  # filled by _add (zeros first, as repair's _empty, would double the peak)
                for i, (mask, v) in enumerate(zip(fit_masks, is_val)):
                    cur = _run_layer(pruned, i, [site], want_input=True, stop=True)[1][site]
                    x = cur["c"][mask] if cols else cur["c"][mask][:, :0]  # (N, p)
                    _add(val if v else fit, x, refs[site][i] - cur["x"][mask], bias)  # y_dense + x_dense - x_pruned
                refs[site].clear()
                del x, cur
                _release_memory()  # the fit's temporaries, before the solve's
                if plain is not None and plain_out is None:  # before any fit of this layer is applied
                    plain_out = Store(spill, (plain.run(i) for i in range(len(plain.hidden))))
                w_fit = _solve(fit, w0, ridge, bias)
                entry = {"layer": index, "kind": kind, ("heads" if kind == "attention" else "neurons"): len(cols),
                         "fit_before": _error(w0, fit) / max(fit["C"], 1e-30),
                         "fit_after": _error(w_fit, fit) / max(fit["C"], 1e-30)}
                apply = True
                if any(is_val):
                    entry["val_before"] = _error(w0, val) / max(val["C"], 1e-30)
                    entry["val_after"] = _error(w_fit, val) / max(val["C"], 1e-30)
                    apply = entry["val_after"] < entry["val_before"]
                    if apply:  # refit on every batch now that the held-out ones have done their job
                        for k in fit:
                            fit[k] += val[k]  # in place: one set of moments, not three
                        w_fit = _solve(fit, w0, ridge, bias)
                entry["applied"] = bool(apply)
                if apply:
                    _set_o_weight(proj, w_fit)
                    local = {id(m): name for name, m in block.named_modules()}[id(proj)]
                    fitted.setdefault(index, []).append((prefixes[index] + local, kind))
                report.layers.append(entry)
                del fit, val, w0, w_fit
                _release_memory()
            if plain is not None and plain_out is None:
                plain_out = Store(spill, (plain.run(i) for i in range(len(plain.hidden))))
            if sites:
                del refs
                dense.advance(outputs)
                pruned.advance()
                if plain is not None:
                    plain.advance(plain_out)
            total += _write_layer(where(shards[index]), block, prefixes[index], dtype)
            weight_map.update({prefixes[index] + k: shards[index] for k in block.state_dict()})
            _free(block)
            if work is not None:
                state = {**state, "layers_done": index + 1, "weight_map": weight_map, "total": total,
                         "fitted": {str(k): v for k, v in fitted.items()},
                         "repair_layers": report.layers if report is not None else None}
                work.commit(state, {name: stream.hidden for name, stream in
                                    (("dense", dense), ("pruned", pruned), ("plain", plain))
                                    if sites and stream is not None})
        bar.close()
        if work is not None:  # the layer shards into the output (linked where the file system allows)
            for name in shards[:-1]:
                _link_or_copy(work.shard(name), tmp / name)
        if report is not None:
            report.applied = bool(fitted)
        if checked:
            rows = {"dense": [(i, i) for i in val_index], "plain": list(enumerate(val_index)),
                    "pruned": [(i, i) for i in val_index]}
            if adapter.decoder:  # KL(dense || model) of the next-token predictions, as repair's check
                def final(stream, rows):  # final-normed hidden states of the real held-out tokens, (N, d)
                    return torch.cat([adapter.export_final(model, stream.hidden[j])[fit_masks[i]] for j, i in rows])

                metric = "kl"
                ref, before, after = (final(s, rows[k]) for s, k in ((dense, "dense"), (plain, "plain"),
                                                                     (pruned, "pruned")))
                metric_before, metric_after = _mean_kls(ref, [before, after],
                                                        lambda a, b: ckpt.rows(head_key, [(a, b)]),
                                                        ckpt.shape(head_key)[0], dtype)
            else:  # a bare encoder: mean cosine of the mean-pooled sentence embeddings, as repair's check
                metric = "cosine"
                ref, before, after = (_pooled(s, rows[k], fit_masks) for s, k in ((dense, "dense"), (plain, "plain"),
                                                                                  (pruned, "pruned")))
                metric_before, metric_after = _mean_cosines(ref, [before, after])
            if not report.applied:
                metric_after = metric_before
            report.check = {"metric": metric, "before": metric_before, "after": metric_after,
                            "n_batches": len(val_index), "n_held_out": held_out["n_held_out"],
                            "unit": held_out["unit"]}
            worse = metric_after <= metric_before if metric == "cosine" else metric_after >= metric_before
            if report.applied and worse:  # undo: the plain sliced projections
                for index, projections in fitted.items():
                    for name, kind in projections:
                        kept = plan.kept_heads[index] if kind == "attention" else kept_neurons[index]
                        _restore_projection(tmp / shards[index], name, ckpt, keys, site_columns(kind, kept, head_dim),
                                            adapter.transposed(model.get_submodule(name)))
                report.applied = False
                for e in report.layers:
                    e["applied"] = False
        # the weights outside the layers, streamed in row chunks
        outside = []
        inside = tuple(prefixes)
        for name, key in keys.items():
            if name.startswith(inside):
                continue
            shape = ckpt.shape(key)
            rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:]))) if shape else 1
            outside.append((name, dtype, shape, _row_chunks(ckpt, key, rows)))
            weight_map[name] = shards[-1]
        total += write_streamed(tmp / shards[-1], outside)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
            + "\n")
        config = type(config).from_dict(config.to_dict())  # a copy: the caller's config object is not touched
        setattr(config, CONFIG_KEY, config_record(plan))
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        plan.save(tmp / PLAN_FILE)
        _copy_side_files(path, tmp)
    if work is not None:
        work.finish()
    t_end = time.perf_counter()
    return {"out": str(out), "plan": plan.to_dict(), "scores": scores.tolist(), "resumed": resumed,
            "neuron_scores": neuron_scores.tolist() if widths else None,
            "params": _params_removed(plan, head_params, neuron_params, prune_params),
            "neurons_before": sum(plan.num_neurons) if plan.num_neurons else None,
            "neurons_after": sum(plan.neurons_after) if plan.num_neurons else None,
            "heads_before": sum(plan.num_heads), "heads_after": sum(plan.heads_after),
            "repair": report.to_dict() if report is not None else None,
            "max_layers_in_memory": peak[0], "bytes_written": total, "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "seconds": {"scoring": t_scored - t0, "pruning": t_end - t_scored, "total": t_end - t0}}


# --------------------------------------------------------------------------------------------------
# the command line's entry: ``headslim shrink MODEL --layerwise ...``

# calibration samples when the user gives none: the carried streams (dense, pruned and the held-out
# "before") hold samples x tokens x hidden values each, in memory unless --stream-memory spills them
LAYERWISE_CALIB_SAMPLES = 128


def check_layerwise_config(config) -> None:
    """One-line refusals for the ``shrink`` settings the layer-at-a-time path does not have."""
    unsupported = [(config.target_speedup is not None, "--target-speedup"),
                   (config.plan is not None, "--plan"),
                   (config.objective != "dense", "--objective task"),
                   (config.repair_inputs != "pruned", "--repair-inputs dense"),
                   (config.allow_pickle, "--allow-pickle (the path reads safetensors only)")]
    for bad, what in unsupported:
        if bad:
            raise HeadslimError(f"--layerwise does not take {what}")


def shrink_from_config(model_path: str | Path, out: str | Path, config, *, calib_samples_given: bool = True,
                       stream_memory: int | None = None, spill_dir: str | Path | None = None,
                       work_dir: str | Path | None = None, method: str | None = None,
                       prune_params: float | None = None) -> dict:
    """``shrink_layerwise`` with the data handling of ``headslim shrink``: calibration texts from
    ``config.calib`` (a seeded sample of ``config.calib_samples``, or :data:`LAYERWISE_CALIB_SAMPLES`
    when the user gave none), tokenised with the model's tokenizer. Returns ``shrink_layerwise``'s
    report plus ``calibration``. ``stream_memory``, ``spill_dir``, ``work_dir``, ``method`` (None: the
    default): as for ``shrink_layerwise``; ``config.method`` is not read (its scorers need the whole model)."""
    from headslim.checkpoints import load_tokenizer
    from headslim.data import batches, load_texts, sample
    from headslim.io import check_length, check_output_dir, load_config, resolve_model_path

    from headslim.distributed import device_for

    check_layerwise_config(config)
    device_for(config.device)  # a device this torch lacks: refused before the calibration data is read
    method = METHOD if method is None else method
    if method not in METHODS:
        raise HeadslimError(f"--layerwise does not take --method {method} (it scores with the whole model in memory; "
                            f"--layerwise scores layer-locally: {', '.join(METHODS)})")
    src = resolve_model_path(model_path)
    check_output_dir(out, overwrite=config.overwrite, inputs=(src, config.calib))
    max_length = check_length(load_config(src), config.max_length)
    n = config.calib_samples if calib_samples_given else LAYERWISE_CALIB_SAMPLES
    calib = sample(load_texts(config.calib, text_column=config.text_column), n, config.seed)
    tokenizer = load_tokenizer(src, pad=True)
    calib_batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
                     for b in batches(calib, tokenizer, batch_size=config.batch_size, max_length=max_length)]
    calibration = {"source": calib.source, "sha256": calib.sha256, "n_samples": len(calib), "max_length": max_length}
    report = shrink_layerwise(src, out, prune=0 if prune_params is not None else config.prune, batches=calib_batches,
                              gqa=config.gqa, repair=config.repair, min_heads_per_layer=config.min_heads_per_layer,
                              prune_ffn=None if prune_params is not None else config.prune_ffn, min_neurons_per_layer=config.min_neurons_per_layer,
                              overwrite=config.overwrite, progress=config.progress,
                              provenance={"calibration": calibration, "seed": config.seed},
                              stream_memory=stream_memory, spill_dir=spill_dir, work_dir=work_dir, method=method,
                              device=config.device, prune_params=prune_params)
    report["calibration"] = calibration
    return report

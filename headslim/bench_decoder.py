"""``headslim bench --task causal-lm``: prefill latency and decode speed of a pruned decoder vs its dense original.

What one timed repetition of a model is, on every backend (``--batch B --prompt T --new-tokens N``):

* **prefill**: one forward pass over ``B`` prompts of ``T`` random tokens (full attention mask) that
  fills the KV cache and picks the first token greedily;
* **decode**: ``N`` single-token steps against the growing cache, each feeding the token the last
  step picked (greedy argmax). Decode speed = ``B * N`` tokens / decode time.

Dense and pruned alternate per repetition (dense, pruned, pruned, dense, ...) after the same warm-up,
as for encoders (:func:`headslim.bench.measure_interleaved`), so machine drift hits both alike.

Backends: the PyTorch ones (eager / SDPA attention, CPU / CUDA) run the model with transformers'
``DynamicCache`` and ``logits_to_keep=1`` in the prefill where the model takes it (what
``generate`` does); ``ort-cpu`` / ``ort-cuda`` (``ort-opt-cpu``: its GroupQueryAttention graph; ``ort-int8-cpu``: its
int8 graph) run the ``headslim export`` graph (one graph for
prefill and decode, per-layer KV heads, :mod:`headslim.export_decoder`) with plain
``InferenceSession.run``, each step feeding the ``present`` tensors back as ``past`` (what a user
of onnxruntime without IO binding does). That graph returns logits at every prompt position.

Beside the timings stand the ideals (:func:`decoder_cost`): the prefill's FLOP ratio, and decode's
byte ratio, because a decode step at small batch is memory-bound: it reads every weight matrix
once (input embedding rows excepted, unless the table is also the LM head) plus the whole KV cache
of every layer, whose size is that layer's own KV heads x past length.
"""

from __future__ import annotations

import inspect
import time

from headslim.errors import HeadslimError, first_line

BYTES_FP32 = 4


# ----------------------------------------------------------------------------------------------
# Analytic cost


def _weights(model):
    """(matmul weight elements, values of weights read per decode step): every Linear / GPT-2 Conv1D
    weight once (a tied LM head counts once, as the matrix it multiplies), every other parameter
    except embedding tables, of which a step reads only ``B`` rows."""
    from torch import nn

    embed_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    matmul, seen, read = 0, set(), 0
    for module in model.modules():  # a module with a 2-D weight that is not a table multiplies by it
        weight = getattr(module, "weight", None)  # (Linear, GPT-2's Conv1D, a tied LM head again)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            matmul += weight.numel()
    output = model.get_output_embeddings()
    lm_head = id(output.weight) if output is not None else None
    for p in model.parameters():  # unique parameters
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_params and id(p) != lm_head:
            continue
        read += p.numel()
    return matmul, read


def cache_heads(model) -> list[int]:
    """KV heads each layer keeps in its cache (0 for a layer with no heads left)."""
    from headslim.arch import get_adapter

    return [len(set(m)) for m in get_adapter(model).kv_maps(model)]


def decoder_cost(model, batch: int, prompt: int, new_tokens: int, *, logits_positions: int = 1,
                 bytes_per_value: int = BYTES_FP32, weight_bytes_per_value: int | None = None) -> dict:
    """FLOPs of the prefill and bytes read per decode step of one model.

    Args:
        logits_positions: prompt positions the prefill computes logits at (1 as ``generate`` does;
            ``prompt`` for a graph that returns them all).

    A FLOP is a multiply or an add; attention mixing counts the causal half of ``T x T``.
    Bytes per decode step: weights (see :func:`_weights`) + K and V of every layer's cache at the
    mean past length over the ``new_tokens`` steps, at ``bytes_per_value`` a value
    (``weight_bytes_per_value`` for the weights when they differ: 1 for an int8 graph).

    Example:
        >>> c = decoder_cost(model, batch=1, prompt=128, new_tokens=32)   # doctest: +SKIP
        >>> c["decode_bytes_per_step"] > c["weight_bytes"]                  # doctest: +SKIP
        True
    """
    from headslim.arch import get_adapter

    adapter = get_adapter(model)
    heads, head_dim = adapter.num_heads(model), int(adapter.head_dim(model))
    matmul, read = _weights(model)
    output = model.get_output_embeddings()
    lm_head = output.weight.numel() if output is not None else 0
    tokens = batch * prompt
    layers_flops = 2 * (tokens * (matmul - lm_head)) + 2 * batch * logits_positions * lm_head
    mix = sum(2 * 2 * batch * h * head_dim * prompt * (prompt + 1) // 2 for h in heads)
    mean_past = prompt + (new_tokens - 1) / 2 + 1  # step i reads prompt + i + 1 cached positions
    kv_values = sum(2 * kv * head_dim for kv in cache_heads(model)) * batch * mean_past
    weight_bytes = read * (bytes_per_value if weight_bytes_per_value is None else weight_bytes_per_value)
    return {"prefill_flops": int(layers_flops + mix), "prefill_matmul_flops": int(layers_flops),
            "prefill_attention_flops": int(mix), "weight_bytes": int(weight_bytes),
            "kv_cache_bytes_mean": int(kv_values * bytes_per_value),
            "decode_bytes_per_step": int(weight_bytes + kv_values * bytes_per_value),
            "logits_positions": logits_positions, "bytes_per_value": bytes_per_value,
            "weight_bytes_per_value": bytes_per_value if weight_bytes_per_value is None else weight_bytes_per_value}


def compare(dense, pruned, batch: int, prompt: int, new_tokens: int, **kw) -> dict:
    """Both models' costs and the ideals: prefill FLOP ratio, decode byte ratio (dense / pruned)."""
    d = decoder_cost(dense, batch, prompt, new_tokens, **kw)
    p = decoder_cost(pruned, batch, prompt, new_tokens, **kw)
    return {"dense": d, "pruned": p,
            "ideal_prefill_speedup": d["prefill_flops"] / p["prefill_flops"],
            "ideal_decode_speedup": d["decode_bytes_per_step"] / p["decode_bytes_per_step"]}


# ----------------------------------------------------------------------------------------------
# Sessions: ``run(feed, new_tokens) -> (prefill seconds, decode seconds)``


class TorchDecoderSession:
    """A causal LM in PyTorch with transformers' KV cache; CUDA work is synchronised before each clock read.

    After ``run``, ``last_tokens`` (B, 1 + new_tokens) holds the tokens it picked (the ORT session
    picks the same ones from the same model: tested).
    """

    def __init__(self, model, device: str):
        self.model, self.device = model, device
        params = inspect.signature(type(model).forward).parameters
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else (
            {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {})

    def feed(self, input_ids, attention_mask):
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def run(self, feed, new_tokens: int) -> tuple[float, float]:
        import torch

        from headslim.compat import cache_kwargs, output_cache

        ids, mask = feed
        ones = torch.ones((ids.shape[0], 1), dtype=mask.dtype, device=mask.device)
        with torch.inference_mode():
            self._sync()
            start = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **self.keep)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            prefilled = time.perf_counter()
            tokens = [token]
            for _ in range(new_tokens):
                mask = torch.cat([mask, ones], dim=1)
                out = self.model(input_ids=token, attention_mask=mask, use_cache=True,
                                 **cache_kwargs(self.model, output_cache(out)))
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            self._sync()
            done = time.perf_counter()
        self.last_tokens = torch.cat(tokens, dim=1).cpu().numpy()  # (B, 1 + new_tokens): what was picked
        return prefilled - start, done - prefilled

    def close(self) -> None:
        self.model = None


class OrtDecoderSession:
    """A ``headslim export`` decoder graph in ONNX Runtime, run step by step with ``session.run``."""

    def __init__(self, path, providers: list[str], options, device: str):
        import onnxruntime as ort

        from headslim.export_decoder import graph_layout

        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:
            raise HeadslimError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None
        self.path, self.device = path, device
        names = {i.name for i in self.session.get_inputs()}
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in names]
        if missing:
            raise HeadslimError(f"{path} is not a decoder graph with a KV cache (no input {missing[0]}): "
                                "export it with headslim export")
        self.layout = graph_layout(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def feed(self, input_ids, attention_mask):
        import numpy as np

        from headslim.export_decoder import past_names, position_ids_of

        ids, mask = input_ids.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_of(mask)}
        for layer, kv, d in self.layout:
            for name in past_names(layer):
                feeds[name] = np.zeros((ids.shape[0], kv, 0, d), dtype=np.float32)
        return feeds

    def logits(self, feed):
        return dict(zip(self.outputs, self.session.run(None, feed)))["logits"]

    def run(self, feed, new_tokens: int) -> tuple[float, float]:
        import numpy as np

        from headslim.export_decoder import past_names, present_names

        batch = feed["input_ids"].shape[0]
        one = np.ones((batch, 1), dtype=np.int64)
        start = time.perf_counter()
        res = dict(zip(self.outputs, self.session.run(None, feed)))
        token = res["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        prefilled = time.perf_counter()
        tokens = [token]
        mask, pos = feed["attention_mask"], feed["position_ids"][:, -1:]
        for _ in range(new_tokens):
            mask, pos = np.concatenate([mask, one], axis=1), pos + 1
            step = {"input_ids": token, "attention_mask": mask, "position_ids": pos}
            for layer, _, _ in self.layout:
                for past, present in zip(past_names(layer), present_names(layer)):
                    step[past] = res[present]
            res = dict(zip(self.outputs, self.session.run(None, step)))
            token = res["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(token)
        done = time.perf_counter()
        self.last_tokens = np.concatenate(tokens, axis=1)  # (B, 1 + new_tokens): what was picked
        return prefilled - start, done - prefilled

    def close(self) -> None:
        self.session = None


def check_decoder_graph(session: OrtDecoderSession, model, model_dir, *, exact: bool = True) -> None:
    """Refuse a graph that does not compute the model's logits on a short random prefill (shape
    only when not ``exact``: an int8 graph)."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, int(model.config.vocab_size), (2, 8), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)
    try:
        got = session.logits(session.feed(ids, mask))
    except Exception as e:
        raise HeadslimError(f"{session.path} fails on a (2, 8) prompt: {first_line(e)}") from None
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits.float().numpy()  # (B, T, V)
    if tuple(got.shape) != tuple(ref.shape):
        raise HeadslimError(f"{session.path}: logits shape {tuple(got.shape)} does not match the model's "
                            f"{tuple(ref.shape)}: not an export of {model_dir}")
    err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-6))
    if exact and err > 1e-3:
        raise HeadslimError(f"{session.path} does not compute what {model_dir} computes "
                            f"(relative difference {err:.2g}): export it from that checkpoint")


# ----------------------------------------------------------------------------------------------
# Measurement


def measure(sessions: dict, feeds: dict, new_tokens: int, *, warmup: int, min_runs: int, min_seconds: float,
            max_runs: int) -> dict:
    """Time prefill + ``new_tokens`` decode steps of every session, alternating the order each repetition.

    Returns:
        ``{role: {"prefill": [seconds], "decode": [seconds]}}``.
    """
    roles = list(sessions)
    for i in range(warmup):
        for role in roles if i % 2 == 0 else roles[::-1]:
            sessions[role].run(feeds[role], new_tokens)
    times = {role: {"prefill": [], "decode": []} for role in roles}
    start, rep = time.perf_counter(), 0
    while rep < max_runs and (rep < min_runs or time.perf_counter() - start < min_seconds):
        for role in roles if rep % 2 == 0 else roles[::-1]:
            prefill, decode = sessions[role].run(feeds[role], new_tokens)
            times[role]["prefill"].append(prefill)
            times[role]["decode"].append(decode)
        rep += 1
    return times


def summarize(times: dict, batch: int, new_tokens: int) -> dict:
    """Prefill p50/p90 (ms), decode p50 per step (ms) and decode tokens/s (median run) of one model."""
    import numpy as np

    pre, dec = np.asarray(times["prefill"]), np.asarray(times["decode"])
    decode_p50 = float(np.percentile(dec, 50))
    return {"runs": int(pre.size),
            "prefill_p50_ms": float(np.percentile(pre, 50) * 1e3), "prefill_p90_ms": float(np.percentile(pre, 90) * 1e3),
            "decode_step_p50_ms": decode_p50 * 1e3 / max(new_tokens, 1),
            "decode_p90_ms": float(np.percentile(dec, 90) * 1e3),
            "decode_tokens_per_s": batch * new_tokens / decode_p50 if decode_p50 > 0 else float("inf")}


def run_points(backend, sessions: dict, models: dict, config, result: dict, log, inputs) -> None:
    """Every batch size of ``config`` on one backend's sessions, appended to ``result["points"]``.

    ``backend``: a :mod:`headslim.bench` backend (``name``, ``kind``, ORT's ``variant``); ``inputs(batch)``
    gives ``(input_ids, attention_mask)`` of ``config.prompt`` tokens.
    """
    positions = config.prompt if backend.kind == "ort" else 1  # the exported graph: logits at every position
    weight_bytes = 1 if getattr(backend, "variant", None) == "int8" else None
    for batch in config.batches:
        point = {"backend": backend.name, "batch": batch, "prompt": config.prompt, "new_tokens": config.new_tokens,
                 "analytic": compare(models["dense"], models["pruned"], batch, config.prompt, config.new_tokens,
                                     logits_positions=positions, weight_bytes_per_value=weight_bytes)}
        try:
            ids, mask = inputs(batch)
            feeds = {role: s.feed(ids, mask) for role, s in sessions.items()}
            times = measure(sessions, feeds, config.new_tokens, warmup=config.warmup, min_runs=config.min_runs,
                            min_seconds=config.min_seconds, max_runs=config.max_runs)
        except Exception as e:  # e.g. out of memory at the largest batch: report, go on
            point.update(status="failed", reason=f"{type(e).__name__}: {first_line(e)}")
            result["points"].append(point)
            log(f"{backend.name} batch {batch}: failed: {point['reason']}")
            continue
        d = summarize(times["dense"], batch, config.new_tokens)
        p = summarize(times["pruned"], batch, config.new_tokens)
        point.update(status="ok", dense=d, pruned=p,
                     prefill_speedup=d["prefill_p50_ms"] / p["prefill_p50_ms"],
                     decode_speedup=p["decode_tokens_per_s"] / d["decode_tokens_per_s"])
        result["points"].append(point)
        a = point["analytic"]
        log(f"{backend.name:>16} batch {batch:>3} prompt {config.prompt}: prefill {d['prefill_p50_ms']:.1f} -> "
            f"{p['prefill_p50_ms']:.1f} ms x{point['prefill_speedup']:.2f} (ideal x{a['ideal_prefill_speedup']:.2f}); "
            f"decode {d['decode_tokens_per_s']:.1f} -> {p['decode_tokens_per_s']:.1f} tok/s "
            f"x{point['decode_speedup']:.2f} (byte-ideal x{a['ideal_decode_speedup']:.2f})")

"""Train a small Llama-shaped GQA decoder on the BBC News *training* articles: a test bed for decoder
pruning quality (issue 17), since no real decoder weights can be downloaded here.

    python bench/decoder_testbed.py --out /work/testbed-decoder

Writes a safetensors checkpoint, a byte-level BPE tokenizer trained on the training articles only
(loads with ``AutoTokenizer.from_pretrained``), and ``TESTBED.md`` (shape, tokens seen, steps, time,
machine, seed, final train loss, held-out perplexity on the BBC *test* articles). This is NOT a real
pretrained model: a few million parameters trained for minutes on ~1 M tokens of news.

Deterministic: fixed seed, fixed data order, ``torch.set_num_threads(2)``, a fixed step count (the
wall-clock limit is a safety stop only; TESTBED.md says when it fired). The held-out perplexity is
computed as ``headslim shrink`` computes it (``headslim.evaluate.perplexity`` over
``headslim.data.batches`` of the test articles, first 128 tokens of each, batch 16), so it is the
table's dense perplexity when ``bench/decoder_quality.py`` evaluates all 422 test articles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE on ``texts`` only; saved as a PreTrainedTokenizerFast that prepends <|bos|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(SPECIALS["bos"])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS['bos']} $A",
                                                       pair=f"{SPECIALS['bos']} $A {SPECIALS['bos']} $B",
                                                       special_tokens=[(SPECIALS["bos"], bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"],
                                   pad_token=SPECIALS["pad"], padding_side="right", model_max_length=1 << 30)
    fast.save_pretrained(str(out))
    return fast


def packed_chunks(texts, tokenizer, seq_len: int):
    """Every article as <|bos|> tokens <|eos|>, concatenated in corpus order, cut into seq_len chunks."""
    import torch

    stream = []
    for enc in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(enc)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len), len(stream)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/work/testbed-decoder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=560)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--max-positions", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the training passes (weights fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=1110, help="wall-clock safety stop, seconds")
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)

    final = Path(args.out)
    if final.exists():
        if not args.overwrite:
            print(f"error: {final} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
        if not (final / "testbed.json").is_file():
            print(f"error: {final} was not written by this script (no testbed.json); not replacing it",
                  file=sys.stderr)
            return 2
    # Written into a sibling temporary folder and moved into place at the end: an interrupted run
    # leaves no half-written checkpoint (the temporary folder is removed on any exit).
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds through the finally below
    try:
        return _train(args, out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _train(args, out: Path, final: Path) -> int:
    t_start = time.perf_counter()

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from headslim.data import batches, bbc_news
    from headslim.evaluate import perplexity
    from headslim.onnx_utils import cpu_name

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train, test = bbc_news("train"), bbc_news("test")
    tokenizer = train_tokenizer(train.texts, args.vocab, out)
    chunks, n_stream = packed_chunks(train.texts, tokenizer, args.seq)
    print(f"tokenizer: vocab {len(tokenizer)}; train stream {n_stream} tokens -> {len(chunks)} chunks of {args.seq}; "
          f"{time.perf_counter() - t_start:.1f}s", flush=True)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         max_position_embeddings=args.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):  # linear warmup, cosine decay to 10 % of the peak
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(chunks), generator=gen)
    pos, epoch = 0, 0
    model.train()
    t_train = time.perf_counter()
    losses, step, stopped_early = [], 0, False
    log_lines = []
    for step in range(args.steps):
        if pos + args.batch > len(order):
            order = torch.randperm(len(chunks), generator=gen)
            pos, epoch = 0, epoch + 1
        ids = chunks[order[pos : pos + args.batch]]  # (B, T)
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach().item())
        elapsed = time.perf_counter() - t_train
        if step % args.log_every == 0 or step == args.steps - 1:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            line = (f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} (mean of last {len(losses[-args.log_every:])}: "
                    f"{recent:.4f}) lr {lr_at(step):.2e} epoch {epoch} elapsed {elapsed:.0f}s")
            print(line, flush=True)
            log_lines.append(line)
        if elapsed > args.time_limit and step < args.steps - 1:
            stopped_early = True
            print(f"time limit {args.time_limit:.0f}s reached after {step + 1} steps: stopping", flush=True)
            break
    steps_done = len(losses)
    train_seconds = time.perf_counter() - t_train
    final_loss = sum(losses[-50:]) / len(losses[-50:])

    model.eval()
    t_eval = time.perf_counter()
    eval_max_len = min(128, args.max_positions)
    ppl_test, n_tok = perplexity(model, batches(test, tokenizer, batch_size=16, max_length=eval_max_len, model=model))
    # Unigram baseline: the train stream's token frequencies (add-one), scored on the same test tokens
    # (the first token of each text, <|bos|>, is never predicted, as in perplexity()).
    counts = torch.bincount(chunks.flatten(), minlength=len(tokenizer)).double() + 1
    logp = (counts / counts.sum()).log()
    nll, cnt = 0.0, 0
    for b in batches(test, tokenizer, batch_size=64, max_length=eval_max_len, model=model):
        ids, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
        nll -= float(logp[ids[mask]].sum())
        cnt += int(mask.sum())
    ppl_unigram = math.exp(nll / cnt)
    print(f"held-out perplexity (BBC test, {len(test)} articles, first {eval_max_len} tokens, {n_tok} tokens): "
          f"{ppl_test:.3f}; unigram {ppl_unigram:.1f}; eval {time.perf_counter() - t_eval:.0f}s", flush=True)

    model.save_pretrained(str(out), safe_serialization=True)
    tokens_seen = steps_done * args.batch * args.seq
    facts = {
        "what": "test bed trained here; NOT a real pretrained model",
        "model_type": "llama", "layers": args.layers, "hidden": args.hidden, "query_heads": args.heads,
        "kv_heads": args.kv_heads, "head_dim": args.hidden // args.heads, "intermediate": args.intermediate,
        "max_position_embeddings": args.max_positions, "vocab": len(tokenizer), "tied_embeddings": True,
        "parameters": n_params, "seed": args.seed, "steps": steps_done, "steps_planned": args.steps,
        "stopped_by_time_limit": stopped_early, "batch": args.batch, "seq": args.seq, "tokens_seen": tokens_seen,
        "train_stream_tokens": n_stream, "epochs": round(tokens_seen / (len(chunks) * args.seq), 2),
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay, "bf16_autocast": args.bf16,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss_mean_last_50": round(final_loss, 4), "final_train_loss_last_step": round(losses[-1], 4),
        "heldout_ppl": round(ppl_test, 3), "heldout_tokens": n_tok, "heldout_articles": len(test),
        "heldout_max_length": eval_max_len, "unigram_ppl": round(ppl_unigram, 2),
        "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (out / "testbed.json").write_text(json.dumps(facts, indent=2) + "\n")
    md = f"""# Decoder test bed (trained here; not a real pretrained model)

This checkpoint is a **test bed**, trained from scratch on this machine by `bench/decoder_testbed.py`
(headslim repository) on the BBC News *training* articles (`headslim.data.bbc_news("train")`,
{len(train)} articles) so that decoder pruning can be judged on a model whose heads learned something.
It is **not** a real pretrained language model: {n_params / 1e6:.2f} M parameters, {tokens_seen:,} tokens seen.

| | |
|---|---|
| shape | LlamaForCausalLM, {args.layers} layers, hidden {args.hidden}, {args.heads} query heads / {args.kv_heads} KV heads (GQA, head_dim {args.hidden // args.heads}), intermediate {args.intermediate}, max positions {args.max_positions}, tied embeddings |
| tokenizer | byte-level BPE, vocab {len(tokenizer)}, trained on the training articles only; `<|bos|>` prepended |
| parameters | {n_params:,} |
| data | {n_stream:,} tokens (articles as `<|bos|> ... <|eos|>`, packed into {len(chunks)} chunks of {args.seq}) |
| training | {steps_done} steps{' (stopped by the time limit; planned ' + str(args.steps) + ')' if stopped_early else ''} x batch {args.batch} x {args.seq} tokens = {tokens_seen:,} tokens ({facts['epochs']} epochs); AdamW (0.9, 0.95), lr {args.lr} with {args.warmup} warmup steps and cosine decay to 10 %, weight decay {args.weight_decay}, grad clip 1.0{', bf16 autocast' if args.bf16 else ', fp32'} |
| seed | {args.seed} (torch.manual_seed, fixed data order) |
| train time | {train_seconds:.0f} s ({train_seconds / 60:.1f} min) training, {facts['total_seconds']:.0f} s in all |
| machine | {cpu_name()}, {args.threads} threads (torch.set_num_threads), {os.cpu_count()} cores visible, no GPU |
| versions | torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()} |
| final train loss | {final_loss:.4f} (mean of the last 50 steps; last step {losses[-1]:.4f}) |
| held-out perplexity | **{ppl_test:.3f}** on the {len(test)} BBC News *test* articles (first {eval_max_len} tokens of each, {n_tok:,} predicted tokens; computed as `headslim shrink` does) |
| unigram perplexity | {ppl_unigram:.1f} on the same tokens (train-stream token frequencies): the level a model that learned nothing about context would reach |
| date | {facts['date']} |
| command | `{facts['command']}` |

Training log (every {args.log_every} steps):

```
""" + "\n".join(log_lines) + "\n```\n"
    (out / "TESTBED.md").write_text(md)
    if final.exists():  # --overwrite of a folder this script wrote (checked above)
        shutil.rmtree(final)
    out.rename(final)
    print(f"wrote {final} (train {train_seconds:.0f}s, held-out ppl {ppl_test:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

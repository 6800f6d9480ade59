#!/usr/bin/env python3
"""Trains an EAGLE-3 head for the model a config serves, from the model's own answers to your prompts, and writes it
in EAGLE-3's own format (config.json + model.safetensors: `speculative.method: eagle3` reads it, and so do vLLM and
SGLang). models/eagle3_train.py has the method; docs/serving.md ("Speculative decoding") the use.

    PYTHONPATH=. .venv/bin/python scripts/train_eagle3.py --config configs/smollm2-135m.yaml \\
        --input prompts.jsonl --output heads/smollm2-eagle3

Input lines: {"prompt": "..."} or {"messages": [...]} (the chat template applied), as the offline job's. The model
answers each (greedy, --max-tokens), the sequences go through it once more to capture what the head reads, then the
head trains (AdamW) on random batches of them; a tenth of the sequences (--eval-fraction) is held out and its
per-round accuracy (how often the head's guess is the model's choice, drafting from every position) printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e})")
            if "messages" in item:
                prompts.append(tokenizer.encode_chat(item["messages"], add_generation_prompt=True))
            elif "prompt" in item:
                prompts.append(tokenizer.encode(item["prompt"], add_special_tokens=True))
            else:
                raise SystemExit(f"{path}:{n}: a line needs 'prompt' or 'messages'")
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def train_head(llm, prompts: list[list[int]], *, max_tokens: int = 128, seq_len: int = 256, draft_vocab: int = 8192,
               aux_layers: tuple[int, ...] = (), rounds: int = 3, steps: int = 400, batch: int = 8, lr: float = 1e-3,
               eval_fraction: float = 0.1, seed: int = 0, progress: bool = True):
    """An EAGLE-3 head for `llm`'s model (an engine.llm.LLM), trained on its greedy answers to `prompts` (token
    ids): (its Eagle3Config, its weights, the held-out accuracy by round [rounds], or None when nothing is held out)."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    from engine.request import SamplingParams
    from models import eagle3, eagle3_train, quant

    t0 = time.perf_counter()
    cfg, params = llm.engine.model_cfg, llm.engine.params
    if any(k.endswith(quant.SCALE_SUFFIX) for k in params):
        raise ValueError("the head starts from the model's embedding and LM head: serve them unquantized while training "
                         "(model.quantize_embeddings: false)")
    answers = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), progress=progress)
    seqs = [(p + a.token_ids)[:seq_len] for p, a in zip(prompts, answers)]
    if progress:
        print(f"{len(seqs)} sequences, {sum(map(len, seqs))} tokens, answered in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    aux_layers = aux_layers or eagle3.default_aux_layers(cfg.num_layers)
    tokens = np.zeros((len(seqs), seq_len), np.int32)
    lengths = np.array([len(s) for s in seqs])
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    rows = jax.jit(lambda t: eagle3_train.target_rows(params, cfg, t, aux_layers))
    aux = np.zeros((len(seqs), seq_len, len(aux_layers) * cfg.hidden_size), np.float32)
    predictions = np.zeros((len(seqs), seq_len), np.int32)
    for i in tqdm(range(len(seqs)), desc="capturing the model's rows", unit="seq", disable=not progress):
        a, p = rows(jnp.asarray(tokens[i]))
        aux[i], predictions[i] = np.asarray(a, np.float32), np.asarray(p)
    real = np.arange(seq_len)[None, :] < lengths[:, None]
    d2t = eagle3_train.draft_vocabulary(predictions[real], min(draft_vocab, cfg.vocab_size), cfg.vocab_size)
    t2d = np.full(cfg.vocab_size, -1, np.int32)
    t2d[np.arange(len(d2t)) + d2t] = np.arange(len(d2t))
    labels = np.where(real, t2d[predictions], -1)
    if progress:
        print(f"draft vocabulary: {len(d2t)} tokens cover {np.mean(labels[real] >= 0):.1%} of the model's choices",
              file=sys.stderr)

    ecfg = eagle3.Eagle3Config(eagle3_train.head_layer_config(cfg, len(d2t)), aux_layers, norm_before_residual=False)
    float_params = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                {k: params[k] for k in ("embed", "final_norm", "lm_head") if k in params})
    head = eagle3_train.init_head(float_params, cfg, ecfg, d2t, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    n_eval = int(len(seqs) * eval_fraction) if len(seqs) > 1 else 0
    held, train = order[:n_eval], order[n_eval:]
    warmup = max(1, steps // 20)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = optimizer.init({k: v for k, v in head.items() if k != "d2t"})
    step = eagle3_train.train_step_fn(float_params, ecfg, optimizer, rounds)
    bar = tqdm(range(steps), desc="training the head", unit="step", disable=not progress)
    for _ in bar:
        pick = rng.choice(train, batch)
        head, opt_state, loss, acc = step(head, opt_state, aux[pick], tokens[pick], labels[pick])
        bar.set_postfix(loss=f"{float(loss[0]):.3f}", acc=" ".join(f"{float(a):.2f}" for a in acc))
    if not n_eval:
        return ecfg, head, None
    evaluate = jax.jit(jax.vmap(lambda a, t, y: eagle3_train.losses(head, float_params, ecfg, a, t, y, rounds)))
    _, count, right = evaluate(aux[held], tokens[held], labels[held])
    return ecfg, head, np.asarray(right).sum(0) / np.maximum(np.asarray(count).sum(0), 1)


def save_head(path: str, cfg, ecfg, head: dict) -> None:
    """The head in EAGLE-3's own format: config.json and model.safetensors in `path` (created)."""
    from safetensors.numpy import save_file

    from models import eagle3_train

    os.makedirs(path, exist_ok=True)
    save_file(eagle3_train.hf_tensors(head, cfg.vocab_size), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(eagle3_train.hf_config(cfg, ecfg, cfg.vocab_size), f, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--input", required=True, help="JSONL prompts the model answers (the training data)")
    ap.add_argument("--output", required=True, help="the head's directory (created)")
    ap.add_argument("--max-tokens", type=int, default=128, help="answer length per prompt")
    ap.add_argument("--seq-len", type=int, default=256, help="sequences cut (and padded) to this many tokens")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="the head's vocabulary: the model's most frequent")
    ap.add_argument("--aux-layers", default="", help="comma-separated layers whose inputs the head reads "
                    "(default: 2, L/2, L-3)")
    ap.add_argument("--rounds", type=int, default=3, help="training-time-test rounds (drafts simulated per position)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from engine.config import load_config
    from engine.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(load_config(args.config, args.set))
    prompts = read_prompts(args.input, llm.tokenizer)
    aux_layers = tuple(int(x) for x in args.aux_layers.split(",")) if args.aux_layers else ()
    ecfg, head, accuracy = train_head(
        llm, prompts, max_tokens=args.max_tokens, seq_len=args.seq_len, draft_vocab=args.draft_vocab,
        aux_layers=aux_layers, rounds=args.rounds, steps=args.steps, batch=args.batch, lr=args.lr,
        eval_fraction=args.eval_fraction, seed=args.seed)
    if accuracy is not None:
        print("held-out accuracy by round (the head's guess is the model's choice, drafting from every position): "
              + ", ".join(f"{r + 1}: {a:.1%}" for r, a in enumerate(accuracy)), file=sys.stderr)
    save_head(args.output, llm.engine.model_cfg, ecfg, head)
    print(f"wrote {args.output} in {time.perf_counter() - t0:.0f} s: --set speculative.method=eagle3 "
          f"speculative.model={args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

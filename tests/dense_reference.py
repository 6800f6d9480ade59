"""The non-paged reference forward of one sequence, padded to a bucket so that sequences of many lengths share a
compile (tests check the engine against it token by token, at lengths that change with every step)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models import llama


def pad_rows(rows: jnp.ndarray, multiple: int = 64) -> jnp.ndarray:
    """`rows` ([n] ids or [n, ...] rows) followed by zero rows up to a multiple of `multiple`: a causal reference over
    them gives the unpadded rows first (no position sees the padding after it), one compiled program per multiple."""
    return jnp.pad(rows, [(0, -rows.shape[0] % multiple)] + [(0, 0)] * (rows.ndim - 1))


def dense_logits(params, cfg, ids, multiple: int = 64) -> np.ndarray:
    """Logits [len(ids), vocab] of `llama.forward_dense` over `ids` padded (`pad_rows`), the unpadded sequence's rows.
    Callers put `params` on the device once (as a loop of calls would otherwise copy them every time)."""
    padded = pad_rows(jnp.asarray(list(ids), jnp.int32), multiple)
    return np.asarray(llama.forward_dense(params, cfg, padded))[: len(ids)]


def assert_argmax(logits, tokens, tie: float = 1e-4, margin=0.0) -> None:
    """Greedy `tokens` [n] are the argmax of a reference's `logits` [n, vocab] (teacher-forced: row i given the tokens
    before i), up to ties: a token within `tie` x (1 + |max|) of its row's max passes, as float32 sums taken in
    another order (the reference's, a kernel's) can make either of two so close the larger; or within `margin` (per
    row, or one for all), where the path tested rounds its activations and a sum's last bits can move a rounding."""
    logits, tokens = np.asarray(logits, np.float64), np.asarray(tokens, np.int64)
    assert logits.shape[0] == len(tokens), (logits.shape, len(tokens))
    best = logits.max(-1)
    short = best - logits[np.arange(len(tokens)), tokens]
    wrong = np.flatnonzero(short > np.maximum(tie * (1 + np.abs(best)), margin))
    assert not wrong.size, (f"tokens {tokens.tolist()} are not the reference's argmax {logits.argmax(-1).tolist()} at "
                            f"steps {wrong.tolist()} (their logits {short[wrong].tolist()} below the max)")


def index_margin(params, cfg, ids) -> float:
    """DeepSeek Sparse Attention's closest call on `ids`: over every layer and every position with more than top_k
    to choose from, the smallest gap between the top_k-th and the next indexer score of our dense forward, relative to
    the larger. Where it is ~1e-4 or less, two float32 implementations summing in other orders can keep different
    positions (seen once: 5.6e-5 against transformers), and the logits after that differ by far more than rounding."""
    import jax

    from pallas_kernels import indexed_attention

    scores, score = [], indexed_attention.index_scores

    def recorded(*args):
        out = score(*args)
        jax.debug.callback(lambda s: scores.append(np.asarray(s)), out)
        return out

    indexed_attention.index_scores = recorded
    try:  # a jit of its own: forward_dense's compiled program would not call the recorder
        jax.block_until_ready(jax.jit(lambda p, t: llama.decoder_dense(p, cfg, t))(params, jnp.asarray(ids, jnp.int32)))
    finally:
        indexed_attention.index_scores = score
    k, gaps = cfg.index_topk, [np.inf]
    for layer in scores:
        for row in range(k, len(ids)):
            best = np.sort(layer[row, : row + 1])[::-1]
            gaps.append((best[k - 1] - best[k]) / max(abs(best[k - 1]), abs(best[k]), 1e-30))
    return float(min(gaps))


def hf_model_from_gguf(path: str, workdir: str):
    """transformers' float32 model of a GGUF file (what AutoModelForCausalLM.from_pretrained(gguf_file=...) builds),
    read from a copy without the tokenizer's arrays.

    NOTE: gguf.GGUFReader builds a numpy view per element of every metadata array and transformers reads a file twice
    (config, then weights): reading Gemma 3 270M took 70 s against 11 s from the copy, SmolLM2 27 s against 16 s,
    side by side on this 2-core machine, 2026-12-04 (its vocabulary and merges, which the model never reads). The copy keeps every tensor's bytes and every other metadata value (ints written as int32, or
    uint64 where they do not fit: transformers reads values, not widths), so transformers still dequantizes and runs
    the file's weights its own way."""
    import os

    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from models.gguf_loader import read_gguf

    meta, tensors = read_gguf(path)
    arch = meta["general.architecture"]
    copy = os.path.join(workdir, os.path.basename(path))
    w = gguf.GGUFWriter(copy, arch)
    for key, value in meta.items():
        if key in ("general.architecture", "general.alignment") or (key.startswith("tokenizer.") and
                                                                      isinstance(value, (list, bytes))):
            continue
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_int32 if -2**31 <= value < 2**31 else w.add_uint64)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    if f"{arch}.vocab_size" not in meta:  # transformers counts the tokens otherwise
        w.add_uint32(f"{arch}.vocab_size", tensors["token_embd.weight"].shape[0])
    for t in tensors.values():
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = AutoModelForCausalLM.from_pretrained(workdir, gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()

"""Speculative decoding with the checkpoint's own multi-token-prediction layer (`speculative.method: mtp`,
models/mtp.py): vLLM's and SGLang's `mtp`.

The layer's K/V lives in the model's pages after the model's arrays, as a draft model's does (engine/draft_model.py),
so prefix hits, copy-on-write, preemption and the host and disk tiers carry it. Its row for position i reads the
model's hidden state at i and token i + 1, so it runs after the step has sampled:

- **extend** (every step, after the head; `extend_impl`): the layer over the step's rows, each paired with the token
  after it: the prompt's next token inside a prefill, else the token the step sampled at that row (for a verified
  draft position that is the draft where it was accepted and the correction where it was not; rows after a rejection
  are overwritten by a later step, as the model's are). Its outputs at the head rows are kept for the next plan.
- **propose** (before a step, for the chunks with draft slots; `propose_impl`): a sequence's first draft is the
  guess of the layer's output at the row that sampled its newest token; each further draft chains the layer one
  position on from its own output and guess, writing K/V the verifying step rewrites.

Under tensor parallelism the layer is split over the devices as the model's layers are, its K/V by head as the
model's (DeepSeek-V3's is an expert layer of ~11B weights: whole on each device it would cost that much memory each).

Greedy drafts, verified by exact match (engine/speculative.py): outputs are plain decoding's whatever the layer
guesses. The layer's K/V at a cached prefix's last position was computed with the token that followed it in the
sequence that cached it, so a prefix hit ends a page early and that page is recomputed (`Scheduler._mtp_cut`): each
draft is the layer's guess over the sequence as computed from scratch.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import W8A8, ConfigKeyError, EngineConfig
from engine.draft_model import DraftModel
from engine.replica_weights import ReplicaWeights
from engine.transfer import unpacked
from models import llama, mtp, sharding
from models.config import LlamaConfig

log = logging.getLogger(__name__)

# The model's weight formats the layer takes too (as its float weights quantized; W8A8 as W8A16: no calibration).
QUANTIZATIONS = {"int8": "int8", "int4": "int4", "fp8": "fp8", "mxfp4": "mxfp4", "w8a8": "int8", "w8a8_fp8": "fp8"}


def load_drafter(config: EngineConfig, loaded_cfg: LlamaConfig, model_cfg: LlamaConfig, dtype, tokenizer,
                 given: tuple | None, mesh, progress: bool) -> tuple[DraftModel, mtp.MtpConfig]:
    """The MTP layer of `model.path` (or `given` = (MtpConfig, params) in process), split over a tensor-parallel
    `mesh` as the model's layers are (its K/V too), its weights quantized as the model's where that format applies to
    float weights; its experts run as the model's (`model_cfg`: the model as served)."""
    t0 = time.perf_counter()
    if given is not None:
        mcfg, params = given
    else:
        mcfg, params = mtp.load_mtp(config.model.path, loaded_cfg, dtype)
    quantization = QUANTIZATIONS.get(config.model.quantization, "none")
    layer_config = config.replace(**{"model.quantization": quantization, "model.quantize_embeddings": False,
                                     "lora.adapters": {}})
    served, _ = sharding.prepare_for_tensor_parallel(mcfg.layer, {"layers": {}}, config.parallel.tensor,
                                                     config.parallel.expert)
    served = dataclasses.replace(served, moe_grouped=model_cfg.moe_grouped)
    weights = ReplicaWeights(layer_config, mcfg.layer, served, dtype, mesh, tokenizer, params, progress)
    log.info("MTP layer of %s (%s) ready in %.1f s: %d draft tokens per sequence per step",
             config.model.path if given is None else "(in-process)", quantization, time.perf_counter() - t0,
             config.speculative.num_tokens)
    return DraftModel(served, weights), dataclasses.replace(mcfg, layer=served)


def check_supported(config: EngineConfig, model_cfg: LlamaConfig) -> None:
    """ConfigKeyError naming a model without an MTP layer this engine reads (draft_model.check_supported: the rest)."""
    if model_cfg.architecture not in mtp.SUPPORTED:
        raise ConfigKeyError(f"speculative.method: mtp: {model_cfg.architecture} checkpoints carry no "
                             f"multi-token-prediction layer this engine reads ({', '.join(mtp.SUPPORTED)} do)")
    if config.model.quantization in W8A8:
        log.info("speculative.method: mtp: the MTP layer's weights take W8A16 (%s), its activations stay as they are",
                 QUANTIZATIONS[config.model.quantization])


def next_tokens(chunks, head_rows: list[list[int]], firsts: np.ndarray, num_tokens: int) -> np.ndarray:
    """[num_tokens] int32: the token after each row of a step (`ModelInputs.next_tokens`): the chunk's next token
    where the step does not sample it (inside a prefill, or a prefill chunk's last row), -1 - r where head row r
    samples it; 0 on padding rows."""
    out = np.zeros(num_tokens, np.int32)
    for c, rows, first in zip(chunks, head_rows, firsts.tolist()):
        n = len(c.token_ids)
        out[first : first + n - 1] = c.token_ids[1:]
        if c.sample:
            out[first + n - len(rows) : first + n] = -1 - np.asarray(rows, np.int32)
        else:
            after = c.seq.token_slice(c.start + n, c.start + n + 1)
            out[first + n - 1] = after[0] if after else 0
    return out


class SampledRows:
    """Where each sequence's newest token was sampled in the last step: the head row whose layer output its first
    draft is guessed from."""

    def __init__(self):
        self._rows: dict[int, tuple[object, int, list[int]]] = {}

    def record(self, chunks, head_rows: list[list[int]]) -> None:
        """A launched step's sampling chunks: (sequence, end position, head rows in position order)."""
        self._rows = {id(c.seq): (c.seq, c.start + len(c.token_ids), rows)
                      for c, rows in zip(chunks, head_rows) if c.sample}

    def row(self, chunk) -> int:
        """The head row of the last step that sampled the token at `chunk.start` (the one before it was computed
        there); -1 if that step did not (the sequence was not in it: no draft this time)."""
        seq, end, rows = self._rows.get(id(chunk.seq), (None, 0, []))
        j = chunk.start - 1 - (end - len(rows))
        return rows[j] if seq is chunk.seq and 0 <= j < len(rows) else -1


def extend_impl(st, params, mtp_params, kv_caches, inputs, every_row, sampled, decode_only=None):
    """The MTP layer over a step's rows, each paired with the token after it (`inputs.next_tokens`, resolved against
    the step's `sampled` tokens by head row). Returns (its outputs at the head rows [R, hidden], before its norm;
    caches)."""
    inputs = unpacked(inputs)
    nxt = inputs.next_tokens
    nxt = jnp.where(nxt < 0, sampled[jnp.maximum(-1 - nxt, 0)], nxt)
    hidden = llama.final_hidden(params, st.cfg, every_row)
    x = mtp.fuse(params, mtp_params, st.mtp, nxt, hidden, inputs.positions)
    layer_inputs = dataclasses.replace(inputs, tokens=nxt, adapter_ids=None, mm_embeds=None, mm_deep=None,
                                       mrope_positions=None, kv_limits=None, next_tokens=None)
    out, layer_kv = llama.forward(mtp_params, st.mtp.layer, kv_caches[st.num_model_kv :], layer_inputs,
                                  attn_backend=st.backend, mesh=st.mesh, decode_only=decode_only, embeds=x)
    return out, (*kv_caches[: st.num_model_kv], *layer_kv)


def propose_impl(st, params, mtp_params, kv_caches, outputs, rows, starts, counts, pages):
    """`speculative.num_tokens` greedy guesses per drafting row j: the first from the layer's output at head row
    rows[j] of the last step, each next from one more run of the layer over (its last output, its last guess) at
    position starts[j] + round - 1. Rounds past a row's count write no K/V. Returns ([rows, num_tokens] int32,
    caches)."""
    n, ps, mcfg = rows.shape[0], st.page_size, st.mtp
    seq = jnp.arange(n, dtype=jnp.int32)
    vocab = st.cfg.vocab_size

    def guess(out):
        return jnp.argmax(mtp.logits(params, mtp_params, mcfg, out)[:, :vocab], axis=-1).astype(jnp.int32)

    def one(i, carry):
        tok, out, drafts, kv = carry
        pos = starts + i - 1
        slots = jnp.where(i < counts, pages[seq, pos // ps] * ps + pos % ps, -1)
        inputs = llama.ModelInputs(tokens=tok, positions=pos, slot_mapping=slots, kv_lens=pos + 1,
                                   page_indices=pages, cu_q_lens=jnp.arange(n + 1, dtype=jnp.int32),
                                   num_seqs=jnp.full((1,), n, jnp.int32), logits_indices=seq)
        x = mtp.fuse(params, mtp_params, mcfg, tok, mtp.chained(params, mtp_params, mcfg, out), pos)
        out, layer_kv = llama.forward(mtp_params, mcfg.layer, kv[st.num_model_kv :], inputs, attn_backend=st.backend,
                                      mesh=st.mesh, decode_only=st.backend != "xla" or None, embeds=x)
        tok = guess(out)
        return tok, out, drafts.at[:, i].set(tok), (*kv[: st.num_model_kv], *layer_kv)

    out = outputs[rows]
    tok = guess(out)
    drafts = jnp.zeros((n, st.num_draft), jnp.int32).at[:, 0].set(tok)
    _, _, drafts, kv_caches = jax.lax.fori_loop(1, st.num_draft, one, (tok, out, drafts, tuple(kv_caches)))
    return drafts, kv_caches

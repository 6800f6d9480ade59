"""Speculative decoding with the checkpoint's own multi-token-prediction layer (`speculative.method: mtp`,
models/mtp.py): vLLM's and SGLang's `mtp`; and with an EAGLE-3 head trained for the model (`speculative.method:
eagle3`, models/eagle3.py), which runs alike over three of the model's hidden states instead of its last.

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
sequence that cached it, so a sequence whose prefix hit ends before it does recomputes that one position, in a private
copy of its page (`Scheduler._admit`): each draft is the layer's guess over the sequence as computed from scratch.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import W8A8, ConfigKeyError, EngineConfig
from engine import draft_trees
from engine.draft_model import DraftModel
from engine.replica_weights import ReplicaWeights
from engine.transfer import unpacked
from models import eagle3, llama, mtp, sharding
from models.config import LlamaConfig

log = logging.getLogger(__name__)

# The model's weight formats the layer takes too (as its float weights quantized; W8A8 as W8A16: no calibration).
QUANTIZATIONS = {"int8": "int8", "int4": "int4", "fp8": "fp8", "mxfp4": "mxfp4", "w8a8": "int8", "w8a8_fp8": "fp8"}


def load_drafter(config: EngineConfig, loaded_cfg: LlamaConfig, model_cfg: LlamaConfig, dtype, tokenizer,
                 given: tuple | None, mesh, progress: bool) -> tuple[DraftModel, mtp.MtpConfig | eagle3.Eagle3Config]:
    """The MTP layer of `model.path`, or the EAGLE-3 head in `speculative.model` (or `given` = (MtpConfig or
    Eagle3Config, params) in process), split over a tensor-parallel `mesh` as the model's layers are (its K/V too).
    An MTP layer's weights are quantized as the model's where that format applies to float weights, its experts run
    as the model's (`model_cfg`: the model as served); an EAGLE-3 head's stay in the model's float dtype."""
    t0 = time.perf_counter()
    eagle = config.speculative.method == "eagle3"
    source = config.speculative.model if eagle else config.model.path
    if given is not None:
        mcfg, params = given
        if eagle:
            eagle3.check_params(mcfg, loaded_cfg, jax.tree.map(np.asarray, params), "(in-process)")
    elif eagle:
        if not source:
            raise ConfigKeyError("speculative.method: eagle3 needs speculative.model, the EAGLE-3 head's checkpoint "
                                 "directory (trained for this model)")
        mcfg, params = eagle3.load_eagle3(source, loaded_cfg, dtype)
    else:
        mcfg, params = mtp.load_mtp(source, loaded_cfg, dtype)
    quantization = "none" if eagle else QUANTIZATIONS.get(config.model.quantization, "none")
    layer_config = config.replace(**{"model.quantization": quantization, "model.quantize_embeddings": False,
                                     "lora.adapters": {}})
    served, _ = sharding.prepare_for_tensor_parallel(mcfg.layer, {"layers": {}}, config.parallel.tensor,
                                                     config.parallel.expert)
    served = dataclasses.replace(served, moe_grouped=model_cfg.moe_grouped)
    weights = ReplicaWeights(layer_config, mcfg.layer, served, dtype, mesh, tokenizer, params, progress)
    log.info("%s of %s (%s) ready in %.1f s: %d draft tokens per sequence per step",
             "EAGLE-3 head" if eagle else "MTP layer", source if given is None else "(in-process)", quantization,
             time.perf_counter() - t0, config.speculative.num_tokens)
    return DraftModel(served, weights), dataclasses.replace(mcfg, layer=served)


def check_supported(config: EngineConfig, model_cfg: LlamaConfig) -> None:
    """ConfigKeyError naming a model without an MTP layer this engine reads (draft_model.check_supported: the
    rest)."""
    if config.speculative.method == "eagle3":  # (any model: the head names what it needs of it)
        return
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
        self._rows = {id(c.seq): (c.seq, c.start + len(c.token_ids), rows, c.draft_parents and c.draft_tree)
                      for c, rows in zip(chunks, head_rows) if c.sample}

    def row(self, chunk) -> int:
        """The head row of the last step that sampled the token at `chunk.start` (the one before it was computed
        there); -1 if that step did not (the sequence was not in it: no draft this time). After a draft tree, the row
        of the node the accepted tokens lead to."""
        seq, end, rows, tree = self._rows.get(id(chunk.seq), (None, 0, [], None))
        j = chunk.start - 1 - (end - len(rows))
        if seq is not chunk.seq or not 0 <= j < len(rows):
            return -1
        if tree:  # (its nodes' rows are in the tree's order)
            node, root = 0, end - len(rows)
            for token in seq.token_slice(root + 1, chunk.start):
                node = tree.child(node, token)
                if node is None:
                    return -1
            j = node
        return rows[j]


def _is_eagle(st) -> bool:
    return isinstance(st.mtp, eagle3.Eagle3Config)


def _layer_inputs(st, params, mtp_params, tokens, hidden, positions) -> tuple[jax.Array, jax.Array | None]:
    """(the layer's input rows, its attention's input rows or None) for pairs (hidden[i], tokens[i])."""
    if _is_eagle(st):
        return eagle3.fuse(params, mtp_params, st.mtp, tokens, hidden, positions)
    return mtp.fuse(params, mtp_params, st.mtp, tokens, hidden, positions), None


def _guesses(st, params, mtp_params, out) -> jax.Array:
    """[N] int32: the model's token each of the layer's output rows guesses."""
    if _is_eagle(st):
        return eagle3.guesses(mtp_params, st.mtp, out)
    logits = mtp.logits(params, mtp_params, st.mtp, out)[:, : st.cfg.vocab_size]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _top_guesses(st, params, mtp_params, out, k: int) -> tuple[jax.Array, jax.Array]:
    """([N, k] log probabilities, [N, k] int32 tokens): the model's k tokens each output row finds likeliest."""
    if _is_eagle(st):
        logp, d = draft_trees.top_tokens(llama.compute_logits(mtp_params, st.mtp.layer, out), k)
        return logp, d + mtp_params["d2t"][d]
    return draft_trees.top_tokens(mtp.logits(params, mtp_params, st.mtp, out), k, st.cfg.vocab_size)


def extend_impl(st, params, mtp_params, kv_caches, inputs, every_row, sampled, decode_only=None):
    """The MTP layer (or EAGLE-3 head) over a step's rows, each paired with the token after it (`inputs.next_tokens`,
    resolved against the step's `sampled` tokens by head row). `every_row`: the model's rows before its final norm,
    or for an EAGLE-3 head its captured layer inputs. Returns (its outputs at the head rows [R, hidden], before its
    norm; caches)."""
    inputs = unpacked(inputs)
    nxt = inputs.next_tokens
    nxt = jnp.where(nxt < 0, sampled[jnp.maximum(-1 - nxt, 0)], nxt)
    hidden = (eagle3.hidden_rows(mtp_params, every_row) if _is_eagle(st)
              else llama.final_hidden(params, st.cfg, every_row))
    x, attn_in = _layer_inputs(st, params, mtp_params, nxt, hidden, inputs.positions)
    layer_inputs = dataclasses.replace(inputs, tokens=nxt, adapter_ids=None, mm_embeds=None, mm_deep=None,
                                       mrope_positions=None, kv_limits=None, next_tokens=None)
    out, layer_kv = llama.forward(mtp_params, st.mtp.layer, kv_caches[st.num_model_kv :], layer_inputs,
                                  attn_backend=st.backend, mesh=st.mesh, decode_only=decode_only, embeds=x,
                                  attn_in=attn_in)
    return out, (*kv_caches[: st.num_model_kv], *layer_kv)


def propose_impl(st, params, mtp_params, kv_caches, outputs, rows, starts, counts, depths, pages):
    """`speculative.num_tokens` greedy guesses per drafting row j: the first from the layer's output at head row
    rows[j] of the last step, each next from one more run of the layer over (its last output, its last guess) at
    position starts[j] + round - 1. Rounds past a row's count write no K/V. Returns ([rows, num_tokens] int32,
    caches). With `st.topk` > 1 a tree of at most depths[j] levels in counts[j] slots, each round over its beams
    (engine.draft_trees): (candidates' (tokens, parents, scores), caches)."""
    n, ps, mcfg = rows.shape[0], st.page_size, st.mtp
    seq = jnp.arange(n, dtype=jnp.int32)
    # what a chained round reads of the last output: an EAGLE-3 head's as it is, an MTP layer's by its kind
    chained = (lambda out: out) if _is_eagle(st) else functools.partial(mtp.chained, params, mtp_params, mcfg)
    if st.topk > 1:
        def round_fn(tok, out, inputs, kv):
            x, attn_in = _layer_inputs(st, params, mtp_params, tok, chained(out), inputs.positions)
            out, layer_kv = llama.forward(mtp_params, mcfg.layer, kv[st.num_model_kv :], inputs,
                                          attn_backend=st.backend, mesh=st.mesh,
                                          decode_only=st.backend != "xla" or None, embeds=x, attn_in=attn_in)
            return _top_guesses(st, params, mtp_params, out, st.topk), out, (*kv[: st.num_model_kv], *layer_kv)

        out = outputs[rows]
        return draft_trees.tree_rounds(_top_guesses(st, params, mtp_params, out, st.topk), round_fn, out,
                                       tuple(kv_caches), topk=st.topk, num_levels=st.num_draft, base=starts,
                                       counts=counts, depths=depths, pages=pages, page_size=ps)

    def one(i, carry):
        tok, out, drafts, kv = carry
        pos = starts + i - 1
        slots = jnp.where(i < counts, pages[seq, pos // ps] * ps + pos % ps, -1)
        inputs = llama.ModelInputs(tokens=tok, positions=pos, slot_mapping=slots, kv_lens=pos + 1,
                                   page_indices=pages, cu_q_lens=jnp.arange(n + 1, dtype=jnp.int32),
                                   num_seqs=jnp.full((1,), n, jnp.int32), logits_indices=seq)
        x, attn_in = _layer_inputs(st, params, mtp_params, tok, chained(out), pos)
        out, layer_kv = llama.forward(mtp_params, mcfg.layer, kv[st.num_model_kv :], inputs, attn_backend=st.backend,
                                      mesh=st.mesh, decode_only=st.backend != "xla" or None, embeds=x, attn_in=attn_in)
        tok = _guesses(st, params, mtp_params, out)
        return tok, out, drafts.at[:, i].set(tok), (*kv[: st.num_model_kv], *layer_kv)

    out = outputs[rows]
    tok = _guesses(st, params, mtp_params, out)
    drafts = jnp.zeros((n, st.num_draft), jnp.int32).at[:, 0].set(tok)
    _, _, drafts, kv_caches = jax.lax.fori_loop(1, st.num_draft, one, (tok, out, drafts, tuple(kv_caches)))
    return drafts, kv_caches

"""The device side of a replica: KV cache, bucketed batch arrays, the jitted step and the sampler.

The scheduler's `StepPlan` (host ints) becomes one `ModelInputs` (device arrays of a few bucketed
shapes); the model step runs with the KV cache donated (updated in place, never copied), then the
head + sampler run on the hidden rows of each sequence's last token. One host sync per step: the
sampled tokens and their logprobs.

Two jitted functions keep the number of compiled shapes additive, not multiplicative:
  forward: (params, kv, inputs[T bucket; S = max_running]) -> (hidden [R, H], kv)   one per T bucket
  head:    (params, hidden, sampling inputs [R bucket])     -> tokens, logprobs       one per R bucket
R, the head rows, is one per sequence (max_running), plus one per draft token with speculative decoding. Engines of
one model and settings in a process share them (`step_programs`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from engine import draft_trees, mtp_drafter, multimodal, sampler, speculative
from engine.config import ConfigKeyError, EngineConfig
from engine.kv_copies import COPY_FIELDS, PageCopies
from engine.request import MAX_TOP_LOGPROBS
from engine.scheduler import StepPlan
from engine.transfer import Packed, unpacked
from models import gated_delta, llama, sharding
from models.config import LlamaConfig
import pallas_kernels
from pallas_kernels import kv_quant

log = logging.getLogger(__name__)

MIN_TOKEN_BUCKET = 16
# A CPU computes every padded token of a step (a GPU's small steps are bound by reading the weights, padded or not):
# there, for a model whose layers hold at least CPU_SMALL_STEP_WEIGHTS weights (a padded token's matmuls outweigh a
# step's fixed cost of ~2 ms), the default buckets start at 4 tokens, so a few decodes pad to 4 or 8, for two more
# compiled forwards (docs/benchmarks.md, "Small steps on a CPU"). A tiny model's steps cost their fixed cost alone.
CPU_MIN_TOKEN_BUCKET = 4
CPU_SMALL_STEP_WEIGHTS = 10_000_000
PROMPT_HEAD_BLOCK = 64  # rows per block of the prompt-logprob head (peak memory: this many rows of logits)
PROGRAM_SETS_KEPT = 8  # the jitted programs of this many recent runner settings stay cached (`step_programs`)


def min_token_bucket(platform: str, layer_weights: int) -> int:
    """The smallest default step size in tokens on `platform` (jax.default_backend()) for a model whose decoder
    layers hold `layer_weights` weights (the embedding and LM head, which no padded token reaches, left out)."""
    return CPU_MIN_TOKEN_BUCKET if platform == "cpu" and layer_weights >= CPU_SMALL_STEP_WEIGHTS else MIN_TOKEN_BUCKET


def configured_buckets(configured: tuple[int, ...], largest: int) -> list[int]:
    """Configured sizes (scheduler.token_buckets, head_buckets: increasing, the last >= `largest`) up to the first
    one >= `largest`: any past it would never be used."""
    return [b for b in configured if b < largest] + [next(b for b in configured if b >= largest)]


def pow2_buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from `smallest` up to the first one >= `largest`."""
    out = [smallest]
    while out[-1] < largest:
        out.append(out[-1] * 2)
    return out


def token_buckets(smallest: int, largest: int, configured: tuple[int, ...] = ()) -> list[int]:
    """Step sizes in tokens: powers of two up to 128, then also the midpoints 1.5 x 2^k (192, 384, 768...),
    up to the first one >= `largest`. A step pads to its bucket, so past 128 tokens, where a step's cost
    is mostly its matmuls, the midpoints cut the padding of a prefill chunk plus decodes from up to 2x to
    up to 1.5x, for one extra compiled shape per doubling. `configured` (scheduler.token_buckets, increasing, the
    last >= `largest`) replaces them, up to its first >= `largest`."""
    if configured:
        return configured_buckets(configured, largest)
    out = [smallest]
    while out[-1] < largest:
        n = out[-1]
        if n < 128:
            out.append(n * 2)
        elif n & (n - 1) == 0:  # 2^k -> 1.5 x 2^k
            out.append(n * 3 // 2)
        else:  # 1.5 x 2^k -> 2^(k+1)
            out.append(n * 4 // 3)
    return out


def top_bucket(k: int) -> int:
    """How many top logprobs a step computes when k are asked for: the next power of two (few distinct shapes)."""
    return 0 if k == 0 else min(MAX_TOP_LOGPROBS, 1 << (k - 1).bit_length())


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def cache_arrays(cfg: LlamaConfig, pages: tuple[int, ...], kv_dtype,
                 draft: LlamaConfig | None = None) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each cache array: K and V [L, Hkv, *pages, D] (a latent cache's of their own widths,
    `LlamaConfig.kv_dims`), and their scales [L, Hkv, *pages] when 8-bit; then the same for a draft model's K/V
    (speculative decoding), which lives in the same pages. `pages`: (num_pages, page_size), or (page_size,) for one
    page (the disk tier's file layout)."""
    shape = (cfg.num_kv_layers, cfg.num_kv_heads) + pages
    arrays = [(shape + (dim,), np.dtype(kv_dtype)) for dim in cfg.kv_dims]
    if kv_quant.is_quantized(kv_dtype):
        arrays += [(shape, np.dtype(kv_quant.SCALE_DTYPE))] * 2
    return arrays + (cache_arrays(draft, pages, kv_dtype) if draft is not None else [])


def kv_page_specs(cfg: LlamaConfig, page_size: int, kv_dtype,
                  draft: LlamaConfig | None = None) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of one page of each cache array, every layer (the disk tier's file layout)."""
    return cache_arrays(cfg, (page_size,), kv_dtype, draft)


def kv_bytes_per_page(cfg: LlamaConfig, page_size: int, kv_dtype) -> int:
    """One page over every layer and KV head: K and V, and their scales for an 8-bit cache."""
    return kv_quant.page_bytes(cfg.num_kv_layers, cfg.num_kv_heads, page_size, cfg.kv_dims, kv_dtype)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    tokens: np.ndarray  # [num head rows] int32 (meaningful where the chunk samples): row i is chunk i's last position
    logprobs: np.ndarray  # [num head rows] float32
    top_ids: np.ndarray  # [num head rows, K]
    top_logprobs: np.ndarray  # [num head rows, K]
    prompt_logprobs: np.ndarray | None = None  # [T]: by row, the logprob of the row's prompt target
    prompt_top_ids: np.ndarray | None = None  # [T, K]
    prompt_top_logprobs: np.ndarray | None = None  # [T, K]
    prompt_ranks: np.ndarray | None = None  # [T]: by row, the rank of the row's prompt target (1: the most likely)
    hidden: np.ndarray | None = None  # [num head rows, hidden] after the final norm (steps with embedding requests)


@dataclasses.dataclass(frozen=True)
class StepStatics:
    """What a runner's jitted programs depend on besides their arrays' shapes: runners with equal statics (another
    engine of the same model and settings in this process: a sweep, a rebuilt LLM, tests) share the programs
    (`step_programs`), and so what was traced, lowered and compiled."""

    cfg: LlamaConfig
    draft_cfg: LlamaConfig | None
    backend: str
    mesh: jax.sharding.Mesh | None
    layout: llama.HybridLayout | None  # a hybrid cache's
    num_model_kv: int  # the cache arrays that are the model's (a draft's follow)
    max_seqs: int
    page_size: int
    num_draft: int  # the draft model's rounds per proposal
    max_rows: int  # head rows at most (the largest sequence bucket): the sampled tokens kept for the next step
    # models.mtp.MtpConfig of an MTP drafter (speculative.method: mtp), or models.eagle3.Eagle3Config of an EAGLE-3 head
    # (eagle3); its weights are draft_params
    mtp: Any = None
    topk: int = 1  # a drafter's tree (speculative.topk > 1; engine.draft_trees): the paths each round keeps
    logprobs_mode: str = "raw_logprobs"  # model.logprobs_mode: what the head's logprobs are of (engine.sampler.sample)


def _forward_impl(st: StepStatics, params, kv_caches, inputs: llama.ModelInputs, prev_tokens, lora, draft_params,
                  states=None, decode_only=None):
    """The model step, its placeholder tokens first replaced by those the previous step sampled; with a draft
    model, the draft's forward over the same tokens too, so its K/V holds every position the model's does (the
    prefix cache's pages serve both). Returns (hidden of each sequence's last row [S, H], every row's hidden
    [T, H], what an EAGLE-3 head reads of every row (its layers' inputs [T, 3 x H]; else None), caches, recurrent
    states (a model with linear attention layers; else None))."""
    inputs = unpacked(inputs)
    tokens = jnp.where(inputs.tokens < 0, prev_tokens[jnp.maximum(-1 - inputs.tokens, 0)], inputs.tokens)
    inputs = dataclasses.replace(inputs, tokens=tokens)
    (hidden, every_row, *aux), own, *rest = llama.forward(
        params, st.cfg, kv_caches[: st.num_model_kv], inputs, attn_backend=st.backend, mesh=st.mesh,
        all_hidden=True, lora=lora, layout=st.layout, decode_only=decode_only, states=states,
        decode_step=decode_only is True and bool(st.cfg.linear_layers),  # Runner._decode_kernel's promise
        aux_layers=getattr(st.mtp, "aux_layers", ()))
    drafts = kv_caches[st.num_model_kv :]
    if st.draft_cfg is not None and st.mtp is None:  # (an MTP layer runs after the head: mtp_drafter.extend_impl)
        _, drafts = llama.forward(draft_params, st.draft_cfg, drafts,
                                  dataclasses.replace(inputs, adapter_ids=None, mm_embeds=None, mm_deep=None,
                                                      mrope_positions=None, kv_limits=None),
                                  attn_backend=st.backend,
                                  decode_only=decode_only)
    return hidden, every_row, (aux[0] if aux else None), (*own, *drafts), (rest[0] if rest else None)


def _propose_impl(st: StepStatics, draft_params, kv_caches, tokens, starts, counts, depths, pages):
    """`speculative.num_tokens` greedy tokens per row from the draft model: row j feeds tokens[j] at position
    starts[j] + i in round i and takes the argmax as the next round's token. Rounds past a row's count write no
    K/V (its pages may end there) and their tokens are dropped. Returns ([rows, num_tokens] int32, caches).
    With `st.topk` > 1 a tree of at most depths[j] levels in counts[j] slots (`_propose_tree`)."""
    rows, ps = tokens.shape[0], st.page_size
    seq = jnp.arange(rows, dtype=jnp.int32)
    vocab = min(st.cfg.vocab_size, st.draft_cfg.vocab_size)  # a draft's table may be padded past the model's
    if st.topk > 1:
        return _propose_tree(st, draft_params, kv_caches, tokens, starts, counts, depths, pages, vocab)

    def one(i, carry):
        tok, drafts, kv = carry
        pos = starts + i
        slots = jnp.where(i < counts, pages[seq, pos // ps] * ps + pos % ps, -1)
        inputs = llama.ModelInputs(tokens=tok, positions=pos, slot_mapping=slots, kv_lens=pos + 1,
                                   page_indices=pages, cu_q_lens=jnp.arange(rows + 1, dtype=jnp.int32),
                                   num_seqs=jnp.full((1,), rows, jnp.int32), logits_indices=seq)
        hidden, drafts_kv = llama.forward(draft_params, st.draft_cfg, kv[st.num_model_kv :], inputs,
                                          attn_backend=st.backend, decode_only=st.backend != "xla" or None)
        logits = llama.compute_logits(draft_params, st.draft_cfg, hidden)[:, :vocab]
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, drafts.at[:, i].set(tok), (*kv[: st.num_model_kv], *drafts_kv)

    init = (tokens, jnp.zeros((rows, st.num_draft), jnp.int32), tuple(kv_caches))
    _, drafts, kv_caches = jax.lax.fori_loop(0, st.num_draft, one, init)
    return drafts, kv_caches


def _propose_tree(st: StepStatics, draft_params, kv_caches, tokens, starts, counts, depths, pages, vocab):
    """The draft model's tree (engine.draft_trees): the real last token tokens[j] at starts[j] gives the first level;
    each round runs the draft over the beams at the positions after it. Returns (candidates' (tokens, parents,
    scores), caches)."""
    rows, ps = tokens.shape[0], st.page_size
    seq = jnp.arange(rows, dtype=jnp.int32)

    def forward(inputs, kv):
        hidden, drafts_kv = llama.forward(draft_params, st.draft_cfg, kv[st.num_model_kv :], inputs,
                                          attn_backend=st.backend, decode_only=st.backend != "xla" or None)
        top = draft_trees.top_tokens(llama.compute_logits(draft_params, st.draft_cfg, hidden), st.topk, vocab)
        return top, (*kv[: st.num_model_kv], *drafts_kv)

    slots = jnp.where(counts > 0, pages[seq, starts // ps] * ps + starts % ps, -1)
    first, kv_caches = forward(llama.ModelInputs(
        tokens=tokens, positions=starts, slot_mapping=slots, kv_lens=starts + 1, page_indices=pages,
        cu_q_lens=jnp.arange(rows + 1, dtype=jnp.int32), num_seqs=jnp.full((1,), rows, jnp.int32), logits_indices=seq,
        tree_masks=jnp.zeros(rows, jnp.int32)), tuple(kv_caches))

    def round_fn(tok, state, inputs, kv):  # (the draft reads its own K/V of the tokens before: no state)
        top, kv = forward(inputs, kv)
        return top, state, kv

    return draft_trees.tree_rounds(first, round_fn, jnp.zeros((rows, 1), jnp.float32), kv_caches, topk=st.topk,
                                   num_levels=st.num_draft, base=starts + 1, counts=counts, depths=depths, pages=pages,
                                   page_size=ps)


def _prompt_head_impl(st: StepStatics, params, every_row, targets, *, num_top):
    """Logprob of `targets[r]` under row r's logits (prompt logprobs), the top `num_top` of each row, and the
    target's rank (1 + the tokens more likely than it). Rows go through in blocks of 64, so at most [64, vocab]
    logits exist at once whatever the step size."""

    def block(args):
        x, tgt = args
        logprobs = jax.nn.log_softmax(llama.compute_logits(params, st.cfg, x), axis=-1)
        _, lp, top_ids, top_lps = sampler.with_logprobs(jnp.maximum(tgt, 0), logprobs, num_top)
        rank = 1 + jnp.sum(logprobs > lp[:, None], axis=-1, dtype=jnp.int32)
        return lp, top_ids, top_lps, rank

    t = targets.shape[0]
    size = PROMPT_HEAD_BLOCK if t % PROMPT_HEAD_BLOCK == 0 else t
    out = jax.lax.map(block, (every_row.reshape(t // size, size, -1), targets.reshape(t // size, size)))
    return tuple(a.reshape(t, *a.shape[2:]) for a in out)


def _head_impl(st: StepStatics, params, hidden, s_in, *, num_rows, use_penalties, use_filters, num_top_logprobs,
               greedy_only, use_mask):
    """Logits and sampling for the first `num_rows` rows; then the rows after the final norm (embedding requests
    read them; XLA computes the norm once for both) and the sampled tokens padded to max_rows, the next
    step's `prev_tokens` (placeholders name the first max_running; an MTP drafter's extend reads them all)."""
    s_in = unpacked(s_in)
    logits = llama.compute_logits(params, st.cfg, hidden[:num_rows])
    out = sampler.sample(logits, s_in, use_penalties=use_penalties, use_filters=use_filters,
                         num_top_logprobs=num_top_logprobs, greedy_only=greedy_only, use_mask=use_mask,
                         logprobs_mode=st.logprobs_mode)
    normed = llama.final_hidden(params, st.cfg, hidden[:num_rows])
    return *out, normed, jnp.zeros(st.max_rows, jnp.int32).at[:num_rows].set(out[0])


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    """A runner's jitted programs (the KV cache donated to the step and to the draft's proposal)."""

    forward: Any
    head: Any
    prompt_head: Any
    propose: Any
    mtp_extend: Any
    mtp_propose: Any


@functools.lru_cache(maxsize=PROGRAM_SETS_KEPT)
def step_programs(statics: StepStatics) -> StepPrograms:
    """The programs of runners with these statics: one set per distinct statics, so engines of one model and settings
    share what was traced, lowered and compiled. The last PROGRAM_SETS_KEPT sets stay cached after their runners are
    gone. Their executables outlive them in JAX's own caches (up to 2,048 executables, ~100 mapped regions each for a
    CPU step program): a process that builds engine after engine of other settings drops them all past half its limit
    on mappings (engine.compiled.release_executables_if_crowded, as each engine is built)."""
    return StepPrograms(
        forward=jax.jit(functools.partial(_forward_impl, statics), donate_argnames=("kv_caches", "states"),
                        static_argnames="decode_only"),
        head=jax.jit(functools.partial(_head_impl, statics), static_argnames=(
            "num_rows", "use_penalties", "use_filters", "num_top_logprobs", "greedy_only", "use_mask")),
        prompt_head=jax.jit(functools.partial(_prompt_head_impl, statics), static_argnames="num_top"),
        propose=jax.jit(functools.partial(_propose_impl, statics), donate_argnums=1),
        mtp_extend=jax.jit(functools.partial(mtp_drafter.extend_impl, statics), donate_argnums=2,
                           static_argnames="decode_only"),
        mtp_propose=jax.jit(functools.partial(mtp_drafter.propose_impl, statics), donate_argnums=2),
    )


class ModelRunner:
    def __init__(self, model_cfg: LlamaConfig, params, config: EngineConfig, num_pages: int, max_model_len: int,
                 kv_dtype, backend: str, mesh=None, eos_ids: frozenset[int] = frozenset(), num_host_pages: int = 0,
                 lora: dict | None = None, num_window_pages: int = 0, disk=None, draft=None, num_snapshots: int = 0,
                 num_host_states: int = 0, disk_states=None, images=None, mtp=None, prompt_rows=None):
        """num_window_pages: a hybrid cache (llama.HybridLayout), its windowed layers keeping that many slots.
        disk: the disk tier (engine.disk_cache.DiskCache) that pages the plans save are handed to.
        draft: (LlamaConfig, device params) of a draft model (speculative.method: draft_model; whole on every device,
        no hybrid cache): its K/V lives in the same pages as the model's, written by every step (`propose` reads it).
        num_snapshots: a model with linear attention layers, the state slots of the prefix cache's snapshots;
        num_host_states: the host tier's slots for them; disk_states: the disk tier's files of them.
        images: an engine.image_encoder.ImageEncoder (a model that takes images): fills the steps' mm_embeds.
        prompt_rows: the dtype of prompts given as embeddings (model.enable_prompt_embeds; engine/prompt_embeds.py),
        whose rows fill the steps' mm_embeds too; None: none are taken.
        mtp: a models.mtp.MtpConfig with `draft` its layer's (config, params): the checkpoint's MTP layer drafts
        (engine/mtp_drafter.py); or a models.eagle3.Eagle3Config, an EAGLE-3 head drafting alike."""
        self.cfg = model_cfg
        self.draft_cfg, self.draft_params = draft if draft is not None else (None, None)
        self.mtp = mtp
        self.eos_ids = eos_ids  # the tokens min_tokens holds back
        self.params = params
        self.lora = lora or {}  # models.lora.stack_adapters of the loaded LoRA adapters ({}: none)
        self.page_size = config.cache.page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = math.ceil(max_model_len / self.page_size)
        self.max_seqs = config.scheduler.max_running
        # Head rows: each chunk's last position, then each draft position (speculative decoding): at most a whole batch
        # of decodes with their drafts (a draft tree's nodes).
        decode_rows = min(self.max_seqs * (1 + config.speculative.draft_tokens), config.scheduler.max_batch_tokens)
        most_rows = min(self.max_seqs * (1 + config.speculative.draft_nodes), config.scheduler.max_batch_tokens)
        configured = config.scheduler.head_buckets
        if configured and configured[-1] < most_rows:
            raise ConfigKeyError(
                f"scheduler.head_buckets: the largest ({configured[-1]}) must hold a whole batch of decodes with their "
                f"drafts ({most_rows} rows: scheduler.max_running x (1 + the draft positions of each), at most "
                "scheduler.max_batch_tokens)")
        self.seq_buckets = configured_buckets(configured, most_rows) if configured else pow2_buckets(1, most_rows)
        self.max_rows = self.seq_buckets[-1]
        layer_weights = sum(leaf.size for leaf in jax.tree.leaves(params["layers"]))
        self.token_buckets = token_buckets(min_token_bucket(jax.default_backend(), layer_weights),
                                           config.scheduler.max_batch_tokens, config.scheduler.token_buckets)
        self.backend = backend
        # The Pallas backends compile each token bucket up to the one holding a whole batch of decodes (drafts
        # included) twice: for the split-KV decode kernel and for the ragged one (`decode_kernel`).
        self.max_decode_bucket = bucket_for(decode_rows, self.token_buckets)
        self.mesh = mesh
        self.layout = None
        # The cache: (k_pages, v_pages) [L, Hkv, P, ps, D] in kv_dtype (a storage dtype: bfloat16 and float8 as their
        # bits, pallas_kernels/kv_quant.py), and (k_scales, v_scales) [L, Hkv, P, ps] after them when 8-bit; a draft
        # model's arrays after those, [L', Hkv', P, ps, ...] over the same pages. Every array leads with [L, Hkv, P]:
        # page copies, host saves and loads handle them alike. Allocated once (split by KV head across a
        # tensor-parallel mesh), donated to every step.
        kv_shapes = cache_arrays(model_cfg, (num_pages, self.page_size), kv_dtype, self.draft_cfg)
        if num_window_pages:  # one stack of every layer's pages: [1, Hkv, layout.size, ps, D]
            if num_host_pages:
                raise ValueError("a hybrid cache has no host tier")
            self.layout = llama.HybridLayout(model_cfg.kv_reach[0], num_pages, num_window_pages)
            kv_shapes = [((1, s[1], self.layout.size) + s[3:], d) for s, d in kv_shapes]
        # The model's arrays split by KV head across a tensor-parallel mesh; a draft's whole on every device, as its
        # weights are; an MTP layer's split as the model's.
        self.num_model_kv = len(cache_arrays(model_cfg, (), kv_dtype))  # the model's arrays; the draft's follow
        kv_sharding = None if mesh is None else tuple(
            jax.sharding.NamedSharding(mesh, sharding.kv_spec(len(s)) if i < self.num_model_kv or mtp else P())
            for i, (s, _) in enumerate(kv_shapes))
        self._allocate_kv = jax.jit(lambda: tuple(jnp.zeros(s, d) for s, d in kv_shapes), out_shardings=kv_sharding)
        self.kv = self._allocate_kv()
        # Linear attention layers' recurrent states (models/gated_delta.py): a slot per running sequence
        # (Sequence.state_slot), one that padding sequences write to, then the prefix cache's snapshots
        # (engine.state_snapshots); donated to every step like the cache.
        self.state_scratch = self.max_seqs
        # With speculative decoding, K more per drafting row after the snapshots (a step's sequences with drafts take
        # rows 0, 1, ...: `Chunk.draft_row`): a sequence's state after each of its verification step's first K tokens
        # (`draft_state_slot`), one of which `rollback_states` puts back when a draft is rejected, before the next step.
        self.draft_state_base = self.max_seqs + 1 + num_snapshots
        self.draft_k = config.speculative.draft_tokens if model_cfg.linear_layers else 0
        # Draft trees (speculative.ngram_branches): every step carries each row's attention mask (`tree_masks`), so one
        # set of programs serves chains and trees (a model with linear attention layers, or sparse attention's
        # indexer, drafts chains only)
        self.trees = config.speculative.trees and not model_cfg.linear_layers and not model_cfg.index_topk
        self.draft_rows = config.speculative.drafting_rows(self.max_seqs) if self.draft_k else 0
        self.num_state_slots = num_state_slots = self.draft_state_base + self.draft_rows * self.draft_k
        # (split by head across a tensor-parallel mesh, as the layers' weights)
        state_sharding = None if mesh is None else jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(mesh, spec), sharding.state_specs(),
            is_leaf=lambda x: isinstance(x, P))
        self._allocate_states = jax.jit(functools.partial(gated_delta.allocate, model_cfg, num_state_slots),
                                        out_shardings=state_sharding)
        self.states = self._allocate_states() if model_cfg.linear_layers else None
        self._copy_states = jax.jit(_copy_states, donate_argnums=0)
        self._replicated = None if mesh is None else sharding.replicated(mesh)
        self.statics = StepStatics(model_cfg, self.draft_cfg, backend, mesh, self.layout, self.num_model_kv,
                                   self.max_seqs, self.page_size, config.speculative.num_tokens, self.max_rows, mtp,
                                   config.speculative.topk if self.trees else 1, config.model.logprobs_mode)
        programs = step_programs(self.statics)
        self._forward = programs.forward
        # What the last launched step sampled; placed as the head's output is (replicated over a mesh), so the first
        # step and the rest share one compiled forward.
        self._prev_tokens = self._to_device(np.zeros(self.max_rows, np.int32))
        self._head = programs.head
        # Copy-on-write, and the host and disk tiers' copies (engine.kv_copies), before each step's forward.
        self.copies = PageCopies(kv_shapes, num_pages, num_host_pages, self.layout, disk, self._to_device,
                                 gated_delta.state_shapes(model_cfg, num_host_states) if model_cfg.linear_layers else None,
                                 num_state_slots if model_cfg.linear_layers else 0, disk_states)
        self._prompt_head = programs.prompt_head
        # Draft model: `propose` runs `statics.num_draft` rounds of it for a bucket of rows (one per drafting sequence).
        self.draft_buckets = pow2_buckets(1, self.max_seqs)
        self._propose = programs.propose
        # MTP drafter: the layer's outputs at the last step's head rows, and which row sampled each sequence's newest
        # token (engine/mtp_drafter.py).
        self._mtp_extend, self._mtp_propose = programs.mtp_extend, programs.mtp_propose
        self._mtp_outputs = None  # (set by every step's extend; warmup's forward buckets come before its drafts)
        self._mtp_rows = mtp_drafter.SampledRows()
        self.followers = None  # engine.multihost.Followers on process 0 of a multi-host replica
        self.images = images
        # Steps whose chunks reach an image's or a given prompt's positions carry their rows (mm_embeds) in this dtype
        self.row_dtype = images.dtype if images is not None else prompt_rows

    # ------------------------------------------------------------------------------ compile
    def warmup(self, progress: bool = True) -> None:
        """Compiles every token bucket and sequence bucket now (the head both greedy-only and sampling, as
        a plain request uses them), so no request waits on XLA."""
        from tqdm import tqdm

        # (a model that takes images, or prompt embeddings, also compiles each bucket with their rows: prefill chunks
        # that reach them)
        row_buckets = self.token_buckets if self.row_dtype is not None else ()
        jobs = [("forward", t, kernel) for t in self.token_buckets for kernel in self._kernels(t)] + \
            [("images", t, False if self.backend != "xla" else None) for t in row_buckets] + \
            [("encoder", n, None) for n in (self.images.batch_sizes if self.images else ())] + \
            [("head", s, variant) for s in self.seq_buckets for variant in PLAIN_HEADS] + \
            [("draft", s, None) for s in (self.draft_buckets if self.draft_cfg is not None else ())]
        for kind, n, arg in tqdm(jobs, desc="compiling buckets", unit="bucket", disable=not progress):
            if kind in ("forward", "images"):
                inputs = self._pack_padding(n)
                if kind == "images":
                    deep = self.images.deepstack if self.images else 0
                    inputs = dataclasses.replace(
                        inputs, mm_embeds=np.zeros((n, self.cfg.hidden_size), self.row_dtype),
                        mm_deep=np.zeros((deep, n, self.cfg.hidden_size), self.row_dtype) if deep else None,
                        kv_limits=np.zeros(n, np.int32) if self.images and self.images.bidirectional else None)
                inputs = self.put_inputs(inputs)
                self._hidden, every_row, aux, self.kv, self.states = self._forward(
                    self.params, kv_caches=self.kv, inputs=inputs, prev_tokens=self._prev_tokens, lora=self.lora,
                    draft_params=self.draft_params, states=self.states, decode_only=arg)
                self._extend_mtp(inputs, every_row, aux, arg)
            elif kind == "encoder":
                self.images.compile(n)
            elif kind == "draft":
                rows, pages = np.zeros(n, np.int32), np.zeros((n, self.max_pages_per_seq), np.int32)
                if self.mtp is not None:
                    _, self.kv = self._mtp_propose(self.params, self.draft_params, self.kv, self._mtp_outputs,
                                                   *self._to_device((rows, rows, rows, rows, pages)))
                else:
                    _, self.kv = self._propose(self.draft_params, self.kv,
                                               *self._to_device((rows, rows, rows, rows, pages)))
            else:
                self._compile_head(n, *arg)

    def warmup_heads(self, variants: tuple[tuple[bool, bool], ...], progress: bool = True) -> None:
        """Compiles more (greedy_only, use_filters) variants of the head at every sequence bucket, after `warmup`."""
        from tqdm import tqdm

        jobs = [(s, variant) for s in self.seq_buckets for variant in variants]
        for n, variant in tqdm(jobs, desc="compiling sampling heads", unit="bucket", disable=not progress):
            self._compile_head(n, *variant)

    def _compile_head(self, num_rows: int, greedy_only: bool, use_filters: bool) -> None:
        s_in = self._to_device(Packed.of(sampler.build_inputs([], num_rows, self.cfg.vocab_size, use_penalties=False)))
        jax.block_until_ready(self._run_head(self._hidden, s_in, num_rows=num_rows, use_penalties=False,
                                             use_filters=use_filters, num_top=0, greedy_only=greedy_only,
                                             use_mask=False))

    def _pack_padding(self, num_tokens: int) -> llama.ModelInputs:
        s, p = self.max_seqs, self.max_pages_per_seq
        return llama.ModelInputs(
            tokens=np.zeros(num_tokens, np.int32),
            positions=np.zeros(num_tokens, np.int32),
            slot_mapping=np.full(num_tokens, -1, np.int32),
            kv_lens=np.zeros(s, np.int32),
            page_indices=np.zeros((s, p), np.int32),
            cu_q_lens=np.zeros(s + 1, np.int32),
            num_seqs=np.zeros(1, np.int32),
            logits_indices=np.zeros(self.max_rows, np.int32),
            adapter_ids=np.zeros(num_tokens, np.int32) if self.lora else None,
            window_slot_mapping=np.full(num_tokens, -1, np.int32) if self.layout else None,
            window_page_indices=np.zeros((s, p), np.int32) if self.layout else None,
            state_slots=np.full(s, self.state_scratch, np.int32) if self.states is not None else None,
            snapshot_offsets=np.zeros(s, np.int32) if self.states is not None else None,
            snapshot_slots=np.full(s, self.state_scratch, np.int32) if self.states is not None else None,
            draft_slots=np.full((s, self.draft_k), self.num_state_slots, np.int32) if self.draft_k else None,
            mrope_positions=np.zeros((3, num_tokens), np.int32) if self.cfg.mrope_section else None,
            next_tokens=np.zeros(num_tokens, np.int32) if self.mtp is not None else None,
            tree_masks=np.zeros(num_tokens, np.int32) if self.trees else None,
        )

    # ---------------------------------------------------------------------------------- step
    def pack(self, plan: StepPlan, head_rows: list[list[int]] | None = None) -> llama.ModelInputs:
        """Host arrays of the plan in its token bucket (sequence axis always max_running long). Whole-array numpy,
        not a loop over chunks: at batch 256 this is host work of every step (tests compare it with the loop)."""
        head_rows = head_rows if head_rows is not None else self.head_rows(plan)
        inputs = self._pack_padding(bucket_for(plan.num_tokens, self.token_buckets))
        chunks, ps = plan.chunks, self.page_size
        num = len(chunks)
        lens = np.fromiter((len(c.token_ids) for c in chunks), np.int32, num)
        starts = np.fromiter((c.start for c in chunks), np.int32, num)
        cu = np.zeros(num + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        total = int(cu[-1])
        seq_of_row = np.repeat(np.arange(num), lens)
        pos = starts[seq_of_row] + np.arange(total, dtype=np.int32) - cu[:-1][seq_of_row]
        inputs.tokens[:total] = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
        inputs.positions[:total] = pos
        if self.trees:  # a draft tree's nodes: K/V at their slots in the chunk (pos), RoPE at their depth
            for c, end in zip(chunks, cu[1:].tolist()):
                if c.draft_parents:
                    tree, root = c.draft_tree, end - len(c.draft) - 1
                    inputs.positions[root:end] = pos[root] + np.fromiter(map(tree.depth, range(len(tree) + 1)), np.int32)
                    inputs.tree_masks[root:end] = tree.masks()
        if inputs.mrope_positions is not None:  # text: the same three; a sequence with images: engine.multimodal's
            inputs.mrope_positions[:, :total] = inputs.positions[:total]
            for c, first in zip(chunks, cu[:-1].tolist()):
                if c.seq.images:
                    inputs.mrope_positions[:, first : first + len(c.token_ids)] = multimodal.mrope_positions(
                        c.seq.images, c.start, len(c.token_ids))
        for i, c in enumerate(chunks):  # rows of int32 arrays (Sequence.page_array): no Python int per page
            inputs.page_indices[i, : len(c.pages)] = c.pages
        inputs.slot_mapping[:total] = inputs.page_indices[seq_of_row, pos // ps] * ps + pos % ps
        if self.lora:
            inputs.adapter_ids[:total] = np.repeat(np.fromiter((c.seq.adapter for c in chunks), np.int32, num), lens)
        if self.layout is not None:  # a page out of the window has slot -1: never read, never written
            _fill_rows(inputs.window_page_indices, [c.window_pages for c in chunks])
            inputs.window_slot_mapping[:total] = inputs.window_page_indices[seq_of_row, pos // ps] * ps + pos % ps
            np.maximum(inputs.window_page_indices, 0, out=inputs.window_page_indices)
        inputs.kv_lens[:num] = starts + lens
        if self.states is not None:
            inputs.state_slots[:num] = [c.seq.state_slot for c in chunks]
            for i, c in enumerate(chunks):
                if c.snapshot is not None:
                    inputs.snapshot_offsets[i], inputs.snapshot_slots[i] = c.snapshot
                if c.draft:  # (elsewhere no slot: num_state_slots marks a sequence without drafts)
                    inputs.draft_slots[i] = [self.draft_state_slot(c.draft_row, j) for j in range(self.draft_k)]
        inputs.cu_q_lens[: num + 1] = cu
        inputs.cu_q_lens[num + 1 :] = total
        inputs.num_seqs[0] = num
        rows_per_chunk = np.fromiter(map(len, head_rows), np.int32, num)
        firsts = np.repeat(cu[1:] - rows_per_chunk, rows_per_chunk)  # each chunk's head rows are its last positions
        within = np.arange(len(firsts), dtype=np.int32) - np.repeat(np.cumsum(rows_per_chunk) - rows_per_chunk,
                                                                     rows_per_chunk)
        inputs.logits_indices[list(itertools.chain.from_iterable(head_rows))] = firsts + within
        if self.mtp is not None:
            inputs.next_tokens[:] = mtp_drafter.next_tokens(chunks, head_rows, cu[:-1], len(inputs.tokens))
        rows = self._row_inputs(chunks, len(inputs.tokens))
        if rows is not None:
            inputs = dataclasses.replace(inputs, mm_embeds=rows[0], mm_deep=rows[1])
            if self.images is not None and self.images.bidirectional:  # an image's positions see to its last (Gemma 3)
                limits = inputs.positions.copy()
                for c, first in zip(chunks, cu[:-1].tolist()):
                    if c.seq.images:
                        limits[first : first + len(c.token_ids)] = multimodal.kv_limits(c.seq.images, c.start,
                                                                                        len(c.token_ids))
                inputs = dataclasses.replace(inputs, kv_limits=limits)
        return inputs

    def _row_inputs(self, chunks, num_tokens: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The step's (mm_embeds, mm_deep) where its chunks reach an image's or a given prompt's positions, else None
        (engine.multimodal.step_rows)."""
        if self.images is not None:
            return self.images.rows(chunks, num_tokens)
        hits = multimodal.spans_reached(chunks) if self.row_dtype is not None else None
        return multimodal.step_rows(hits, num_tokens, self.cfg.hidden_size, self.row_dtype) if hits else None

    def run(self, plan: StepPlan) -> StepOutput:
        """One step, start to finish."""
        return self.fetch(self.launch(plan))

    def launch(self, plan: StepPlan, token_mask: np.ndarray | None = None,
               prompt_targets: list[tuple[int, int]] | None = None, prompt_top: int = 0,
               copied: bool = False) -> "LaunchedStep":
        """Packs the plan and dispatches its device work without waiting for it. Placeholder tokens in the
        plan (`engine.request.placeholder`) take the tokens sampled by the previously launched step.
        copied: the plan's page copies are done (`propose` did them).
        token_mask: [head rows (`head_rows`), ceil(vocab / 32)] int32, the tokens each row may sample (structured outputs).
        prompt_targets: (row, token) pairs whose logprob (and top `prompt_top`) to return (prompt logprobs)."""
        t0 = time.perf_counter()
        head_rows = self.head_rows(plan)
        inputs = self.pack(plan, head_rows)
        num_real = sum(map(len, head_rows))
        num_rows = bucket_for(num_real, self.seq_buckets)
        # Row r samples output index `step` of its sequence: a draft position j samples index len(output) + j, after
        # the output and the drafts before it (what penalties count).
        rows = [None] * num_real
        # In a draft tree, node j samples index len(output) + its depth, after the output and its ancestors' drafts.
        for c, chunk_rows in zip(plan.chunks, head_rows):
            tree = c.draft_tree if c.draft_parents else None
            for j, r in enumerate(chunk_rows):
                if tree is None or not j:
                    rows[r] = (c.seq.params, c.seq.seed, len(c.seq.output_ids) + j, c.seq.prompt_ids,
                               c.seq.output_ids + list(c.draft[:j]) if j else c.seq.output_ids)
                else:
                    path = [c.draft[n - 1] for n in tree.path(j)]
                    rows[r] = (c.seq.params, c.seq.seed, len(c.seq.output_ids) + len(path), c.seq.prompt_ids,
                               c.seq.output_ids + path)
        params = [c.seq.params for c in plan.chunks if c.sample]
        use_penalties = any(p.uses_penalties for p in params)
        use_filters = any(p.uses_filters and not p.greedy for p in params)
        greedy_only = all(p.greedy for p in params)
        num_top = top_bucket(max((p.logprobs or 0 for p in params), default=0))
        if token_mask is not None:  # padding rows allow everything
            token_mask = np.concatenate([token_mask, np.full((num_rows - len(token_mask), token_mask.shape[1]), -1, np.int32)])
        s_in = sampler.build_inputs(rows, num_rows, self.cfg.vocab_size, use_penalties, token_mask, self.eos_ids)
        targets = None
        if prompt_targets:
            targets = np.full(len(inputs.tokens), -1, np.int32)
            target_rows, target_tokens = zip(*prompt_targets)
            targets[list(target_rows)] = target_tokens
        step = StepArrays(inputs, s_in, num_rows=num_rows, use_penalties=use_penalties, use_filters=use_filters,
                          num_top=num_top, greedy_only=greedy_only, use_mask=token_mask is not None,
                          prompt_targets=targets, prompt_top=top_bucket(prompt_top),
                          decode_kernel=self._decode_kernel(plan, len(inputs.tokens)),
                          state_copies=self._state_copy_arrays(plan.state_copies), **self.copies.pack_states(plan),
                          **(dict.fromkeys(COPY_FIELDS) if copied else self.copies.pack(plan)))
        if self.followers is not None:
            step = self.followers.lead(step)
        if self.mtp is not None:
            self._mtp_rows.record(plan.chunks, head_rows)
        out = self.dispatch(step)
        return LaunchedStep(out, head_rows, time.perf_counter() - t0,
                            want_hidden=any(c.sample and (c.seq.params.embed or c.seq.params.return_hidden_states)
                                            for c in plan.chunks))

    def _kernels(self, num_tokens: int) -> tuple[bool | None, ...]:
        """The attention kernels a step in this token bucket may use (`decode_only`): one compiled step each."""
        if self.backend == "xla":
            return (None,)  # one attention path: no second compile
        return (True, False) if num_tokens <= self.max_decode_bucket else (False,)

    def _decode_kernel(self, plan: StepPlan, num_tokens: int) -> bool | None:
        """The plan's attention kernel: on the Pallas backends the split-KV decode kernel when no sequence has more
        than a few new tokens (decodes, drafts: `pallas_kernels.prefers_decode_kernel`), else the ragged one, whose
        query blocks read a chunk's KV once per block instead of once per row (a short tail prefilled over a long
        cached prefix, the prefix cache's common case). A model with linear attention layers takes the decode kernel
        only when every chunk is a decode (one token, or a real token and its drafts): that program then compiles only
        their recurrent rule's single steps (`llama.forward`'s decode_step; no piece loop to read back at every such
        layer)."""
        kernels = self._kernels(num_tokens)
        if len(kernels) == 1:
            return kernels[0]
        longest = max(len(c.token_ids) for c in plan.chunks)
        if self.cfg.linear_layers and not all(len(c.token_ids) == 1 or c.draft for c in plan.chunks):
            return False
        return pallas_kernels.prefers_decode_kernel(longest)

    def draft_state_slot(self, row: int, j: int) -> int:
        """The state slot holding, after a step, the state of its drafting row `row`'s sequence after the first j + 1
        tokens of its verification (the row's slots are reused by the next step with drafts)."""
        assert 0 <= row < self.draft_rows, (row, self.draft_rows)
        return self.draft_state_base + row * self.draft_k + j

    def rollback_states(self, rollbacks: list[tuple[int, int, int]]) -> None:
        """(drafting row, sequence slot, tokens kept) per sequence whose drafts were not all accepted in the last step:
        its state becomes the one after the kept tokens (`draft_state_slot`), before any later step reads it."""
        pairs = self._state_copy_arrays([(self.draft_state_slot(row, kept - 1), slot) for row, slot, kept in rollbacks])
        if self.followers is not None:  # the other processes of a multi-host replica copy them too
            pairs = self.followers.rollback(pairs)
        self.copy_states(pairs)

    def copy_states(self, pairs: tuple[np.ndarray, np.ndarray]) -> None:
        """Recurrent-state slots pairs[0][i] copied into pairs[1][i] (padded with the scratch slot)."""
        self.states = self._copy_states(self.states, *self._to_device(pairs))

    def _state_copy_arrays(self, copies: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray] | None:
        """(src, dst) state slots of a plan's copies, padded to max_running with the scratch slot; None without any."""
        if not copies:
            return None
        pairs = np.full((2, self.max_seqs), self.state_scratch, np.int32)
        pairs[:, : len(copies)] = np.asarray(copies, np.int32).T
        return pairs[0], pairs[1]

    @staticmethod
    def head_rows(plan: StepPlan) -> list[list[int]]:
        """The head rows of each chunk, in position order. Chunk i's last position is row i (the row a placeholder
        names); a chunk with k draft tokens also samples at its k positions before that, in rows after every
        chunk's last row."""
        out, extra = [], len(plan.chunks)
        for i, c in enumerate(plan.chunks):
            k = len(c.draft)
            out.append(list(range(extra, extra + k)) + [i])
            extra += k
        return out

    def fetch(self, launched: "LaunchedStep") -> StepOutput:
        """Waits for a launched step's sampled tokens and logprobs (the step's one host sync). They come by head row
        (`LaunchedStep.head_rows`)."""
        host = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731
        tokens, logprobs, top_ids, top_lps = map(host, launched.outputs[:4])
        prompt = map(host, launched.outputs[5:])
        self.copies.land()
        n = sum(map(len, launched.head_rows))
        hidden = host(launched.outputs[4])[:n].astype(np.float32) if launched.want_hidden else None
        return StepOutput(tokens[:n], logprobs[:n], top_ids[:n], top_lps[:n], *prompt, hidden=hidden)

    def execute(self, step: "StepArrays") -> None:
        """A follower process's step of a multi-host replica: the leader's arrays, run to completion."""
        jax.block_until_ready(self.dispatch(step))

    def dispatch(self, step: "StepArrays") -> tuple[jax.Array, ...]:
        """The device work of one step, dispatched; every process of a multi-host replica runs it on the same
        arrays. Returns (tokens, logprobs, top_ids, top_logprobs[, prompt logprobs, their top ids, top logprobs, ranks]),
        replicated (and the head rows after the final norm after top_logprobs)."""
        self.kv = self.copies.apply(self.kv, step)
        if self.states is not None:
            self.states = self.copies.apply_states(self.states, step)
        if step.state_copies is not None:
            self.states = self._copy_states(self.states, *self._to_device(step.state_copies))
        inputs, s_in = self._to_device((Packed.of(step.inputs), Packed.of(step.sampling)))  # one call, a few buffers
        t0, compiled = time.perf_counter(), (_num_compiled(self._forward), _num_compiled(self._head))
        hidden, every_row, aux, self.kv, self.states = self._forward(
            self.params, kv_caches=self.kv, inputs=inputs, prev_tokens=self._prev_tokens, lora=self.lora,
            draft_params=self.draft_params, states=self.states, decode_only=step.decode_kernel)
        out = self._run_head(hidden, s_in, num_rows=step.num_rows,
                             use_penalties=step.use_penalties, use_filters=step.use_filters, num_top=step.num_top,
                             greedy_only=step.greedy_only, use_mask=step.use_mask)
        if (_num_compiled(self._forward), _num_compiled(self._head)) != compiled:  # the stall every stream just saw
            log.info("a step compiled a new shape in %.1f s (%d tokens, %d sampling rows, penalties=%s, filters=%s, "
                     "top logprobs=%d, token mask=%s); steps like it reuse it from now on", time.perf_counter() - t0,
                     len(step.inputs.tokens), step.num_rows, step.use_penalties, step.use_filters, step.num_top,
                     step.use_mask)
        self._prev_tokens = out[-1]
        self._extend_mtp(inputs, every_row, aux, step.decode_kernel)
        if step.prompt_targets is None:
            return out[:-1]
        return out[:-1] + self._prompt_head(self.params, every_row, self._to_device(step.prompt_targets),
                                            num_top=step.prompt_top)

    def _extend_mtp(self, inputs, every_row, aux, decode_only: bool | None) -> None:
        """With an MTP drafter, its layer's K/V of a step's rows, each paired with the token after it (the step's
        sampled ones from `_prev_tokens`), and its outputs at the head rows kept for `propose`. The layer reads the
        step's `every_row`, an EAGLE-3 head its captured layer inputs `aux`."""
        if self.mtp is not None:
            self._mtp_outputs, self.kv = self._mtp_extend(self.params, self.draft_params, self.kv, inputs,
                                                          every_row if aux is None else aux, self._prev_tokens,
                                                          decode_only=decode_only)

    def _run_head(self, hidden, s_in, *, num_rows: int, use_penalties: bool, use_filters: bool, num_top: int,
                  greedy_only: bool, use_mask: bool):
        """The jitted head, every static argument passed by name and always all of them: jit keys its cache on the
        keywords given, so a call that leaves one to its default misses what a call naming it compiled."""
        return self._head(self.params, hidden, s_in, num_rows=num_rows, use_penalties=use_penalties,
                          use_filters=use_filters, num_top_logprobs=num_top, greedy_only=greedy_only, use_mask=use_mask)

    def _to_device(self, tree):
        """Host arrays to the device in one transfer (replicated over a tensor-parallel mesh)."""
        return jax.device_put(tree, self._replicated)

    def put_inputs(self, inputs: llama.ModelInputs) -> Packed:
        """A step's model inputs on the device as the forward takes them (`engine.transfer.Packed`)."""
        return self._to_device(Packed.of(inputs))

    def propose(self, plan: StepPlan) -> list[speculative.DraftTree]:
        """Draft tokens of every chunk with draft slots (`Chunk.draft`: how many), the draft model's greedy
        continuation of its last token, one token per round of the draft on the device (`_propose_impl`); with
        `speculative.topk` > 1 a tree of at most as many nodes, as deep as the slots' tree (engine.draft_trees);
        empty for the other chunks. Reads the draft's K/V of the tokens before (the steps wrote it) and writes it for the tokens it
        feeds (the step that verifies them writes it again). The plan's page copies are applied first (its launch
        then skips them: `launch(copied=True)`): a page a draft writes to may be one the plan evicts, whose saves to
        the host and disk tiers must read it before."""
        self.kv = self.copies.apply(self.kv, types.SimpleNamespace(**self.copies.pack(plan)))
        wanted = [i for i, c in enumerate(plan.chunks) if c.draft]
        out = [speculative.DraftTree.chain() for _ in plan.chunks]
        if not wanted or (self.mtp is not None and self._mtp_outputs is None):
            return out
        rows = bucket_for(len(wanted), self.draft_buckets)
        tokens, starts, counts, depths = (np.zeros(rows, np.int32) for _ in range(4))
        pages = np.zeros((rows, self.max_pages_per_seq), np.int32)
        for j, i in enumerate(wanted):
            c = plan.chunks[i]
            tokens[j], starts[j], counts[j], depths[j] = c.token_ids[0], c.start, len(c.draft), c.draft_tree.height
            if self.mtp is not None:  # MTP: the head row whose layer output the first draft is guessed from
                row = self._mtp_rows.row(c)
                tokens[j], counts[j] = max(row, 0), counts[j] if row >= 0 else 0
            pages[j, : len(c.pages)] = c.pages
        args = self._to_device((tokens, starts, counts, depths, pages))
        if self.mtp is not None:
            drafts, self.kv = self._mtp_propose(self.params, self.draft_params, self.kv, self._mtp_outputs, *args)
        else:
            drafts, self.kv = self._propose(self.draft_params, self.kv, *args)
        if self.statics.topk > 1:
            cand_tokens, parents, scores = (np.asarray(a) for a in drafts)
            for j, i in enumerate(wanted):
                row = cand_tokens[j], parents[j], scores[j]
                out[i] = (draft_trees.select_tree(*row, int(counts[j])) if plan.chunks[i].draft_parents
                          else draft_trees.best_path(*row))  # (slots for a chain: DraftTree.chain)
            return out
        drafts = np.asarray(drafts)
        for j, i in enumerate(wanted):
            out[i] = speculative.DraftTree.chain(drafts[j, : counts[j]].tolist())
        return out

    def move_slots(self, moves: list[tuple[int, int]]) -> None:
        """(src, dst) cache slots moved now, with no step to carry them (StepPlan.slot_moves)."""
        self.kv = self.copies.move_slots(self.kv, moves)

    def save_to_disk(self, saves: list[tuple[int, int, int]], state_saves: list[tuple[int, int]] = ()) -> None:
        """Writes (page, window slot, block hash) pages, and (snapshot slot, block hash) snapshots of recurrent states,
        out now, with no step to carry them (the engine is idle)."""
        self.copies.save_to_disk(self.kv, saves)
        if state_saves:
            self.copies.save_states_to_disk(self.states, list(state_saves))


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    """A dispatched step whose results are still on the device."""

    outputs: tuple[jax.Array, ...]  # tokens, logprobs, top_ids, top_logprobs, normed head rows[, prompt logprobs ...]
    head_rows: list[list[int]]  # by chunk, the rows of its sampled tokens in position order (`ModelRunner.head_rows`)
    pack_s: float  # host time to pack and dispatch it
    # an embedding request ends its prompt in this step, or a request returns hidden states: fetch the normed rows too
    want_hidden: bool = False


@dataclasses.dataclass
class StepArrays:
    """Everything the device needs for one step, as host arrays (what a multi-host leader broadcasts)."""

    inputs: llama.ModelInputs
    sampling: sampler.SamplingInputs
    copies: tuple[np.ndarray, np.ndarray] | None
    num_rows: int
    use_penalties: bool
    use_filters: bool
    num_top: int
    greedy_only: bool
    use_mask: bool = False
    prompt_targets: np.ndarray | None = None  # [T] int32: the token whose logprob row r gives, -1 for none
    prompt_top: int = 0
    slot_moves: tuple[np.ndarray, np.ndarray] | None = None  # (src, dst) cache slots: accepted draft-tree nodes, first
    host_saves: tuple[np.ndarray, np.ndarray] | None = None  # (pages, host slots; -1 pads): evicted pages to host
    host_loads: tuple[np.ndarray, np.ndarray] | None = None  # (host slots, pages; out-of-range pads): hits to device
    # (pages, or a hybrid cache's [L, n] entries, padded; their block hashes): to the disk tier
    disk_saves: tuple[np.ndarray, tuple[int, ...]] | None = None
    disk_loads: tuple[tuple[np.ndarray, ...], np.ndarray] | None = None  # (pages read from disk, where they go)
    decode_kernel: bool | None = None  # the attention kernel (ragged_paged_attention's decode_only); None: xla
    state_copies: tuple[np.ndarray, np.ndarray] | None = None  # (src, dst) recurrent-state slots, copied first
    state_saves: tuple[np.ndarray, np.ndarray] | None = None  # (state slots, host slots; -1 pads): snapshots to host
    state_loads: tuple[np.ndarray, np.ndarray] | None = None  # (host slots, state slots; out-of-range pads): to device
    state_disk_saves: tuple[np.ndarray, tuple[int, ...]] | None = None  # (snapshot slots, their hashes): to disk
    state_disk_loads: tuple[object, np.ndarray] | None = None  # (states read from disk [Lg, n, ...], state slots)


# The head variants (greedy_only, use_filters) warmup compiles: greedy, and sampling by temperature alone. A server adds
# top-k/top-p/min-p sampling (FILTER_HEADS; `LLMEngine.warmup_sampling_filters`, which scripts/serve.py calls).
PLAIN_HEADS = ((True, False), (False, False))
FILTER_HEADS = ((False, True),)


def _copy_states(states: gated_delta.States, src: jax.Array, dst: jax.Array) -> gated_delta.States:
    """Every linear layer's state of slot src[i] copied into slot dst[i] (a cached prefix's snapshot into a sequence's
    slot; pairs (scratch, scratch) pad)."""
    return jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), states)


def _num_compiled(fn) -> int:
    """How many shapes a jitted function has compiled (-1 where this jax does not say)."""
    size = getattr(fn, "_cache_size", None)
    return size() if callable(size) else -1


def _fill_rows(table: np.ndarray, rows: list) -> None:
    """table[i, :len(rows[i])] = rows[i] for every i, in one scatter."""
    counts = np.fromiter(map(len, rows), np.int64, len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), table.dtype, int(counts.sum()))
    row_ids = np.repeat(np.arange(len(rows)), counts)
    table[row_ids, np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)] = flat

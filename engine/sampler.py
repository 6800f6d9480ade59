"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, penalties, per-request seeds, logprobs.

Per-row parameters travel as [S] arrays, so one compiled function serves any mix of requests; static
flags only switch off whole stages nobody in the batch uses (penalties, filters, top logprobs).
A row's random key is fold_in(key(seed), num_generated): the same seed and prompt give the same
tokens whatever else shares the batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine.request import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, 0 = off
    top_p: jax.Array  # [S] float32
    min_p: jax.Array  # [S] float32
    presence_penalty: jax.Array  # [S] float32
    frequency_penalty: jax.Array  # [S] float32
    repetition_penalty: jax.Array  # [S] float32
    seeds: jax.Array  # [S] uint32
    steps: jax.Array  # [S] int32, tokens generated so far
    output_counts: jax.Array | None = None  # [S, V] float32, counts of generated tokens (penalties only)
    seen: jax.Array | None = None  # [S, V] bool, prompt or generated tokens (repetition penalty only)
    token_mask: jax.Array | None = None  # [S, ceil(V / 32)] int32 bitmask of allowed tokens (structured outputs only)
    bias_ids: jax.Array | None = None  # [S, K] int32: logit_bias and min_tokens entries (K a power of two; 0 pads)
    bias_values: jax.Array | None = None  # [S, K] float32 added at bias_ids (-inf bans a token)


def bias_entries(p: SamplingParams, step: int, eos_ids: frozenset[int]) -> list[tuple[int, float]]:
    """A row's additive logit entries: its logit_bias, and -inf on end tokens and stop ids before min_tokens."""
    entries = list(p.logit_bias)
    if step < p.min_tokens:
        entries += [(t, -np.inf) for t in sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids)))]
    return entries


def build_inputs(
    rows: list[tuple[SamplingParams, int, int, list[int], list[int]]], num_rows: int, vocab_size: int, use_penalties: bool,
    token_mask: np.ndarray | None = None, eos_ids: frozenset[int] = frozenset(), num_bias: int | None = None,
) -> SamplingInputs:
    """Host arrays for `num_rows` (bucketed) rows from (params, seed, step, prompt_ids, output_ids) per real row;
    `token_mask` [num_rows, ceil(V / 32)] when some row's tokens are constrained. Bias arrays are [num_rows, K],
    K the next power of two of the longest row's entries (`num_bias` forces K; 0: none)."""
    n = num_rows
    temperature = np.zeros(n, np.float32)
    top_k = np.zeros(n, np.int32)
    top_p, rep = np.ones(n, np.float32), np.ones(n, np.float32)
    min_p, presence, frequency = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    seeds, steps = np.zeros(n, np.uint32), np.zeros(n, np.int32)
    counts = np.zeros((n, vocab_size), np.float32) if use_penalties else None
    seen = np.zeros((n, vocab_size), bool) if use_penalties else None
    for i, (p, seed, step, prompt_ids, output_ids) in enumerate(rows):
        temperature[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
        presence[i], frequency[i], rep[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        seeds[i], steps[i] = seed & 0xFFFFFFFF, step
        if use_penalties and p.uses_penalties:
            np.add.at(counts[i], np.asarray(output_ids, np.int64), 1.0)
            prompt = np.asarray(prompt_ids, np.int64)
            seen[i, prompt[prompt < vocab_size]] = True  # (ids past the vocabulary are images' positions)
            seen[i, output_ids] = True
    entries = [bias_entries(p, step, eos_ids) for p, _, step, _, _ in rows]
    longest = max(map(len, entries), default=0)
    k = num_bias if num_bias is not None else (1 << (longest - 1).bit_length() if longest else 0)
    bias_ids = bias_values = None
    if k:
        bias_ids, bias_values = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
        for i, row in enumerate(entries):
            if row:
                bias_ids[i, : len(row)], bias_values[i, : len(row)] = zip(*row)
    return SamplingInputs(temperature, top_k, top_p, min_p, presence, frequency, rep, seeds, steps, counts, seen, token_mask,
                          bias_ids, bias_values)


FILTER_CANDIDATES = 256  # top-k / top-p / min-p look among each row's this many most likely tokens first


def _keep_ranked(ranked: jax.Array, s: SamplingInputs, total: jax.Array) -> jax.Array:
    """Which of each row's most likely tokens survive top-k / top-p / min-p: `ranked` [S, N] are the row's N largest
    temperature-scaled logits in descending order, `total` [S, 1] its whole row's sum of exp(logit - max). Every
    condition only gets stricter down the ranking, so the kept tokens are always a leading run."""
    probs = jnp.exp(ranked - ranked[:, :1]) / total
    rank = jnp.arange(ranked.shape[-1])[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, jnp.iinfo(jnp.int32).max)[:, None]
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p 1 keeps every token: in float32 the mass before a far-tail token rounds to 1.0 (a peaked row's top-k
    # would otherwise lose its last few)
    nucleus = (mass_before < s.top_p[:, None]) | (s.top_p[:, None] >= 1)
    keep = (rank < k) & nucleus & (probs >= s.min_p[:, None] * probs[:, :1])
    return keep.at[:, 0].set(True)  # the most likely token always survives


def _filter_mask(scaled: jax.Array, s: SamplingInputs, candidates: int = FILTER_CANDIDATES) -> jax.Array:
    """Which entries of temperature-scaled logits [S, V] survive top-k / top-p / min-p (a bool mask in vocabulary
    order; all of a row without filters, so it draws exactly as in a batch where nobody uses them).

    The ranking is over each row's `candidates` most likely tokens (`lax.top_k`: the mask 46x faster than over a
    sort of 49k logits on a 2-core CPU, scripts/sampler_bench.py) when every filtered row's kept run ends inside
    them, which top-k up to `candidates` and top-p / min-p over a peaked distribution do; otherwise over the whole
    sorted vocabulary. Both give the same mask."""
    vocab = scaled.shape[-1]
    rows = jnp.arange(scaled.shape[0])[:, None]
    total = jnp.exp(scaled - scaled.max(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True)
    filtered = ((s.top_k > 0) & (s.top_k < vocab)) | (s.top_p < 1) | (s.min_p > 0)

    def over(ids: jax.Array) -> tuple[jax.Array, jax.Array]:  # ids [S, N]: each row's N most likely, descending
        """-> (the mask, whether each row keeps its N-th)."""
        keep = _keep_ranked(jnp.take_along_axis(scaled, ids, axis=-1), s, total)
        return jnp.zeros(scaled.shape, bool).at[rows, ids].set(keep), keep[:, -1]

    def whole() -> jax.Array:
        return over(jnp.argsort(-scaled, axis=-1))[0]

    if candidates >= vocab:
        mask = whole()
    else:
        short, last_kept = over(jax.lax.top_k(scaled, candidates)[1])
        mask = jax.lax.cond(jnp.any(filtered & last_kept), whole, lambda: short)
    return mask | ~filtered[:, None]


LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")


def sample(
    logits: jax.Array, s: SamplingInputs, *, use_penalties: bool, use_filters: bool, num_top_logprobs: int,
    greedy_only: bool = False, use_mask: bool = False, logprobs_mode: str = "raw_logprobs",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [S, V] float32 -> (tokens [S] int32, logprobs [S], top_ids [S, K], top_logprobs [S, K]).

    logprobs_mode (static; vLLM's): what the returned logprobs are of. "raw_logprobs": the model's distribution,
    before masks, biases, penalties and temperature; "processed_logprobs": the distribution each row was sampled from,
    after all of them and top-k / top-p / min-p (a greedy row: after masks, biases and penalties, at temperature 1),
    what an RL trainer's importance ratios need; "raw_logits" / "processed_logits": the same values before the
    log-softmax.
    greedy_only (static): every row has temperature 0, so no random draw is made at all.
    use_mask (static): `s.token_mask` allows only some tokens per row (structured outputs).
    """
    logits = jnp.asarray(logits)
    raw = logits
    if use_mask:
        logits = jnp.where(allowed_tokens(s.token_mask, logits.shape[-1]), logits, -jnp.inf)
    if s.bias_ids is not None:
        logits = logits.at[jnp.arange(logits.shape[0])[:, None], s.bias_ids].add(s.bias_values)
    if use_penalties:
        logits = logits - s.presence_penalty[:, None] * (s.output_counts > 0) - s.frequency_penalty[:, None] * s.output_counts
        rp = s.repetition_penalty[:, None]
        logits = jnp.where(s.seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        return with_logprobs(greedy, _reported(raw, logits, logprobs_mode), num_top_logprobs)
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seeds, s.steps)
    if use_filters:
        scaled = jnp.where(_filter_mask(scaled, s), scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled)
    tokens = jnp.where(s.temperature == 0, greedy, sampled.astype(jnp.int32))
    if logprobs_mode.startswith("processed"):  # (greedy rows: their logits at temperature 1, unfiltered)
        return with_logprobs(tokens, _reported(raw, jnp.where(s.temperature[:, None] == 0, logits, scaled),
                                               logprobs_mode), num_top_logprobs)
    return with_logprobs(tokens, _reported(raw, raw, logprobs_mode), num_top_logprobs)


def _reported(raw: jax.Array, processed: jax.Array, mode: str) -> jax.Array:
    """[S, V]: the values logprobs are read from in `mode` (`sample`): the raw or processed logits, or their
    log-softmax."""
    values = processed if mode.startswith("processed") else raw
    return jax.nn.log_softmax(values, axis=-1) if mode.endswith("logprobs") else values


def allowed_tokens(token_mask: jax.Array, vocab: int) -> jax.Array:
    """[S, ceil(V / 32)] int32 bitmask -> [S, V] bool (bit t % 32 of word t // 32)."""
    bits = (token_mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]: a broadcast, no gather
    return bits.reshape(token_mask.shape[0], -1)[:, :vocab].astype(bool)


def with_logprobs(tokens: jax.Array, values: jax.Array, num_top_logprobs: int):
    """(tokens, their logprobs, top_ids, top_logprobs) from the chosen tokens and the [S, V] values reported as
    logprobs (`_reported`)."""
    logprobs = jnp.take_along_axis(values, tokens[:, None], axis=-1)[:, 0]
    if num_top_logprobs:
        top_lps, top_ids = jax.lax.top_k(values, num_top_logprobs)
    else:
        top_lps = jnp.zeros((tokens.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((tokens.shape[0], 0), jnp.int32)
    return tokens, logprobs, top_ids.astype(jnp.int32), top_lps

"""Gated DeltaNet layers (Qwen3.5; models/gated_delta.py): the matrix form of the gated delta rule against the rule
token by token, a ragged batch of decodes and chunks from live states against each sequence's tokens one at a
time, and Qwen3.5 checkpoints against transformers (logits, and greedy tokens through the engine)."""
from __future__ import annotations

import dataclasses
import functools
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gated_delta, llama, sharding
from models.config import LlamaConfig
from models.errors import ConfigError
from pallas_kernels import gpu_compile
import fresh

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=12, max_position_embeddings=256)


def _record_kernels(llm, kernels: list) -> None:
    """Appends (the longest chunk, the attention kernel chosen: `ModelRunner._decode_kernel`) of each step `llm` runs."""
    runner = llm.engine.runner
    choose = runner._decode_kernel

    def recorded(plan, num_tokens):
        kernels.append((max(len(c.token_ids) for c in plan.chunks), choose(plan, num_tokens)))
        return kernels[-1][1]

    runner._decode_kernel = recorded


def _close(got, want, tol: float = 2e-4) -> None:
    """Float32 recurrences in two orders (a chunk's matrix form, one token a step): an error relative to the largest
    value compared (a sum's rounding scales with its terms), not to each element (one near 0 can be off by 3e-4 after
    150 tokens: RADIXLM_TEST_SEED=2076518976, test_a_ragged_batch_is_each_sequence_token_by_token[qwen3_5-xla])."""
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max(initial=0.0))))


def _rule_inputs(rng, t, h, dk, dv):
    q = rng.standard_normal((t, h, dk)).astype(np.float32)
    k = rng.standard_normal((t, h, dk)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)  # the layer's keys are unit length
    v = rng.standard_normal((t, h, dv)).astype(np.float32)
    g = -rng.uniform(0.0, 0.5, (t, h)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (t, h)).astype(np.float32)
    return q, k, v, g, beta


def _numpy_rule(q, k, v, g, beta, s0):
    """The rule token by token in float64 numpy (the definition)."""
    s, out = s0.astype(np.float64).copy(), []
    for qt, kt, vt, gt, bt in zip(*(a.astype(np.float64) for a in (q, k, v, g, beta))):
        s *= np.exp(gt)[:, None, None]
        u = bt[:, None] * (vt - np.einsum("hkv,hk->hv", s, kt))
        s += kt[:, :, None] * u[:, None, :]
        out.append(np.einsum("hkv,hk->hv", s, qt))
    return np.stack(out), s


@pytest.mark.parametrize("valid", [64, 37, 1])
def test_matrix_form_is_the_rule_token_by_token(valid):
    rng = fresh.rng()
    q, k, v, g, beta = _rule_inputs(rng, 64, 3, 8, 12)
    s0 = rng.standard_normal((3, 8, 12)).astype(np.float32)
    mask = np.arange(64) < valid
    o, s = gated_delta.chunk_rule(*map(jnp.asarray, (q, k, v, g, beta, s0)), jnp.asarray(mask))
    ref_o, ref_s = _numpy_rule(q[:valid], k[:valid], v[:valid], g[:valid], beta[:valid], s0)
    np.testing.assert_allclose(np.asarray(o)[:valid], ref_o, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-4, atol=1e-4)
    scan_o, scan_s = gated_delta.recurrent_reference(*map(jnp.asarray, (q[:valid], k[:valid], v[:valid], g[:valid],
                                                                           beta[:valid], s0)))
    np.testing.assert_allclose(np.asarray(scan_o), ref_o, rtol=1e-4, atol=1e-4)


def _tiny_cfg() -> LlamaConfig:
    return LlamaConfig.from_hf_config({**TINY, "model_type": "qwen3_5_text"})


# Granite 4.0-H's shape in small: Mamba-2 layers (8 heads of 16 in 2 B/C groups, state 16) around an attention layer
GRANITE4 = dict(vocab_size=211, hidden_size=64, intermediate_size=96, shared_intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, layer_types=["mamba", "mamba", "attention", "mamba"],
                mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2,
                mamba_chunk_size=32, num_local_experts=0, num_experts_per_tok=2, embedding_multiplier=2.0,
                logits_scaling=1.5, residual_multiplier=0.7, attention_multiplier=0.2, max_position_embeddings=256)


def _tiny_granite4() -> LlamaConfig:
    return LlamaConfig.from_hf_config({**GRANITE4, "model_type": "granitemoehybrid"})


# LFM2's shape in small: short convolution layers (3 taps over B x) around an attention layer; the MLP's width 120
# adjusted as transformers does (2/3, x 1.3, up to a multiple of 16: 112)
LFM2 = dict(vocab_size=211, hidden_size=64, intermediate_size=120, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, layer_types=["conv", "conv", "full_attention", "conv"],
            block_multiple_of=16, block_ffn_dim_multiplier=1.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tiny_lfm2() -> LlamaConfig:
    return LlamaConfig.from_hf_config({**LFM2, "model_type": "lfm2"})


def _tiny(model: str) -> LlamaConfig:
    return {"qwen3_5": _tiny_cfg, "granite4": _tiny_granite4, "lfm2": _tiny_lfm2}[model]()


@pytest.mark.parametrize("valid", [64, 37, 1])
def test_mamba2_matrix_form_is_the_recurrence_token_by_token(valid):
    """Mamba-2's state space duality (delta=False): S <- exp(g) S + k v^T, o = S^T q, in float64 numpy."""
    rng = fresh.rng()
    q, k, v, g, _ = _rule_inputs(rng, 64, 3, 8, 12)
    s0 = rng.standard_normal((3, 8, 12)).astype(np.float32)
    s, want = s0.astype(np.float64), []
    for t in range(valid):
        s = s * np.exp(g[t].astype(np.float64))[:, None, None] + k[t][:, :, None] * v[t][:, None, :]
        want.append(np.einsum("hkv,hk->hv", s, q[t]))
    o, got_s = gated_delta.chunk_rule(*map(jnp.asarray, (q, k, v, g, np.ones_like(g), s0)),
                                      jnp.asarray(np.arange(64) < valid), delta=False)
    np.testing.assert_allclose(np.asarray(o)[:valid], np.stack(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_s), s, rtol=1e-4, atol=1e-4)
    scan_o, _ = gated_delta.recurrent_reference(*map(jnp.asarray, (q[:valid], k[:valid], v[:valid], g[:valid],
                                                                     np.ones_like(g[:valid]), s0)), delta=False)
    np.testing.assert_allclose(np.asarray(scan_o), np.stack(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("model", ["qwen3_5", "granite4", "lfm2"])
def test_a_ragged_batch_is_each_sequence_token_by_token(model, backend):
    """Decodes and chunks (lengths across piece boundaries, starts not aligned to them, one at position 0) from states
    left in their slots: the batch's outputs and states are those of feeding each sequence one token per step, and
    the snapshots taken within them (after the decode, inside a chunk, at a chunk's end) the states at those tokens.
    Gated DeltaNet (Qwen3.5), Mamba-2 (Granite 4.0-H) and short convolution (LFM2: a state of no elements beside the
    convolution's) layers; the chunks through the XLA piece loop, and through the Pallas kernel
    (pallas_kernels/linear_scan.py) in interpret mode."""
    cfg = _tiny(model)
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    w = {k: v[0] for k, v in params["layers"].items() if k.startswith("gdn_")}
    proj = lambda h, name: h @ w[name]  # noqa: E731
    rng = fresh.rng()
    num_slots, starts, lens = 10, [0, 5, 70, 3, 0], [1, 150, 1, 64, 90]
    slots, snapshots, snapshot_slots = [4, 0, 2, 5, 1], [1, 40, 0, 64, 90], [6, 7, 3, 8, 9]
    # two linear layers' states; the batch runs the second's (the first's must stay as they are)
    shapes = gated_delta.state_shapes(cfg, num_slots)
    states = gated_delta.States(conv=jnp.asarray(rng.standard_normal((2, *shapes.conv[1:])), jnp.float32),
                                ssm=jnp.asarray(rng.standard_normal((2, *shapes.ssm[1:])) * 0.3, jnp.float32))
    h = jnp.asarray(rng.standard_normal((sum(lens) + 7, cfg.hidden_size)), jnp.float32)  # 7 rows of padding
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    pad_seqs = 2  # the sequence axis padded past num_seqs, as the runner's
    batch = gated_delta.Batch(
        cu_q_lens=jnp.asarray(np.concatenate([cu, [cu[-1]] * pad_seqs])),
        kv_lens=jnp.asarray(np.array(starts + [0] * pad_seqs) + np.array(lens + [0] * pad_seqs), jnp.int32),
        num_seqs=jnp.asarray([len(lens)], jnp.int32), slots=jnp.asarray(slots + [3] * pad_seqs, jnp.int32),
        snapshot_offsets=jnp.asarray(snapshots + [5] * pad_seqs, jnp.int32),
        snapshot_slots=jnp.asarray(snapshot_slots + [3] * pad_seqs, jnp.int32), backend=backend)
    step = jax.jit(lambda h, st, b: gated_delta.mix(cfg, w, h, st, 1, b, proj))
    out, after = step(h, states, batch)
    np.testing.assert_array_equal(np.asarray(after.ssm[0]), np.asarray(states.ssm[0]))
    np.testing.assert_array_equal(np.asarray(after.conv[0]), np.asarray(states.conv[0]))
    conv, ssm = after.conv[1], after.ssm[1]
    for i, (start, n, slot) in enumerate(zip(starts, lens, slots)):
        st = states
        for j in range(n):  # one token per step, from the same slot
            one = gated_delta.Batch(cu_q_lens=jnp.asarray([0, 1], jnp.int32),
                                    kv_lens=jnp.asarray([start + j + 1], jnp.int32),
                                    num_seqs=jnp.ones((1,), jnp.int32), slots=jnp.asarray([slot], jnp.int32),
                                    decode_step=True)  # the decode step's program: the single step alone
            o, st = step(h[cu[i] + j : cu[i] + j + 1], st, one)
            c, s = st.conv[1], st.ssm[1]
            _close(np.asarray(out[cu[i] + j]), np.asarray(o[0]))
            if j + 1 == snapshots[i]:
                np.testing.assert_allclose(np.asarray(conv[snapshot_slots[i]]), np.asarray(c[slot]), rtol=1e-5, atol=1e-5)
                _close(np.asarray(ssm[snapshot_slots[i]]), np.asarray(s[slot]))
        np.testing.assert_allclose(np.asarray(conv[slot]), np.asarray(c[slot]), rtol=1e-5, atol=1e-5)
        _close(np.asarray(ssm[slot]), np.asarray(s[slot]))
    np.testing.assert_array_equal(np.asarray(ssm[3]), np.asarray(states.ssm[1, 3]))  # no sequence's: untouched
    np.testing.assert_array_equal(np.asarray(conv[3]), np.asarray(states.conv[1, 3]))


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("model", ["qwen3_5", "granite4", "lfm2"])
def test_drafted_sequences_keep_the_state_after_each_token(model, backend):
    """Speculative decoding's verification step: sequences with a real token and drafts (2 to K + 1 tokens) beside a
    decode and a long chunk. Outputs and final states are those of one token a step, and draft slot j of a drafted
    sequence holds its state (recurrent and convolution) after its first j + 1 tokens, for every token but the last;
    a snapshot after the real token is taken too; slots nobody names are untouched."""
    cfg = _tiny(model)
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    w = {k: v[0] for k, v in params["layers"].items() if k.startswith("gdn_")}
    proj = lambda h, name: h @ w[name]  # noqa: E731
    rng = fresh.rng()
    K, num_slots = 3, 24
    starts, lens, slots = [9, 30, 4, 70, 12], [4, 2, 1, 80, 3], [0, 1, 2, 3, 4]
    drafted = [True, True, False, False, True]
    snapshots, snapshot_slots = [0, 1, 0, 0, 0], [5, 6, 5, 5, 5]
    draft_slots = np.full((len(lens), K), num_slots, np.int32)
    for i, d in enumerate(drafted):
        if d:
            draft_slots[i] = 8 + 3 * i + np.arange(K)
    shapes = gated_delta.state_shapes(cfg, num_slots)
    states = gated_delta.States(conv=jnp.asarray(rng.standard_normal((2, *shapes.conv[1:])), jnp.float32),
                                ssm=jnp.asarray(rng.standard_normal((2, *shapes.ssm[1:])) * 0.3, jnp.float32))
    h = jnp.asarray(rng.standard_normal((sum(lens) + 5, cfg.hidden_size)), jnp.float32)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    batch = gated_delta.Batch(cu_q_lens=jnp.asarray(cu), kv_lens=jnp.asarray(np.add(starts, lens), jnp.int32),
                              num_seqs=jnp.asarray([len(lens)], jnp.int32), slots=jnp.asarray(slots, jnp.int32),
                              snapshot_offsets=jnp.asarray(snapshots, jnp.int32),
                              snapshot_slots=jnp.asarray(snapshot_slots, jnp.int32),
                              draft_slots=jnp.asarray(draft_slots), backend=backend)
    step = jax.jit(lambda h, st, b: gated_delta.mix(cfg, w, h, st, 1, b, proj))
    out, after = step(h, states, batch)
    conv, ssm = after.conv[1], after.ssm[1]
    for i, (start, n, slot) in enumerate(zip(starts, lens, slots)):
        st = states
        for j in range(n):
            one = gated_delta.Batch(cu_q_lens=jnp.asarray([0, 1], jnp.int32), kv_lens=jnp.asarray([start + j + 1], jnp.int32),
                                    num_seqs=jnp.ones((1,), jnp.int32), slots=jnp.asarray([slot], jnp.int32),
                                    decode_step=True)
            o, st = step(h[cu[i] + j : cu[i] + j + 1], st, one)
            _close(np.asarray(out[cu[i] + j]), np.asarray(o[0]))
            if drafted[i] and j + 1 < n:
                _close(np.asarray(ssm[draft_slots[i, j]]), np.asarray(st.ssm[1, slot]))
                np.testing.assert_allclose(np.asarray(conv[draft_slots[i, j]]), np.asarray(st.conv[1, slot]), rtol=1e-5, atol=1e-5)
            if j + 1 == snapshots[i]:
                _close(np.asarray(ssm[snapshot_slots[i]]), np.asarray(st.ssm[1, slot]))
        _close(np.asarray(ssm[slot]), np.asarray(st.ssm[1, slot]))
        np.testing.assert_allclose(np.asarray(conv[slot]), np.asarray(st.conv[1, slot]), rtol=1e-5, atol=1e-5)
    named = set(slots) | {6} | {int(x) for i, d in enumerate(drafted) if d for x in draft_slots[i][: lens[i] - 1]}
    for slot in set(range(num_slots)) - named:
        np.testing.assert_array_equal(np.asarray(ssm[slot]), np.asarray(states.ssm[1, slot]))
        np.testing.assert_array_equal(np.asarray(conv[slot]), np.asarray(states.conv[1, slot]))


@pytest.mark.parametrize("model", ["qwen3_5", "granite4"])
def test_a_decode_step_compiles_only_the_single_steps_and_matches_the_general_program(model):
    """`decode_step` (every sequence with one new token, or a real token and its drafts): the layer's program has no
    loop (the chunk path's piece loop, a host read-back per layer on a GPU, is left out), and its outputs, states,
    draft slots and snapshots are the general program's on the same batch: live states, padding rows and sequence
    slots, drafted sequences of 2 to K + 1 tokens, snapshots after the first token for some sequences, and slots no
    sequence names left untouched."""
    cfg = _tiny_cfg() if model == "qwen3_5" else _tiny_granite4()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    w = {k: v[0] for k, v in params["layers"].items() if k.startswith("gdn_")}
    proj = lambda h, name: h @ w[name]  # noqa: E731
    rng = fresh.rng()
    K, num_seqs, max_seqs = 3, 5, 8  # 3 padding sequence slots
    num_slots = 12 + max_seqs * K  # sequences' and snapshots' slots, then K draft slots per sequence
    shapes = gated_delta.state_shapes(cfg, num_slots)
    states = gated_delta.States(conv=jnp.asarray(rng.standard_normal((2, *shapes.conv[1:])), jnp.float32),
                                ssm=jnp.asarray(rng.standard_normal((2, *shapes.ssm[1:])) * 0.3, jnp.float32))
    order = rng.permutation(12)
    slots, free = order[:max_seqs], order[max_seqs:]  # padding sequences name slots too: theirs must stay as they are
    live = np.arange(max_seqs) < num_seqs
    lens = np.where(live, rng.choice([1, 1, 2, K + 1], max_seqs), 0)
    lens[0], lens[1] = 1, K + 1
    starts = np.concatenate([[0], rng.integers(1, 200, num_seqs - 1), np.zeros(max_seqs - num_seqs, int)])
    draft_slots = np.full((max_seqs, K), num_slots, np.int32)
    for i in np.flatnonzero(lens > 1):
        draft_slots[i] = 12 + K * i + np.arange(K)
    snap = np.zeros(max_seqs, np.int32)  # after the first token, for 1 to len(free) live sequences, a free slot each
    snap[rng.choice(num_seqs, rng.integers(1, min(num_seqs, len(free)) + 1), replace=False)] = 1
    snapshot_slots = np.full(max_seqs, num_slots, np.int32)
    snapshot_slots[snap > 0] = free[: snap.sum()]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    batch = dict(cu_q_lens=jnp.asarray(cu), kv_lens=jnp.asarray(np.where(live, starts + lens, 0), jnp.int32),
                 num_seqs=jnp.asarray([num_seqs], jnp.int32), slots=jnp.asarray(slots, jnp.int32),
                 snapshot_offsets=jnp.asarray(snap), snapshot_slots=jnp.asarray(snapshot_slots),
                 draft_slots=jnp.asarray(draft_slots))
    h = jnp.asarray(rng.standard_normal((cu[-1] + 3, cfg.hidden_size)), jnp.float32)  # 3 padding rows
    step = lambda decode: jax.jit(lambda h, st, b: gated_delta.mix(  # noqa: E731
        cfg, w, h, st, 1, gated_delta.Batch(**b, decode_step=decode), proj))
    loops = lambda decode: gpu_compile.loops_outside_kernels(  # noqa: E731
        jax.make_jaxpr(step(decode))(h, states, batch).jaxpr)
    assert loops(True) == [] and loops(False) == ["while[?]"]
    (out, after), (want, want_states) = step(True)(h, states, batch), step(False)(h, states, batch)
    np.testing.assert_allclose(np.asarray(out[: cu[-1]]), np.asarray(want[: cu[-1]]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(after.ssm), np.asarray(want_states.ssm), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(after.conv), np.asarray(want_states.conv))
    named = set(slots[:num_seqs]) | set(snapshot_slots[snap > 0])
    named |= {int(d) for i in np.flatnonzero(lens > 1) for d in draft_slots[i][: lens[i] - 1]}
    for slot in set(range(num_slots)) - named:
        np.testing.assert_array_equal(np.asarray(after.ssm[:, slot]), np.asarray(states.ssm[:, slot]))
        np.testing.assert_array_equal(np.asarray(after.conv[:, slot]), np.asarray(states.conv[:, slot]))
    for i in np.flatnonzero(snap & (lens == 1)):  # the snapshot is the state after the token
        np.testing.assert_array_equal(np.asarray(after.ssm[1, snapshot_slots[i]]), np.asarray(after.ssm[1, slots[i]]))
    for i in np.flatnonzero(snap & (lens > 1)):  # ... after the first token: the first draft slot's
        np.testing.assert_array_equal(np.asarray(after.ssm[1, snapshot_slots[i]]),
                                      np.asarray(after.ssm[1, draft_slots[i, 0]]))
    assert not np.array_equal(np.asarray(after.ssm[1, slots[0]]), np.asarray(states.ssm[1, slots[0]]))


def test_a_hybrid_decode_step_has_no_loop_but_the_layer_scans():
    """The whole model step on the Pallas backend (what a GPU runs): with decode_step, as the runner compiles a step
    of decodes, the only loops outside the kernels are the layer scans (Qwen3.5: one over its 3-layer groups; Granite
    4.0-H, whose pattern does not repeat: one over its first run of 2); so it is in the general step, whose prefill
    chunks walk their pieces inside a kernel (pallas_kernels/linear_scan.py): the XLA backend's step has a piece loop
    for each linear layer's place in the scanned body instead, on a GPU a predicate read back at every trip."""
    from engine import runner  # noqa: PLC0415

    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    num_tokens, max_seqs, max_pages = 32, 16, 8
    for cfg, scans in ((_tiny_cfg(), ["scan[3]"]), (_tiny_granite4(), ["scan[2]"])):
        params = jax.eval_shape(functools.partial(llama.init_params, cfg), jax.random.key(0))
        caches = tuple(jax.ShapeDtypeStruct(shape, dtype)
                       for shape, dtype in runner.cache_arrays(cfg, (64, 16), np.dtype(jnp.bfloat16)))
        shapes = gated_delta.state_shapes(cfg, max_seqs)
        states = gated_delta.States(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in (shapes.conv, shapes.ssm)))
        inputs = llama.ModelInputs(i32(num_tokens), i32(num_tokens), i32(num_tokens), i32(max_seqs),
                                   i32(max_seqs, max_pages), i32(max_seqs + 1), i32(1), i32(max_seqs),
                                   state_slots=i32(max_seqs), snapshot_offsets=i32(max_seqs),
                                   snapshot_slots=i32(max_seqs))
        for single in (True, False):
            step = functools.partial(llama.forward, cfg=cfg, attn_backend="pallas", decode_only=single,
                                     decode_step=single)
            loops = gpu_compile.loops_outside_kernels(
                jax.make_jaxpr(step)(params, kv_caches=caches, inputs=inputs, states=states).jaxpr)
            assert loops == scans, (cfg.architecture, single, loops)


def test_qwen3_5_configs_read_as_transformers_builds_them():
    cfg = _tiny_cfg()
    assert cfg.linear_layers == (True, True, True, False) and cfg.num_kv_layers == 1
    assert (cfg.attn_output_gate, cfg.qk_norm, cfg.rotary_dim, cfg.linear_conv_dim) == (True, True, 4, 80)
    nested = LlamaConfig.from_hf_config({"model_type": "qwen3_5", "text_config": {
        **TINY, "num_hidden_layers": 8, "full_attention_interval": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                            "mrope_section": [1, 1, 0], "mrope_interleaved": True}}})
    assert nested.linear_layers == (True, False) * 4 and nested.rope_theta == 1e6
    moe = LlamaConfig.from_hf_config({"model_type": "qwen3_5_moe", "text_config": {
        **{k: v for k, v in TINY.items() if k != "intermediate_size"}, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40, "num_experts": 6, "num_experts_per_tok": 2}})
    assert (moe.architecture, moe.num_experts, moe.mlp_intermediate_size, moe.norm_topk_prob) == ("qwen3_5_moe", 6, 40, True)
    with pytest.raises(ConfigError, match="layer_types"):
        LlamaConfig.from_hf_config({**TINY, "model_type": "qwen3_5_text", "layer_types": ["mamba"] * 4})
    with pytest.raises(ConfigError, match="some attention layers"):
        LlamaConfig.from_hf_config({**TINY, "model_type": "qwen3_5_text", "layer_types": ["linear_attention"] * 4})


def _hf_qwen3_5(moe: bool = False, next_: bool = False):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    experts = dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2)
    if next_:
        model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**TINY, **experts)).eval()
    elif moe:
        tiny = {k: v for k, v in TINY.items() if k != "intermediate_size"}
        model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(
            **tiny, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2)).eval()
    else:
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**TINY)).eval()
    with torch.no_grad():  # every weight away from its initial value (norms at 0 and 1, A_log, dt_bias)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.slow
def test_qwen3_5_checkpoint_matches_transformers_and_serves_its_greedy_tokens(tmp_path):
    pytest.importorskip("transformers")
    import torch

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2, _assert_greedy_is_argmax

    model = _hf_qwen3_5()
    model.save_pretrained(tmp_path)
    cfg, params = load_weights(str(tmp_path))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 150))  # three pieces of the matrix form
    with torch.no_grad():  # in float64: transformers' float32 and ours each stray ~5e-5 from it, ~1e-4 from each other
        ref = model.double()(torch.tensor([ids])).logits[0].numpy()
        model.float()
    ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
    # The tail of that float32 drift over 150 recurrent steps: one logit in 31,650 off by 3.2e-4 in a CI run (a fresh
    # model and ids each run), past the 2.2e-4 that atol 2e-4 allowed there.
    np.testing.assert_allclose(ours, ref, atol=4e-4, rtol=1e-4)

    # Through the engine: prompts prefilled in chunks of a 48-token budget beside decodes, more prompts than running
    # slots (slots reused), and a cache small enough to preempt.
    rng = random.Random(0)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (1, 5, 70, 150, 9, 40)]
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **{
        "warmup": False, "cache.num_pages": 26, "cache.page_size": 8, "model.max_model_len": 200,
        "scheduler.max_batch_tokens": 48, "scheduler.max_running": 4})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    _assert_greedy_is_argmax(model, prompts, outs)
    assert llm.engine.scheduler.stats.num_preemptions > 0


def test_tensor_parallelism_that_splits_a_linear_layers_heads_unevenly_is_refused_by_name():
    from engine.llm import LLM
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    with pytest.raises(sharding.ShardingError, match="linear_num_key_heads=2 is not divisible by parallel.tensor=4"):
        LLM(None, progress=False, model=(cfg, params, tokenizer), **{"warmup": False, "parallel.tensor": 4})


@pytest.mark.parametrize("model", ["qwen3_5"])  # (Mamba-2's draft slots: test_drafted_sequences_keep_the_state...)
def test_speculative_decoding_puts_back_the_state_of_rejected_drafts(model, monkeypatch):
    """Speculative decoding on a model with linear attention layers: drafts wholly accepted, cut after some tokens and
    wholly rejected (an oracle proposer: the true continuation, spoiled at a position chosen per step), a sequence's
    recurrent state put back to the one after its kept tokens: the greedy tokens of plain decoding, beside prefill
    chunks, with the prefix cache resuming from snapshots. A hybrid draft model is refused by name."""
    from engine.config import ConfigKeyError
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg() if model == "qwen3_5" else _tiny_granite4()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(24)]
    prompts = [system + [rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (2, 9, 30)]
    prompts.append(list(prompts[1]))  # resumed at its prompt-end snapshot
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    small = {"warmup": False, "cache.num_pages": 64, "cache.page_size": 8, "model.max_model_len": 128,
             "scheduler.max_running": 3, "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32],
             "debug_checks": True}  # one compiled forward a setting
    plain = [o.token_ids for o in LLM(None, progress=False, model=(cfg, params, tokenizer), **small)
             .generate(prompts, greedy)]

    def oracle(self, tokens, k):  # the true next k tokens, the first `len(tokens) % 4` of them kept (3: all)
        i = next(i for i, p in enumerate(prompts) if list(tokens[: len(p)]) == p and tokens[len(p)] == plain[i][0])
        done = len(tokens) - len(prompts[i])
        true = plain[i][done : done + k]
        good = len(tokens) % 4 if len(tokens) % 4 < 3 else k
        return true[:good] + [(t + 1) % cfg.vocab_size for t in true[good:]]

    from engine import speculative
    monkeypatch.setattr(speculative.NgramIndex, "propose", oracle)
    # pallas_interpret: steps of decodes and drafts take the decode_step program; max_batch 2: rows of draft slots
    # for 2 sequences, not 3 (a sequence's row changes when the one before it ends or stops drafting)
    kernels = []
    for backend, max_batch in (("xla", 0), ("pallas_interpret", 0), ("xla", 2)):
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **small, **{
            "speculative.method": "ngram", "speculative.num_tokens": 3, "speculative.max_batch": max_batch,
            "attention.backend": backend})
        runner = llm.engine.runner
        assert runner.num_state_slots == runner.draft_state_base + (max_batch or 3) * 3
        rows = []
        _record_kernels(llm, kernels)
        launch = runner.launch

        def launch_recording(plan, *args, **kwargs):  # the drafting rows of each step
            rows.append(tuple(c.draft_row for c in plan.chunks if c.draft))
            return launch(plan, *args, **kwargs)

        runner.launch = launch_recording
        got = llm.generate(prompts[:2], greedy) + llm.generate(prompts[2:], greedy)  # the second wave: prefix hits
        assert [o.token_ids for o in got] == plain, (backend, max_batch)
        stats = llm.engine.stats()
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
        assert got[-1].cached_tokens == len(prompts[1]) // 8 * 8
        assert {(0, 1), (0,)} <= set(rows) <= {(), (0,), (0, 1), (0, 1, 2)}
    assert any(longest > 1 and decode for longest, decode in kernels)  # drafted decodes in the decode_step program
    with pytest.raises(ConfigKeyError, match="speculative.model .* has linear attention layers"):
        LLM(None, progress=False, model=(cfg, params, tokenizer), draft=(cfg, params),
            **small, **{"speculative.method": "draft_model"})


@pytest.mark.parametrize("model", ["qwen3_5", "granite4", "lfm2"])
def test_lora_adapters_equal_their_merged_weights(model, tmp_path):
    """PEFT LoRA adapters on the attention layers' projections and every layer's MLP, served in one batch beside the
    base model and each other (their prefix caches, snapshots included, apart): the tokens of the base model with
    each adapter merged into its weights; at tensor parallelism 2 too (Qwen3.5); LFM2's under its own module names
    (`self_attn.out_proj`, `feed_forward.w3` / `w2`). An adapter of a linear attention layer's modules is refused by
    name."""
    from safetensors.numpy import load_file, save_file

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.lora import load_peft_adapter, write_random_adapter
    from models.tokenizer import Tokenizer
    from models.weights import layers_of
    from test_models import SMOLLM2

    cfg = _tiny(model)
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3))
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    # (Granite 4.0-H's MLP is `shared_mlp.input_linear` / `output_linear` in transformers, not adapted here: attention's)
    modules = ["wq", "wv", "wo"] if model == "granite4" else ["wq", "wv", "wo", "w_up", "w_down"]
    paths = {name: write_random_adapter(str(tmp_path / name), cfg, rank=4, alpha=8, modules=modules, seed=i, std=0.2)
             for i, name in enumerate(("a", "b"))}

    def merged(path):
        layers = dict(params["layers"])
        for name, (a, b) in load_peft_adapter(path, cfg).items():
            rows = layers_of(cfg, name)  # the layers this weight is stacked over (attention's: its attention layers)
            layers[name] = layers[name] + np.einsum("lir,lro->lio", a[rows], b[rows]).astype(layers[name].dtype)
        return {**params, "layers": layers}

    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(24)]
    prompts = [system + [rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (2, 7)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    small = {"warmup": False, "cache.num_pages": 48, "cache.page_size": 8, "model.max_model_len": 96,
             "scheduler.max_running": 6, "scheduler.token_buckets": [16, 512]}  # two forwards a setting
    reference = LLM(None, progress=False, model=(cfg, params, tokenizer), **small)
    want = {None: [o.token_ids for o in reference.generate(prompts, greedy)]}
    for name, path in paths.items():  # the same compiled steps, each merged model's weights in turn
        reference.update_weights(merged(path))
        want[name] = [o.token_ids for o in reference.generate(prompts, greedy)]
    assert want["a"] != want[None] and want["b"] != want["a"]  # the adapters do change the model
    if model == "lfm2":
        assert "base_model.model.model.layers.2.self_attn.out_proj.lora_A.weight" in load_file(
            os.path.join(paths["a"], "adapter_model.safetensors"))
    jobs = [(i, adapter) for adapter in (None, "a", "b") for i in range(len(prompts))] * 2  # the second round: hits
    for tp in (1, 2) if model == "qwen3_5" else (1,):
        served = LLM(None, progress=False, model=(cfg, params, tokenizer),
                     **small, **{"lora.adapters": paths, "parallel.tensor": tp})
        ids = [served.engine.add_request(prompts[i], greedy, adapter=adapter) for i, adapter in jobs]
        finals = served._run(set(ids), progress=False)
        for rid, (i, adapter) in zip(ids, jobs):
            assert finals[rid].token_ids == want[adapter][i], (tp, adapter)

    linear = write_random_adapter(str(tmp_path / "linear"), cfg, rank=2, alpha=2, modules=["wq"])
    tensors = load_file(os.path.join(linear, "adapter_model.safetensors"))
    first = layers_of(cfg, "gdn_out")[0]
    tensors[f"base_model.model.model.layers.{first}.linear_attn.out_proj.lora_A.weight"] = np.zeros((2, 4), np.float32)
    save_file(tensors, os.path.join(linear, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="linear_attn.out_proj.lora_A.weight adapts a module this model does not"):
        load_peft_adapter(linear, cfg)


@pytest.mark.parametrize("model", ["qwen3_5", "granite4"])
def test_tensor_parallel_serves_the_same_greedy_tokens(model):
    """Linear attention layers split by head over 2 (forced CPU) devices, each running its own heads' convolution and
    rule on its half of the states (the output projection all-reduced): the same greedy tokens as on one device, over
    shared prefixes resumed from snapshots, and each device holding half of every state and linear-layer weight; then
    again after `update_weights` with another model's arrays (JAX arrays, which skip host memory when no layout
    change is needed: here the reordering is)."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg() if model == "qwen3_5" else _tiny_granite4()
    seed = fresh.seed()
    params, updated = (llama.init_params(cfg, jax.random.PRNGKey(seed + i), scale=0.3) for i in range(2))
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(40)]
    prompts = [system + [rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (3, 9, 17)]
    prompts += [[rng.randrange(3, cfg.vocab_size) for _ in range(30)], list(prompts[0])]
    outs = {}
    for tp in (1, 2):
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
            "warmup": False, "cache.num_pages": 40, "cache.page_size": 8, "model.max_model_len": 128,
            "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32], "scheduler.max_running": 3,
            "parallel.tensor": tp})
        got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert got[-1].cached_tokens == 40  # resumed from the prompt's snapshot
        llm.update_weights(updated)
        again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        outs[tp] = [o.token_ids for o in got + again]
    assert outs[2] == outs[1]
    runner = llm.engine.runner
    for tree in (runner.states, {k: v for k, v in runner.params["layers"].items() if k.startswith("gdn_")}):
        held = sharding.bytes_per_device(tree)
        assert len(held) == 2 and len(set(held.values())) == 1, held
    norm = runner.params["layers"]["gdn_norm"]  # Gated DeltaNet's: one per head_dim, whole on both
    assert (sharding.bytes_per_device(norm)["cpu:0"] == norm.nbytes) == (model == "qwen3_5")


@pytest.mark.parametrize("model", ["qwen3_5"])  # (Mamba-2's single step: the decode-step test above)
def test_pallas_steps_serve_the_xla_steps_greedy_tokens(model):
    """The engine on the Pallas kernels (interpret mode), where a step of decodes takes the single-step program
    (`decode_step`) and a step with a longer chunk the general one: the same greedy tokens as on the xla backend
    (which compiles one program for both), over chunked prompts beside decodes, a repeated prompt resumed from a
    snapshot, and slots reused."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2

    cfg = _tiny_cfg() if model == "qwen3_5" else _tiny_granite4()
    params = llama.init_params(cfg, jax.random.PRNGKey(fresh.seed()), scale=0.3)
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    rng = random.Random(fresh.seed())
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (1, 5, 70, 9, 40)]
    prompts.append(list(prompts[2]))  # resumed at its prompt's snapshot
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs, kernels = {}, []
    for backend in ("xla", "pallas_interpret"):
        llm = LLM(None, progress=False, model=(cfg, params, tokenizer), **{
            "warmup": False, "cache.num_pages": 40, "cache.page_size": 8, "model.max_model_len": 128,
            "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32], "scheduler.max_running": 3,
            "attention.backend": backend})
        _record_kernels(llm, kernels)
        got = llm.generate(prompts[:-1], greedy) + llm.generate(prompts[-1:], greedy)
        outs[backend] = [o.token_ids for o in got]
        assert got[-1].cached_tokens == 64
    assert outs["pallas_interpret"] == outs["xla"]
    pallas = [k for k in kernels if k[1] is not None]  # (the xla backend's steps: None)
    assert {longest for longest, single in pallas if single} == {1}  # decodes alone: the single-step program
    assert any(longest > 1 and single is False for longest, single in pallas)


@pytest.mark.slow
def test_prefix_cache_resumes_recurrent_states_from_snapshots_without_changing_tokens(tmp_path):
    """A shared system prompt (computed twice, then resumed at the second's snapshot where the two parted), a
    conversation's next turn (resumed at the first turn's latest snapshot), the same prompt again (its prompt-end
    snapshot), with a snapshot pool small enough to reuse slots: every greedy token is transformers' argmax, and the
    prompts after the first few are served partly from the cache."""
    pytest.importorskip("transformers")
    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2, _assert_greedy_is_argmax

    model = _hf_qwen3_5()
    model.save_pretrained(tmp_path)
    cfg, params = load_weights(str(tmp_path))
    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(75)]
    tail = lambda n: [rng.randrange(3, cfg.vocab_size) for _ in range(n)]  # noqa: E731
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **{
        "warmup": False, "cache.num_pages": 64, "cache.page_size": 8, "model.max_model_len": 256,
        "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "scheduler.max_running": 4,
        "cache.state_snapshots": 6, "debug_checks": True})
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    waves = [[system + tail(5)], [system + tail(9)], [system + tail(3), system + tail(20), system + tail(1)]]
    outs = []
    for prompts in waves:
        got = llm.generate(prompts, greedy)
        _assert_greedy_is_argmax(model, prompts, got)
        outs.append(got)
    assert outs[0][0].cached_tokens == outs[1][0].cached_tokens == 0  # no snapshot where they part yet
    assert all(o.cached_tokens == 72 for o in outs[2])  # the system prompt's last page boundary
    first = waves[2][1]
    second = first + outs[2][1].token_ids + tail(6)  # the next turn
    again = list(first)  # the same prompt again
    got = llm.generate([second, again], greedy)
    _assert_greedy_is_argmax(model, [second, again], got)
    assert got[0].cached_tokens == (len(first) + 10 - 1) // 8 * 8  # the first turn's latest page boundary
    assert got[1].cached_tokens == len(first) // 8 * 8  # its prompt's last page boundary
    stats = llm.engine.stats()
    assert stats["state_snapshots_total"] == 6 and 0 < stats["state_snapshots_used"] <= 6


# A device cache too small for the tier tests' prompts: 24 pages of 8 tokens and two snapshot slots
def test_snapshot_slots_are_never_read_or_reused_within_the_plan_that_writes_them():
    from engine.state_snapshots import StateSnapshots

    snaps = StateSnapshots(first_slot=5, num_slots=2)
    a = snaps.take(101)
    assert a is not None and not snaps.usable(101)  # written by this plan's step: not readable before the next plan
    b = snaps.take(102)
    assert snaps.take(103) is None  # every slot is being written by this plan: no snapshot rather than a shared slot
    snaps.drop([102])
    assert snaps.take(104) is None  # ... and a dropped one's slot waits for the plan's end
    snaps.end_plan()
    assert snaps.usable(101) and not snaps.usable(102) and snaps.take(101) is None  # one snapshot per name
    assert snaps.take(104) == b  # the freed slot
    snaps.end_plan()
    snaps.slot(101)  # 101 used: 104 is now the least recently used
    assert snaps.take(105) == b and not snaps.usable(104)
    slot = snaps.reserve()  # a name not known yet (a placeholder token): out of the LRU until named
    assert slot == a and not snaps.usable(101)
    snaps.end_plan()
    snaps.name(slot, 106)
    assert snaps.usable(106) and snaps.slot(106) == a
    snaps.check_invariants()


@pytest.mark.slow
def test_qwen3_5_moe_checkpoint_matches_transformers_and_resumes_a_shared_prefix(tmp_path):
    """Qwen3.5-MoE: Qwen3.5's layers with experts (softmax, top 2 of 6 renormalized) and a gated shared expert."""
    pytest.importorskip("transformers")
    import torch

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2, _assert_greedy_is_argmax

    model = _hf_qwen3_5(moe=True)
    model.save_pretrained(tmp_path)
    cfg, params = load_weights(str(tmp_path))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.shared_expert_gate) == (6, 2, True)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 100))
    with torch.no_grad():  # (transformers' grouped expert matmuls take no float64)
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
    # float32 on both sides: one seed put 1 of 21,100 logits 3.6e-4 apart (2026-12-04), past the 3e-4 this had
    np.testing.assert_allclose(ours, ref, atol=5e-4, rtol=1e-4)
    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(30)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    waves = [[system + [5, 6]], [system + [7]], [system + [8, 9, 10], system + [11]]]
    for tp in (1, 2):  # and split over 2 devices: attention, linear layers and experts by head / feature
        llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **{
            "warmup": False, "cache.num_pages": 32, "cache.page_size": 8, "model.max_model_len": 96,
            "parallel.tensor": tp})
        for prompts in waves:
            outs = llm.generate(prompts, greedy)
            _assert_greedy_is_argmax(model, prompts, outs)
        assert [o.cached_tokens for o in outs] == [24, 24]


@pytest.mark.slow
def test_qwen3_next_checkpoint_matches_transformers(tmp_path):
    """Qwen3-Next: Qwen3.5-MoE's layers, each linear layer's q/k/v/z and b/a projections fused with their rows
    grouped by key head (regrouped at load)."""
    pytest.importorskip("transformers")
    import torch

    from models.loader import load_weights

    model = _hf_qwen3_5(next_=True)
    model.save_pretrained(tmp_path)
    cfg, params = load_weights(str(tmp_path))
    assert cfg.architecture == "qwen3_next" and cfg.num_params() == sum(p.numel() for p in model.parameters())
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 100))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=3e-4, rtol=1e-4)


def test_granite4_configs_read_as_transformers_builds_them():
    cfg = _tiny_granite4()
    assert (cfg.linear_kind, cfg.linear_layers, cfg.num_kv_layers) == ("mamba2", (True, True, False, True), 1)
    assert (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads, cfg.linear_value_head_dim,
            cfg.linear_conv_dim, cfg.linear_conv_bias, cfg.linear_dt_limit) == (2, 16, 8, 16, 192, True, ())
    assert cfg.rope_layers == (False,) * 4  # Granite 4.0's attention: no position embedding
    # transformers >= 5 writes the kinds as linear_attention / full_attention, an infinite limit as {"__float__": ...}
    written = LlamaConfig.from_hf_config({**GRANITE4, "model_type": "granitemoehybrid", "layer_types": [
        "linear_attention", "linear_attention", "full_attention", "linear_attention"], "mamba_d_head": "auto",
        "time_step_limit": [0.001, {"__float__": "Infinity"}]})
    assert written.linear_layers == cfg.linear_layers and written.linear_value_head_dim == 16
    assert written.linear_dt_limit == (0.001, float("inf"))
    attention_only = LlamaConfig.from_hf_config({**GRANITE4, "model_type": "granitemoehybrid",
                                                 "layer_types": ["attention"] * 4})
    assert attention_only.linear_layers == () and attention_only.num_kv_layers == 4
    for change, named in (({"mamba_proj_bias": True}, "mamba_proj_bias"), ({"layer_types": ["mamba", "moe"] * 2}, "moe"),
                          ({"mamba_d_head": 12}, "mamba_d_head"), ({"layer_types": ["mamba"] * 4}, "some attention")):
        with pytest.raises(ConfigError, match=named):
            LlamaConfig.from_hf_config({**GRANITE4, "model_type": "granitemoehybrid", **change})


def test_lfm2_configs_read_as_transformers_builds_them():
    """LFM2's config.json: conv layers where layer_types says (else all but full_attn_idxs), the MLP's width as
    transformers adjusts it, q/k norms per head, tied embeddings; its parameter count as transformers builds the model;
    conv_bias and an unknown layer kind refused by name; split over devices by channel, the projection's B, C and x
    reordered device-major (a hidden size the devices do not divide refused)."""
    import transformers

    from models import sharding

    cfg = _tiny_lfm2()
    assert (cfg.linear_kind, cfg.linear_layers, cfg.num_kv_layers, cfg.linear_conv_kernel) == (
        "short_conv", (True, True, False, True), 1, 3)
    assert (cfg.intermediate_size, cfg.qk_norm, cfg.qk_norm_whole, cfg.tie_word_embeddings, cfg.head_dim) == (
        112, True, False, True, 16)
    assert gated_delta.state_bytes_per_slot(cfg) == 4 * 3 * 2 * 64  # three layers' two inputs of B x, no ssm state
    by_idxs = LlamaConfig.from_hf_config({**{k: v for k, v in LFM2.items() if k != "layer_types"}, "model_type": "lfm2",
                                          "full_attn_idxs": [2]})
    assert by_idxs.linear_layers == cfg.linear_layers
    assert cfg.num_params() == sum(p.numel() for p in transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        **LFM2)).parameters())
    for change, named in (({"conv_bias": True}, "conv_bias"), ({"layer_types": ["conv", "moe"] * 2}, "layer_types")):
        with pytest.raises(ConfigError, match=named):
            LlamaConfig.from_hf_config({**LFM2, "model_type": "lfm2", **change})
    params = jax.device_get(llama.init_params(cfg, jax.random.key(0)))
    with pytest.raises(sharding.ShardingError, match="hidden_size=64 is not divisible by parallel.tensor=3"):
        sharding.prepare_for_tensor_parallel(dataclasses.replace(cfg, num_heads=6, num_kv_heads=6, head_dim=8,
                                                                 intermediate_size=96), params, 3)
    _, split = sharding.prepare_for_tensor_parallel(cfg, params, 2)  # [B | C | x] -> [B_0 C_0 x_0 | B_1 C_1 x_1]
    qkv = np.asarray(params["layers"]["gdn_qkv"]).reshape(*params["layers"]["gdn_qkv"].shape[:2], 3, 2, 32)
    np.testing.assert_array_equal(split["layers"]["gdn_qkv"], qkv.swapaxes(2, 3).reshape(qkv.shape[0], 64, 192))


@pytest.mark.slow
def test_lfm2_checkpoint_matches_transformers_and_resumes_a_shared_prefix(tmp_path):
    """A tiny random LFM2 checkpoint: logits within 1e-4 of transformers'; the GGUF llama.cpp's converter writes of
    it, the same config and logits; through the engine (its convolution state in state slots, snapshots at page boundaries, chunked prefill beside decodes, a
    pool small enough to preempt), transformers' argmax at every step, with a shared prefix resumed from a snapshot."""
    import torch
    import transformers

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2, _assert_greedy_is_argmax

    torch.manual_seed(fresh.seed())
    model = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(**LFM2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    cfg, params = load_weights(str(tmp_path))
    ids = list(fresh.rng().integers(0, cfg.vocab_size, 100))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    gguf_cfg, gguf_params = load_weights(_write_lfm2_gguf(tmp_path, cfg))  # llama.cpp's layout: the same model
    assert gguf_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # (GGUF keeps it as float32)
    assert dataclasses.replace(gguf_cfg, rms_norm_eps=cfg.rms_norm_eps) == cfg
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, ours, atol=1e-5, rtol=1e-5)
    rng = random.Random(0)
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(40)]
    prompts = [system + [rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (1, 5, 30, 9)]
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **{
        "warmup": False, "cache.num_pages": 26, "cache.page_size": 8, "model.max_model_len": 128,
        "scheduler.max_batch_tokens": 32, "scheduler.max_running": 3})
    outs = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    outs += llm.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    _assert_greedy_is_argmax(model, prompts, outs)
    assert sum(o.cached_tokens for o in outs[1:]) >= 3 * 32  # the system prompt resumed from its snapshot


# LiquidAI/LFM2-8B-A1B's config.json, the fields that shape the model
LFM2_8B_A1B = {
    "model_type": "lfm2_moe", "vocab_size": 65536, "hidden_size": 2048, "intermediate_size": 7168,
    "moe_intermediate_size": 1792, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_experts": 32, "num_experts_per_tok": 4, "num_dense_layers": 2, "norm_topk_prob": True,
    "routed_scaling_factor": 1.0, "use_expert_bias": True, "conv_L_cache": 3, "conv_bias": False, "norm_eps": 1e-05,
    "max_position_embeddings": 128000, "tie_word_embeddings": True, "rope_theta": 1000000.0,
    "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "conv", "full_attention", "conv", "conv", "conv",
                    "full_attention", "conv", "conv", "conv", "full_attention", "conv", "conv", "conv",
                    "full_attention", "conv", "conv", "full_attention", "conv", "conv"],
}


def test_lfm2_moe_config_reads_as_transformers_builds_it():
    """LFM2-8B-A1B: LFM2's layers, the first two MLPs dense at intermediate_size (not adjusted), then 32 experts of
    1,792, the top 4 by sigmoid score plus expert_bias, renormalized; its parameter count as transformers builds it
    (8,339,930,560)."""
    import torch
    import transformers

    cfg = LlamaConfig.from_hf_config(LFM2_8B_A1B)
    assert cfg.moe_layers == (False, False) + (True,) * 22 and cfg.intermediate_size == 7168
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
            cfg.router_scoring, cfg.router_score_bias, cfg.norm_topk_prob) == (32, 4, 1792, 0, "sigmoid", True, True)
    assert cfg.linear_layers == tuple(t == "conv" for t in LFM2_8B_A1B["layer_types"])
    fields = {k: v for k, v in LFM2_8B_A1B.items() if k not in ("model_type", "rope_theta")}
    with torch.device("meta"):
        hf = transformers.Lfm2MoeForCausalLM(transformers.Lfm2MoeConfig(
            **fields, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("expert_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + biases == 8_339_930_560


@pytest.mark.slow
def test_lfm2_moe_checkpoint_matches_transformers_and_serves(tmp_path):
    """A tiny random LFM2-MoE checkpoint (a dense first layer, then experts with a correction bias that changes the
    choice, among short convolution and attention layers): logits within 1e-4 of transformers', and those of the GGUF
    llama.cpp's converter writes of it (`lfm2moe`), read to the same config; through the engine
    (convolution states, prefix hits from snapshots, preemption) its argmax at every step, the same tokens with the
    experts as grouped matmuls, on the Pallas kernels (interpret) and split over 2 devices (the short convolution
    layers by channel)."""
    import torch
    import transformers

    from models.loader import load_weights
    from test_models import _hf_checkpoint_parity, _serve_variants

    torch.manual_seed(fresh.seed())
    model = transformers.Lfm2MoeForCausalLM(transformers.Lfm2MoeConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, num_dense_layers=1,
        layer_types=["conv", "full_attention", "conv", "full_attention"])).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.feed_forward.expert_bias.normal_(0, 0.5)
    cfg, params, ids, ref = _hf_checkpoint_parity(model, tmp_path, 60, lambda n: 0.3 if "norm" in n else 0.05)
    assert cfg.moe_layers == (False, True, True, True) and cfg.router_score_bias
    assert load_weights(str(tmp_path))[0] == cfg
    gguf_cfg, gguf_params = load_weights(_write_lfm2_gguf(tmp_path, cfg))  # llama.cpp's layout: the same model
    assert dataclasses.replace(gguf_cfg, rms_norm_eps=cfg.rms_norm_eps) == cfg
    got = np.asarray(llama.forward_dense(jax.device_put(gguf_params), gguf_cfg, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    greedy = _serve_variants(model, cfg, params, [{}, {"model.moe_backend": "grouped"},
                                                   {"attention.backend": "pallas_interpret"}, {"parallel.tensor": 2}])
    assert greedy[0] == greedy[1] == greedy[2] == greedy[3]


def _write_lfm2_gguf(directory, cfg: LlamaConfig) -> str:
    """The LFM2 checkpoint in `directory` (F32) as llama.cpp's converter writes it (LFM2Model): head_count_kv a list
    per layer (0 on the convolution layers), shortconv.l_cache, the MLP's adjusted width as feed_forward_length; the
    final norm token_embd_norm, the convolution layers under `shortconv` (conv squeezed to [hidden, K]), Q/K rows as
    HF has them. An LFM2-MoE one as LFM2MoeModel writes it: `lfm2moe`, expert_count, expert_used_count,
    expert_feed_forward_length, leading_dense_block_count, expert_gating_func sigmoid; each expert layer's experts
    stacked (ffn_gate_exps, ffn_up_exps, ffn_down_exps), the router ffn_gate_inp, its bias exp_probs_b.bias."""
    import json

    import gguf
    from safetensors.numpy import load_file

    sd = load_file(str(directory / "model.safetensors"))
    hf = json.loads((directory / "config.json").read_text())
    moe = hf["model_type"] == "lfm2_moe"
    path = str(directory / "lfm2.gguf")
    w = gguf.GGUFWriter(path, "lfm2moe" if moe else "lfm2")
    for add, value in ((w.add_block_count, cfg.num_layers), (w.add_context_length, cfg.max_position),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_heads), (w.add_rope_freq_base, cfg.rope_theta),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_vocab_size, cfg.vocab_size),
                       (w.add_shortconv_l_cache, hf["conv_L_cache"])):
        add(value)
    w.add_head_count_kv([0 if t == "conv" else hf["num_key_value_heads"] for t in hf["layer_types"]])
    if moe:
        w.add_expert_count(hf["num_experts"])
        w.add_expert_used_count(hf["num_experts_per_tok"])
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        w.add_leading_dense_block_count(hf["num_dense_layers"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        for i in range(hf["num_dense_layers"], cfg.num_layers):
            prefix = f"model.layers.{i}.feed_forward."
            for theirs, ours in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                w.add_tensor(f"blk.{i}.{ours}.weight",
                             np.stack([sd[f"{prefix}experts.{e}.{theirs}.weight"] for e in range(hf["num_experts"])]))
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", sd[prefix + "gate.weight"])
            w.add_tensor(f"blk.{i}.exp_probs_b.bias", sd[prefix + "expert_bias"])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("token_embd_norm.weight", sd["model.embedding_norm.weight"])
    names = {"operator_norm": "attn_norm", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
             "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_output",
             "self_attn.q_layernorm": "attn_q_norm", "self_attn.k_layernorm": "attn_k_norm",
             "conv.in_proj": "shortconv.in_proj", "conv.conv": "shortconv.conv", "conv.out_proj": "shortconv.out_proj"}
    for i in range(cfg.num_layers):
        for theirs, ours in names.items():
            x = sd.get(f"model.layers.{i}.{theirs}.weight")
            if x is not None:
                w.add_tensor(f"blk.{i}.{ours}.weight", x[:, 0, :] if theirs == "conv.conv" else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_granite4(experts: int = 0, **changes):
    import torch
    import transformers

    torch.manual_seed(fresh.seed())
    model = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(
        **{**GRANITE4, "num_local_experts": experts, **changes})).eval()
    with torch.no_grad():  # every weight away from its initial value (norms at 1, A_log, D, dt_bias)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.slow
def test_granite4_checkpoint_matches_transformers_and_resumes_a_shared_prefix(tmp_path):
    """Granite 4.0-H (granitemoehybrid with Mamba-2 layers; the MoE kind's logits too): transformers' logits, and
    through the engine its greedy tokens, prompts sharing a system prompt resumed from state snapshots. The dense
    model's time steps are clamped (time_step_limit (0, 0.3): most of softplus(dt + dt_bias) ~ 1.3 is cut)."""
    pytest.importorskip("transformers")
    import torch

    from engine.llm import LLM
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_models import SMOLLM2, _assert_greedy_is_argmax

    ids = list(fresh.rng().integers(0, GRANITE4["vocab_size"], 150))  # three pieces of the matrix form
    for experts, limit in ((4, (0.0, float("inf"))), (0, (0.0, 0.3))):
        model = _hf_granite4(experts, time_step_limit=limit)
        model.save_pretrained(tmp_path / str(experts))
        cfg, params = load_weights(str(tmp_path / str(experts)))
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())
        assert cfg.num_experts == experts and cfg.linear_dt_limit == (() if experts else limit)
        with torch.no_grad():  # float64 (transformers' grouped expert matmuls take none: float32 with experts)
            ref = (model if experts else model.double())(torch.tensor([ids])).logits[0].numpy()
            model.float()
        ours = np.asarray(llama.forward_dense(jax.device_put(params), cfg, jnp.asarray(ids, jnp.int32)))
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)

    rng = random.Random(fresh.seed())
    system = [rng.randrange(3, cfg.vocab_size) for _ in range(43)]
    llm = LLM(None, progress=False, model=(cfg, params, Tokenizer.load(tokenizer_source(SMOLLM2))), **{
        "warmup": False, "cache.num_pages": 40, "cache.page_size": 8, "model.max_model_len": 128,
        "scheduler.max_batch_tokens": 32, "scheduler.token_buckets": [32], "scheduler.max_running": 3,
        "debug_checks": True})
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    waves = [[system + [5, 6]], [system + [7]], [system + [8, 9, 10], system + [11], system + [12] * 20]]
    for prompts in waves:
        outs = llm.generate(prompts, greedy)
        _assert_greedy_is_argmax(model, prompts, outs)
    assert [o.cached_tokens for o in outs] == [40, 40, 40]  # the system prompt's last page boundary

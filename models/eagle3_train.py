"""Training an EAGLE-3 head for a model (scripts/train_eagle3.py): the model's own outputs as data, the head's layer
as the engine runs it (`llama._decoder` with the attention below), and EAGLE-3's training-time test.

- **Data** (`target_rows`): per sequence, the model's captured layer inputs (the rows the head reads) and the model's
  greedy prediction at every position: the head learns the model, not the text.
- **Draft vocabulary** (`draft_vocabulary`): the model's most frequent predictions in the data, as d2t.
- **Training-time test** (`losses`): round 1 runs the head over every position i (the model's rows at i, token
  i + 1) and predicts the model's choice at i + 1; round r > 1 runs it again, at position i + r - 1, over round
  r - 1's output at i and token i + r, and predicts the model's choice at i + r: what drafting does from position i,
  with the text's tokens in place of the head's guesses. A round's query for chain i attends to round 1's keys at
  positions up to i (the K/V the engine's extend writes) and to its own chain's keys of rounds 2..r (what the
  drafting rounds write), never to another chain's. Round r's loss is weighted 0.8^(r-1) (SpecForge's).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import eagle3, gated_delta, llama
from models.config import ConfigError, LlamaConfig


def target_rows(params: dict, cfg: LlamaConfig, tokens: jax.Array, aux_layers: tuple[int, ...]):
    """One sequence through the model, dense: (its captured rows [T, len(aux) x hidden], the model's greedy
    prediction at every position [T] int32)."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    recurrent = ((gated_delta.allocate(cfg, 1), gated_delta.one_sequence(tokens.shape[0]))
                 if cfg.linear_layers else None)
    x, _, aux = llama._decoder(params, cfg, tokens, positions, llama._dense_attend(cfg), recurrent=recurrent,
                               aux_layers=aux_layers)
    return aux, jnp.argmax(llama.compute_logits(params, cfg, x), axis=-1).astype(jnp.int32)


def head_layer_config(cfg: LlamaConfig, draft_vocab: int) -> LlamaConfig:
    """A head's layer for a model of config `cfg`: a Llama layer of the model's width, attention heads and RoPE (its
    MLP as wide as the model's dense one, else 4 x hidden); ConfigError for RoPE scaling a config.json cannot
    name."""
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type not in ("llama3", "linear", "yarn"):
        raise ConfigError(f"a head for a model with {cfg.rope_scaling.rope_type} RoPE scaling is not supported")
    heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) if not cfg.mla else (cfg.hidden_size // 128, 8, 128)
    return LlamaConfig(architecture="llama", vocab_size=draft_vocab, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size, num_layers=1,
                       num_heads=heads[0], num_kv_heads=heads[1], head_dim=heads[2], rope_theta=cfg.rope_theta,
                       rope_scaling=cfg.rope_scaling, rms_norm_eps=cfg.rms_norm_eps, max_position=cfg.max_position,
                       attn_input_size=2 * cfg.hidden_size)


def draft_vocabulary(predictions: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """d2t [size] int32 of the `size` tokens the model predicts most often (ties and the unseen by id), in id order."""
    counts = np.bincount(predictions.ravel(), minlength=vocab_size)
    top = np.sort(np.argsort(-counts, kind="stable")[:size])
    return (top - np.arange(size)).astype(np.int32)


def init_head(params: dict, cfg: LlamaConfig, ecfg: eagle3.Eagle3Config, d2t: np.ndarray, key: jax.Array,
              scale: float = 0.02) -> dict:
    """A head to train: random layer and fc, its final norm and LM head the model's (the head's output lives where
    the model's last hidden state does), restricted to the draft vocabulary."""
    head = eagle3.init_params(ecfg, key, scale=scale)
    layers = {k: (jnp.ones_like(v) if k in ("attn_norm", "mlp_norm") else v) for k, v in head["layers"].items()}
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    ids = jnp.arange(len(d2t)) + jnp.asarray(d2t)
    return {**head, "layers": layers, "final_norm": params["final_norm"], "lm_head": lm_head[:, ids],
            "d2t": jnp.asarray(d2t, jnp.int32)}


def _attend(cfg: LlamaConfig, r: int):
    """The attention of training round r (`llama._decoder`'s `attend`). The carry: round 1's K/V [T, Hkv, D] and
    every later round's [rounds - 1, T, Hkv, D] (one structure for every round, as the layer scan wants). Round 1 is
    causal over its own K/V, which it keeps; round r > 1 reads round 1's K/V up to its chain's start and its chain's
    own K/V of rounds 2..r, this one's included."""
    group = cfg.num_heads // cfg.num_kv_heads

    def attend(i, window, sinks, q, k, v, carry):
        t = q.shape[0]
        rep = lambda a: jnp.repeat(a, group, axis=-2).astype(jnp.float32)  # noqa: E731  heads: Hkv -> Hq
        k1, v1, ks, vs = carry
        if r == 1:
            k1, v1 = k, v
        else:
            ks, vs = ks.at[r - 2].set(k), vs.at[r - 2].set(v)
        q32 = q.astype(jnp.float32) * cfg.sm_scale
        scores = jnp.einsum("thd,shd->hts", q32, rep(k1))
        limit = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # chain i reads round 1's positions <= i
        scores = jnp.where(limit[None], scores, -jnp.inf)
        own = jnp.einsum("thd,rthd->htr", q32, rep(ks[: r - 1]))  # [Hq, T, r - 1]: its chain's later rounds
        weights = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1)
        o = jnp.einsum("hts,shd->thd", weights[..., :t], rep(v1))
        o = o + jnp.einsum("htr,rthd->thd", weights[..., t:], rep(vs[: r - 1]))
        return o.astype(q.dtype), (k1, v1, ks, vs)

    return attend


def round_outputs(head: dict, params: dict, ecfg: eagle3.Eagle3Config, aux: jax.Array, tokens: jax.Array,
                  rounds: int) -> list[jax.Array]:
    """The head's output rows [T, hidden] (before its final norm) of each training round over one sequence: row i of
    round r is what drafting from position i computes in its r-th round, given the sequence's tokens as its guesses.
    `tokens` [T]: the sequence (0 past its end)."""
    cfg, t = ecfg.layer, tokens.shape[0]
    chain = jnp.arange(t, dtype=jnp.int32)
    hidden = eagle3.hidden_rows(head, aux)
    kv = jnp.zeros((t, cfg.num_kv_heads, cfg.head_dim), hidden.dtype)
    later = jnp.zeros((max(rounds - 1, 1), t, cfg.num_kv_heads, cfg.head_dim), hidden.dtype)
    carry, outs = (kv, kv, later, later), []
    for r in range(1, rounds + 1):
        tok = tokens[jnp.minimum(chain + r, t - 1)]
        positions = chain + r - 1
        x, attn_in = eagle3.fuse(params, head, ecfg, tok, hidden, positions)
        hidden, carry = llama._decoder(head, cfg, tok, positions, _attend(cfg, r), carry, embeds=x, attn_in=attn_in)
        outs.append(hidden)
    return outs


def losses(head: dict, params: dict, ecfg: eagle3.Eagle3Config, aux: jax.Array, tokens: jax.Array,
           labels: jax.Array, rounds: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One sequence's training-time test: per round, (the summed cross-entropy, the rows counted, the rows whose
    guess is the model's choice), each [rounds]. `labels` [T]: the model's choice at each position as a draft id,
    -1 where that is outside the draft vocabulary or past the sequence's end."""
    t = tokens.shape[0]
    chain = jnp.arange(t, dtype=jnp.int32)
    out_loss, out_count, out_right = [], [], []
    for r, out in enumerate(round_outputs(head, params, ecfg, aux, tokens, rounds), start=1):
        target = jnp.where(chain + r < t, labels[jnp.minimum(chain + r, t - 1)], -1)
        logits = llama.compute_logits(head, ecfg.layer, out)
        logp = jax.nn.log_softmax(logits, axis=-1)
        valid = target >= 0
        nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[:, None], axis=-1)[:, 0]
        out_loss.append(jnp.sum(jnp.where(valid, nll, 0.0)))
        out_count.append(jnp.sum(valid))
        out_right.append(jnp.sum(valid & (jnp.argmax(logits, axis=-1) == target)))
    return jnp.stack(out_loss), jnp.stack(out_count), jnp.stack(out_right)


def train_step_fn(params: dict, ecfg: eagle3.Eagle3Config, optimizer, rounds: int):
    """A jitted step over a batch (aux [B, T, k x hidden], tokens [B, T], labels [B, T]) -> (head, optimizer state,
    per-round mean loss [rounds], per-round accuracy [rounds]); the model's weights stay fixed, d2t too."""
    import optax

    decay = jnp.asarray([0.8**r for r in range(rounds)], jnp.float32)

    def batch_losses(trained, fixed, aux, tokens, labels):
        head = {**trained, **fixed}
        loss, count, right = jax.vmap(lambda a, t, y: losses(head, params, ecfg, a, t, y, rounds))(aux, tokens, labels)
        count = jnp.maximum(jnp.sum(count, axis=0), 1)
        per_round = jnp.sum(loss, axis=0) / count
        return jnp.sum(decay * per_round), (per_round, jnp.sum(right, axis=0) / count)

    @jax.jit
    def step(head, opt_state, aux, tokens, labels):
        trained = {k: v for k, v in head.items() if k != "d2t"}
        (_, (per_round, accuracy)), grads = jax.value_and_grad(batch_losses, has_aux=True)(
            trained, {"d2t": head["d2t"]}, aux, tokens, labels)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        return {**optax.apply_updates(trained, updates), "d2t": head["d2t"]}, opt_state, per_round, accuracy

    return step


def hf_config(cfg: LlamaConfig, ecfg: eagle3.Eagle3Config, target_vocab: int) -> dict[str, Any]:
    """The head's config.json in EAGLE-3's own format (`LlamaForCausalLMEagle3`: what vLLM and SGLang read too)."""
    layer = ecfg.layer
    out = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": layer.hidden_size,
           "intermediate_size": layer.intermediate_size, "num_attention_heads": layer.num_heads,
           "num_key_value_heads": layer.num_kv_heads, "head_dim": layer.head_dim, "num_hidden_layers": 1,
           "rms_norm_eps": layer.rms_norm_eps, "rope_theta": layer.rope_theta, "hidden_act": "silu",
           "max_position_embeddings": layer.max_position, "vocab_size": target_vocab,
           "draft_vocab_size": layer.vocab_size, "target_hidden_size": cfg.hidden_size, "tie_word_embeddings": False,
           "norm_before_residual": ecfg.norm_before_residual,
           "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(ecfg.aux_layers), "use_aux_hidden_state": True}}
    rs = layer.rope_scaling
    if rs is not None:  # (head_layer_config: llama3, linear or yarn)
        out["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, **(
            {"low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
             "original_max_position_embeddings": rs.original_max_position} if rs.rope_type == "llama3" else
            {"original_max_position_embeddings": rs.original_max_position, "beta_fast": rs.beta_fast,
             "beta_slow": rs.beta_slow} if rs.rope_type == "yarn" else {})}
    return out


def hf_tensors(head: dict, target_vocab: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """The head's tensors by EAGLE-3's names, torch orientation (`midlayer.*`, fc, norm, lm_head, d2t, t2d)."""
    layers = {k: np.asarray(v)[0] for k, v in head["layers"].items()}
    out = {"midlayer." + name: (layers[key].T if layers[key].ndim == 2 else layers[key])
           for key, name in eagle3.LAYER_NAMES.items()}
    out |= {"midlayer.hidden_norm.weight": np.asarray(head["hnorm"]), "fc.weight": np.asarray(head["fc"]).T,
            "norm.weight": np.asarray(head["final_norm"]), "lm_head.weight": np.asarray(head["lm_head"]).T}
    out = {k: np.ascontiguousarray(v, dtype) for k, v in out.items()}
    d2t = np.asarray(head["d2t"], np.int64)
    t2d = np.zeros(target_vocab, bool)
    t2d[np.arange(len(d2t)) + d2t] = True
    return out | {"d2t": d2t, "t2d": t2d}

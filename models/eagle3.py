"""EAGLE-3 draft heads (`speculative.method: eagle3`, the head's checkpoint in `speculative.model`): vLLM's and
SGLang's `eagle3`. A head is one decoder layer trained beside a given model: it reads the model's hidden states from
three of its layers and drafts the token after next. As a drafter it runs where an MTP layer does
(engine/mtp_drafter.py: extend after each step, propose before), its K/V in the model's pages.

The head's row for position i reads:
- the model's inputs to layers `aux_layers` at i (the residual stream before each; vLLM's ids: 0 is the embedding;
  by default 2, L / 2 and L - 3 of L layers, or the checkpoint's `eagle_aux_hidden_state_layer_ids`), concatenated
  and projected to the head's hidden size by `fc`: its hidden state h;
- the embedding of token i + 1 (the head's own `embed_tokens` where the checkpoint has one, else the model's), e.

Its layer's attention reads [input_layernorm(e), hidden_norm(h)] (q/k/v projections twice the hidden size wide);
the residual stream starts from h (or from hidden_norm(h): `norm_before_residual`); then post_attention_layernorm and
the MLP as Llama's. Its final norm and LM head score a draft vocabulary (`draft_vocab_size`), draft id d standing for
the model's token d + d2t[d]. A chained round reads the layer's output before the final norm as its hidden state
(not through `fc`) with the token it guessed, one position on.

Checkpoints, HF directories (config.json and safetensors):
- EAGLE-3's own (the EAGLE authors', SpecForge's: `LlamaForCausalLMEagle3`): a Llama config.json plus
  `draft_vocab_size` (and `target_hidden_size`, `eagle_config`); tensors `midlayer.*` (a Llama layer's names plus
  `hidden_norm`), `fc.weight`, `norm.weight`, `lm_head.weight`, `d2t`, and `t2d` (not read).
- speculators' (`Eagle3Speculator`): the layer's config in `transformer_layer_config`, the rest at the top level;
  `layers.0.*` for `midlayer.*`.
Either may carry `embed_tokens.weight`, and a `model.` prefix on every name but the LM head's.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ConfigError, LlamaConfig
from models.gguf_loader import CheckpointError

# The layer's own names (after its prefix) for our keys; its input norms are read in `fuse`, not by the layer.
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
LAYER_PREFIXES = ("midlayer.", "layers.0.", "model.midlayer.", "model.layers.0.")


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 head: its decoder layer's config (one Llama layer whose attention reads twice the hidden size; its
    vocabulary the draft vocabulary) and how it reads the model."""

    layer: LlamaConfig
    aux_layers: tuple[int, ...]  # the model's layers whose inputs it reads (0: the embedding)
    norm_before_residual: bool  # the residual stream starts from hidden_norm(h) instead of h


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's and SGLang's choice where a checkpoint names none: early, middle and late layers."""
    return 2, num_layers // 2, num_layers - 3


def eagle3_config(raw: dict[str, Any], target: LlamaConfig, source: str = "config.json") -> Eagle3Config:
    """The head of an EAGLE-3 config.json `raw`, for a model of config `target`; ConfigError naming what does not
    fit it."""
    layer_raw = raw.get("transformer_layer_config") or raw
    fields = {**layer_raw, **{k: raw[k] for k in ("draft_vocab_size", "target_hidden_size", "norm_before_residual",
                                                 "eagle_aux_hidden_state_layer_ids") if k in raw}}
    eagle = raw.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state") is False:
        raise ConfigError(f"{source}: eagle_config.use_aux_hidden_state is false (an EAGLE-1/2 style head reading the "
                          "last hidden state); speculative.method: eagle3 reads EAGLE-3 heads")
    base = LlamaConfig.from_hf_config({**layer_raw, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                       "num_hidden_layers": 1, "tie_word_embeddings": False}, source)
    target_hidden = int(fields.get("target_hidden_size") or base.hidden_size)
    if target_hidden != target.hidden_size:
        raise ConfigError(f"{source}: the head reads hidden states of size {target_hidden} (target_hidden_size or "
                          f"hidden_size); the model's are {target.hidden_size}: a head trained for another model")
    if base.hidden_size != target.hidden_size:
        raise ConfigError(f"{source}: hidden_size {base.hidden_size} differs from the model's {target.hidden_size} "
                          "(a head of another width than its model is not supported)")
    ids = fields.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    aux = tuple(int(i) for i in ids) if ids else default_aux_layers(target.num_layers)
    bad = [i for i in aux if not 0 <= i < target.num_layers]
    if bad:
        raise ConfigError(f"{source}: eagle_aux_hidden_state_layer_ids {list(aux)}: layer {bad[0]} is not one of the "
                          f"model's {target.num_layers} (ids count from 0, the embedding)")
    draft_vocab = int(fields.get("draft_vocab_size") or base.vocab_size)
    if draft_vocab > target.vocab_size:
        raise ConfigError(f"{source}: draft_vocab_size {draft_vocab} is larger than the model's vocabulary "
                          f"({target.vocab_size})")
    layer = dataclasses.replace(base, num_layers=1, vocab_size=draft_vocab, attn_input_size=2 * base.hidden_size,
                                max_position=target.max_position)  # (the model's context; RoPE scaling as the head's)
    return Eagle3Config(layer, aux, bool(fields.get("norm_before_residual", False)))


def init_params(ecfg: Eagle3Config, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> dict:
    """Random weights of a head (tests, benchmarks): no embedding of its own, d2t zero (draft id d is the model's
    token d)."""
    k_layer, k_fc, k_head = jax.random.split(key, 3)
    cfg = ecfg.layer
    h = cfg.hidden_size
    params = llama.init_params(cfg, k_layer, dtype, scale)
    return {"layers": params["layers"], "hnorm": jnp.ones(h, dtype), "final_norm": params["final_norm"],
            "fc": (llama.normal(k_fc, (len(ecfg.aux_layers) * h, h)) * scale).astype(dtype),
            "lm_head": (llama.normal(k_head, (h, cfg.vocab_size)) * scale).astype(dtype),
            "d2t": jnp.zeros(cfg.vocab_size, jnp.int32)}


def embed(params: dict, head: dict, tokens: jax.Array) -> jax.Array:
    """The head's embedding of `tokens` (its own table, else the model's, unscaled: vLLM's); ids past the
    vocabulary (an image's positions) read row 0."""
    table = head if "embed" in head else params
    vocab = table["embed"].shape[0]
    return llama.embed_tokens(table, jnp.where(tokens < vocab, tokens, 0))


def hidden_rows(head: dict, aux: jax.Array) -> jax.Array:
    """The head's hidden state [T, hidden] from the model's captured rows [T, len(aux_layers) x hidden]: `fc`."""
    return jnp.dot(aux, head["fc"].astype(aux.dtype), preferred_element_type=jnp.float32).astype(aux.dtype)


def fuse(params: dict, head: dict, ecfg: Eagle3Config, tokens: jax.Array, hidden: jax.Array,
         positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the layer's residual stream rows, its attention's input rows [T, 2 x hidden]) for pairs (hidden[i],
    tokens[i])."""
    cfg = ecfg.layer
    eps = cfg.rms_norm_eps
    e = embed(params, head, tokens).astype(hidden.dtype)
    normed = llama.rms_norm(hidden, head["hnorm"], eps)
    attn_in = jnp.concatenate([llama.rms_norm(e, head["layers"]["attn_norm"][0], eps), normed], axis=-1)
    return (normed if ecfg.norm_before_residual else hidden), attn_in


def guesses(head: dict, ecfg: Eagle3Config, out: jax.Array) -> jax.Array:
    """[N] int32: the model's token each output row guesses (the draft vocabulary's argmax, mapped by d2t)."""
    d = jnp.argmax(llama.compute_logits(head, ecfg.layer, out), axis=-1).astype(jnp.int32)
    return d + head["d2t"][d]


def forward_dense(params: dict, head: dict, ecfg: Eagle3Config, tokens: jax.Array, hidden: jax.Array) -> jax.Array:
    """Reference: the layer over one sequence of pairs (hidden[i], tokens[i]) at positions 0.., no cache -> its
    output rows before the final norm [T, hidden]."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    x, attn_in = fuse(params, head, ecfg, tokens, hidden, positions)
    out, _ = llama._decoder(head, ecfg.layer, tokens, positions, llama._dense_attend(ecfg.layer), embeds=x,
                            attn_in=attn_in)
    return out


# ------------------------------------------------------------------------------------------------- loading
def load_eagle3(path: str, target: LlamaConfig, dtype: Any = np.float32) -> tuple[Eagle3Config, dict]:
    """An EAGLE-3 head from its HF checkpoint directory (or `pkg:` path), for a model of config `target`: (its config,
    host weights in `dtype`, d2t int32). CheckpointError / ConfigError naming what is missing or does not fit."""
    from models.loader import checkpoint_kind, resolve_path
    from models.safetensors_loader import opened_shards

    resolved = resolve_path(path)
    if checkpoint_kind(resolved) != "safetensors":
        raise CheckpointError(f"speculative.model {path}: an EAGLE-3 head is read from an HF checkpoint directory "
                              "(config.json and safetensors files)")
    source = os.path.join(resolved, "config.json")
    try:
        with open(source) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: {e}") from e
    ecfg = eagle3_config(raw, target, source)
    bin_file = os.path.join(resolved, "pytorch_model.bin")
    if os.path.isfile(bin_file) and not any(f.endswith(".safetensors") for f in os.listdir(resolved)):
        raise CheckpointError(
            f"{bin_file}: the head's weights are a torch pickle, which this engine does not read (it runs no pickled "
            "code); write them once as safetensors beside it, where torch is installed: python -c \"import torch; "
            "from safetensors.torch import save_file; save_file(torch.load('pytorch_model.bin'), "
            "'model.safetensors')\"")
    with opened_shards(resolved) as (shard_of, stored):
        return ecfg, _assemble(ecfg, target, shard_of, stored, resolved, dtype)


def _assemble(ecfg: Eagle3Config, target: LlamaConfig, shard_of, stored, path: str, dtype) -> dict:
    cfg = ecfg.layer
    prefix = next((p for p in LAYER_PREFIXES if p + LAYER_NAMES["wq"] in shard_of), None)
    if prefix is None:
        raise CheckpointError(f"{path}: no EAGLE-3 layer ({' or '.join(p + LAYER_NAMES['wq'] for p in LAYER_PREFIXES)})")
    model = "model." if prefix.startswith("model.") else ""

    def get(name: str) -> np.ndarray:
        if name not in shard_of:
            raise CheckpointError(f"{path}: the EAGLE-3 head's tensor {name!r} is not in the checkpoint")
        return stored(name)

    layers = {key: get(prefix + name)[None] for key, name in LAYER_NAMES.items()}
    layers = {k: np.swapaxes(v, -1, -2) if v.ndim == 3 else v for k, v in layers.items()}  # x @ W orientation
    params = {"layers": {k: v.astype(dtype) for k, v in layers.items()},
              "hnorm": get(prefix + "hidden_norm.weight").astype(dtype),
              "fc": get(model + "fc.weight").T.astype(dtype),
              "final_norm": get(model + "norm.weight").astype(dtype),
              "lm_head": get("lm_head.weight").T.astype(dtype)}
    if model + "embed_tokens.weight" in shard_of:
        params["embed"] = get(model + "embed_tokens.weight").astype(dtype)
    d2t = model + "d2t" if model + "d2t" in shard_of else "d2t"
    params["d2t"] = (get(d2t).astype(np.int64) if d2t in shard_of else np.zeros(cfg.vocab_size, np.int64))
    check_params(ecfg, target, params, path)
    params["d2t"] = params["d2t"].astype(np.int32)
    return params


def check_params(ecfg: Eagle3Config, target: LlamaConfig, params: dict, path: str) -> None:
    """CheckpointError naming the first tensor whose shape does not fit the head's config and the model."""
    cfg, h = ecfg.layer, ecfg.layer.hidden_size
    want = {**{f"layers.{k}": v for k, v in llama.param_shapes(cfg)["layers"].items() if k in LAYER_NAMES},
            "hnorm": (h,), "fc": (len(ecfg.aux_layers) * target.hidden_size, h), "final_norm": (h,),
            "lm_head": (h, cfg.vocab_size), "d2t": (cfg.vocab_size,)}
    if "embed" in params:
        want["embed"] = (target.vocab_size, h)
    got = {**{f"layers.{k}": v for k, v in params["layers"].items()}, **{k: v for k, v in params.items() if k != "layers"}}
    for key, shape in want.items():
        if tuple(got[key].shape) != tuple(shape):
            raise CheckpointError(f"{path}: the EAGLE-3 head's {key} has shape {tuple(got[key].shape)}; its config "
                                  f"and the model need {tuple(shape)}"
                                  + (" (fc reads one hidden state per eagle_aux_hidden_state_layer_ids entry)"
                                     if key == "fc" else ""))
    ids = np.arange(cfg.vocab_size) + params["d2t"]
    if ids.size and (ids.min() < 0 or ids.max() >= target.vocab_size):
        raise CheckpointError(f"{path}: d2t maps draft ids outside the model's vocabulary of {target.vocab_size}")

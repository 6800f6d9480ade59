"""Multi-token prediction (MTP) layers: the extra decoder layer DeepSeek-V3, GLM-4.5 and Qwen3.5 / Qwen3-Next
checkpoints carry past their last layer, trained to predict the token after next. As a drafter
(`speculative.method: mtp`, engine/mtp_drafter.py) it needs no second model: one layer of the model's own kind.

The module reads a pair, the model's hidden state at position i (after its final norm) and the embedding of token
i + 1, each RMS-normed, concatenated (embedding first) and projected back to the hidden size; runs its decoder layer
over that at position i (with its own K/V in the cache's pages); and its output, normed, goes through the model's LM
head: a guess at token i + 2. Drafting more tokens chains it: the next round pairs the module's own output with the
token it guessed, one position on.

Names in the checkpoints:
- DeepSeek-V3, GLM-4.5 (`num_nextn_predict_layers`): layer `num_hidden_layers` under `model.layers.{n}.`, a
  decoder layer as the model's plus `enorm` (the embedding's norm), `hnorm` (the hidden state's), `eh_proj`
  [hidden, 2 x hidden] and `shared_head.norm`. Its `embed_tokens` and `shared_head.head` copy the model's embedding
  and LM head (DeepSeek-V3's report: shared), which are used in their place. The embedding of position 0 is zeroed
  (vLLM's reading of DeepSeek's), and a chained round reads the module's output before its norm.
- Qwen3.5, Qwen3-Next (`mtp_num_hidden_layers`): `mtp.layers.0.` a full-attention layer as the model's, `mtp.fc`
  (eh_proj), `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm`, every norm scaled by 1 + w as the
  model's; a chained round reads the normed output.
- GLM-4.5, GLM-5 and DeepSeek-V3.2 GGUF files (llama.cpp's converter: glm4moe, glm-dsa, deepseek32): block
  `block_count - nextn_predict_layers` as the model's blocks, plus `nextn.enorm`, `nextn.hnorm`, `nextn.eh_proj`,
  `nextn.shared_head_norm`.
Where a checkpoint has several such layers, the first drafts every round (published ones have one).
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
from models.config import LlamaConfig
from models.gguf_loader import CheckpointError

# A module's weights: its decoder layer (`params["layers"]`, stacked over one layer), `final_norm`, and the norms and
# projection of its input rows, `enorm`, `hnorm`, `eh_proj` [2 x hidden, hidden] (`fuse`).
DEEPSEEK_STYLE = ("deepseek_v3", "glm4_moe")
QWEN_STYLE = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
SUPPORTED = DEEPSEEK_STYLE + QWEN_STYLE


@dataclasses.dataclass(frozen=True)
class MtpConfig:
    """An MTP module: its decoder layer's config (the model's, one attention layer, experts where the model has them)
    and how it is read."""

    layer: LlamaConfig
    mask_first: bool  # position 0's embedding zeroed (DeepSeek-V3, GLM-4.5)
    chain_normed: bool  # a chained round reads the normed output (Qwen) instead of the output before its norm


def mtp_config(cfg: LlamaConfig) -> MtpConfig:
    """The MTP module of a model of config `cfg` (the checkpoint's, before tensor parallelism)."""
    if cfg.architecture not in SUPPORTED:
        raise CheckpointError(f"architecture {cfg.architecture!r} has no multi-token-prediction layer this engine "
                              f"reads ({', '.join(SUPPORTED)} have)")
    layer = dataclasses.replace(cfg, num_layers=1, linear_layers=(), moe_layers=(), sliding_layers=(), rope_layers=(),
                                mrope_section=(), mrope_interleaved=False)
    deepseek = cfg.architecture in DEEPSEEK_STYLE
    return MtpConfig(layer, mask_first=deepseek, chain_normed=not deepseek)


def init_params(mcfg: MtpConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> dict:
    """Random weights of an MTP module (tests)."""
    k_layer, k_proj = jax.random.split(key)
    params = llama.init_params(mcfg.layer, k_layer, dtype, scale)
    h = mcfg.layer.hidden_size
    return {"layers": params["layers"], "final_norm": params["final_norm"], "enorm": jnp.ones(h, dtype),
            "hnorm": jnp.ones(h, dtype),
            "eh_proj": (llama.normal(k_proj, (2 * h, h)) * scale).astype(dtype)}


def head_params(params: dict, mtp_params: dict) -> dict:
    """The model's embedding and LM head with the module's final norm: what `llama.compute_logits` reads."""
    return {**{k: v for k, v in params.items() if k != "layers"}, "final_norm": mtp_params["final_norm"]}


def fuse(params: dict, mtp_params: dict, mcfg: MtpConfig, tokens: jax.Array, hidden: jax.Array,
         positions: jax.Array) -> jax.Array:
    """The module's input rows [T, hidden]: eh_proj([norm(embed(tokens)), norm(hidden)]). Ids past the vocabulary
    (an image's positions) read row 0."""
    cfg = mcfg.layer
    e = llama.input_rows(params, cfg, jnp.where(tokens < cfg.vocab_size, tokens, 0)).astype(hidden.dtype)
    if mcfg.mask_first:
        e = jnp.where((positions == 0)[:, None], 0, e)
    eps = cfg.rms_norm_eps
    x = jnp.concatenate([llama.rms_norm(e, mtp_params["enorm"], eps), llama.rms_norm(hidden, mtp_params["hnorm"], eps)],
                        axis=-1)
    return jnp.dot(x, mtp_params["eh_proj"].astype(x.dtype), preferred_element_type=jnp.float32).astype(hidden.dtype)


def chained(params: dict, mtp_params: dict, mcfg: MtpConfig, out: jax.Array) -> jax.Array:
    """What the next round reads of the module's output rows (before its norm)."""
    return llama.final_hidden(head_params(params, mtp_params), mcfg.layer, out) if mcfg.chain_normed else out


def logits(params: dict, mtp_params: dict, mcfg: MtpConfig, out: jax.Array) -> jax.Array:
    """The module's guesses [N, vocab] float32 from its output rows (before its norm)."""
    return llama.compute_logits(head_params(params, mtp_params), mcfg.layer, out)


def forward_dense(params: dict, mtp_params: dict, mcfg: MtpConfig, tokens: jax.Array,
                  hidden: jax.Array) -> jax.Array:
    """Reference: the module over one sequence of pairs (hidden[i], tokens[i]) at positions 0.., no cache -> its
    output rows before the norm [T, hidden]."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    x = fuse(params, mtp_params, mcfg, tokens, hidden, positions)
    out, _ = llama._decoder(mtp_params, mcfg.layer, tokens, positions, llama._dense_attend(mcfg.layer), embeds=x)
    return out


# ------------------------------------------------------------------------------------------------- loading
def num_mtp_layers(directory: str) -> int:
    """How many MTP layers an HF checkpoint directory's config.json declares (0: none)."""
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    raw = {**raw, **raw.get("text_config", {})}
    return int(raw.get("num_nextn_predict_layers") or raw.get("mtp_num_hidden_layers") or 0)


def load_mtp(path: str, cfg: LlamaConfig, dtype: Any = np.float32) -> tuple[MtpConfig, dict]:
    """The first MTP layer of an HF checkpoint directory, or of a GLM-4.5 or GLM-5 GGUF file (llama.cpp's converter
    keeps their `blk.{n}.nextn.*` block): (its config, host weights in `dtype`). CheckpointError naming what is missing: a
    checkpoint without such a layer, or a tensor not in the files."""
    from models.loader import checkpoint_kind, resolve_path

    resolved = resolve_path(path)
    kind = checkpoint_kind(resolved)
    mcfg = mtp_config(cfg)
    if kind == "gguf":
        return mcfg, _load_gguf(resolved, cfg, mcfg, dtype)
    if kind != "safetensors":
        raise CheckpointError(f"speculative.method: mtp reads the MTP layer from an HF checkpoint directory or a "
                              f"GLM-4.5 / GLM-5 GGUF file; {path} is an Orbax directory, which holds the model alone")
    return mcfg, _load_hf(resolved, cfg, mcfg, dtype)


def _load_hf(path: str, cfg: LlamaConfig, mcfg: MtpConfig, dtype) -> dict:
    from models.safetensors_loader import hf_names, hf_tensor, opened_shards, tensor_reader

    if not num_mtp_layers(path):
        raise CheckpointError(f"{path}: its config.json declares no multi-token-prediction layer "
                              "(num_nextn_predict_layers / mtp_num_hidden_layers)")
    with opened_shards(path) as (shard_of, stored):
        names, own = _names(cfg, hf_names(cfg), shard_of)
        get = tensor_reader(path, shard_of, stored)
        return _assemble(mcfg, names, own, lambda key, name: hf_tensor(cfg, key, get(name)), shard_of, path, dtype)


def _load_gguf(path: str, cfg: LlamaConfig, mcfg: MtpConfig, dtype) -> dict:
    from models.gguf_loader import gguf_names, read_gguf, tensor_reader

    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("glm4moe", "glm-dsa", "deepseek32") or not int(meta.get(f"{arch}.nextn_predict_layers") or 0):
        raise CheckpointError(f"{path}: this GGUF file carries no multi-token-prediction layer (llama.cpp's converter "
                              "keeps GLM-4.5's, GLM-5's and DeepSeek-V3.2's, as nextn_predict_layers blocks; the others "
                              "drop theirs)")
    base = f"blk.{cfg.num_layers}."
    names = {k: v.replace("blk.{i}.", base) for k, v in gguf_names(cfg, tensors).items()}
    own = {"final_norm": base + "nextn.shared_head_norm.weight", "enorm": base + "nextn.enorm.weight",
           "hnorm": base + "nextn.hnorm.weight", "eh_proj": base + "nextn.eh_proj.weight"}
    return _assemble(mcfg, names, own, tensor_reader(path, arch, cfg, tensors), tensors, path, dtype)


def _assemble(mcfg: MtpConfig, names: dict[str, str], own: dict[str, str], read, stored, path: str, dtype) -> dict:
    """The layer's weights: its decoder layer by the model's name table `names` (one layer's), its final norm and fuse
    weights by `own` (norms read as the model's final norm is: Qwen's 1 + w)."""
    from models.weights import assemble

    missing = [name for name in own.values() if name not in stored]
    if missing:
        raise CheckpointError(f"{path}: the MTP layer's tensor {missing[0]!r} is not in the checkpoint")
    params = assemble(mcfg.layer, names, read, dtype, layers_only=True)
    for key, name in own.items():
        arr = read("final_norm" if key != "eh_proj" else key, name)
        params[key] = np.ascontiguousarray(arr.T if key == "eh_proj" else arr).astype(dtype)
    return params


def _names(cfg: LlamaConfig, names: dict[str, str], shard_of) -> tuple[dict[str, str], dict[str, str]]:
    """(the decoder layer's name table, the final norm's and fuse weights' names) of an HF checkpoint's first MTP
    layer."""
    if cfg.architecture in DEEPSEEK_STYLE:
        base = f"model.layers.{cfg.num_layers}."
        return {k: v.replace("model.layers.{i}.", base) for k, v in names.items()}, {
            "final_norm": base + "shared_head.norm.weight", "enorm": base + "enorm.weight",
            "hnorm": base + "hnorm.weight", "eh_proj": base + "eh_proj.weight"}
    prefix = next((p for p in ("mtp.", "model.mtp.", "model.language_model.mtp.") if p + "fc.weight" in shard_of),
                  "mtp.")
    return {k: v.replace("model.layers.{i}.", prefix + "layers.0.") for k, v in names.items()}, {
        "final_norm": prefix + "norm.weight", "enorm": prefix + "pre_fc_norm_embedding.weight",
        "hnorm": prefix + "pre_fc_norm_hidden.weight", "eh_proj": prefix + "fc.weight"}

"""Tensor parallelism inside one replica: how weights and KV pages lie on a 1-D device mesh ("tp").

XLA's SPMD partitioner does the rest: attention heads and the MLP intermediate dimension are split,
the vocabulary of the embedding / LM head too, and XLA inserts the all-reduces after the attention
output and MLP down projections. Attention itself runs per shard under `shard_map` (heads are
independent), so each device reads only its own KV heads.

Head counts: query heads must divide by N. KV heads that N does not divide are replicated the way
vLLM does when N is a multiple of them: each KV head is repeated N / num_kv_heads times (weights
duplicated, so the model is mathematically unchanged) and every device holds one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import gated_delta, quant
from models.config import LlamaConfig

AXIS = "tp"


class ShardingError(ValueError):
    """No tensor-parallel layout exists for this model at this degree."""


def make_mesh(num_devices: int) -> Mesh:
    devices = jax.devices()
    if num_devices > len(devices):
        raise ShardingError(f"parallel.tensor={num_devices} but only {len(devices)} {jax.default_backend()} devices are visible")
    return Mesh(np.asarray(devices[:num_devices]), (AXIS,))


def prepare_for_tensor_parallel(cfg: LlamaConfig, params: dict, n: int,
                                experts: bool = False) -> tuple[LlamaConfig, dict]:
    """Checks divisibility and replicates KV heads if needed; returns the (config, params) to shard. `experts`
    (parallel.expert): a model's experts lie whole on the devices, E / N each (LlamaConfig.expert_parallel)."""
    if n == 1:
        return cfg, params
    if cfg.num_heads % n:
        raise ShardingError(f"num_heads={cfg.num_heads} is not divisible by parallel.tensor={n}: no layout splits the heads evenly")
    sizes = ("mlp_intermediate_size", "moe_intermediate_size") + (("intermediate_size",) if cfg.mixed_mlp else ())
    if experts and cfg.num_experts:
        if cfg.num_experts % n:
            raise ShardingError(f"num_experts={cfg.num_experts} is not divisible by parallel.tensor={n}: expert "
                                "parallelism (parallel.expert) puts the same number of whole experts on each device")
        cfg = dataclasses.replace(cfg, expert_parallel=True)
        sizes = tuple(name for name in sizes if name != "moe_intermediate_size")
    for name in sizes:  # the dense MLP (or shared expert), each expert, the dense layers' MLP among expert layers
        if getattr(cfg, name) % n:
            raise ShardingError(f"{name.removeprefix('mlp_')}={getattr(cfg, name)} is not divisible by parallel.tensor={n}")
    if cfg.linear_layers:
        params = _prepare_linear_layers(cfg, params, n)
    if cfg.num_kv_heads % n == 0:
        return cfg, params
    if n % cfg.num_kv_heads or cfg.num_heads % n:
        raise ShardingError(
            f"num_kv_heads={cfg.num_kv_heads} neither divides nor is divided by parallel.tensor={n}: no layout keeps each "
            "query head with its KV head on one device"
        )
    layers = dict(params["layers"])
    # with quantized weights (an FP8 checkpoint's kept as stored, int8, int4; models/quant.py), their scales (a
    # column's, a block's, a group's) and int4's offsets
    # (and a k norm over the whole projection, OLMo 2's: the mean square over repeated heads is the same)
    for name in ("wk", "wv", "bk", "bv") + (("k_norm",) if cfg.qk_norm_whole else ()) + tuple(
            w + s for w in ("wk", "wv") for s in (
            quant.SCALE_SUFFIX, quant.BLOCK_SCALE_SUFFIX, quant.OFFSET_SUFFIX)):
        if name in layers:
            if layers[name].shape[-1] % cfg.num_kv_heads:
                raise ShardingError(f"{name}: the FP8 checkpoint's blocks of {name.split('_')[0]} span two KV heads, "
                                    f"which parallel.tensor={n} repeats; serve it with model.quantization: w8a8_fp8 "
                                    "(a scale per output feature)")
            layers[name] = _repeat_kv_heads(layers[name], cfg, n)
    return dataclasses.replace(cfg, num_kv_heads=n), {**params, "layers": layers}


def _prepare_linear_layers(cfg: LlamaConfig, params: dict, n: int) -> dict:
    """Linear attention layers (models/gated_delta.py) split by head: each device takes whole key heads (Mamba-2: B/C
    groups) and the value heads they serve. The convolution's channels [q | k | v] (Mamba-2: [x | B | C]) are
    reordered device-major, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so that each device's contiguous share of them is a
    whole layer of its own heads in the same order (the recurrent states' conv channels follow). LFM2's short
    convolution layers split by channel: the projection's [B | C | x] reordered alike, [B_0 C_0 x_0 | ...], each
    device convolving its own channels of B x (the convolution and the states split as they are) and projecting
    them out (row-parallel, an all-reduce after)."""
    layers = params["layers"]
    if cfg.linear_kind == "short_conv":
        h = cfg.hidden_size
        if h % n:
            raise ShardingError(f"hidden_size={h} is not divisible by parallel.tensor={n}: LFM2's short convolution "
                                "layers split their channels evenly")
        order = np.concatenate([part * h + d * (h // n) + np.arange(h // n) for d in range(n) for part in range(3)])
        if "gdn_qkv" not in layers:
            return params
        return {**params, "layers": {**layers, "gdn_qkv": np.take(np.asarray(layers["gdn_qkv"]), order, axis=-1)}}
    for name in ("linear_num_key_heads", "linear_num_value_heads"):
        if getattr(cfg, name) % n:
            raise ShardingError(f"{name}={getattr(cfg, name)} is not divisible by parallel.tensor={n}: no layout splits "
                                "the linear attention layers' heads evenly")
    if "gdn_qkv" not in layers:
        return params
    widths = gated_delta.conv_sections(cfg)
    order = np.concatenate([start + d * (width // n) + np.arange(width // n) for d in range(n)
                            for start, width in zip(np.cumsum((0,) + widths[:-1]), widths)])
    moved = {name: np.take(np.asarray(layers[name]), order, axis=-1)
             for name in ("gdn_qkv", "gdn_conv", "gdn_conv_bias") if name in layers}
    return {**params, "layers": {**layers, **moved}}


def linear_layer_specs(cfg: LlamaConfig) -> dict[str, P]:
    """PartitionSpec of one linear attention layer's weights (no leading layer axis): the convolution's channels
    (device-major, `_prepare_linear_layers`), z, the per-head gates and biases split by head (KDA's per channel: by
    head too); the output projection by its inputs (an all-reduce after); the norm's weight split with its groups
    (Mamba-2) or, one per head_dim, whole."""
    col, per_head = P(None, AXIS), P(AXIS)
    return {"gdn_qkv": col, "gdn_conv": col, "gdn_conv_bias": per_head, "gdn_z": col, "gdn_a": col, "gdn_b": col,
            "gdn_dt_bias": per_head, "gdn_a_log": per_head, "gdn_d": per_head, "gdn_out": P(AXIS, None),
            "gdn_norm": per_head if cfg.linear_kind == "mamba2" else P(),
            # KDA's low-rank pairs: the first half whole on every device, the second split by head
            "gdn_fa": P(), "gdn_fb": col, "gdn_ga": P(), "gdn_gb": col}


def state_specs() -> gated_delta.States:
    """The recurrent states split like the heads: conv [Lg, N, K - 1, conv_dim] by channel, ssm [Lg, N, Hv, Dk, Dv]
    by value head."""
    return gated_delta.States(conv=P(None, None, None, AXIS), ssm=P(None, None, AXIS, None, None))


def _repeat_kv_heads(w, cfg: LlamaConfig, n: int) -> np.ndarray:
    """[..., Hkv * W] -> [..., n * W]: each KV head's W columns (its head_dim, or its blocks' scales) repeated in
    place, n // Hkv times (n devices, fewer KV heads)."""
    w = np.asarray(w)
    heads = w.reshape(*w.shape[:-1], cfg.num_kv_heads, 1, w.shape[-1] // cfg.num_kv_heads)
    return np.broadcast_to(heads, (*heads.shape[:-2], n // cfg.num_kv_heads, heads.shape[-1])).reshape(
        *w.shape[:-1], -1)


def prepare_lora_for_tensor_parallel(cfg: LlamaConfig, adapters: list[dict], n: int) -> list[dict]:
    """LoRA adapters loaded for the original `cfg` (models.lora.load_peft_adapter) -> the layout of the prepared
    config: the K and V projections' B matrices get the same repeated KV heads as the weights."""
    if n == 1 or cfg.num_kv_heads % n == 0:
        return adapters
    return [{name: (a, _repeat_kv_heads(b, cfg, n) if name in ("wk", "wv") else b) for name, (a, b) in adapter.items()}
            for adapter in adapters]


def shard_lora(lora: dict, mesh: Mesh) -> dict:
    """Stacked adapters (models.lora.stack_adapters) sharded like the projections they adapt: for a column-parallel
    projection B is split by output features (A replicated); for a row-parallel one A by input features (the experts'
    alike, each expert's gate / up split by output features and down by input, as their weights)."""
    row_parallel = {"wo", "w_down", "moe_down"}
    out = {}
    for name, w in lora.items():
        lead = (None,) * (w["a"].ndim - 2)  # [L, N] or [L, N, E]
        a_spec = P(*lead, AXIS, None) if name in row_parallel else P()
        b_spec = P() if name in row_parallel else P(*lead, None, AXIS)
        out[name] = {"a": jax.device_put(w["a"], NamedSharding(mesh, a_spec)),
                     "b": jax.device_put(w["b"], NamedSharding(mesh, b_spec))}
    return out


# Projections [L, in, out] split by output features (column-parallel) or by input features (row-parallel: each device
# sums its inputs' share, then an all-reduce); the others are replicated. Latent attention: the query and latent-up
# projections split by head; the latent (and its RoPE key), shared by every head, is computed on every device into its
# own copy of the cache (wq_a, wkv_a replicated).
COLUMN_PARALLEL = ("wq", "wk", "wv", "w_gate", "w_up", "dense_gate", "dense_up", "wq_b", "wkv_b")
ROW_PARALLEL = ("wo", "w_down", "dense_down")


def param_specs(cfg: LlamaConfig, params: dict, n: int) -> dict:
    """PartitionSpec per weight (layers stacked on axis 0)."""
    vocab = AXIS if cfg.vocab_size % n == 0 else None
    col, row = P(None, None, AXIS), P(None, AXIS, None)  # split output features / input features
    layer_specs = {
        "attn_norm": P(), "mlp_norm": P(), "post_attn_norm": P(), "post_mlp_norm": P(),
        # per head_dim, shared by every head: replicated; over a whole projection (OLMo 2): split with its heads (XLA
        # sums the mean square across devices)
        **dict.fromkeys(("q_norm", "k_norm"), P(None, AXIS) if cfg.qk_norm_whole else P()),
        **dict.fromkeys(COLUMN_PARALLEL, col), **dict.fromkeys(ROW_PARALLEL, row),
        "bq": P(None, AXIS), "bk": P(None, AXIS), "bv": P(None, AXIS),
        # Experts [L, E, in, out]: every expert split by its intermediate features, like the dense MLP.
        "router": P(), "shared_gate": P(), "router_score_bias": P(),
        # experts in a latent space: the projections there and back run whole on every device (as the router does)
        "latent_down": P(), "latent_up": P(),
        "xielu_alpha_p": P(), "xielu_alpha_n": P(), "xielu_beta": P(), "xielu_eps": P(),
        "wq_a": P(), "q_a_norm": P(), "wkv_a": P(), "kv_a_norm": P(),
        # sparse attention's indexer: run whole on every device, as the latent is (it picks for all heads)
        **dict.fromkeys(("index_wq", "index_wk", "index_k_norm", "index_k_norm_bias", "index_weights"), P()),
        "moe_gate": P(None, None, None, AXIS), "moe_up": P(None, None, None, AXIS), "moe_down": P(None, None, AXIS, None),
        # gpt-oss: the output projection's and the experts' down biases are added after the all-reduce (replicated);
        # gate / up biases split with their outputs; a sink per query head, with its head.
        "bo": P(), "sinks": P(None, AXIS), "router_bias": P(), "moe_gate_bias": P(None, None, AXIS),
        "moe_up_bias": P(None, None, AXIS), "moe_down_bias": P(),
        **{name: P(None, *spec) for name, spec in linear_layer_specs(cfg).items()},  # stacked over linear layers
    }
    # Under expert parallelism (whole experts, E / N a device) every per-expert array [L, E, ...] is split by its
    # expert, whatever its format: the experts' own specs below are for experts split by their features.
    experts = () if cfg.expert_parallel else quant.EXPERTS
    for name in quant.PROJECTIONS:  # int8 weights' scales [L, out]: split with a column-parallel weight's outputs
        layer_specs[name + quant.SCALE_SUFFIX] = P(None, AXIS) if layer_specs[name] == col else P()
    for name in experts:  # int8 experts' scales [L, E, out]: split with gate's and up's intermediate features
        layer_specs[name + quant.SCALE_SUFFIX] = P() if name == "moe_down" else P(None, None, AXIS)
    for name in quant.PROJECTIONS + experts:  # 4-bit weights' per-group arrays [L, (E,) in / group, out]: int4's
        # scales and offsets, mxfp4's exponents; split along with the weight's inputs or outputs, like the weight
        mx = name + quant.EXPONENT_SUFFIX in params["layers"]
        if name + quant.OFFSET_SUFFIX in params["layers"] or mx:
            groups = params["layers"][name + (quant.EXPONENT_SUFFIX if mx else quant.SCALE_SUFFIX)].shape[-2]
            if layer_specs[name][-2] == AXIS and groups % n:
                raise ShardingError(
                    f"{name}'s {groups} {'MXFP4' if mx else 'int4'} groups do not split over parallel.tensor={n}: "
                    + ("each device needs whole groups of 32 inputs" if mx
                       else "take a model.quantization_group_size that leaves a multiple of it (a checkpoint's own "
                            "int4 groups: fewer devices, or model.quantization: none to dequantize them)"))
            for suffix in ((quant.EXPONENT_SUFFIX,) if mx else (quant.SCALE_SUFFIX, quant.OFFSET_SUFFIX)):
                layer_specs[name + suffix] = layer_specs[name]
    for name in quant.PROJECTIONS + experts:  # an FP8 checkpoint's block scales [L, (E,) in / b, out / b]
        scales = params["layers"].get(name + quant.BLOCK_SCALE_SUFFIX)
        if scales is not None:
            axis = layer_specs[name].index(AXIS) if AXIS in layer_specs[name] else None
            if axis is not None and scales.shape[axis] % n:
                side = "inputs" if axis == scales.ndim - 2 else "outputs"
                raise ShardingError(f"{name}'s {scales.shape[axis]} FP8 blocks of {side} do not split over "
                                    f"parallel.tensor={n}: each device needs whole blocks")
            layer_specs[name + quant.BLOCK_SCALE_SUFFIX] = layer_specs[name]
    if cfg.expert_parallel:
        layer_specs |= {k: P(None, AXIS) for k in params["layers"] if k.startswith("moe_")}
    specs = {"layers": {k: layer_specs[k] for k in params["layers"]}}
    # (an MTP layer's weights have no embedding; its own vectors and input projection are replicated)
    specs |= {k: P() for k in params if k not in ("layers", "embed", "lm_head")}
    if "embed" in params:
        specs["embed"] = P(vocab, None)
    if "lm_head" in params:
        specs["lm_head"] = P(None, vocab)
    for name in ("embed", "lm_head"):  # int8 embeddings / head: a scale per vocabulary entry, split like them
        if name + quant.SCALE_SUFFIX in params:
            specs[name + quant.SCALE_SUFFIX] = P(vocab)
    return specs


def shard_params(cfg: LlamaConfig, params: dict, mesh: Mesh) -> dict:
    specs = param_specs(cfg, params, mesh.size)
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)


def kv_spec(ndim: int = 5) -> P:
    """A cache array split by KV head: pages [L, Hkv, P, ps, D] (ndim 5), an 8-bit cache's scales [L, Hkv, P, ps] (4)."""
    return P(None, AXIS, *[None] * (ndim - 2))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def array_bytes(a) -> int:
    """Bytes `a` takes in device memory: 4-bit types (int4 weights) are packed two to a byte, which `nbytes` (one
    byte per element for them) does not count."""
    packed = np.dtype(a.dtype) in (np.dtype(jnp.int4), np.dtype(jnp.uint4))
    return -(-a.size // 2) if packed else a.nbytes


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes of every array in `tree` held by each device, read from the arrays' own shards."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[str(shard.device)] = out.get(str(shard.device), 0) + array_bytes(shard.data)
    return out

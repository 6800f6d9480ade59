"""Mixture-of-experts MLP layers (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss, GLM-4.5, DeepSeek-V3): a router picks each
token's top-k experts.

Weights of one layer (leaves of the stacked layer pytree, [L] first there):
  router [H, E]; moe_gate, moe_up [E, H, I]; moe_down [E, I, H] (I: one expert's intermediate size);
  a shared expert every token goes through (Qwen2-MoE, GLM-4.5, DeepSeek): the dense MLP's w_gate / w_up / w_down,
  Qwen2-MoE's scaled per token by sigmoid(x @ shared_gate), shared_gate [H, 1]; gpt-oss's biases
  (`LlamaConfig.moe_bias`): router_bias [E], moe_gate_bias, moe_up_bias [E, I], moe_down_bias [E, H]; DeepSeek-V3's
  and GLM-4.5's router_score_bias [E] (their `e_score_correction_bias`: `route`).

Two ways to run a layer, the same results (tested against each other and float64 numpy on fresh random input):
  - `grouped_moe`: the (token, expert) pairs sorted by expert, each projection one grouped matmul over the experts'
    row groups (`jax.lax.ragged_dot`): a token costs its k experts, not all E. XLA runs ragged_dot natively on GPUs
    and TPUs; on the CPU jax lowers it to a dense masked matmul over every group and every pair (E x k times the
    work);
  - `dense_moe` runs every expert on every token and weights them by a dense [T, E] routing matrix (E times the
    work, in plain matmuls): the CPU's path.
The engine picks (`model.moe_backend`): grouped on accelerators, dense on the CPU. Which pays on a GPU at which batch is
measured by scripts/moe_bench.py (scripts/gpu_check.sh runs it), not yet on record.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from models import quant
from pallas_kernels import fp8_matmul
from models.quant import SCALE_SUFFIX, packed_weight

MOE_KEYS = ("router", "moe_gate", "moe_up", "moe_down")
MOE_BIAS_KEYS = ("router_bias", "moe_gate_bias", "moe_up_bias", "moe_down_bias")
# Experts in a latent space (Nemotron 3 Super's LatentMoE, LlamaConfig.moe_latent_size): the layer's input projected
# down to it before them [H, latent], their weighted sum back up after [latent, H]; the router reads the input itself.
LATENT_KEYS = ("latent_down", "latent_up")
SHARED_GATE = "shared_gate"
SCORE_BIAS = "router_score_bias"
SCORINGS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a router's logits become each token's experts and their weights (`route`)."""

    top_k: int
    norm_topk_prob: bool = True  # the k weights renormalized to sum to 1
    scoring: str = "softmax"  # "softmax" over the experts, or an independent "sigmoid" per expert (DeepSeek-V3, GLM-4.5)
    # Group-limited routing (DeepSeek's n_group / topk_group): the experts fall in `groups` equal groups, each group is
    # ranked by the sum of its `group_top` best scores, and a token's k experts come from its `groups_per_tok` best
    # groups.
    groups: int = 1
    groups_per_tok: int = 1
    scaling: float = 1.0  # the weights multiplied by this after any renormalization (routed_scaling_factor)
    group_top: int = 2  # a group's score: the sum of its best this many scores (DeepSeek-V2: 1, its best)
    # The weight multiplies the expert's input (Llama 4: expert(w x)) instead of its output. With a gated MLP and no
    # biases that is w down(act(w gate) up): the experts run on x with the gate's pre-activation scaled by w and the
    # output weighted by w as usual (`_grouped_experts`, `_dense_experts`).
    scales_input: bool = False

# The gated activation: (gate projection, up projection) -> the down projection's input (models.llama.gated_activation).
Glu = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ExpertLora:
    """One layer's LoRA adapters of its experts: weights {projection: {"a": [N, E, in, R], "b": [N, E, R, out]}}
    (models.lora.stack_adapters) and each token's adapter, onehot [T, N] (none: all zeros)."""
    weights: dict
    onehot: jax.Array

    def token_adapters(self) -> jax.Array:
        """[T] each token's adapter, 1..N (0: none)."""
        n = self.onehot.shape[1]
        return jnp.sum(self.onehot.astype(jnp.int32) * jnp.arange(1, n + 1, dtype=jnp.int32)[None, :], axis=1)


@dataclasses.dataclass(frozen=True)
class LoraGroups:
    """The (token, expert) pairs of a layer regrouped by (adapter, expert), for the experts' LoRA products: `order`
    [P] the pairs' rows (as the expert grouping sorted them) in that grouping's order, `sizes` [N x E] the rows of each
    (adapter, expert) group (adapter-major), `adapted` [P] whether the row at each place of `order` has an adapter (the
    base model's rows sort last, in no group)."""
    order: jax.Array
    sizes: jax.Array
    adapted: jax.Array


def lora_groups(row_adapter: jax.Array, row_expert: jax.Array, num_adapters: int, num_experts: int) -> LoraGroups:
    """row_adapter [P] (each row's token's adapter, 0: none), row_expert [P] (each row's expert; rows past the experts
    included, as any) -> LoraGroups."""
    group = jnp.where(row_adapter > 0, (row_adapter - 1) * num_experts + row_expert, num_adapters * num_experts)
    order = jnp.argsort(group)  # stable
    sizes = jnp.bincount(group, length=num_adapters * num_experts).astype(jnp.int32)  # (the base model's not counted)
    return LoraGroups(order, sizes, group[order] < num_adapters * num_experts)


def expert_delta_grouped(rows: jnp.ndarray, weights: dict, groups: LoraGroups) -> jnp.ndarray:
    """rows [P, in] (the pairs' inputs), weights {"a": [N, E, in, R], "b": [N, E, R, out]} (one layer) -> [P, out]:
    each row through its expert's A and B of its token's adapter, as two grouped matmuls over the rows regrouped by
    (adapter, expert): each group reads its own A and B alone, so a step reads only the pairs' adapters of the pairs'
    experts, and a row costs one adapter's rank, whatever the number of adapters; the base model's rows get 0."""
    a, b = weights["a"], weights["b"]
    n, e, d_in, r = a.shape
    xa = jax.lax.ragged_dot(rows[groups.order], a.reshape(n * e, d_in, r), groups.sizes)  # [P, R]
    y = jax.lax.ragged_dot(xa, b.reshape(n * e, r, b.shape[-1]), groups.sizes)  # [P, out]
    y = jnp.where(groups.adapted[:, None], y, 0)  # rows past the groups: whatever the matmul left there
    return jnp.zeros_like(y).at[groups.order].set(y)


def expert_delta_dense(x: jnp.ndarray, weights: dict, onehot: jnp.ndarray) -> jnp.ndarray:
    """x [T, in] (every expert's input) or [T, E, in] (each expert's own), weights {"a": [N, E, in, R], "b":
    [N, E, R, out]}, onehot [T, N] -> [T, E, out]: every token through every expert's A and B of its adapter."""
    xa = jnp.einsum("ti,neir->tner" if x.ndim == 2 else "tei,neir->tner", x, weights["a"])
    xa = xa * onehot[:, :, None, None].astype(xa.dtype)
    return jnp.einsum("tner,nero->teo", xa, weights["b"])


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """Llama's, Mixtral's and Qwen's gated activation."""
    return jax.nn.silu(gate) * up


def route(h: jax.Array, p: dict, routing: Routing) -> tuple[jax.Array, jax.Array]:
    """(weights [T, k] float32, experts [T, k] int32) from one layer's router weights in `p`: the router's logits in
    float32 (plus `router_bias`, gpt-oss's), scored by softmax or sigmoid; the k best scores (plus `router_score_bias`
    where there is one: it chooses experts, it does not weigh them) among the best groups' experts, weighted by their
    scores, renormalized to sum to 1 when `norm_topk_prob` (Mixtral's and gpt-oss's softmax over the top-k logits is
    the same thing), times `scaling`."""
    logits = jnp.dot(h.astype(jnp.float32), p["router"].astype(jnp.float32))
    if "router_bias" in p:
        logits = logits + p["router_bias"].astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if routing.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if SCORE_BIAS not in p else scores + p[SCORE_BIAS].astype(jnp.float32)
    if routing.groups > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.reshape(num_tokens, routing.groups, num_experts // routing.groups)
        group_scores = jnp.sum(jax.lax.top_k(grouped, min(routing.group_top, grouped.shape[-1]))[0], axis=-1)
        _, best = jax.lax.top_k(group_scores, routing.groups_per_tok)
        keep = jnp.zeros(group_scores.shape, bool).at[jnp.arange(num_tokens)[:, None], best].set(True)
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(num_tokens, num_experts)
    if SCORE_BIAS in p or routing.groups > 1:
        _, experts = jax.lax.top_k(choice, routing.top_k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
    else:
        weights, experts = jax.lax.top_k(scores, routing.top_k)
    if routing.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + (1e-20 if routing.scoring == "sigmoid" else 0))
    return weights * routing.scaling, experts.astype(jnp.int32)


def _experts_matmul(matmul: Callable, x: jax.Array, p: dict, name: str, scales: Callable = lambda s: s,
                    quantized_activations: bool = False) -> jax.Array:
    """matmul(x, w) with expert weights `name`. 8-bit experts (int8, e4m3; models/quant.py) are converted for the
    matmul and its float32 output scaled by `scales(<name>_scale)`, each output's expert and feature scale; with
    `quantized_activations` each row of x is quantized to their type instead (a scale per row, W8A8); 4-bit experts
    (int4, mxfp4) and FP8 blocks are dequantized into x's dtype."""
    w = packed_weight(p, name, x.dtype)
    if w is not None:
        return matmul(x, w)
    if name + SCALE_SUFFIX not in p:
        return matmul(x, p[name])
    w = p[name]
    if quantized_activations:
        xq, x_scale = quant.quantize_activations(x, w.dtype)
        y = matmul(xq, w, preferred_element_type=jnp.int32 if w.dtype == jnp.int8 else jnp.float32)
        # a row's scale against the output's rows: [T, 1] -> [T, 1, 1] where the output has an expert axis too
        y = y.astype(jnp.float32) * x_scale.reshape(x_scale.shape[:1] + (1,) * (y.ndim - x_scale.ndim)
                                                    + x_scale.shape[1:])
    else:
        y = matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scales(p[name + SCALE_SUFFIX])).astype(x.dtype)


def moe_mlp(h: jax.Array, p: dict, routing: Routing, glu: Glu, grouped: bool, quantized_activations: bool = False,
            quant_kernels: str = "none", mesh: jax.sharding.Mesh | None = None,
            expert_parallel: bool = False, lora: ExpertLora | None = None,
            router_in: jax.Array | None = None) -> jax.Array:
    """h [T, H] -> [T, H]: each token through its top-k experts, weighted by its routing weights
    (`quantized_activations`: 8-bit experts take 8-bit activations, W8A8; `quant_kernels`: 8-bit experts read by the
    Pallas grouped kernel on the grouped path, per device of `mesh`; LlamaConfig.quant_kernels; `expert_parallel`: the
    experts lie whole on the devices of `mesh`, E / N each: `expert_parallel_moe`; `lora`: LoRA adapters of the experts'
    projections, each token's own added; `router_in` [T, H']: what the router reads where it is not h, the experts'
    input (experts in a latent space: LATENT_KEYS))."""
    if expert_parallel and mesh is not None:
        if lora is not None:
            raise ValueError("LoRA adapters of the experts are not supported with parallel.expert")
        return expert_parallel_moe(h, p, routing, glu, grouped, quantized_activations, quant_kernels, mesh, router_in)
    weights, experts = route(h if router_in is None else router_in, p, routing)
    run = _grouped_experts if grouped else _dense_experts
    return run(h, p, weights, experts, glu, quantized_activations, quant_kernels, mesh, lora, routing.scales_input)


def expert_parallel_moe(h: jax.Array, p: dict, routing: Routing, glu: Glu, grouped: bool,
                        quantized_activations: bool = False, quant_kernels: str = "none",
                        mesh: jax.sharding.Mesh | None = None, router_in: jax.Array | None = None) -> jax.Array:
    """`moe_mlp` with the experts split whole over the devices of `mesh` (models.sharding: every per-expert array by
    its expert axis, E / N experts a device; the router replicated), as vLLM's and SGLang's expert parallelism lays
    them out. Every device holds every token (the attention's all-reduce left them replicated) and routes them alike;
    each runs the pairs whose expert it holds (the others weigh 0 and, on the grouped path, sort last, past every
    group), and an all-reduce sums the devices' outputs: the communication of the tensor-parallel MLP, whose
    all-reduce it replaces. What each device multiplies is its experts whole, not E slivers of I / N features."""
    from jax.sharding import PartitionSpec as P

    from models.sharding import AXIS

    names = [k for k in p if k.startswith("moe_") or k.startswith("router")]
    specs = {k: P(AXIS) if k.startswith("moe_") else P() for k in names}

    def per_device(h, router_in, w):
        weights, experts = route(router_in, w, routing)
        count = w["moe_down"].shape[0]  # this device's experts: global ids [first, first + count)
        local = experts - jax.lax.axis_index(AXIS) * count
        mine = (local >= 0) & (local < count)
        run = _grouped_experts if grouped else _dense_experts
        out = run(h, w, jnp.where(mine, weights, 0), jnp.where(mine, local, count), glu, quantized_activations,
                  quant_kernels, None, scales_input=routing.scales_input)
        return jax.lax.psum(out.astype(jnp.float32), AXIS).astype(h.dtype)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), specs), out_specs=P(), check_vma=False)(
        h, h if router_in is None else router_in, {k: p[k] for k in names})


def _grouped_kernel(x: jax.Array, p: dict, name: str, sizes: jax.Array, interpret: bool,
                    mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Rows grouped by expert @ 8-bit experts `name` (an FP8 checkpoint's blocks, or int8 / e4m3 with a scale per
    output feature) through pallas_kernels/fp8_matmul.py's grouped kernel. Under a tensor-parallel mesh per device
    under shard_map, as the experts are split: gate and up by their output features, down by its input features
    (float32 partial sums, all-reduced)."""
    blocks = name + quant.BLOCK_SCALE_SUFFIX in p
    values, scales = p[name], p[name + (quant.BLOCK_SCALE_SUFFIX if blocks else SCALE_SUFFIX)]

    def local(x, v, s, sizes, out_dtype=x.dtype):
        return fp8_matmul.grouped_scaled_matmul(x, v, s, sizes, interpret=interpret, out_dtype=out_dtype)

    if mesh is None:
        return local(x, values, scales, sizes)
    from jax.sharding import PartitionSpec as P

    from models.sharding import AXIS

    if name == "moe_down":
        def per_device(x, v, s, sizes):
            return jax.lax.psum(local(x, v, s, sizes, jnp.float32), AXIS).astype(x.dtype)

        scale_spec = P(None, AXIS, None) if blocks else P()  # a column's scale: down's outputs are not split
        specs, out = (P(None, AXIS), P(None, AXIS, None), scale_spec, P()), P()
    else:
        scale_spec = P(None, None, AXIS) if blocks else P(None, AXIS)
        per_device, specs, out = local, (P(), P(None, None, AXIS), scale_spec, P()), P(None, AXIS)
    return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)(x, values, scales, sizes)


def kernel_reads(p: dict, name: str, devices: int = 1) -> bool:
    """Whether the grouped kernel can read experts `name` split over `devices` (gate and up by outputs, down by
    inputs): 8-bit weights (int8, e4m3) with a scale per block or per output feature, each device's share in tiles
    the kernel takes and within its int32 offsets."""
    blocks = name + quant.BLOCK_SCALE_SUFFIX in p
    scales = p.get(name + (quant.BLOCK_SCALE_SUFFIX if blocks else SCALE_SUFFIX))
    if scales is None or name + quant.OFFSET_SUFFIX in p or p[name].dtype not in (jnp.int8, jnp.float8_e4m3fn):
        return False
    split = -2 if name == "moe_down" else -1
    shape, scale_shape = list(p[name].shape), list(scales.shape)
    shape[split] //= devices
    if blocks or split == -1:
        scale_shape[split] //= devices
    return fp8_matmul.grouped_tileable(tuple(shape), tuple(scale_shape)) and p[name].size // devices < 2**31


def _plus_bias(y: jax.Array, p: dict, name: str, rows: Callable) -> jax.Array:
    """y plus expert projection `name`'s bias (`rows(bias)`: each row's, broadcast against y), where it has one."""
    bias = p.get(name + "_bias")
    return y if bias is None else y + rows(bias).astype(y.dtype)


def grouped_moe(h: jax.Array, p: dict, routing: Routing, glu: Glu, quantized_activations: bool = False,
                quant_kernels: str = "none", mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """`moe_mlp` as grouped matmuls over the (token, expert) pairs sorted by expert."""
    weights, experts = route(h, p, routing)
    return _grouped_experts(h, p, weights, experts, glu, quantized_activations, quant_kernels, mesh,
                            scales_input=routing.scales_input)


def dense_moe(h: jax.Array, p: dict, routing: Routing, glu: Glu, quantized_activations: bool = False) -> jax.Array:
    """`moe_mlp` with every expert on every token, weighted by a dense [T, E] routing matrix (zero off the top k)."""
    weights, experts = route(h, p, routing)
    return _dense_experts(h, p, weights, experts, glu, quantized_activations, scales_input=routing.scales_input)


def _grouped_experts(h: jax.Array, p: dict, weights: jax.Array, experts: jax.Array, glu: Glu,
                     quantized_activations: bool = False, quant_kernels: str = "none",
                     mesh: jax.sharding.Mesh | None = None, lora: ExpertLora | None = None,
                     scales_input: bool = False) -> jax.Array:
    """Each token's picks `experts` [T, k] (ids of the experts in `p`; an id past them: a pair run elsewhere, whose
    rows sort last, past every group, and come back 0) weighted by `weights` [T, k], as grouped matmuls over the
    pairs sorted by expert (plus each pair's token's LoRA adapter of its expert, `lora`); `scales_input`: the weight
    scales each pair's gate pre-activation too (Routing.scales_input)."""
    num_tokens, top_k = experts.shape
    num_experts = p["moe_down"].shape[0]
    flat = experts.reshape(-1)  # [T * k]: pair j is token j // k
    order = jnp.argsort(flat)  # stable: a group's rows keep token order
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # (ids past the experts not counted)
    rows = h[order // top_k]  # [T * k, H], grouped by expert
    expert_of_row = flat[order]
    held = expert_of_row < num_experts
    expert_of_row = jnp.minimum(expert_of_row, num_experts - 1)

    def grouped(x, w, **kw):
        return jax.lax.ragged_dot(x, w, sizes, **kw)

    def row_scales(s):  # each row's expert's scales (or biases)
        return s[expert_of_row]

    if lora is not None:  # the pairs regrouped by (adapter, expert) once, for every adapted projection
        groups = lora_groups(lora.token_adapters()[order // top_k], expert_of_row, lora.onehot.shape[1], num_experts)

    def project(x, name):
        if (quant_kernels != "none" and not quantized_activations
                and kernel_reads(p, name, mesh.size if mesh is not None else 1)):
            y = _grouped_kernel(x, p, name, sizes, quant_kernels == "pallas_interpret", mesh)
        else:
            y = _experts_matmul(grouped, x, p, name, row_scales, quantized_activations)
        if lora is not None and name in lora.weights:
            y = y + expert_delta_grouped(x, lora.weights[name], groups).astype(y.dtype)
        return _plus_bias(y, p, name, row_scales)

    gate = project(rows, "moe_gate") if "moe_gate" in p else None  # (an ungated expert: glu reads up alone)
    if scales_input:
        gate = gate * weights.reshape(-1)[order][:, None].astype(gate.dtype)
    out = project(glu(gate, project(rows, "moe_up")), "moe_down")  # [T * k, H]
    out = jnp.where(held[:, None], out, 0)  # rows past the groups: whatever the matmul left there
    out = jnp.zeros_like(out).at[order].set(out).reshape(num_tokens, top_k, -1)
    return jnp.einsum("tk,tkh->th", weights.astype(out.dtype), out)


def _dense_experts(h: jax.Array, p: dict, weights: jax.Array, experts: jax.Array, glu: Glu,
                   quantized_activations: bool = False, quant_kernels: str = "none",
                   mesh: jax.sharding.Mesh | None = None, lora: ExpertLora | None = None,
                   scales_input: bool = False) -> jax.Array:
    """Each token's picks `experts` [T, k] weighted by `weights` [T, k] with every expert of `p` on every token and a
    dense [T, E] routing matrix (zero off the picks; an id past the experts: a pair run elsewhere, dropped); `lora`:
    each token's adapter of every expert added; `scales_input`: as `_grouped_experts`'. (`quant_kernels` and `mesh`:
    the grouped path's, unused here.)"""
    num_experts = p["moe_down"].shape[0]
    dense = jnp.zeros((h.shape[0], num_experts), jnp.float32)
    dense = dense.at[jnp.arange(h.shape[0])[:, None], experts].add(weights, mode="drop")  # a token's picks differ
    every = functools.partial(jnp.einsum, "th,ehi->tei")

    def per_expert(b):  # [E, out] -> [1, E, out]: every token's row of each expert
        return b[None]

    def adapted(y, x, name):
        if lora is None or name not in lora.weights:
            return y
        return y + expert_delta_dense(x, lora.weights[name], lora.onehot).astype(y.dtype)

    gate, up = (_plus_bias(adapted(_experts_matmul(every, h, p, name, quantized_activations=quantized_activations),
                                   h, name), p, name, per_expert) if name in p else None
                for name in ("moe_gate", "moe_up"))  # (an ungated expert: no gate; glu reads up alone)
    if scales_input:
        gate = gate * dense[:, :, None].astype(gate.dtype)
    down_in = glu(gate, up)
    out = _experts_matmul(functools.partial(jnp.einsum, "tei,eih->teh"), down_in, p, "moe_down",
                          quantized_activations=quantized_activations)
    out = _plus_bias(adapted(out, down_in, "moe_down"), p, "moe_down", per_expert)
    return jnp.einsum("te,teh->th", dense.astype(out.dtype), out)

"""Qwen2-VL's, Qwen2.5-VL's, Qwen3.5's and Qwen3-VL's image encoders: a ViT over an image's own grid of patches, with
2D rotary positions, and the patch merger, as pure functions over a pytree of weights. It owns the encoder's config
(read from a `qwen2_vl`, `qwen2_5_vl`, `qwen3_5`, `qwen3_5_moe`, `qwen3_vl` or `qwen3_vl_moe` config.json), its
weights (shapes, random init, reading an HF checkpoint) and `encode`: an image's inputs in (models/qwen_patches.py: its
patches padded to a bucket, their grid coordinates, windows and position taps, by name), the rows that replace the
image's placeholder tokens in the language model's input embeddings out (Qwen3-VL: and its DeepStack features).
Preprocessing (smart resize, patchify: engine/qwen_images.py) and splicing the rows into the prompt (with M-RoPE
positions) are the caller's.

An image of grid (1, grid_h, grid_w) arrives as grid_h * grid_w patches of patch_dim = C * T * P * P pixels (a still
image repeated T = temporal_patch_size times), in the processor's block-major order: the merge x merge blocks
row-major over the grid, each block's patches row-major. So the merger's groups are merge**2 consecutive rows, and an
image gives grid_h * grid_w // merge**2 rows out. The patch conv (stride == kernel) is a matmul over a patch.

Each layer: x + attn(norm1(x)), then x + mlp(norm2(x)); q and k rotated by the patch's (h, w) grid coordinates
(head_dim / 4 frequencies each, theta 10000, rotate-half). Qwen2-VL: LayerNorm, fc1 -> act -> fc2, every layer
attends over the whole image. Qwen2.5-VL: RMSNorm, gated MLP, and the layers not in fullatt_block_indexes attend
within windows of window_size pixels (whole merge blocks). Rows stay in the processor's order throughout: a windowed
layer gathers its q, k, v into one block of `window_rows` rows per window (`qwen_patches.window_blocks`, on the host;
a partial window's block padded and its padding masked), attends within each block and scatters the rows back (HF
permutes the patches into window order instead; attention is permutation-equivariant and a window is a set of whole
merge blocks, so the two agree). A full layer attends over the whole image in blocks of FULL_BLOCK queries. So memory
grows as N x FULL_BLOCK and N x window_rows, never N x N: Qwen2.5-VL's windows hold 64 patches, the max_pixels of its
published checkpoints 65,536 patches.

Qwen3.5 (`qwen3_5`; the dense and the MoE models have the same tower): Qwen2-VL's layers (LayerNorm, fc1 -> act ->
fc2, here gelu-tanh; every layer full) and merger, plus a bias on the patch conv and a learned position table of
side x side rows (side = sqrt(num_position_embeddings), 48 by default) added to the patch embeddings, resampled to
each image's grid: bilinear, corners on corners (align_corners), taps past the edge clamped to it. The resampling
depends on the grid only, so the host gives each patch its 4 rows of the table and their weights
(`qwen_patches.position_taps`, HF's get_vision_interpolation_indices_and_weights) and `encode` sums the 4 rows gathered.

Qwen3-VL (`qwen3_vl`; the dense and the MoE models have the same tower): Qwen3.5's tower plus DeepStack. The layers
named by deepstack_visual_indexes (`deepstack_layers`, strictly increasing) each hand their output (the hidden states
after that layer's block) to a merger of their own (`deepstack_merger_list.{j}`), whose LayerNorm normalizes each
merged row of merge_unit * hidden after the 2 x 2 shuffle (HF's use_postshuffle_norm), not each patch. The language
model adds deepstack feature j to the image's token rows after its decoder layer j, so `encode` returns, per output
row, the main merger's row and then each deepstack merger's, side by side (`encode`'s docstring). The scan over layers
carries the deepstack layers' outputs, [deepstack_count, N, hidden]; the mergers run after it.

Layouts: activations [N, hidden] for one image's N patches, N padded to a bucket (padding rows: valid False, no
query reads them; their own values are finite and dropped); weights oriented for x @ W, layers stacked on axis 0.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.errors import ConfigError
from models.gguf_loader import CheckpointError
from models.safetensors_loader import opened_shards
from models.vision import ACTIVATIONS as _VIT_ACTIVATIONS

ACTIVATIONS = {**_VIT_ACTIVATIONS, "silu": jax.nn.silu}
NORM_EPS = 1e-6  # every norm of every tower, the merger's included
# model_type -> kind (Qwen3.5's and Qwen3-VL's MoE models have the dense ones' towers)
KINDS = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_5": "qwen3_5", "qwen3_5_moe": "qwen3_5",
         "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"}
LEARNED_POSITIONS = ("qwen3_5", "qwen3_vl")  # the kinds with a patch conv bias and a learned position table
# kind -> (the vision_config class's defaults for fields a config.json leaves out)
_FIELDS = ("depth", "num_heads", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "hidden_act")
DEFAULTS = {
    "qwen2_vl": dict(zip(_FIELDS, (32, 16, 3, 14, 2, 2, "quick_gelu")), embed_dim=1280, mlp_ratio=4, hidden_size=3584),
    "qwen2_5_vl": dict(zip(_FIELDS, (32, 16, 3, 14, 2, 2, "silu")), hidden_size=3584, intermediate_size=3420,
                       out_hidden_size=3584, window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
    "qwen3_5": dict(zip(_FIELDS, (27, 16, 3, 16, 2, 2, "gelu_pytorch_tanh")), hidden_size=1152, intermediate_size=4304,
                    out_hidden_size=3584, num_position_embeddings=2304),
}
DEFAULTS["qwen3_vl"] = DEFAULTS["qwen3_5"] | {"deepstack_visual_indexes": (8, 16, 24)}
TOKEN_DEFAULTS = {  # the top-level config classes'
    "qwen2_vl": {"image_token_id": 151655, "vision_start_token_id": 151652},
    "qwen2_5_vl": {"image_token_id": 151655, "vision_start_token_id": 151652},
    "qwen3_5": {"image_token_id": 248056, "vision_start_token_id": 248053},
    "qwen3_vl": {"image_token_id": 151655, "vision_start_token_id": 151652},
}
ROPE_THETA = 10000.0  # the vision config's rope_parameters default
FULL_BLOCK = 1024  # queries per block of a full-attention layer: scores [heads, FULL_BLOCK, N] at a time
MASKED = -1e30  # a masked score: finite, so a row with nothing to attend to averages its block, never NaN
TAPS = 4  # Qwen3.5: rows of the position table mixed per patch (bilinear: 2 x 2)

# Checkpoint names: the tower under `visual.` (Qwen2(.5)-VL's published checkpoints, and what transformers 5.x saves
# for them) or `model.visual.` (what transformers 4.52+ saved for them; Qwen3.5's and Qwen3-VL's checkpoints)
PREFIXES = ("visual.", "model.visual.")
PATCH_NAME = "patch_embed.proj.weight"
TOP_NAMES = {"patch": PATCH_NAME, "patch_bias": "patch_embed.proj.bias", "pos_embed": "pos_embed.weight"}
LAYER_NAMES = {"norm1": "norm1.weight", "norm1_bias": "norm1.bias", "norm2": "norm2.weight", "norm2_bias": "norm2.bias",
               "wqkv": "attn.qkv.weight", "bqkv": "attn.qkv.bias", "wo": "attn.proj.weight", "bo": "attn.proj.bias",
               **{k: f"mlp.{k}.weight" for k in ("fc1", "fc2")},
               **{f"{k}_bias": f"mlp.{k}.bias" for k in ("fc1", "fc2")},
               **{k: f"mlp.{k}_proj.weight" for k in ("gate", "up", "down")},
               **{f"{k}_bias": f"mlp.{k}_proj.bias" for k in ("gate", "up", "down")}}
MERGER_NAMES = {"ln": "ln_q.weight", "ln_bias": "ln_q.bias", "w1": "mlp.0.weight", "b1": "mlp.0.bias",
                "w2": "mlp.2.weight", "b2": "mlp.2.bias"}
QWEN3_5_NAMES = {  # Qwen3.5's and Qwen3-VL's names where they differ (Qwen3-VL's deepstack mergers: the merger's)
    "layers": {**{k: f"mlp.linear_{k}.weight" for k in ("fc1", "fc2")},
               **{f"{k}_bias": f"mlp.linear_{k}.bias" for k in ("fc1", "fc2")}},
    "merger": {"ln": "norm.weight", "ln_bias": "norm.bias", "w1": "linear_fc1.weight", "b1": "linear_fc1.bias",
               "w2": "linear_fc2.weight", "b2": "linear_fc2.bias"},
}
DEEPSTACK_PREFIX = "deepstack_merger_list."  # Qwen3-VL: + f"{j}." + the merger's names
NORMS = ("norm1", "norm2", "ln")  # norm scales (initialized near 1)
LINEARS = ("wqkv", "wo", "fc1", "fc2", "gate", "up", "down", "w1", "w2")  # stored (out, in) by HF, (in, out) here


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    kind: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_5" | "qwen3_vl"
    hidden_size: int  # the ViT's width (Qwen2-VL's vision_config.embed_dim)
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    hidden_act: str
    out_hidden_size: int  # the merger's output: the language model's hidden size
    image_token_id: int
    vision_start_token_id: int
    window_size: int = 0  # Qwen2.5-VL: a window's side in pixels; 0: no windowed layers
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL: the layers that attend over the whole image
    num_position_embeddings: int = 0  # Qwen3.5, Qwen3-VL: the learned position table's rows, a square grid; 0: none
    deepstack_layers: tuple[int, ...] = ()  # Qwen3-VL: the layers whose outputs get their own merger, increasing
    rope_theta: float = ROPE_THETA

    def __post_init__(self):
        if self.kind not in DEFAULTS:
            raise ConfigError(f"qwen vision kind {self.kind!r} is not supported ({', '.join(DEFAULTS)})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported "
                              f"({', '.join(ACTIVATIONS)})")
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "temporal_patch_size",
                 "spatial_merge_size", "in_channels", "out_hidden_size")
        for name in sizes:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"vision_config.{name} {getattr(self, name)!r} is not a positive int")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"vision_config.num_heads {self.num_heads}: hidden size {self.hidden_size} / heads must "
                              f"be a multiple of 4 (2D rotary: head_dim / 4 frequencies for each of h and w)")
        if self.kind == "qwen2_5_vl" and self.window_merges < 1:
            raise ConfigError(f"vision_config.window_size {self.window_size} is less than one merge block "
                              f"(spatial_merge_size {self.spatial_merge_size} * patch_size {self.patch_size} pixels)")
        table, learned = self.num_position_embeddings, self.kind in LEARNED_POSITIONS
        if learned and not (isinstance(table, int) and table >= 1 and math.isqrt(table) ** 2 == table):
            raise ConfigError(f"vision_config.num_position_embeddings {table!r} is not a positive perfect square "
                              f"(the learned positions are a side x side grid)")
        if not learned and table:
            raise ConfigError(f"num_position_embeddings {table!r}: a {self.kind} tower has no learned positions")
        deep = self.deepstack_layers
        if self.kind != "qwen3_vl" and deep:
            raise ConfigError(f"deepstack_visual_indexes {deep!r}: a {self.kind} tower has no deepstack mergers")
        if not all(isinstance(i, int) and 0 <= i < self.num_layers for i in deep) or list(deep) != sorted(set(deep)):
            raise ConfigError(f"vision_config.deepstack_visual_indexes {list(deep)!r} are not strictly increasing "
                              f"layer indexes in [0, depth {self.num_layers})")

    @property
    def text_hidden_size(self) -> int:
        return self.out_hidden_size

    @property
    def patch_dim(self) -> int:  # a patch's pixels, flattened (C, T, P, P)
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:  # patches per output row
        return self.spatial_merge_size ** 2

    @property
    def deepstack_count(self) -> int:  # Qwen3-VL: the deepstack mergers, each one more out_hidden_size per row out
        return len(self.deepstack_layers)

    @property
    def window_merges(self) -> int:  # a window's side in merge blocks (HF's vit_merger_window_size)
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_rows(self) -> int:  # the patches of a whole window (1 where there are no windows)
        return self.window_merges ** 2 * self.merge_unit if self.kind == "qwen2_5_vl" else 1

    @property
    def position_side(self) -> int:  # learned positions: the grid's side (HF's num_grid_per_side); else 0
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "QwenVisionConfig | None":
        """A `qwen2_vl`, `qwen2_5_vl`, `qwen3_5`, `qwen3_5_moe`, `qwen3_vl` or `qwen3_vl_moe` config.json's image
        encoder; None for any other model, and for a Qwen3.5 config without a vision_config (a text-only checkpoint;
        Qwen3-VL's config class reads a missing one as its defaults). The language model's fields are top-level (older
        checkpoints) or under text_config (transformers 5)."""
        kind = KINDS.get(cfg.get("model_type"))
        if kind is None or (kind == "qwen3_5" and cfg.get("vision_config") is None):
            return None
        vision = cfg.get("vision_config") or {}
        field = lambda name: vision.get(name, DEFAULTS[kind][name])  # noqa: E731
        window, fullatt, table, deep = 0, (), 0, ()
        if kind == "qwen2_vl":  # embed_dim is the ViT's width; hidden_size the merger's output
            hidden, out_hidden = field("embed_dim"), field("hidden_size")
            intermediate = int(hidden * field("mlp_ratio"))
        else:
            hidden, out_hidden = field("hidden_size"), field("out_hidden_size")
            intermediate = field("intermediate_size")
        if kind == "qwen2_5_vl":
            window, fullatt = field("window_size"), tuple(field("fullatt_block_indexes"))
        if kind in LEARNED_POSITIONS:
            table = field("num_position_embeddings")
        if kind == "qwen3_vl":
            deep = tuple(field("deepstack_visual_indexes"))
        text = cfg.get("text_config") or cfg
        if "hidden_size" in text and text["hidden_size"] != out_hidden:  # HF would fail splicing the rows in
            raise ConfigError(f"vision_config.{'hidden_size' if kind == 'qwen2_vl' else 'out_hidden_size'} "
                              f"{out_hidden} is not the text model's hidden_size {text['hidden_size']}")
        rope = vision.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):  # HF reads "default" as the towers' axial
            raise ConfigError(f"vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported (axial)")
        tokens = {k: int(cfg.get(k, text.get(k, v))) for k, v in TOKEN_DEFAULTS[kind].items()}
        return cls(kind=kind, hidden_size=hidden, intermediate_size=intermediate, num_layers=field("depth"),
                   num_heads=field("num_heads"), patch_size=field("patch_size"),
                   temporal_patch_size=field("temporal_patch_size"), spatial_merge_size=field("spatial_merge_size"),
                   in_channels=field("in_channels"), hidden_act=field("hidden_act"), out_hidden_size=out_hidden,
                   window_size=window, fullatt_block_indexes=fullatt, num_position_embeddings=table,
                   deepstack_layers=deep, **tokens,
                   rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", ROPE_THETA))))


def param_shapes(cfg: QwenVisionConfig) -> dict:
    """The weight pytree as shapes: "patch" [patch_dim, hidden] (Qwen3.5, Qwen3-VL: and "patch_bias" [hidden],
    "pos_embed" [num_position_embeddings, hidden]), "layers" (num_layers stacked), "merger" (Qwen3-VL: and "deepstack",
    deepstack_count mergers stacked, their norms over merge_unit * hidden)."""
    h, i, n, m = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.merge_unit * cfg.hidden_size
    layer_norm = cfg.kind != "qwen2_5_vl"  # LayerNorm with a bias, fc1 -> act -> fc2; Qwen2.5-VL: RMSNorm, gated
    layers = {"norm1": (n, h), "norm2": (n, h), "wqkv": (n, h, 3 * h), "bqkv": (n, 3 * h), "wo": (n, h, h),
              "bo": (n, h)}
    if layer_norm:
        layers |= {"norm1_bias": (n, h), "norm2_bias": (n, h), "fc1": (n, h, i), "fc1_bias": (n, i), "fc2": (n, i, h),
                   "fc2_bias": (n, h)}
    else:
        layers |= {"gate": (n, h, i), "gate_bias": (n, i), "up": (n, h, i), "up_bias": (n, i), "down": (n, i, h),
                   "down_bias": (n, h)}
    merger = {"ln": (h,), "w1": (m, m), "b1": (m,), "w2": (m, cfg.out_hidden_size), "b2": (cfg.out_hidden_size,)}
    top = {"patch": (cfg.patch_dim, h)}
    if cfg.kind in LEARNED_POSITIONS:
        top |= {"patch_bias": (h,), "pos_embed": (cfg.num_position_embeddings, h)}
    if cfg.deepstack_count:  # norms after the shuffle: over a merged row
        top["deepstack"] = {k: (cfg.deepstack_count, *s) for k, s in (merger | {"ln": (m,), "ln_bias": (m,)}).items()}
    return top | {"layers": layers, "merger": merger | ({"ln_bias": (h,)} if layer_norm else {})}


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def init_params(cfg: QwenVisionConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> dict:
    """Random weights of the right shapes (tests and synthetic benchmarks); norm scales near 1. One draw cut into
    pieces (a draw per shape would compile a generator per shape)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    sizes = [int(np.prod(shape)) for _, shape in flat]
    draws = jnp.split(scale * jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
    arrays = [(getattr(path[-1], "key", None) in NORMS) + d.reshape(shape) for d, (path, shape) in zip(draws, flat)]
    return jax.tree.unflatten(treedef, [a.astype(dtype) for a in arrays])


def load_params(path: str, cfg: QwenVisionConfig, dtype=np.float32) -> dict:
    """The encoder's weights (numpy arrays of `dtype`) from an HF Qwen2-VL / Qwen2.5-VL / Qwen3.5 / Qwen3-VL
    checkpoint directory; the language model's tensors are not read."""
    shapes = param_shapes(cfg)
    renamed = QWEN3_5_NAMES if cfg.kind in LEARNED_POSITIONS else {}
    layer_names, merger_names = LAYER_NAMES | renamed.get("layers", {}), MERGER_NAMES | renamed.get("merger", {})
    with opened_shards(path) as (names, stored):
        found = [p for p in PREFIXES if p + PATCH_NAME in names]
        if not found:
            raise CheckpointError(f"{path}: missing tensor {PREFIXES[0] + PATCH_NAME!r} (nor under {PREFIXES[1:]})")
        prefix = found[0]

        def read(key: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
            a = stored(prefix + name)
            # HF's (out, C, T, P, P) patch conv and (out, in) linears, turned into (in, out) for x @ W
            a = a.reshape(a.shape[0], -1).T if key == "patch" else a.T if key in LINEARS else a
            if a.shape != shape:
                raise CheckpointError(f"{path}: tensor {prefix + name!r} has shape {a.shape} (as x @ W), config "
                                      f"needs {shape}")
            return a.astype(dtype)

        def stacked(group: str, name) -> dict:  # filled entry by entry: one copy of the stack in host memory
            out = {}
            for k, shape in shapes[group].items():
                stack = out[k] = np.empty(shape, dtype)
                for i in range(shape[0]):
                    stack[i] = read(k, name(i, k), shape[1:])
            return out

        params = {k: read(k, TOP_NAMES[k], s) for k, s in shapes.items() if k in TOP_NAMES}
        params["merger"] = {k: read(k, "merger." + merger_names[k], s) for k, s in shapes["merger"].items()}
        params["layers"] = stacked("layers", lambda i, k: f"blocks.{i}.{layer_names[k]}")
        if "deepstack" in shapes:
            params["deepstack"] = stacked("deepstack", lambda j, k: f"{DEEPSTACK_PREFIX}{j}.{merger_names[k]}")
    return params


# ---------------------------------------------------------------------------------------------- forward
def _norm(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """LayerNorm where there is a bias (Qwen2-VL, Qwen3.5, Qwen3-VL), else RMSNorm; in float32."""
    x32 = x.astype(jnp.float32)
    if b is not None:
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + NORM_EPS) * w.astype(jnp.float32)
    return (y if b is None else y + b.astype(jnp.float32)).astype(x.dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rotary in float32. x [N, heads, D], cos/sin [N, 1, D]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Softmax attention of each group's queries over its valid keys, in float32. q, k, v [G, L, heads, D],
    key_valid [G, L] bool -> [G, L, heads, D]."""
    scores = jnp.einsum("gqhd,gkhd->ghqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(key_valid[:, None, None], scores, MASKED), axis=-1).astype(v.dtype)
    return jnp.einsum("ghqk,gkhd->gqhd", probs, v)


def _full_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Every query over the image's valid keys, FULL_BLOCK queries at a time. q, k, v [N, heads, D] -> [N, heads, D]."""
    n = q.shape[0]
    block = min(n, FULL_BLOCK)  # (N and FULL_BLOCK are powers of two)
    out = jax.lax.map(lambda qb: _attention(qb[None], k[None], v[None], valid[None])[0],
                      q.reshape(n // block, block, *q.shape[1:]))
    return out.reshape(q.shape)


def _window_attention(q: jax.Array, k: jax.Array, v: jax.Array, blocks: jax.Array, block_valid: jax.Array,
                      slot: jax.Array) -> jax.Array:
    """Each query over its window's keys: rows gathered into one block per window ([B, window_rows] row indices,
    `window_blocks`), attended within the block, each row taken back from its `slot` in them."""
    b, rows = blocks.shape
    gathered = [a[blocks.reshape(-1)].reshape(b, rows, *a.shape[1:]) for a in (q, k, v)]
    out = _attention(*gathered, block_valid)
    return out.reshape(b * rows, *q.shape[1:])[slot]


def _layer(cfg: QwenVisionConfig, p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, attend) -> jax.Array:
    """One pre-norm layer over one image's patches. x [N, H]; attend(q, k, v) [N, heads, D] -> [N, heads, D]."""
    n, h = x.shape
    heads, d = cfg.num_heads, h // cfg.num_heads
    # attention: norm1 -> fused qkv [N, 3, heads, D] -> rotary on q, k -> softmax in float32 -> proj, residual
    y = _norm(x, p["norm1"], p.get("norm1_bias"))
    qkv = (y @ p["wqkv"] + p["bqkv"]).reshape(n, 3, heads, d)
    q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]
    x = x + attend(q, k, v).reshape(n, h) @ p["wo"] + p["bo"]
    # MLP: norm2 -> fc1 -> act -> fc2 (Qwen2-VL, Qwen3.5) | down(act(gate) * up) (Qwen2.5-VL), residual
    y = _norm(x, p["norm2"], p.get("norm2_bias"))
    act = ACTIVATIONS[cfg.hidden_act]
    if cfg.kind != "qwen2_5_vl":
        return x + act(y @ p["fc1"] + p["fc1_bias"]) @ p["fc2"] + p["fc2_bias"]
    return x + (act(y @ p["gate"] + p["gate_bias"]) * (y @ p["up"] + p["up_bias"])) @ p["down"] + p["down_bias"]


def _merge(cfg: QwenVisionConfig, w: dict, x: jax.Array, postshuffle: bool = False) -> jax.Array:
    """The patch merger: x [N, H] -> [N // merge_unit, out_hidden_size]. Each merge block's merge_unit consecutive
    rows as one [merge_unit * H] row, normalized per patch before the regrouping (postshuffle: per merged row after
    it, Qwen3-VL's deepstack mergers), then fc1 -> exact gelu -> fc2."""
    rows = (x.shape[0] // cfg.merge_unit, cfg.merge_unit * cfg.hidden_size)
    if postshuffle:
        y = _norm(x.reshape(rows), w["ln"], w["ln_bias"])
    else:
        y = _norm(x, w["ln"], w.get("ln_bias")).reshape(rows)
    y = jax.nn.gelu(y @ w["w1"] + w["b1"], approximate=False)
    return y @ w["w2"] + w["b2"]


def encode(params: dict, inputs: dict, *, cfg: QwenVisionConfig) -> jax.Array:
    """One image's inputs by name (`qwen_patches.encode_inputs`: its patches [N, patch_dim], N static and padded, with
    its rows' grid coordinates, validity, windows and position taps) -> [N // merge_unit, (1 + deepstack_count) *
    out_hidden_size] in the weights' dtype; rows past the image's are padding's. Pure; jit it with cfg static
    (functools.partial).

    Row r's columns: [0, out_hidden_size) the main merger's (the tokens' input embeddings); Qwen3-VL's then, for
    j < deepstack_count, [(1 + j) * out_hidden_size, (2 + j) * out_hidden_size) the merger of layer
    deepstack_layers[j]'s output (HF's deepstack_features[j], which its language model adds to the tokens' hidden
    states after decoder layer j). So out.reshape(rows, 1 + deepstack_count, out_hidden_size)[:, 0] is the main
    merger's, [:, 1 + j] deepstack feature j. The other kinds: the main merger's alone."""
    patches, hpos, wpos, valid = (inputs[k] for k in ("patches", "hpos", "wpos", "valid"))
    n, d = patches.shape[0], cfg.hidden_size // cfg.num_heads
    dtype = params["patch"].dtype
    if patches.shape[1] != cfg.patch_dim or n % cfg.merge_unit:
        raise ValueError(f"patches {patches.shape}: the encoder takes [N, {cfg.patch_dim}], N a multiple of "
                         f"{cfg.merge_unit}")
    x = patches.astype(dtype) @ params["patch"]  # the patch conv: [N, H]
    if cfg.kind in LEARNED_POSITIONS:  # its bias, and the learned positions at the patch: its taps' rows weighted (f32)
        index, weight = inputs["pos_index"], inputs["pos_weight"]
        pos = sum(params["pos_embed"][index[:, t]].astype(jnp.float32) * weight[:, t, None] for t in range(TAPS))
        x = x + params["patch_bias"] + pos.astype(dtype)
    # 2D rotary: head_dim / 4 frequencies, angles (h's, then w's) [N, D / 2], repeated for the two halves [N, 1, D]
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, d // 2, 2, dtype=jnp.float32) / (d // 2))
    angles = jnp.concatenate([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], axis=-1).astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    full = np.array([cfg.kind != "qwen2_5_vl" or i in cfg.fullatt_block_indexes for i in range(cfg.num_layers)])

    def attend(is_full, q, k, v):
        if full.all():
            return _full_attention(q, k, v, valid)
        return jax.lax.cond(is_full, lambda: _full_attention(q, k, v, valid),
                            lambda: _window_attention(q, k, v, inputs["blocks"], inputs["block_valid"],
                                                      inputs["slot"]))

    # Qwen3-VL: per layer, whether its output is a deepstack layer's and its slot among them (0 for the others)
    deep = np.isin(np.arange(cfg.num_layers), cfg.deepstack_layers)
    slot = np.where(deep, np.cumsum(deep) - 1, 0).astype(np.int32)

    def body(carry, xs):
        x, kept = carry  # kept [deepstack_count, N, H]: the deepstack layers' outputs so far
        i, is_full, is_deep, j = xs  # a step indexes its weights in the stack in place
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        x = _layer(cfg, layer, x, cos, sin, functools.partial(attend, is_full))
        if cfg.deepstack_count:
            kept = jax.lax.dynamic_update_index_in_dim(kept, jnp.where(is_deep, x, kept[j]), j, 0)
        return (x, kept), None

    kept = jnp.zeros((cfg.deepstack_count, n, cfg.hidden_size), dtype) if cfg.deepstack_count else None
    xs = (jnp.arange(cfg.num_layers, dtype=jnp.int32), jnp.asarray(full), jnp.asarray(deep), jnp.asarray(slot))
    (x, kept), _ = jax.lax.scan(body, (x, kept), xs)
    rows = [_merge(cfg, params["merger"], x)]  # [N // merge_unit, out_hidden_size] each
    if cfg.deepstack_count:
        rows += list(jax.vmap(functools.partial(_merge, cfg, postshuffle=True))(params["deepstack"], kept))
    return jnp.concatenate(rows, axis=-1).astype(dtype)

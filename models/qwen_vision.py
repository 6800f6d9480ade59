"""Qwen2-VL's and Qwen2.5-VL's image encoder: a ViT over an image's own grid of patches, with 2D rotary positions,
and the patch merger, as pure functions over a pytree of weights. It owns the encoder's config (read from a `qwen2_vl`
or `qwen2_5_vl` config.json), its weights (shapes, random init, reading an HF checkpoint), the host-side layout of an
image's patches (`patch_layout`) and `encode`: patches in, the rows that replace the image's placeholder tokens in the
language model's input embeddings out. Preprocessing (smart resize, patchify: engine/qwen_images.py) and splicing the
rows into the prompt (with M-RoPE positions) are the caller's.

An image of grid (1, grid_h, grid_w) arrives as grid_h * grid_w patches of patch_dim = C * T * P * P pixels (a still
image repeated T = temporal_patch_size times), in the processor's block-major order: the merge x merge blocks
row-major over the grid, each block's patches row-major. So the merger's groups are merge**2 consecutive rows, and an
image gives grid_h * grid_w // merge**2 rows out. The patch conv (stride == kernel) is a matmul over a patch.

Each layer: x + attn(norm1(x)), then x + mlp(norm2(x)); q and k rotated by the patch's (h, w) grid coordinates
(head_dim / 4 frequencies each, theta 10000, rotate-half). Qwen2-VL: LayerNorm, fc1 -> act -> fc2, every layer
attends over the whole image. Qwen2.5-VL: RMSNorm, gated MLP, and the layers not in fullatt_block_indexes attend
within windows of window_size pixels (whole merge blocks). Rows stay in the processor's order throughout: a windowed
layer gathers its q, k, v into one block of `window_rows` rows per window (`window_blocks`, on the host; a partial
window's block padded and its padding masked), attends within each block and scatters the rows back (HF permutes
the patches into window order instead; attention is permutation-equivariant and a window is a set of whole merge
blocks, so the two agree). A full layer attends over the whole image in blocks of FULL_BLOCK queries. So memory
grows as N x FULL_BLOCK and N x window_rows, never N x N: Qwen2.5-VL's windows hold 64 patches, its default
max_pixels 65,536 patches.

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
NORM_EPS = 1e-6  # every norm of both towers, the merger's ln_q included
# model_type -> (the vision_config class's defaults for fields a config.json leaves out)
_FIELDS = ("depth", "num_heads", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "hidden_act")
DEFAULTS = {
    "qwen2_vl": dict(zip(_FIELDS, (32, 16, 3, 14, 2, 2, "quick_gelu")), embed_dim=1280, mlp_ratio=4, hidden_size=3584),
    "qwen2_5_vl": dict(zip(_FIELDS, (32, 16, 3, 14, 2, 2, "silu")), hidden_size=3584, intermediate_size=3420,
                       out_hidden_size=3584, window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
}
TOKEN_DEFAULTS = {"image_token_id": 151655, "vision_start_token_id": 151652}  # both config classes'
ROPE_THETA = 10000.0  # the vision config's rope_parameters default
FULL_BLOCK = 1024  # queries per block of a full-attention layer: scores [heads, FULL_BLOCK, N] at a time
MASKED = -1e30  # a masked score: finite, so a row with nothing to attend to averages its block, never NaN

# Checkpoint names: the tower under `visual.` (the published checkpoints; what transformers 5.x saves) or
# `model.visual.` (what transformers 4.52+ saved)
PREFIXES = ("visual.", "model.visual.")
PATCH_NAME = "patch_embed.proj.weight"
LAYER_NAMES = {"norm1": "norm1.weight", "norm1_bias": "norm1.bias", "norm2": "norm2.weight", "norm2_bias": "norm2.bias",
               "wqkv": "attn.qkv.weight", "bqkv": "attn.qkv.bias", "wo": "attn.proj.weight", "bo": "attn.proj.bias",
               **{k: f"mlp.{k}.weight" for k in ("fc1", "fc2")},
               **{f"{k}_bias": f"mlp.{k}.bias" for k in ("fc1", "fc2")},
               **{k: f"mlp.{k}_proj.weight" for k in ("gate", "up", "down")},
               **{f"{k}_bias": f"mlp.{k}_proj.bias" for k in ("gate", "up", "down")}}
MERGER_NAMES = {"ln": "ln_q.weight", "ln_bias": "ln_q.bias", "w1": "mlp.0.weight", "b1": "mlp.0.bias",
                "w2": "mlp.2.weight", "b2": "mlp.2.bias"}
NORMS = ("norm1", "norm2", "ln")  # norm scales (initialized near 1)
LINEARS = ("wqkv", "wo", "fc1", "fc2", "gate", "up", "down", "w1", "w2")  # stored (out, in) by HF, (in, out) here


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    kind: str  # "qwen2_vl" | "qwen2_5_vl"
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
    def window_merges(self) -> int:  # a window's side in merge blocks (HF's vit_merger_window_size)
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_rows(self) -> int:  # the patches of a whole window (Qwen2-VL: 1, no windows)
        return self.window_merges ** 2 * self.merge_unit if self.kind == "qwen2_5_vl" else 1

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "QwenVisionConfig | None":
        """A `qwen2_vl` or `qwen2_5_vl` config.json's image encoder; None for any other model. The language model's
        fields are top-level (older checkpoints) or under text_config (transformers 5)."""
        kind = cfg.get("model_type")
        if kind not in DEFAULTS:
            return None
        vision = cfg.get("vision_config") or {}
        field = lambda name: vision.get(name, DEFAULTS[kind][name])  # noqa: E731
        if kind == "qwen2_vl":  # embed_dim is the ViT's width; hidden_size the merger's output
            hidden, out_hidden = field("embed_dim"), field("hidden_size")
            intermediate, window, fullatt = int(hidden * field("mlp_ratio")), 0, ()
        else:
            hidden, out_hidden = field("hidden_size"), field("out_hidden_size")
            intermediate = field("intermediate_size")
            window, fullatt = field("window_size"), tuple(field("fullatt_block_indexes"))
        text = cfg.get("text_config") or cfg
        if "hidden_size" in text and text["hidden_size"] != out_hidden:  # HF would fail splicing the rows in
            raise ConfigError(f"vision_config.{'hidden_size' if kind == 'qwen2_vl' else 'out_hidden_size'} "
                              f"{out_hidden} is not the text model's hidden_size {text['hidden_size']}")
        rope = vision.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported (axial)")
        tokens = {k: int(cfg.get(k, text.get(k, v))) for k, v in TOKEN_DEFAULTS.items()}
        return cls(kind=kind, hidden_size=hidden, intermediate_size=intermediate, num_layers=field("depth"),
                   num_heads=field("num_heads"), patch_size=field("patch_size"),
                   temporal_patch_size=field("temporal_patch_size"), spatial_merge_size=field("spatial_merge_size"),
                   in_channels=field("in_channels"), hidden_act=field("hidden_act"), out_hidden_size=out_hidden,
                   window_size=window, fullatt_block_indexes=fullatt,
                   rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", ROPE_THETA))), **tokens)


def param_shapes(cfg: QwenVisionConfig) -> dict:
    """The weight pytree as shapes: "patch" [patch_dim, hidden], "layers" (num_layers stacked), "merger"."""
    h, i, n, m = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.merge_unit * cfg.hidden_size
    layer_norm = cfg.kind == "qwen2_vl"  # LayerNorm with a bias; Qwen2.5-VL: RMSNorm
    layers = {"norm1": (n, h), "norm2": (n, h), "wqkv": (n, h, 3 * h), "bqkv": (n, 3 * h), "wo": (n, h, h),
              "bo": (n, h)}
    if layer_norm:
        layers |= {"norm1_bias": (n, h), "norm2_bias": (n, h), "fc1": (n, h, i), "fc1_bias": (n, i), "fc2": (n, i, h),
                   "fc2_bias": (n, h)}
    else:
        layers |= {"gate": (n, h, i), "gate_bias": (n, i), "up": (n, h, i), "up_bias": (n, i), "down": (n, i, h),
                   "down_bias": (n, h)}
    merger = {"ln": (h,), "w1": (m, m), "b1": (m,), "w2": (m, cfg.out_hidden_size), "b2": (cfg.out_hidden_size,)}
    return {"patch": (cfg.patch_dim, h), "layers": layers, "merger": merger | ({"ln_bias": (h,)} if layer_norm else {})}


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
    """The encoder's weights (numpy arrays of `dtype`) from an HF Qwen2-VL / Qwen2.5-VL checkpoint directory; the
    language model's tensors are not read."""
    shapes = param_shapes(cfg)
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

        params = {"patch": read("patch", PATCH_NAME, shapes["patch"]),
                  "merger": {k: read(k, "merger." + MERGER_NAMES[k], s) for k, s in shapes["merger"].items()},
                  "layers": {}}
        for k, shape in shapes["layers"].items():  # filled layer by layer: one copy of the stack in host memory
            stack = params["layers"][k] = np.empty(shape, dtype)
            for i in range(shape[0]):
                stack[i] = read(k, f"blocks.{i}.{LAYER_NAMES[k]}", shape[1:])
    return params


# ---------------------------------------------------------------------------------------------- layout (host)
def patch_layout(cfg: QwenVisionConfig, grid_thw: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per patch of one image, in the processor's (block-major) order, int32 [grid_h * grid_w] each: "hpos", "wpos"
    (its grid row and column: HF's get_vision_position_ids) and "window" (Qwen2.5-VL: which window of
    window_merges x window_merges merge blocks, row-major, partial at the bottom and right edges, as HF's
    get_vision_window_index groups them; Qwen2-VL: 0)."""
    t, gh, gw = (int(x) for x in grid_thw)
    m = cfg.spatial_merge_size
    if t != 1 or gh < 1 or gw < 1 or gh % m or gw % m:
        raise ValueError(f"grid_thw {tuple(grid_thw)}: an image is (1, h, w) with h, w positive multiples of "
                         f"spatial_merge_size {m} (videos are not supported)")
    i = np.arange(gh * gw)
    block, inner = i // cfg.merge_unit, i % cfg.merge_unit
    block_row, block_col = block // (gw // m), block % (gw // m)
    layout = {"hpos": block_row * m + inner // m, "wpos": block_col * m + inner % m, "window": np.zeros_like(i)}
    if cfg.kind == "qwen2_5_vl":
        side = cfg.window_merges
        layout["window"] = block_row // side * -(-(gw // m) // side) + block_col // side
    return {k: v.astype(np.int32) for k, v in layout.items()}


# ---------------------------------------------------------------------------------------------- forward
def _norm(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """LayerNorm where there is a bias (Qwen2-VL), else RMSNorm; in float32."""
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
    # MLP: norm2 -> fc1 -> act -> fc2 (Qwen2-VL) | down(act(gate) * up) (Qwen2.5-VL), residual
    y = _norm(x, p["norm2"], p.get("norm2_bias"))
    act = ACTIVATIONS[cfg.hidden_act]
    if cfg.kind == "qwen2_vl":
        return x + act(y @ p["fc1"] + p["fc1_bias"]) @ p["fc2"] + p["fc2_bias"]
    return x + (act(y @ p["gate"] + p["gate_bias"]) * (y @ p["up"] + p["up_bias"])) @ p["down"] + p["down_bias"]


def encode(params: dict, patches: jax.Array, hpos: jax.Array, wpos: jax.Array, valid: jax.Array, blocks: jax.Array,
           block_valid: jax.Array, slot: jax.Array, *, cfg: QwenVisionConfig) -> jax.Array:
    """One image's patches [N, patch_dim] (N static, padded: `padded_len`) with its rows' grid coordinates and
    validity [N] and its windows (`window_blocks`: [B, window_rows] twice, [N]) -> [N // merge_unit,
    out_hidden_size] in the weights' dtype; rows past the image's are padding's. `encode_inputs` makes the arguments.
    Pure; jit it with cfg static (functools.partial)."""
    n, d = patches.shape[0], cfg.hidden_size // cfg.num_heads
    dtype = params["patch"].dtype
    if patches.shape[1] != cfg.patch_dim or n % cfg.merge_unit:
        raise ValueError(f"patches {patches.shape}: the encoder takes [N, {cfg.patch_dim}], N a multiple of "
                         f"{cfg.merge_unit}")
    x = patches.astype(dtype) @ params["patch"]  # the patch conv: [N, H]
    # 2D rotary: head_dim / 4 frequencies, angles (h's, then w's) [N, D / 2], repeated for the two halves [N, 1, D]
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, d // 2, 2, dtype=jnp.float32) / (d // 2))
    angles = jnp.concatenate([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], axis=-1).astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    full = np.array([cfg.kind == "qwen2_vl" or i in cfg.fullatt_block_indexes for i in range(cfg.num_layers)])

    def attend(is_full, q, k, v):
        if full.all():
            return _full_attention(q, k, v, valid)
        return jax.lax.cond(is_full, lambda: _full_attention(q, k, v, valid),
                            lambda: _window_attention(q, k, v, blocks, block_valid, slot))

    def body(x, xs):
        i, is_full = xs  # a step indexes its weights in the stack in place
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        return _layer(cfg, layer, x, cos, sin, functools.partial(attend, is_full)), None

    x, _ = jax.lax.scan(body, x, (jnp.arange(cfg.num_layers, dtype=jnp.int32), jnp.asarray(full)))
    # merger: ln_q per patch, each merge block's merge_unit consecutive rows as one [merge_unit * H] row, MLP
    w = params["merger"]
    y = _norm(x, w["ln"], w.get("ln_bias")).reshape(n // cfg.merge_unit, cfg.merge_unit * cfg.hidden_size)
    y = jax.nn.gelu(y @ w["w1"] + w["b1"], approximate=False)
    return (y @ w["w2"] + w["b2"]).astype(dtype)


def window_blocks(cfg: QwenVisionConfig, window: np.ndarray, num_rows: int) -> tuple[np.ndarray, ...]:
    """An image's windows as blocks for `encode` (its rows' window ids [n], padded to num_rows rows): (blocks
    [B, window_rows] int32, the rows of each window, a partial one's block padded with row 0; block_valid
    [B, window_rows] bool; slot [num_rows] int32, each row's place in blocks flattened, padding rows pointing at
    row 0's). B: the window count rounded up to a power of two (so image sizes share compiled programs); Qwen2-VL:
    one dummy block."""
    rows = cfg.window_rows
    count = int(window.max()) + 1 if cfg.kind == "qwen2_5_vl" else 0
    blocks = np.zeros((1 << max(count - 1, 0).bit_length(), rows), np.int32)
    block_valid = np.zeros(blocks.shape, bool)
    slot = np.zeros(num_rows, np.int32)
    for w in range(count):
        members = np.flatnonzero(window == w)
        blocks[w, : len(members)] = members
        block_valid[w, : len(members)] = True
        slot[members] = w * rows + np.arange(len(members))
    slot[len(window):] = slot[0]
    return blocks, block_valid, slot


def encode_inputs(cfg: QwenVisionConfig, patches: np.ndarray, grid_thw: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """`encode`'s arguments after the weights for one image's patches [n, patch_dim] of grid_thw, padded to
    padded_len(n) rows."""
    layout = patch_layout(cfg, grid_thw)
    n = len(layout["hpos"])
    if patches.shape != (n, cfg.patch_dim):
        raise ValueError(f"patches {patches.shape}: grid_thw {tuple(grid_thw)} takes [{n}, {cfg.patch_dim}]")
    size = padded_len(cfg, n)
    return (np.pad(patches, ((0, size - n), (0, 0))), np.pad(layout["hpos"], (0, size - n)),
            np.pad(layout["wpos"], (0, size - n)), np.arange(size) < n, *window_blocks(cfg, layout["window"], size))


def padded_len(cfg: QwenVisionConfig, num_patches: int) -> int:
    """The bucket an image of num_patches is padded to: merge_unit * a power of two, at least 64 rows (merge 2)."""
    groups = max(num_patches // cfg.merge_unit, -(-64 // cfg.merge_unit))
    return cfg.merge_unit * 2 ** math.ceil(math.log2(groups))


def encode_image(encode_fn, params: dict, cfg: QwenVisionConfig, patches: np.ndarray,
                 grid_thw: tuple[int, int, int]) -> np.ndarray:
    """One image's patches [n, patch_dim] (the processor's) -> its rows [n // merge_unit, out_hidden_size] (numpy, the
    weights' dtype), through encode_fn = jax.jit(functools.partial(encode, cfg=cfg)) at padded_len(n): one compile
    per bucket (and window count's), not per image size."""
    out = encode_fn(params, *encode_inputs(cfg, patches, grid_thw))
    return np.asarray(out[: len(patches) // cfg.merge_unit])

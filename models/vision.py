"""LLaVA's and Gemma 3's image encoder: a ViT vision tower (CLIP or SigLIP) and the multimodal projector, as pure
functions over a pytree of weights. It owns the encoder's config (read from a `LlavaForConditionalGeneration` or
`Gemma3ForConditionalGeneration` config.json), its weights (shapes, random init, reading an HF checkpoint) and
`encode_images`: normalized pixels in, the rows that replace an image's placeholder tokens in the language model's
input embeddings out. Image preprocessing (resize, crop, normalization) and splicing the rows into the prompt are the
caller's.

HF's LLaVA takes `hidden_states[k]` of the tower for each k in `vision_feature_layer` (hidden_states[0]: the
embeddings, after CLIP's pre-LayerNorm; hidden_states[i]: layer i's output; negative k counts from the end, so -1 is
the last layer's output, never with the tower's post-LayerNorm), concatenates them on the feature axis, drops the
first token with the "default" select strategy, and projects: linear_1 -> act -> linear_2. Only the layers up to
the deepest selected one are stored and run.

Gemma 3 (`gemma3`) takes the tower's `last_hidden_state` instead: every layer, then SigLIP's post-LayerNorm
(`post_norm`), every patch; its projector (models/gemma3_vision.py) average-pools the patch grid to
mm_tokens_per_image rows, RMS-normalizes and projects them.

LLaVA-NeXT (`llava_next`, "anyres") encodes an image as tiles of the tower's size: a base tile of the whole image,
then the tiles of a (rows, cols) grid chosen from `image_grid_pinpoints` (the preprocessing's); models/anyres.py lays
their features out as the image's rows.

Layouts: activations [N, T, hidden] (N images, T tokens); weights oriented for x @ W, layers stacked on axis 0.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models import gemma3_vision
from models.errors import ConfigError
from models.gguf_loader import CheckpointError
from models.safetensors_loader import opened_shards  # the one reader of safetensors directories (bf16, shards)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # SigLIP
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
# vision_config.model_type -> (kind, the HF config class's defaults for fields a config.json may leave out)
_TOWER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps")
TOWERS = {
    "clip_vision_model": ("clip", dict(zip(_TOWER_FIELDS, (768, 3072, 12, 12, 3, 224, 32, "quick_gelu", 1e-5)))),
    "siglip_vision_model": ("siglip", dict(zip(_TOWER_FIELDS, (768, 3072, 12, 12, 3, 224, 16, "gelu_pytorch_tanh", 1e-6)))),
}
SELECT_STRATEGIES = ("default", "full")
# Queries per block of the tower's attention over an image of more tokens (Gemma 3's 4,096 patches): a block's
# float32 scores, [images, heads, 1024, T], in place of [images, heads, T, T] (1 GiB an image at Gemma 3's 16 heads)
ATTENTION_BLOCK = 1024
PROJECTORS = ("llava", "gemma3")
LLAMA_HIDDEN_SIZE = 4096  # text_config.hidden_size where a config.json leaves it out (LlamaConfig's default)
# LlavaNextConfig's image_grid_pinpoints where a config.json leaves it out or null: (height, width) each
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# Checkpoint names: the tower's under one of these prefixes (older LLaVA checkpoints, transformers >= 4.52, 5.x
# saves without `vision_model`), the projector's under `[model.]multi_modal_projector.`.
TOWER_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
NEWLINE_PREFIXES = ("", "model.")  # LLaVA-NeXT's `image_newline`
EMBED_NAMES = {"patch": "embeddings.patch_embedding.weight", "patch_bias": "embeddings.patch_embedding.bias",
               "cls": "embeddings.class_embedding", "pos": "embeddings.position_embedding.weight",
               "pre_norm": "pre_layrnorm.weight", "pre_norm_bias": "pre_layrnorm.bias",
               "post_norm": "post_layernorm.weight", "post_norm_bias": "post_layernorm.bias"}
LAYER_NAMES = {"ln1": "layer_norm1.weight", "ln1_bias": "layer_norm1.bias", "ln2": "layer_norm2.weight",
               "ln2_bias": "layer_norm2.bias", "fc1": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias",
               "fc2": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias",
               **{f"w{x}": f"self_attn.{x}_proj.weight" for x in "qkv"}, "wo": "self_attn.out_proj.weight",
               **{f"b{x}": f"self_attn.{x}_proj.bias" for x in "qkv"}, "bo": "self_attn.out_proj.bias"}
PROJECTOR_NAMES = {"w1": "linear_1.weight", "b1": "linear_1.bias", "w2": "linear_2.weight", "b2": "linear_2.bias"}
NORMS = ("pre_norm", "post_norm", "ln1", "ln2")  # LayerNorm scales (initialized near 1)
LINEARS = ("wq", "wk", "wv", "wo", "fc1", "fc2", "w1", "w2")  # stored (out, in) by HF, (in, out) here


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str  # "clip" (class token, pre-LayerNorm, patch conv without bias) | "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int  # the tower's, not all of them run (num_layers_run)
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]  # HF hidden_states indices, concatenated on the feature axis in this order
    select_strategy: str  # "default": drop the first token | "full"
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    image_token_id: int  # the placeholder token each of an image's rows (tokens_per_image, or anyres.packed_tokens) replaces
    # LLaVA-NeXT: the tile grids' resolutions, (height, width) in pixels, multiples of image_size; () for LLaVA-1.5
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    image_newline: bool = False  # a learned [text_hidden_size] row end (params["image_newline"]) after each packed row
    projector: str = "llava"  # "llava": linear_1 -> act -> linear_2 | "gemma3": pool -> RMSNorm -> matmul
    post_norm: bool = False  # the last layer's output through the tower's post-LayerNorm (HF's last_hidden_state)
    num_pooled_tokens: int = 0  # gemma3: an image's rows after the average pool (mm_tokens_per_image), a square
    boi_token_id: int | None = None  # gemma3: the tokens around an image's placeholder rows; None for LLaVA
    eoi_token_id: int | None = None

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ConfigError(f"vision kind {self.kind!r} is not supported (clip, siglip)")
        for name, hf in (("hidden_act", "vision_config.hidden_act"), ("projector_act", "projector_hidden_act")):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"{hf} {getattr(self, name)!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(f"vision_feature_select_strategy {self.select_strategy!r} is not supported "
                              f"({', '.join(SELECT_STRATEGIES)})")
        if not self.feature_layers or any(not -self.num_layers - 1 <= k <= self.num_layers for k in self.feature_layers):
            raise ConfigError(f"vision_feature_layer {list(self.feature_layers)} is out of range for a tower of "
                              f"{self.num_layers} layers (hidden_states {-self.num_layers - 1}..{self.num_layers})")
        if self.hidden_size % self.num_heads or self.image_size < self.patch_size:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} not a multiple of num_attention_heads "
                              f"{self.num_heads}, or image_size {self.image_size} < patch_size {self.patch_size}")
        bad = [p for p in self.grid_pinpoints if len(p) != 2 or not all(
            isinstance(x, int) and x > 0 and x % self.image_size == 0 for x in p)]
        if bad:  # HF's tiling would disagree with its own tile count
            raise ConfigError(f"image_grid_pinpoints {[list(p) for p in bad]}: not [height, width] in positive "
                              f"multiples of vision_config.image_size {self.image_size}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"projector {self.projector!r} is not supported ({', '.join(PROJECTORS)})")
        if self.post_norm and self.feature_indices != (self.num_layers,):
            raise ConfigError(f"post_norm follows the last layer only: vision_feature_layer [-1], not "
                              f"{list(self.feature_layers)}")
        if self.projector == "gemma3":
            n = self.num_pooled_tokens
            if self.kind != "siglip" or self.select_strategy != "full" or self.grid_pinpoints or self.image_newline:
                raise ConfigError(f"gemma3's projector needs a siglip_vision_model tower, all its patches ('full') "
                                  f"and no tiles, not a {self.kind} tower with {self.select_strategy!r}")
            if not isinstance(n, int) or n < 1 or math.isqrt(n) ** 2 != n:
                raise ConfigError(f"mm_tokens_per_image {n!r} is not a positive square (the pooled grid's rows)")
            if self.grid % (side := math.isqrt(n)):  # HF's pool would leave another count than mm_tokens_per_image
                raise ConfigError(f"vision_config image_size // patch_size = {self.grid} patches per side is not a "
                                  f"multiple of sqrt(mm_tokens_per_image) = {side}")
        if self.grid_pinpoints and self.tokens_per_image != self.grid ** 2:  # HF fails to lay such tiles out
            raise ConfigError(f"vision_feature_select_strategy {self.select_strategy!r} leaves {self.tokens_per_image} "
                              f"features per {self.kind} tile, not the {self.grid}x{self.grid} patches that LLaVA-NeXT "
                              f"lays out ('default' for CLIP, 'full' for SigLIP)")

    @property
    def grid(self) -> int:  # patches per side (HF's conv drops a remainder of pixels)
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:  # tokens through the tower: CLIP's class token, then the patches
        return self.grid ** 2 + (self.kind == "clip")

    @property
    def feature_indices(self) -> tuple[int, ...]:  # feature_layers as non-negative hidden_states indices
        return tuple(k % (self.num_layers + 1) for k in self.feature_layers)

    @property
    def num_layers_run(self) -> int:
        return max(self.feature_indices)

    @property
    def tokens_per_image(self) -> int:  # an encoded tile's rows (LLaVA-NeXT: one tile's, not a packed image's)
        if self.projector == "gemma3":
            return self.num_pooled_tokens
        return self.num_positions - (self.select_strategy == "default")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "VisionConfig | None":
        """A `llava`, `llava_next` or `gemma3` config.json's image encoder; None for any other model or a config
        without vision_config."""
        vision = cfg.get("vision_config")
        if cfg.get("model_type") not in ("llava", "llava_next", "gemma3") or not vision:
            return None
        gemma3 = cfg["model_type"] == "gemma3"
        anyres, pinpoints = cfg["model_type"] == "llava_next", ()
        if anyres:
            pinpoints = cfg.get("image_grid_pinpoints")
            pinpoints = LLAVA_NEXT_PINPOINTS if pinpoints is None else tuple(tuple(p) for p in pinpoints)
            if not pinpoints:
                raise ConfigError("image_grid_pinpoints is empty (llava_next needs at least one resolution)")
        model_type = vision.get("model_type", "siglip_vision_model" if gemma3 else "clip_vision_model")
        if model_type not in TOWERS:
            raise ConfigError(f"vision_config.model_type {model_type!r} is not supported ({', '.join(TOWERS)})")
        kind, defaults = TOWERS[model_type]
        field = lambda name: vision.get(name, defaults[name])  # noqa: E731
        sizes = {name: field(name) for name in ("image_size", "patch_size")}
        for name, size in sizes.items():  # an int, or [height, width]
            if not isinstance(size, int) and len(set(size)) != 1:
                raise ConfigError(f"vision_config.{name} {size} is not square")
            sizes[name] = size if isinstance(size, int) else int(size[0])
        tower = dict(kind=kind, hidden_size=field("hidden_size"), intermediate_size=field("intermediate_size"),
                     num_layers=field("num_hidden_layers"), num_heads=field("num_attention_heads"),
                     image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                     num_channels=field("num_channels"), layer_norm_eps=float(field("layer_norm_eps")),
                     hidden_act=field("hidden_act"))
        if gemma3:
            return cls(**tower, **gemma3_vision.config_fields(cfg))
        layers = cfg.get("vision_feature_layer", -2)
        return cls(
            **tower, feature_layers=(layers,) if isinstance(layers, int) else tuple(layers),
            select_strategy=cfg.get("vision_feature_select_strategy", "default"),
            projector_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
            text_hidden_size=(cfg.get("text_config") or {}).get("hidden_size", LLAMA_HIDDEN_SIZE),
            # transformers writes image_token_index (its image_token_id is an alias); some checkpoints the newer name
            image_token_id=int(cfg.get("image_token_id", cfg.get("image_token_index", 32000))),
            grid_pinpoints=pinpoints, image_newline=anyres,
        )


def param_shapes(vcfg: VisionConfig) -> dict:
    """The weight pytree as shapes: "embed" (with the post-LayerNorm where vcfg.post_norm), "layers" (num_layers_run
    stacked), "projector", and LLaVA-NeXT's "image_newline"."""
    h, i, n, p = vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_layers_run, vcfg.patch_size
    embed = {"patch": (vcfg.num_channels * p * p, h), "pos": (vcfg.num_positions, h)}
    embed |= {"cls": (h,), "pre_norm": (h,), "pre_norm_bias": (h,)} if vcfg.kind == "clip" else {"patch_bias": (h,)}
    embed |= {"post_norm": (h,), "post_norm_bias": (h,)} if vcfg.post_norm else {}
    layers = {name: (n, h) for name in ("ln1", "ln1_bias", "ln2", "ln2_bias", "bq", "bk", "bv", "bo", "fc2_bias")}
    layers |= {"wq": (n, h, h), "wk": (n, h, h), "wv": (n, h, h), "wo": (n, h, h), "fc1": (n, h, i),
               "fc1_bias": (n, i), "fc2": (n, i, h)}
    t = vcfg.text_hidden_size
    projector = {"w1": (h * len(vcfg.feature_layers), t), "w2": (t, t)}
    if vcfg.projector == "gemma3":
        projector = gemma3_vision.projector_shapes(vcfg)
    elif vcfg.projector_bias:
        projector |= {"b1": (t,), "b2": (t,)}
    shapes = {"embed": embed, "layers": layers, "projector": projector}
    return shapes | {"image_newline": (t,)} if vcfg.image_newline else shapes


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def init_params(vcfg: VisionConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> dict:
    """Random weights of the right shapes (tests and synthetic benchmarks); LayerNorm scales near 1. One draw for
    all leaves, cut into pieces: a draw per shape would compile a random-number generator per shape."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(vcfg), is_leaf=lambda x: isinstance(x, tuple))
    sizes = [int(np.prod(shape)) for _, shape in flat]
    draws = jnp.split(scale * jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
    arrays = [(path[-1].key in NORMS) + d.reshape(shape) for d, (path, shape) in zip(draws, flat)]
    return jax.tree.unflatten(treedef, [a.astype(dtype) for a in arrays])


def load_params(path: str, vcfg: VisionConfig, dtype=np.float32) -> dict:
    """The encoder's weights (numpy arrays of `dtype`) from an HF LLaVA, LLaVA-NeXT or Gemma 3 checkpoint directory;
    the language model's and the tower's unused tensors (later layers, LLaVA's post-LayerNorm, SigLIP's pooling head)
    are not read."""
    shapes = param_shapes(vcfg)
    with opened_shards(path) as (names, stored):
        def prefix(candidates: tuple[str, ...], probe: str) -> str:
            found = [c for c in candidates if c + probe in names]
            if not found:
                raise CheckpointError(f"{path}: missing tensor {candidates[0] + probe!r} (nor under {candidates[1:]})")
            return found[0]

        def read(key: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
            a = stored(name)
            # HF's (out, C, p, p) patch conv and (out, in) linears, turned into (in, out) for x @ W
            a = a.reshape(a.shape[0], -1).T if key == "patch" else a.T if key in LINEARS else a
            if a.shape != shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape} (as x @ W), config needs {shape}")
            return a.astype(dtype)

        tower = prefix(TOWER_PREFIXES, EMBED_NAMES["patch"])
        projector_names = gemma3_vision.PROJECTOR_NAMES if vcfg.projector == "gemma3" else PROJECTOR_NAMES
        projector = prefix(PROJECTOR_PREFIXES, next(iter(projector_names.values())))  # its first weight's name
        params = {"embed": {k: read(k, tower + EMBED_NAMES[k], s) for k, s in shapes["embed"].items()},
                  "projector": {k: read(k, projector + projector_names[k], s) for k, s in shapes["projector"].items()},
                  "layers": {}}
        if vcfg.image_newline:
            newline = prefix(NEWLINE_PREFIXES, "image_newline") + "image_newline"
            params["image_newline"] = read("image_newline", newline, shapes["image_newline"])
        for k, shape in shapes["layers"].items():  # filled layer by layer: one copy of the stack in host memory
            stack = params["layers"][k] = np.empty(shape, dtype)
            for i in range(shape[0]):
                stack[i] = read(k, f"{tower}encoder.layers.{i}.{LAYER_NAMES[k]}", shape[1:])
    return params


# ---------------------------------------------------------------------------------------------- forward
def _layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with a bias, in float32."""
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    return x @ w if b is None else x @ w + b


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over every token of each image, in float32, `block` queries at a time where an image
    has more tokens (the scores of a block, [N, heads, block, T], are all that is held at once). q, k, v [N, T, heads,
    D] -> [N, T, heads, D]."""
    n, t, heads, d = q.shape

    def attend(qb):
        scores = jnp.einsum("nqhd,nkhd->nhqk", qb, k, preferred_element_type=jnp.float32) * d ** -0.5
        return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)

    if t <= block:
        return attend(q)
    num = -(-t // block)  # the last block padded with zero queries (their rows dropped)
    blocks = jnp.pad(q, ((0, 0), (0, num * block - t), (0, 0), (0, 0))).reshape(n, num, block, heads, d)
    out = jax.lax.map(attend, blocks.transpose(1, 0, 2, 3, 4))  # [num, N, block, heads, D]
    return out.transpose(1, 0, 2, 3, 4).reshape(n, num * block, heads, d)[:, :t]


def _encoder_layer(vcfg: VisionConfig, p: dict, x: jax.Array) -> jax.Array:
    """One pre-norm transformer layer over every token of every image (bidirectional attention). x [N, T, H]."""
    n, t, h = x.shape
    heads, d = vcfg.num_heads, h // vcfg.num_heads
    # attention: LN1 -> q, k, v [N, T, heads, D] -> softmax(q k^T / sqrt(D)) v in float32 -> out_proj, residual
    y = _layer_norm(x, p["ln1"], p["ln1_bias"], vcfg.layer_norm_eps)
    q, k, v = (_dense(y, p[f"w{c}"], p[f"b{c}"]).reshape(n, t, heads, d) for c in "qkv")
    attn = _attention(q, k, v, ATTENTION_BLOCK).reshape(n, t, h)
    x = x + _dense(attn, p["wo"], p["bo"])
    # MLP: LN2 -> fc1 -> act -> fc2, residual
    y = _layer_norm(x, p["ln2"], p["ln2_bias"], vcfg.layer_norm_eps)
    return x + _dense(ACTIVATIONS[vcfg.hidden_act](_dense(y, p["fc1"], p["fc1_bias"])), p["fc2"], p["fc2_bias"])


def _run_layers(vcfg: VisionConfig, layers: dict, x: jax.Array, start: int, stop: int) -> jax.Array:
    """Layers start..stop-1, one `lax.scan` step each; a step indexes its weights in the stack in place (slicing the
    run's weights out first would copy them)."""
    def body(x, i):
        return _encoder_layer(vcfg, jax.tree.map(lambda a: a[i], layers), x), None

    x, _ = jax.lax.scan(body, x, jnp.arange(start, stop, dtype=jnp.int32))
    return x


def encode_images(params: dict, vcfg: VisionConfig, pixels: jax.Array) -> jax.Array:
    """Normalized pixels [N, C, image_size, image_size] -> [N, tokens_per_image, text_hidden_size] in the weights'
    dtype. Pure; jit it with vcfg static."""
    e, dtype = params["embed"], params["embed"]["patch"].dtype
    n, c = pixels.shape[:2]
    g, p, h = vcfg.grid, vcfg.patch_size, vcfg.hidden_size
    if pixels.shape[1:] != (vcfg.num_channels, vcfg.image_size, vcfg.image_size):
        raise ValueError(f"pixels {pixels.shape}: the encoder takes [N, {vcfg.num_channels}, {vcfg.image_size}, "
                         f"{vcfg.image_size}] (resize and normalize first)")
    # patch embedding: the stride-p conv as a matmul over each patch's pixels, flattened in the conv weight's
    # (C, p, p) order; patches row-major over the grid. [N, g*g, C*p*p] @ [C*p*p, H]
    patches = pixels[:, :, :g * p, :g * p].reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    x = patches.reshape(n, g * g, c * p * p).astype(dtype) @ e["patch"]  # [N, g*g, H]
    if vcfg.kind == "clip":  # the class token first, then position embeddings and the pre-LayerNorm
        x = jnp.concatenate([jnp.broadcast_to(e["cls"], (n, 1, h)), x], axis=1)
        x = _layer_norm(x + e["pos"], e["pre_norm"], e["pre_norm_bias"], vcfg.layer_norm_eps)
    else:
        x = x + e["patch_bias"] + e["pos"]
    # hidden_states[k] for each selected k: run the layers between consecutive selected depths, keep each end
    hidden, depth = {0: x}, 0
    for stop in sorted(set(vcfg.feature_indices) - {0}):
        x = hidden[stop] = _run_layers(vcfg, params["layers"], x, depth, stop)
        depth = stop
    if vcfg.post_norm:  # the last layer's output (x) through the post-LayerNorm: HF's last_hidden_state
        hidden[vcfg.num_layers] = _layer_norm(x, e["post_norm"], e["post_norm_bias"], vcfg.layer_norm_eps)
    feats = jnp.concatenate([hidden[k] for k in vcfg.feature_indices], axis=-1)  # [N, T, H * len(feature_layers)]
    if vcfg.projector == "gemma3":  # pool -> RMSNorm -> matmul, [N, num_pooled_tokens, text_hidden_size]
        return gemma3_vision.project(params["projector"], vcfg, feats).astype(dtype)
    # NOTE: "default" drops the first token whatever the tower, as HF does: CLIP's class token, but SigLIP's first
    # patch (SigLIP LLaVAs are meant to say "full").
    if vcfg.select_strategy == "default":
        feats = feats[:, 1:]
    # projector: linear_1 -> act -> linear_2, [N, tokens_per_image, text_hidden_size]
    w = params["projector"]
    y = ACTIVATIONS[vcfg.projector_act](_dense(feats, w["w1"], w.get("b1")))
    return _dense(y, w["w2"], w.get("b2")).astype(dtype)

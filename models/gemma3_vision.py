"""Gemma 3's multimodal projector, the part of its image encoder that is not LLaVA's: what a `gemma3` config.json
sets beyond its SigLIP tower, the projector's weights, and `project`. The tower itself runs in `models/vision.py`,
which calls `project` on the tower's `last_hidden_state` (after SigLIP's post-LayerNorm).

HF's Gemma3MultiModalProjector: the tower's [N, g*g, H] patches, row-major over the g x g grid, average-pooled with
kernel = stride = g / sqrt(mm_tokens_per_image) into [N, mm_tokens_per_image, H] (pooled tokens row-major too) ->
mm_soft_emb_norm (Gemma's RMSNorm: float32, scale 1 + w, eps = vision_config.layer_norm_eps) -> @
mm_input_projection_weight [H, text hidden], a plain parameter stored as x @ W (not a Linear: never transposed).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from models.vision import VisionConfig

# Gemma3Config's and Gemma3TextConfig's defaults, for fields a config.json leaves out
MM_TOKENS_PER_IMAGE = 256
IMAGE_TOKEN_ID = 262144  # <image_soft_token>: each of an image's pooled rows replaces one
BOI_TOKEN_ID = 255999  # <start_of_image>, before an image's soft tokens
EOI_TOKEN_ID = 256000  # <end_of_image>, after them
TEXT_HIDDEN_SIZE = 2304
# Checkpoint names under vision.PROJECTOR_PREFIXES
PROJECTOR_NAMES = {"w": "mm_input_projection_weight", "norm": "mm_soft_emb_norm.weight"}


def config_fields(cfg: dict) -> dict:
    """The VisionConfig fields a `gemma3` config.json sets besides the tower's: its last layer through the tower's
    post-LayerNorm, every patch ("full"), then this projector."""
    def token(name: str, default: int) -> int:  # transformers writes *_index; *_id is its alias
        return int(cfg.get(f"{name}_id", cfg.get(f"{name}_index", default)))

    return dict(feature_layers=(-1,), select_strategy="full", post_norm=True, projector="gemma3",
                projector_act="gelu", projector_bias=False,  # LLaVA's projector fields, unused by this one
                text_hidden_size=(cfg.get("text_config") or {}).get("hidden_size", TEXT_HIDDEN_SIZE),
                num_pooled_tokens=cfg.get("mm_tokens_per_image", MM_TOKENS_PER_IMAGE),
                image_token_id=token("image_token", IMAGE_TOKEN_ID), boi_token_id=token("boi_token", BOI_TOKEN_ID),
                eoi_token_id=token("eoi_token", EOI_TOKEN_ID))


def projector_shapes(vcfg: VisionConfig) -> dict:
    return {"norm": (vcfg.hidden_size,), "w": (vcfg.hidden_size, vcfg.text_hidden_size)}


def project(p: dict, vcfg: VisionConfig, x: jax.Array) -> jax.Array:
    """The tower's last_hidden_state [N, g*g, H] -> [N, num_pooled_tokens, text_hidden_size] in x's dtype."""
    n, _, h = x.shape
    side = math.isqrt(vcfg.num_pooled_tokens)
    k = vcfg.grid // side  # the pool's kernel and stride, in patches
    # average pool: patch (row, col) = (a * k + i, b * k + j) -> pooled token a * side + b. [N, side*side, H]
    pooled = x.astype(jnp.float32).reshape(n, side, k, side, k, h).mean(axis=(2, 4)).reshape(n, side * side, h)
    y = pooled.astype(x.dtype).astype(jnp.float32)  # HF pools in x's dtype, then normalizes in float32
    # mm_soft_emb_norm: RMSNorm, its scale (1 + w); back to x's dtype before the projection, as HF's
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + vcfg.layer_norm_eps)
    y = (y * (1 + p["norm"].astype(jnp.float32))).astype(x.dtype)
    return (y @ p["w"]).astype(x.dtype)

"""Gemma 3's image encoder from llama.cpp's mmproj GGUF: the file `llama-mtmd-cli --mmproj` reads beside a text GGUF,
holding the SigLIP tower and the projector. `read_mmproj` turns it into what models/vision.py reads from an HF
checkpoint directory: a VisionConfig, the weights in `vision.load_params`' layout, and the image processor's config.

What llama.cpp's converter (convert_hf_to_gguf.py: MmprojModel, Gemma3VisionModel) writes, and clip.cpp reads back:
  metadata  general.architecture "clip"; clip.projector_type "gemma3" (clip.vision.projector_type in files of several
            encoders); clip.has_vision_encoder; clip.vision.{image_size, patch_size, embedding_length,
            feed_forward_length, block_count, attention.head_count, attention.layer_norm_epsilon, projection_dim
            (the text model's hidden size), image_mean, image_std}; clip.use_gelu (SigLIP's tanh GELU; absent, clip.cpp
            runs quick GELU); clip.vision.projector.scale_factor, the average pool's kernel in patches, written only
            where it is not Gemma 3's 4 (896 / 14 = 64 patches a side pooled to 16: 256 rows an image).
  tensors   numpy order, as HF stores them: v.patch_embd (the conv, [H, C, p, p]), v.position_embd [g*g, H], v.blk.{i}.
            {ln1, ln2, attn_q, attn_k, attn_v, attn_out, ffn_up (fc1), ffn_down (fc2)} ([out, in] weights, biases),
            v.post_ln; mm.soft_emb_norm holding 1 + w (the converter adds the 1 of Gemma's RMSNorm, in float32: a
            bfloat16 checkpoint's w of magnitude 2^-16 or more comes back exactly); mm.input_projection [H, text
            hidden], as HF's mm_input_projection_weight (x @ W; clip.cpp transposes it itself). Any GGUF float or block
            type (the converter keeps norms, biases and embeddings in F32 and the projection in F16).
  not kept the tokens around an image's rows (clip.cpp asks the text model's vocabulary for <start_of_image> and
            <end_of_image>) and the image processor's resampling (bilinear in clip.cpp, as HF's Gemma3ImageProcessor).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from models import gemma3_vision, vision
from models.errors import ConfigError
from models.gguf_loader import CheckpointError, dequantized, read_gguf
from models.vision import VisionConfig

PROJECTOR_TYPES = ("gemma3",)
POOL_KERNEL = 4  # clip.cpp's Gemma 3 pool kernel, in patches per side, where the file has no scale_factor
NUM_CHANNELS = 3  # clip.cpp's images are RGB
PIL_BILINEAR = 2  # clip.cpp resizes Gemma 3's images bilinearly, as transformers' Gemma3ImageProcessor does

# Our weight keys (vision.param_shapes) -> mmproj tensor names, `{i}` the layer
EMBED_NAMES = {"patch": "v.patch_embd.weight", "patch_bias": "v.patch_embd.bias", "pos": "v.position_embd.weight",
               "post_norm": "v.post_ln.weight", "post_norm_bias": "v.post_ln.bias"}
LAYER_NAMES = {"ln1": "v.blk.{i}.ln1.weight", "ln1_bias": "v.blk.{i}.ln1.bias", "ln2": "v.blk.{i}.ln2.weight",
               "ln2_bias": "v.blk.{i}.ln2.bias",
               **{f"w{x}": f"v.blk.{{i}}.attn_{x}.weight" for x in "qkv"}, "wo": "v.blk.{i}.attn_out.weight",
               **{f"b{x}": f"v.blk.{{i}}.attn_{x}.bias" for x in "qkv"}, "bo": "v.blk.{i}.attn_out.bias",
               "fc1": "v.blk.{i}.ffn_up.weight", "fc1_bias": "v.blk.{i}.ffn_up.bias",
               "fc2": "v.blk.{i}.ffn_down.weight", "fc2_bias": "v.blk.{i}.ffn_down.bias"}
PROJECTOR_NAMES = {"norm": "mm.soft_emb_norm.weight", "w": "mm.input_projection.weight"}


def read_mmproj(path: str, *, text_hidden_size: int, image_token_id: int, boi_token_id: int, eoi_token_id: int,
                dtype=np.float32) -> tuple[VisionConfig, dict, dict]:
    """A Gemma 3 mmproj GGUF -> (its VisionConfig, its weights as numpy arrays of `dtype` in vision.load_params'
    layout, a preprocessor config for engine.images.ImageProcessor.from_dict). The token ids and the text model's
    hidden size come from the text GGUF (the mmproj holds none of them; its projection_dim must match the latter)."""
    meta, tensors = read_gguf(path)
    vcfg = _config(path, meta, text_hidden_size, image_token_id, boi_token_id, eoi_token_id)
    processor = _processor_config(path, meta, vcfg)

    h, p = vcfg.hidden_size, vcfg.patch_size

    def read(key: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = dequantized(path, tensors, name)
        if key == "patch":  # the conv [H, C, p, p] -> [C*p*p, H], its pixels in the (C, p, p) order encode_images uses
            if a.shape != (h, NUM_CHANNELS, p, p):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape}, the config needs "
                                      f"{(h, NUM_CHANNELS, p, p)}")
            a = a.reshape(h, -1).T
        elif key in vision.LINEARS:  # [out, in] -> [in, out]
            a = a.T
        elif key == "norm":  # the converter's 1 + w back to w (exact where 1 + w lies in [0.5, 2])
            a = a - np.float32(1)
        if a.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape} (as x @ W), the config needs {shape}")
        return a.astype(dtype)

    shapes = vision.param_shapes(vcfg)
    layers = {k: np.empty(s, dtype) for k, s in shapes["layers"].items()}  # filled layer by layer: one copy in memory
    for i in range(vcfg.num_layers):
        names = _layer_names(tensors, i, h, vcfg.intermediate_size)
        for k, stack in layers.items():
            stack[i] = read(k, names[k], stack.shape[1:])
    params = {"embed": {k: read(k, EMBED_NAMES[k], s) for k, s in shapes["embed"].items()}, "layers": layers,
              "projector": {k: read(k, PROJECTOR_NAMES[k], s) for k, s in shapes["projector"].items()}}
    return vcfg, params, processor


def _layer_names(tensors: dict, i: int, hidden: int, intermediate: int) -> dict[str, str]:
    """Layer i's tensor names. NOTE: files from before llama.cpp fixed its SigLIP names hold fc1 under ffn_down and fc2
    under ffn_up; clip.cpp swaps them back where ffn_down reads from the hidden size, as here (where the two sizes
    differ; equal ones cannot tell)."""
    names = {k: v.format(i=i) for k, v in LAYER_NAMES.items()}
    down = tensors.get(names["fc2"])
    if intermediate != hidden and down is not None and down.shape == (intermediate, hidden):
        for a, b in (("fc1", "fc2"), ("fc1_bias", "fc2_bias")):
            names[a], names[b] = names[b], names[a]
    return names


def _float32(x: float) -> float:
    """A float32 from the file as the shortest decimal that reads back as it: 1e-06, not 9.99999997e-07, as the
    config.json it was converted from had it."""
    return float(str(np.float32(x)))


def _config(path: str, meta: dict[str, Any], text_hidden_size: int, image_token_id: int, boi_token_id: int,
            eoi_token_id: int) -> VisionConfig:
    projector = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if projector is None:
        raise CheckpointError(f"{path}: not an mmproj file (no clip.projector_type; general.architecture "
                              f"{meta.get('general.architecture')!r})")
    if projector not in PROJECTOR_TYPES:
        raise ConfigError(f"{path}: mmproj projector type {projector!r} is not supported "
                          f"({', '.join(PROJECTOR_TYPES)})")
    if not meta.get("clip.has_vision_encoder"):
        raise CheckpointError(f"{path}: clip.has_vision_encoder is not true: the mmproj has no image encoder")

    def key(name: str, kind: type = int, default: Any = None) -> Any:
        value = meta.get(f"clip.vision.{name}", default)
        if value is None:
            raise CheckpointError(f"{path}: missing metadata key 'clip.vision.{name}'")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _float32(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        raise CheckpointError(f"{path}: metadata key 'clip.vision.{name}' is {value!r}, not a "
                              + ("positive integer" if kind is int else "number"))

    projection_dim = key("projection_dim")
    if projection_dim != text_hidden_size:
        raise CheckpointError(f"{path}: clip.vision.projection_dim {projection_dim} is not the text model's hidden "
                              f"size {text_hidden_size} (an mmproj of another model?)")
    if meta.get("clip.use_silu"):
        raise ConfigError(f"{path}: clip.use_silu is not supported for a gemma3 tower (SigLIP's GELU)")
    image_size, patch_size = key("image_size"), key("patch_size")
    kernel = key("projector.scale_factor", int, POOL_KERNEL)
    grid = image_size // patch_size
    if grid % kernel:  # HF's pool would leave another count of rows than clip.cpp's
        raise ConfigError(f"{path}: clip.vision.projector.scale_factor {kernel} does not divide the {grid} patches a "
                          f"side of image_size {image_size} / patch_size {patch_size}")
    fields = gemma3_vision.config_fields({
        "text_config": {"hidden_size": text_hidden_size}, "mm_tokens_per_image": (grid // kernel) ** 2,
        "image_token_id": image_token_id, "boi_token_id": boi_token_id, "eoi_token_id": eoi_token_id})
    try:
        return VisionConfig(
            kind="siglip", hidden_size=key("embedding_length"), intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"), num_heads=key("attention.head_count"), image_size=image_size,
            patch_size=patch_size, num_channels=NUM_CHANNELS, layer_norm_eps=key("attention.layer_norm_epsilon", float),
            # clip.cpp: use_gelu is ggml's tanh GELU (SigLIP's gelu_pytorch_tanh); without it, quick GELU
            hidden_act="gelu_pytorch_tanh" if meta.get("clip.use_gelu") else "quick_gelu", **fields)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _processor_config(path: str, meta: dict[str, Any], vcfg: VisionConfig) -> dict:
    """The Gemma3ImageProcessor config clip.cpp's preprocessing amounts to: a bilinear resize to the tower's square,
    rescale by 1/255, normalize by the file's mean and std."""
    def stats(name: str) -> list[float]:
        value = meta.get(f"clip.vision.{name}")
        if not (isinstance(value, list) and len(value) == NUM_CHANNELS and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
            raise CheckpointError(f"{path}: metadata key 'clip.vision.{name}' is {value!r}, not a list of 3 numbers"
                                  if value is not None else f"{path}: missing metadata key 'clip.vision.{name}'")
        return [_float32(x) for x in value]

    side = vcfg.image_size
    return {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": side, "width": side},
            "resample": PIL_BILINEAR, "image_mean": stats("image_mean"), "image_std": stats("image_std")}

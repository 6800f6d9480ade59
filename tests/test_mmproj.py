"""models/mmproj.py: llama.cpp's mmproj GGUF of Gemma 3's image encoder, read back as the HF checkpoint it was
converted from. Tiny random Gemma3ForConditionalGeneration checkpoints (as tests/test_gemma3_vision.py builds them)
are written as mmproj files the way llama.cpp's converter writes them (`write_mmproj`: convert_hf_to_gguf.py's
MmprojModel and Gemma3VisionModel, the names from the gguf package's own tensor map), read by `read_mmproj`, and
compared with `vision.load_params`, `VisionConfig.from_hf_config`, the directory's image processor and transformers'
`get_image_features`; the converter's F16, BF16 and Q8_0 outputs, older files' ffn names, and refusals."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fresh
from engine.images import ImageProcessor
from models import vision
from models.errors import ConfigError
from models.gguf_loader import CheckpointError, read_gguf
from models.mmproj import read_mmproj
from models.vision import VisionConfig
from test_gemma3_vision import TEXT, TOKENS, _hf_config, _hf_features, tiny_gemma3
from test_images import random_image

IDS = dict(text_hidden_size=TEXT["hidden_size"], image_token_id=TOKENS["image_token_index"],
           boi_token_id=TOKENS["boi_token_index"], eoi_token_id=TOKENS["eoi_token_index"])
# (image_size, mm_tokens_per_image): 6 x 6 patches pooled by 2, a kernel the converter writes (scale_factor); 4 x 4
# pooled by 4, Gemma 3's kernel, which it leaves out
SIZES = [(84, 9), (56, 1)]
# CLIP's statistics: not exact in float32, as the mmproj stores them
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

_encode = jax.jit(vision.encode_images, static_argnums=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """-> get(image_size, mm_tokens_per_image): (test_gemma3_vision's `tiny_gemma3` with the weights an F32 mmproj
    holds bit for bit, its directory with a preprocessor_config.json), each built once per module."""
    built = {}

    def get(image_size: int, mm_tokens: int):
        if (image_size, mm_tokens) not in built:
            model = tiny_gemma3(f"{__name__}::checkpoints[{image_size}-{mm_tokens}]", mm_tokens, image_size,
                                mmproj_exact=True)
            directory = tmp_path_factory.mktemp(f"gemma3-{image_size}-{mm_tokens}")
            model.save_pretrained(str(directory))
            (directory / "preprocessor_config.json").write_text(json.dumps({
                "image_processor_type": "Gemma3ImageProcessor", "size": {"height": image_size, "width": image_size},
                "image_seq_length": mm_tokens, "image_mean": MEAN, "image_std": STD, "resample": 2,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True}))
            built[image_size, mm_tokens] = model, str(directory)
        return built[image_size, mm_tokens]

    return get


def _converter_type(hf_name: str, name: str, ndim: int, outtype):
    """The GGUF type the converter stores a tensor in for its --outtype (ModelBase.prepare_tensors with
    Gemma3VisionModel.tensor_force_quant): 1-D tensors and norms F32, the embeddings F32, the projection F16."""
    import gguf

    t = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight"):
        return t.F32
    if "input_projection" in hf_name:
        return t.F16
    return t.F32 if ".embeddings." in hf_name else outtype


def write_mmproj(directory: str, path, outtype: str = "F32", *, projector_type: str = "gemma3", drop=(),
                 edit=None, legacy_ffn: bool = False) -> str:
    """The mmproj GGUF llama.cpp's converter writes of an HF Gemma 3 directory (`--mmproj --outtype outtype`), less
    the general.* naming keys. drop: metadata keys and tensor names left out; edit: {tensor name: array -> array};
    legacy_ffn: fc1 under ffn_down and fc2 under ffn_up, as converters before llama.cpp's fix named them."""
    import gguf
    from safetensors.numpy import load_file

    cfg = _hf_config(directory)
    v, text = cfg["vision_config"], cfg["text_config"]
    with open(os.path.join(directory, "preprocessor_config.json")) as f:
        pre = json.load(f)
    qtype = gguf.GGMLQuantizationType[outtype]
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}[outtype]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])  # general.architecture "clip"
    # MmprojModel.set_gguf_parameters, then Gemma3VisionModel's: key -> the writer's call
    clip, cv = gguf.Keys.Clip, gguf.Keys.ClipVision
    kernel = (v["image_size"] // v["patch_size"]) // math.isqrt(pre.get("image_seq_length", 256))
    keys = {
        gguf.Keys.General.TYPE: lambda: w.add_type(gguf.GGUFType.MMPROJ),
        gguf.Keys.General.FILE_TYPE: lambda: w.add_file_type(gguf.LlamaFileType[file_type]),
        clip.HAS_VISION_ENCODER: lambda: w.add_clip_has_vision_encoder(True),
        cv.PROJECTION_DIM: lambda: w.add_vision_projection_dim(text["hidden_size"]),
        cv.IMAGE_SIZE: lambda: w.add_vision_image_size(v["image_size"]),
        cv.PATCH_SIZE: lambda: w.add_vision_patch_size(v["patch_size"]),
        cv.EMBEDDING_LENGTH: lambda: w.add_vision_embedding_length(v["hidden_size"]),
        cv.FEED_FORWARD_LENGTH: lambda: w.add_vision_feed_forward_length(v["intermediate_size"]),
        cv.BLOCK_COUNT: lambda: w.add_vision_block_count(v["num_hidden_layers"]),
        cv.Attention.HEAD_COUNT: lambda: w.add_vision_head_count(v["num_attention_heads"]),
        cv.IMAGE_MEAN: lambda: w.add_vision_image_mean(pre["image_mean"]),
        cv.IMAGE_STD: lambda: w.add_vision_image_std(pre["image_std"]),
        clip.PROJECTOR_TYPE: lambda: w.add_clip_projector_type(projector_type),
        cv.Attention.LAYERNORM_EPS: lambda: w.add_vision_attention_layernorm_eps(v.get("layer_norm_eps", 1e-6)),
        cv.USE_GELU: lambda: w.add_vision_use_gelu(True),
    }
    if kernel > 0 and kernel != 4:  # written only where not Gemma 3's
        keys[cv.Projector.SCALE_FACTOR] = lambda: w.add_vision_projector_scale_factor(kernel)
    for key, add in keys.items():
        if key not in drop:
            add()
    # the tensors: the tower's and the projector's (Gemma3VisionModel.filter_tensors), renamed by the gguf package's map
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, v["num_hidden_layers"])
    for hf_name, a in load_file(os.path.join(directory, "model.safetensors")).items():
        if not hf_name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        # published checkpoints (transformers 4.x) keep the tower under vision_tower.vision_model., as the map does
        if not hf_name.startswith("vision_tower.vision_model."):
            hf_name = hf_name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        hf_name = hf_name.replace("_weight", ".weight")  # mm_input_projection_weight
        if "soft_emb_norm.weight" in hf_name:  # Gemma3VisionModel.modify_tensors: Gemma's RMSNorm scale, 1 + w
            a = a + np.float32(1)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if legacy_ffn:
            name = name.replace("ffn_up", "ffn_x").replace("ffn_down", "ffn_up").replace("ffn_x", "ffn_down")
        if name in drop:
            continue
        a = (edit or {}).get(name, lambda x: x)(a)
        t = _converter_type(hf_name, name, a.ndim, qtype)
        try:
            data = gguf.quants.quantize(a, t)
        except gguf.QuantError:  # rows that do not fill Q8_0's blocks: the converter falls back to F16
            t = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(a, t)
        w.add_tensor(name, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _pixels_equal(processor: dict, directory: str) -> None:
    """The processor read from the mmproj and the HF directory's turn a random image into the same pixels."""
    rng = fresh.rng()
    image = random_image(rng, "RGB", int(rng.integers(20, 200)), int(rng.integers(20, 200)))
    want = ImageProcessor.from_dir(directory)(image)
    got = ImageProcessor.from_dict(processor)(image)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("image_size, mm_tokens", SIZES)
def test_read_mmproj_is_the_checkpoint(checkpoints, tmp_path, image_size, mm_tokens):
    """An F32 mmproj reads as its HF directory: the same VisionConfig, load_params' weights bit for bit, the same
    pixels; encoded, transformers' features (float64) to a relative 1e-5."""
    model, directory = checkpoints(image_size, mm_tokens)
    path = write_mmproj(directory, tmp_path / "mmproj.gguf")
    meta, _ = read_gguf(path, tensors=False)
    assert ("clip.vision.projector.scale_factor" in meta) == (mm_tokens != 1)
    vcfg, params, processor = read_mmproj(path, **IDS)
    assert vcfg == VisionConfig.from_hf_config(_hf_config(directory))
    assert vcfg.tokens_per_image == mm_tokens
    want = vision.load_params(directory, vcfg)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for (key, got), expected in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
        assert got.dtype == np.float32, key
        np.testing.assert_array_equal(got, expected, err_msg=jax.tree_util.keystr(key))
    _pixels_equal(processor, directory)
    pixels = fresh.rng().standard_normal((2, 3, image_size, image_size), dtype=np.float32)
    features = _hf_features(model, pixels)
    got = np.asarray(_encode(params, vcfg, jnp.asarray(pixels)))
    assert got.shape == features.shape == (2, mm_tokens, TEXT["hidden_size"])
    np.testing.assert_allclose(got, features, rtol=0, atol=1e-5 * np.abs(features).max())


# outtype -> (the GGUF types the converter gives an attention weight, fc1 (ffn_up) and fc2 (ffn_down), whose rows of
# 48 do not fill Q8_0's blocks of 32), features' tolerance relative to their largest
QUANTIZED = {"F16": (("F16", "F16", "F16"), 2e-3), "BF16": (("BF16", "BF16", "BF16"), 2e-2),
             "Q8_0": (("Q8_0", "Q8_0", "F16"), 2e-2)}


@pytest.mark.parametrize("outtype", list(QUANTIZED))
def test_quantized_mmproj(checkpoints, tmp_path, outtype):
    """The converter's F16, BF16 and Q8_0 files: each tensor in the type it gives it, dequantized by the one GGUF
    reader. Weights stored in float types are the checkpoint's rounded to them, bit for bit (the rest, F32, as they
    are); Q8_0's within a block's step; features near transformers'."""
    (attn, up, down), tolerance = QUANTIZED[outtype]
    model, directory = checkpoints(84, 9)
    path = write_mmproj(directory, tmp_path / f"mmproj-{outtype}.gguf", outtype)
    _, tensors = read_gguf(path)
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert (types["v.blk.0.attn_q.weight"], types["v.blk.0.ffn_up.weight"], types["v.blk.0.ffn_down.weight"]) == (
        attn, up, down)
    assert (types["v.patch_embd.weight"], types["v.position_embd.weight"], types["mm.input_projection.weight"],
            types["mm.soft_emb_norm.weight"], types["v.blk.1.ln2.weight"], types["v.blk.1.attn_out.bias"]) == (
        "F32", "F32", "F16", "F32", "F32", "F32")
    vcfg, params, processor = read_mmproj(path, **IDS)
    want = vision.load_params(directory, vcfg)
    stored = {"wq": attn, "wk": attn, "wv": attn, "wo": attn, "fc1": up, "fc2": down}
    rounding = {"F16": np.float16, "BF16": ml_dtypes.bfloat16}
    for group in ("embed", "layers", "projector"):
        for key, expected in want[group].items():
            got, kind = params[group][key], stored.get(key, "F32") if group == "layers" else "F32"
            assert got.dtype == np.float32
            if kind == "Q8_0":  # a block's 32 values share a scale of max |x| / 127
                np.testing.assert_allclose(got, expected, rtol=0, atol=np.abs(expected).max() / 127, err_msg=key)
            else:
                rounded = expected.astype(rounding[kind]).astype(np.float32) if kind in rounding else expected
                np.testing.assert_array_equal(got, rounded, err_msg=f"{group}.{key}")
    _pixels_equal(processor, directory)
    pixels = fresh.rng().standard_normal((1, 3, 84, 84), dtype=np.float32)
    features = _hf_features(model, pixels)
    got = np.asarray(_encode(params, vcfg, jnp.asarray(pixels)))
    np.testing.assert_allclose(got, features, rtol=0, atol=tolerance * np.abs(features).max())


def test_older_ffn_names_and_dtype(checkpoints, tmp_path):
    """A file with fc1 under ffn_down and fc2 under ffn_up (converters before llama.cpp's fix; clip.cpp swaps them back
    by their shapes) reads as the current one; `dtype` sets every weight's."""
    _, directory = checkpoints(84, 9)
    _, want, _ = read_mmproj(write_mmproj(directory, tmp_path / "new.gguf"), **IDS)
    old = write_mmproj(directory, tmp_path / "old.gguf", legacy_ffn=True)
    assert read_gguf(old)[1]["v.blk.0.ffn_down.weight"].shape == (48, 32)  # fc1's [out, in]
    _, got, _ = read_mmproj(old, **IDS)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    _, half, _ = read_mmproj(old, **IDS, dtype=ml_dtypes.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(half)} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(half["layers"]["fc1"], want["layers"]["fc1"].astype(ml_dtypes.bfloat16))


def test_refusals(checkpoints, tmp_path):
    """Refused by name: another projector type, missing keys and tensors, an mmproj of another text model, shapes that
    disagree with the metadata, a file that is no mmproj."""
    import gguf

    _, directory = checkpoints(84, 9)
    cv = gguf.Keys.ClipVision

    def refused(error, match, ids=IDS, **kw):
        path = write_mmproj(directory, tmp_path / f"bad{len(os.listdir(tmp_path))}.gguf", **kw)
        with pytest.raises(error, match=match):
            read_mmproj(path, **ids)

    refused(ConfigError, r"mmproj projector type 'idefics3' is not supported \(gemma3\)", projector_type="idefics3")
    refused(CheckpointError, r"not an mmproj file \(no clip.projector_type; general.architecture 'clip'\)",
            drop=(gguf.Keys.Clip.PROJECTOR_TYPE,))
    refused(CheckpointError, r"missing tensor 'v.blk.1.attn_k.weight'", drop=("v.blk.1.attn_k.weight",))
    refused(CheckpointError, r"missing tensor 'mm.soft_emb_norm.weight'", drop=("mm.soft_emb_norm.weight",))
    refused(CheckpointError, r"missing metadata key 'clip.vision.block_count'", drop=(cv.BLOCK_COUNT,))
    refused(CheckpointError, r"missing metadata key 'clip.vision.image_mean'", drop=(cv.IMAGE_MEAN,))
    refused(CheckpointError, r"no image encoder", drop=(gguf.Keys.Clip.HAS_VISION_ENCODER,))
    refused(CheckpointError, r"projection_dim 24 is not the text model's hidden size 48",
            ids={**IDS, "text_hidden_size": 48})
    refused(CheckpointError, r"tensor 'v.position_embd.weight' has shape \(35, 32\).*needs \(36, 32\)",
            edit={"v.position_embd.weight": lambda a: a[:-1]})
    refused(CheckpointError, r"tensor 'v.patch_embd.weight' has shape \(32, 14, 14, 3\)",
            edit={"v.patch_embd.weight": lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))})
    # 6 patches a side, Gemma 3's kernel of 4 (the key left out) does not divide them
    refused(ConfigError, r"scale_factor 4 does not divide the 6 patches", drop=(cv.Projector.SCALE_FACTOR,))

"""Gemma 3's image encoder (models/vision.py + models/gemma3_vision.py) against transformers'
Gemma3ForConditionalGeneration: tiny random SigLIP towers and projectors saved as HF checkpoints, read back by
`load_params` / `VisionConfig.from_hf_config`, encoded by `encode_images` and compared with HF's
`get_image_features`; both checkpoint name layouts, bfloat16, config defaults and refusals; and engine/images.py's
Gemma 3 processor against transformers' PIL-backend Gemma3ImageProcessor."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fresh
from engine.images import ImageProcessor, load_image
from models import gemma3_vision, vision
from models.vision import VisionConfig
from test_images import random_image

TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=12)
# 84 pixels in patches of 14: a 6 x 6 grid, pooled by 2 (9 tokens) or by 3 (4 tokens)
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=84,
             patch_size=14, vision_use_head=False)
TOKENS = dict(image_token_index=63, boi_token_index=61, eoi_token_index=62)

_encode = jax.jit(vision.encode_images, static_argnums=1)


def tiny_gemma3(key: str, mm_tokens_per_image: int, image_size: int = TOWER["image_size"], mmproj_exact: bool = False):
    """A tiny random HF Gemma 3 in float32 (TEXT, TOWER, TOKENS), every weight outside the language model moved off
    its initial value (HF's init leaves biases and mm_soft_emb_norm at 0, LayerNorm scales at 1) by a draw of 0.1
    standard deviations; mm_soft_emb_norm by 0.5, so that its scale's 1 + w is far from both 1 and w. mmproj_exact:
    mm_input_projection_weight rounded to float16 and mm_soft_emb_norm to multiples of 2^-16, which llama.cpp's
    converter keeps exactly (it writes the projection in F16 and adds 1 to the norm in float32)."""
    import torch
    import transformers

    config = transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(**{**TOWER, "image_size": image_size}),
        text_config=transformers.Gemma3TextConfig(**TEXT), mm_tokens_per_image=mm_tokens_per_image, **TOKENS)
    torch.manual_seed(fresh.seed(key))
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "language_model" not in name:
                t.add_((0.5 if "soft_emb_norm" in name else 0.1) * torch.randn_like(t))
            if mmproj_exact and "mm_input_projection" in name:
                t.copy_(t.half().float())
            if mmproj_exact and "soft_emb_norm" in name:
                t.copy_(torch.round(t * 2**16) / 2**16)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """-> get(mm_tokens_per_image): (`tiny_gemma3`, the directory it was saved to), each built once per module."""
    built = {}

    def get(mm_tokens_per_image: int):
        if mm_tokens_per_image not in built:
            model = tiny_gemma3(f"{__name__}::checkpoints[{mm_tokens_per_image}]", mm_tokens_per_image)
            directory = tmp_path_factory.mktemp(f"gemma3-{mm_tokens_per_image}")
            model.save_pretrained(str(directory))
            built[mm_tokens_per_image] = model, str(directory)
        return built[mm_tokens_per_image]

    return get


def _hf_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def _hf_features(model, pixels: np.ndarray) -> np.ndarray:
    """HF's get_image_features in float64 (a copy of the model): the reference the float32 encoder is held to."""
    import copy
    import torch

    with torch.no_grad():
        out = copy.deepcopy(model).double().model.get_image_features(pixel_values=torch.from_numpy(pixels).double())
    return out.pooler_output.numpy()


@pytest.mark.parametrize("mm_tokens", [9, 4])
def test_encode_images_is_transformers(checkpoints, mm_tokens):
    """1 and 3 images at once, float32 weights: HF's features (float64) to a relative 1e-5."""
    model, directory = checkpoints(mm_tokens)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    assert (vcfg.projector, vcfg.post_norm, vcfg.tokens_per_image, vcfg.text_hidden_size) == (
        "gemma3", True, mm_tokens, TEXT["hidden_size"])
    assert (vcfg.image_token_id, vcfg.boi_token_id, vcfg.eoi_token_id) == (63, 61, 62)
    params = vision.load_params(directory, vcfg)
    for num_images in (1, 3):
        pixels = fresh.rng().standard_normal((num_images, 3, 84, 84), dtype=np.float32)
        want = _hf_features(model, pixels)
        got = np.asarray(_encode(params, vcfg, jnp.asarray(pixels)))
        assert got.dtype == np.float32 and got.shape == want.shape == (num_images, mm_tokens, TEXT["hidden_size"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_attention_in_query_blocks_is_the_whole_attention(checkpoints, monkeypatch):
    """An image of more tokens than vision.ATTENTION_BLOCK attends in blocks of that many queries (the last one padded):
    HF's features all the same. Here 36 patches in blocks of 8 (4 whole, one of 4)."""
    import functools

    model, directory = checkpoints(9)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    params = vision.load_params(directory, vcfg)
    pixels = fresh.rng().standard_normal((2, 3, 84, 84), dtype=np.float32)
    monkeypatch.setattr(vision, "ATTENTION_BLOCK", 8)
    got = np.asarray(jax.jit(functools.partial(vision.encode_images, vcfg=vcfg))(params, pixels=jnp.asarray(pixels)))
    want = _hf_features(model, pixels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    q, k, v = (jnp.asarray(fresh.rng().standard_normal((2, 36, 4, 8), dtype=np.float32)) for _ in range(3))
    np.testing.assert_allclose(vision._attention(q, k, v, 8), vision._attention(q, k, v, 36), rtol=1e-6, atol=1e-6)


def test_bfloat16_params_load_and_run(checkpoints):
    """Weights read as bfloat16 encode in bfloat16, near HF's float32 features (bfloat16's 8 bits of precision)."""
    model, directory = checkpoints(4)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    params = vision.load_params(directory, vcfg, dtype=ml_dtypes.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    pixels = fresh.rng().standard_normal((2, 3, 84, 84), dtype=np.float32)
    got = _encode(params, vcfg, jnp.asarray(pixels))
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 4, TEXT["hidden_size"])
    want = _hf_features(model, pixels)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=0, atol=0.05 * np.abs(want).max())


# (tower prefix, projector prefix): transformers 5.x saves the first; 4.x checkpoints (google/gemma-3-*) the second
LAYOUTS = [("vision_tower.", "multi_modal_projector."), ("vision_tower.vision_model.", "multi_modal_projector."),
           ("model.vision_tower.vision_model.", "model.multi_modal_projector."),
           ("model.vision_tower.", "model.multi_modal_projector.")]


@pytest.mark.parametrize("tower, projector", LAYOUTS, ids=lambda prefix: prefix.rstrip("."))
def test_load_params_name_layouts(checkpoints, tmp_path, tower, projector):
    """The saved checkpoint renamed to each layout reads as the saved one, bit for bit; its tensors in bfloat16 read as
    the saved ones rounded to bfloat16."""
    from safetensors.numpy import load_file, save_file

    _, directory = checkpoints(9)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    saved = load_file(os.path.join(directory, "model.safetensors"))
    assert "vision_tower.post_layernorm.weight" in saved and "multi_modal_projector.mm_input_projection_weight" in saved

    def renamed(name: str) -> str:
        for old, new in (("vision_tower.", tower), ("multi_modal_projector.", projector)):
            if name.startswith(old):
                return new + name.removeprefix(old)
        return name  # the language model's

    tensors = {renamed(n): a for n, a in saved.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    want = vision.load_params(directory, vcfg)
    assert jax.tree.map(np.shape, want) == vision.param_shapes(vcfg)
    got = vision.load_params(str(tmp_path), vcfg)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got["projector"]["w"], saved["multi_modal_projector.mm_input_projection_weight"])

    bf16 = {n: a.astype(ml_dtypes.bfloat16) for n, a in tensors.items()}
    save_file(bf16, str(tmp_path / "model.safetensors"))
    for g, w in zip(jax.tree.leaves(vision.load_params(str(tmp_path), vcfg)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w.astype(ml_dtypes.bfloat16).astype(np.float32))

    for missing in (f"{tower}post_layernorm.bias", f"{projector}mm_soft_emb_norm.weight",
                    f"{projector}mm_input_projection_weight"):
        save_file({n: a for n, a in tensors.items() if n != missing}, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=re.escape(missing.removeprefix("model."))):  # a probe: under either
            vision.load_params(str(tmp_path), vcfg)


# google/gemma-3-4b-it's config.json, less the text model's fields: the vision config says only a few of its fields
PUBLISHED = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3", "text_config": {"hidden_size": 2560, "model_type": "gemma3_text"},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}


@pytest.mark.parametrize("raw", [PUBLISHED, {"model_type": "gemma3", "vision_config": {"image_size": 896,
                                                                                       "patch_size": 14}}],
                         ids=["published", "minimal"])
def test_config_defaults_are_transformers(raw):
    """A config.json read as transformers resolves it (its classes' defaults for what it leaves out); 256 rows an
    image, the count of <image_soft_token>s HF's Gemma3Processor puts in a prompt."""
    import inspect
    import transformers

    vcfg = VisionConfig.from_hf_config(raw)
    hf = transformers.Gemma3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    hv = hf.vision_config
    assert (vcfg.kind, vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_layers, vcfg.num_heads) == (
        "siglip", hv.hidden_size, hv.intermediate_size, hv.num_hidden_layers, hv.num_attention_heads)
    assert (vcfg.image_size, vcfg.patch_size, vcfg.num_channels, vcfg.hidden_act, vcfg.layer_norm_eps) == (
        hv.image_size, hv.patch_size, hv.num_channels, hv.hidden_act, hv.layer_norm_eps)
    assert (vcfg.num_pooled_tokens, vcfg.text_hidden_size) == (hf.mm_tokens_per_image, hf.text_config.hidden_size)
    assert (vcfg.image_token_id, vcfg.boi_token_id, vcfg.eoi_token_id) == (
        hf.image_token_id, hf.boi_token_id, hf.eoi_token_id) == (262144, 255999, 256000)
    image_seq_length = inspect.signature(transformers.Gemma3Processor.__init__).parameters["image_seq_length"]
    assert vcfg.tokens_per_image == 256 == image_seq_length.default
    assert (vcfg.feature_layers, vcfg.num_layers_run, vcfg.select_strategy) == ((-1,), hv.num_hidden_layers, "full")


def test_from_hf_config_refusals():
    """What HF's Gemma 3 cannot encode is refused by name when the config is read: a pooled count that is not a square
    (HF's int(sqrt) pools to another count), a patch grid the pool does not tile (HF's AvgPool2d leaves more rows,
    shown), a tower other than SigLIP's; and hand-built configs that mix the projectors' fields."""
    import torch
    import transformers

    for raw, message in [
        (PUBLISHED | {"mm_tokens_per_image": 255}, "mm_tokens_per_image 255 is not a positive square"),
        (PUBLISHED | {"mm_tokens_per_image": 0}, "mm_tokens_per_image 0 is not a positive square"),
        (PUBLISHED | {"mm_tokens_per_image": None}, "mm_tokens_per_image None is not a positive square"),
        (PUBLISHED | {"mm_tokens_per_image": 9},
         r"64 patches per side is not a multiple of sqrt\(mm_tokens_per_image\) = 3"),
        (PUBLISHED | {"mm_tokens_per_image": 65536}, "64 patches per side is not a multiple"),  # a pool of 0 pixels
        (PUBLISHED | {"vision_config": PUBLISHED["vision_config"] | {"model_type": "clip_vision_model"}},
         "gemma3's projector needs a siglip_vision_model tower"),
        (PUBLISHED | {"vision_config": PUBLISHED["vision_config"] | {"model_type": "pixtral"}},
         "vision_config.model_type 'pixtral'"),
        (PUBLISHED | {"vision_config": PUBLISHED["vision_config"] | {"image_size": [896, 448]}},
         r"vision_config.image_size \[896, 448\] is not square"),
    ]:
        with pytest.raises(ValueError, match=message):
            VisionConfig.from_hf_config(raw)
    assert VisionConfig.from_hf_config({"model_type": "gemma3"}) is None  # no vision_config
    assert VisionConfig.from_hf_config({"model_type": "gemma3_text", "hidden_size": 8}) is None

    # HF's projector on a 6 x 6 grid asked for 16 tokens: a pool of 1 leaves 36 rows, not the prompt's 16
    config = transformers.Gemma3Config(vision_config=transformers.SiglipVisionConfig(**TOWER),
                                       text_config=transformers.Gemma3TextConfig(**TEXT), mm_tokens_per_image=16)
    projector = transformers.models.gemma3.modeling_gemma3.Gemma3MultiModalProjector(config)
    assert projector(torch.zeros(1, 36, TOWER["hidden_size"])).shape[1] == 36
    with pytest.raises(ValueError, match="6 patches per side is not a multiple of sqrt"):
        VisionConfig.from_hf_config(config.to_dict())

    vcfg = VisionConfig.from_hf_config(PUBLISHED)
    for change, message in [(dict(projector="mlp"), "projector 'mlp' is not supported"),
                            (dict(feature_layers=(-2,)), r"post_norm follows the last layer only.*\[-2\]"),
                            (dict(select_strategy="default"), "gemma3's projector needs .*'default'"),
                            (dict(grid_pinpoints=((896, 1792),)), "gemma3's projector needs")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(vcfg, **change)


def test_init_params_shapes_and_dtype():
    raw = {"model_type": "gemma3", "text_config": {"hidden_size": 16}, "mm_tokens_per_image": 9,
           "vision_config": {k: v for k, v in TOWER.items() if k != "vision_use_head"}}
    vcfg = VisionConfig.from_hf_config(raw)
    params = vision.init_params(vcfg, jax.random.key(fresh.seed()), dtype=jnp.bfloat16)
    shapes = vision.param_shapes(vcfg)
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    assert shapes["projector"] == {"w": (32, 16), "norm": (32,)} == gemma3_vision.projector_shapes(vcfg)
    assert shapes["embed"]["post_norm"] == shapes["embed"]["post_norm_bias"] == (32,)
    assert abs(float(params["embed"]["post_norm"].astype(jnp.float32).mean()) - 1) < 0.1  # a LayerNorm scale
    assert abs(float(params["projector"]["norm"].astype(jnp.float32).mean())) < 0.1  # Gemma's: 1 + w
    pixels = jnp.asarray(fresh.rng().standard_normal((3, 3, 84, 84), dtype=np.float32))
    out = _encode(params, vcfg, pixels)
    assert out.dtype == jnp.bfloat16 and out.shape == (3, vcfg.tokens_per_image, 16) == (3, 9, 16)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# ---------------------------------------------------------------------------------------------- the processor
PROCESSORS = {
    "published": {  # google/gemma-3-4b-it's preprocessor_config.json
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": 256,
        "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"height": 896, "width": 896}},
    "defaults": {"image_processor_type": "Gemma3ImageProcessor"},  # the class's: 224 x 224, bilinear
    # an int size (a square: default_to_square), pan and scan's options off, bicubic, another mean and std
    "small-int-size": {"image_processor_type": "Gemma3ImageProcessorFast", "size": 45, "resample": 3,
                       "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                       "pan_and_scan_min_ratio_to_activate": 1.2, "image_mean": [0.4, 0.5, 0.6],
                       "image_std": [0.2, 0.3, 0.25]},
    "small-rect": {"image_processor_type": "Gemma3ImageProcessorPil", "size": {"height": 40, "width": 56}},
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_processor_is_transformers(name, tmp_path):
    """Up- and downscaled images, RGB and not (grayscale, RGBA over white, a palette with a transparent colour): the
    pixels of transformers' PIL-backend processor, to the bit."""
    from transformers import AutoImageProcessor

    config = PROCESSORS[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(reference).__name__ == "Gemma3ImageProcessorPil", type(reference)
    processor = ImageProcessor.from_dir(str(tmp_path))
    height, width = processor.size_hw
    rng = fresh.rng()
    sizes = [("RGB", int(rng.integers(5, height)), int(rng.integers(5, width))),  # upscaled
             ("RGB", int(rng.integers(height + 1, 3 * height)), int(rng.integers(width + 1, 3 * width))),  # down
             ("RGB", int(rng.integers(5, height)), int(rng.integers(width + 1, 3 * width))),  # one side each
             ("L", int(rng.integers(5, 2 * height)), int(rng.integers(5, 2 * width))),
             ("RGBA", int(rng.integers(5, 2 * height)), int(rng.integers(5, 2 * width))),
             ("P", int(rng.integers(5, 2 * height)), int(rng.integers(5, 2 * width)))]
    # NOTE: the published config's "do_convert_rgb": null turns HF's conversion off (grayscale fails in it): HF gets
    # load_image's RGB image there, as the engine's processor always does
    converts = config.get("do_convert_rgb", True) is not None
    for mode, h, w in sizes:
        image = random_image(rng, mode, h, w)
        want = reference(images=[image if converts else load_image(image)], return_tensors="np")["pixel_values"][0]
        got = processor(load_image(image))
        assert got.dtype == np.float32 and got.shape == want.shape == (3, height, width), (mode, h, w)
        assert np.abs(got - want).max() == 0.0, f"{name} {mode} {h}x{w}"
        np.testing.assert_array_equal(processor(image), got)  # converts to RGB itself too


def test_processor_from_dict_and_refusals():
    p = ImageProcessor.from_dict(PROCESSORS["published"])
    assert (p.size_hw, p.resample, p.crop_hw, p.image_mean, p.image_std, p.shortest_edge) == (
        (896, 896), 2, None, (0.5,) * 3, (0.5,) * 3, None)
    assert ImageProcessor.from_dict(PROCESSORS["defaults"]).size_hw == (224, 224)  # transformers' class default
    assert ImageProcessor.from_dict(PROCESSORS["small-int-size"]).size_hw == (45, 45)  # not a shortest edge
    off = {**PROCESSORS["published"], "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
           "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}
    assert ImageProcessor.from_dict(off) == p  # pan and scan's options, ignored while it is off
    with pytest.raises(ValueError, match="do_pan_and_scan=True"):
        ImageProcessor.from_dict({**off, "do_pan_and_scan": True})
    with pytest.raises(ValueError, match="shortest_edge"):  # the tower reads one size
        ImageProcessor.from_dict({**PROCESSORS["published"], "size": {"shortest_edge": 896}})
    with pytest.raises(ValueError, match="Gemma3nImageProcessor"):
        ImageProcessor.from_dict({"image_processor_type": "Gemma3nImageProcessor"})

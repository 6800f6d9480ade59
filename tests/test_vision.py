"""models/vision.py against transformers' LlavaForConditionalGeneration: tiny random CLIP and SigLIP towers saved as
HF checkpoints, read back by `load_params` / `VisionConfig.from_hf_config`, encoded by `encode_images` and compared
with HF's image features for each feature-layer selection and select strategy; the checkpoint name layouts, shards
and bfloat16; what the config refuses."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models import anyres, vision
from models.vision import VisionConfig
import fresh

TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)
# 18 pixels in patches of 4: a 4 x 4 grid, the conv dropping the last 2 rows and columns as HF's does
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=18,
             patch_size=4)
IMAGE_TOKEN = 63

_encode = jax.jit(vision.encode_images, static_argnums=1)


def _saved(model_cls, config, key: str, directory) -> tuple:
    """(a random `model_cls(config)` with every weight outside the language model moved off its initial value (HF's
    init leaves biases at 0 and norm scales at 1), the directory it is saved in)."""
    import torch

    torch.manual_seed(fresh.seed(key))
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "language_model" not in name:
                t.add_(0.1 * torch.randn_like(t))
    model.save_pretrained(str(directory))
    return model, str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """-> get(kind, num_feature_layers): (a tiny random HF LLaVA in float32, the directory it was saved to), each
    built once per module. Every weight of the tower and projector is perturbed (HF's init leaves biases at 0 and
    LayerNorms at 1)."""
    built = {}

    def get(kind: str, num_feature_layers: int):
        import transformers

        if (kind, num_feature_layers) not in built:
            tower = (transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig)(**TOWER)
            config = transformers.LlavaConfig(
                vision_config=tower, text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
                vision_feature_layer=-2 if num_feature_layers == 1 else [-2, -1])
            built[kind, num_feature_layers] = _saved(
                transformers.LlavaForConditionalGeneration, config, f"{__name__}::checkpoints[{kind}-{num_feature_layers}]",
                tmp_path_factory.mktemp(f"llava-{kind}-{num_feature_layers}"))
        return built[kind, num_feature_layers]

    return get


def _hf_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


# every selection with either strategy, and hidden_states[0] (the embeddings: CLIP's after its pre-LayerNorm) once
SELECTIONS = [(layers, strategy) for layers in (-2, -1, [-2, -1]) for strategy in ("default", "full")] + [([0, 2], "full")]


@pytest.mark.parametrize("layers, strategy", SELECTIONS, ids=str)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encode_images_is_transformers(checkpoints, kind, layers, strategy):
    import torch

    model, directory = checkpoints(kind, 1 if isinstance(layers, int) else len(layers))
    hf = _hf_config(directory) | {"vision_feature_layer": layers, "vision_feature_select_strategy": strategy}
    vcfg = VisionConfig.from_hf_config(hf)
    assert (vcfg.kind, vcfg.image_token_id, vcfg.text_hidden_size) == (kind, IMAGE_TOKEN, TEXT["hidden_size"])
    params = vision.load_params(directory, vcfg)
    pixels = fresh.rng().standard_normal((2, 3, 18, 18), dtype=np.float32)

    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=torch.from_numpy(pixels), vision_feature_layer=layers,
                                             vision_feature_select_strategy=strategy)
    want = torch.stack(out.pooler_output).numpy()  # a [tokens, text hidden] per image
    got = np.asarray(_encode(params, vcfg, jnp.asarray(pixels)))
    assert got.shape == want.shape == (2, vcfg.tokens_per_image, TEXT["hidden_size"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("tower", ["vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower."])
def test_load_params_name_layouts_shards_bfloat16(checkpoints, tmp_path, tower):
    """The saved checkpoint (transformers 5.x: `vision_tower.*`) renamed to another layout, its tensors in bfloat16 and
    two shards, reads as the original rounded to bfloat16."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file
    import torch

    _, directory = checkpoints("siglip", 2)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    model_prefix = "model." if tower.startswith("model.") else ""
    renamed = {}
    for name, a in load_file(os.path.join(directory, "model.safetensors")).items():
        name = tower + name.removeprefix("vision_tower.") if name.startswith("vision_tower.") else model_prefix + name
        renamed[name] = torch.from_numpy(a).to(torch.bfloat16)
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: renamed[n] for n in shard}, str(tmp_path / file))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: file for file, shard in shards.items() for n in shard}}, f)

    want = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), vision.load_params(directory, vcfg))
    got = vision.load_params(str(tmp_path), vcfg)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


def test_load_params_names_a_missing_tensor(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, directory = checkpoints("clip", 1)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    missing = "vision_tower.encoder.layers.1.mlp.fc2.bias"  # layer 1 of the 2 that feature layer -2 runs
    save_file({n: a for n, a in tensors.items() if n != missing}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        vision.load_params(str(tmp_path), vcfg)
    save_file({n: a for n, a in tensors.items() if "projector" not in n}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight"):
        vision.load_params(str(tmp_path), vcfg)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_config_defaults_are_transformers(kind):
    """A config.json that leaves the tower's fields at their defaults (as llava-1.5's does) reads as transformers
    resolves it; llava-1.5's encoder gives its image_seq_length of 576 tokens per image."""
    import transformers

    tower = {"model_type": f"{kind}_vision_model", "hidden_size": 64, "image_size": 336, "patch_size": 14,
             "num_hidden_layers": 4, "num_attention_heads": 4}
    raw = {"model_type": "llava", "vision_config": tower, "text_config": {"model_type": "llama"}}
    vcfg = VisionConfig.from_hf_config(raw)
    hf = transformers.LlavaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    hv = hf.vision_config
    assert (vcfg.hidden_act, vcfg.layer_norm_eps, vcfg.num_channels, vcfg.intermediate_size) == (
        hv.hidden_act, hv.layer_norm_eps, hv.num_channels, hv.intermediate_size)
    assert (vcfg.feature_layers, vcfg.select_strategy, vcfg.projector_act, vcfg.projector_bias) == (
        (hf.vision_feature_layer,), hf.vision_feature_select_strategy, hf.projector_hidden_act,
        hf.multimodal_projector_bias)
    assert (vcfg.text_hidden_size, vcfg.image_token_id) == (hf.text_config.hidden_size, hf.image_token_id)
    # llava-1.5: CLIP ViT-L/14 at 336 pixels, the class token dropped
    assert vcfg.tokens_per_image == (hf.image_seq_length if kind == "clip" else hf.image_seq_length - 1)
    assert vcfg.num_layers_run == 3  # hidden_states[-2] of 4 layers


def test_from_hf_config_refuses_what_it_does_not_implement():
    base = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}
    assert VisionConfig.from_hf_config({"model_type": "llama", "hidden_size": 8}) is None
    assert VisionConfig.from_hf_config({"model_type": "llava"}) is None
    for raw, field in [
        ({**base, "vision_config": {"model_type": "pixtral"}}, "vision_config.model_type 'pixtral'"),
        ({**base, "vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls'"),
        ({**base, "projector_hidden_act": "swish"}, "projector_hidden_act 'swish'"),
        ({**base, "vision_config": {"model_type": "clip_vision_model", "hidden_act": "relu"}}, "vision_config.hidden_act"),
        ({**base, "vision_feature_layer": -14}, "vision_feature_layer"),  # 12 layers: hidden_states -13..12
    ]:
        with pytest.raises(ValueError, match=field):
            VisionConfig.from_hf_config(raw)


def test_init_params_shapes_and_dtype():
    raw = {"model_type": "llava", "vision_feature_layer": [1, -1], "text_config": {"hidden_size": 16},
           "vision_config": {"model_type": "siglip_vision_model", **TOWER}}
    vcfg = VisionConfig.from_hf_config(raw)
    params = vision.init_params(vcfg, jax.random.key(fresh.seed()), dtype=jnp.bfloat16)
    shapes = vision.param_shapes(vcfg)
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    assert shapes["layers"]["wq"][0] == vcfg.num_layers_run == 3
    assert shapes["projector"]["w1"] == (2 * TOWER["hidden_size"], 16)
    assert abs(float(params["layers"]["ln1"].astype(jnp.float32).mean()) - 1) < 0.1
    pixels = jnp.asarray(fresh.rng().standard_normal((3, 3, 18, 18), dtype=np.float32))
    out = _encode(params, vcfg, pixels)
    assert out.dtype == jnp.bfloat16 and out.shape == (3, vcfg.tokens_per_image, 16) == (3, 15, 16)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
# 28 pixels in patches of 7: tiles of 4 x 4 features; grids of 1x2, 2x1, 2x2, 3x1 and 1x3 tiles
NEXT_TOWER = TOWER | dict(image_size=28, patch_size=7)
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# (height, width): square (nothing cut), landscape (rows cut), portrait (columns cut), a grid it fills exactly,
# extreme ones on 1x3 and 3x1 grids (an odd padding), ones whose unpadded map keeps no row, or no column, and one
# whose extent on the map is 2.9999999999999996 in floats (3 after HF's rounding to 7 decimals: a padding of 0, not 1)
SIZES = [(30, 30), (100, 190), (190, 100), (56, 28), (37, 300), (300, 41), (10, 1000), (1000, 9), (47, 188)]
STRATEGY = {"clip": "default", "siglip": "full"}  # the strategy that leaves a tile its grid of patches


@pytest.fixture(scope="module")
def next_checkpoints(tmp_path_factory):
    """-> get(kind): (a tiny random HF LlavaNext in float32 with the strategy its tower needs, the directory it was
    saved to), each built once per module; every weight of the tower and projector and image_newline perturbed."""
    built = {}

    def get(kind: str):
        import transformers

        if kind not in built:
            tower = (transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig)(**NEXT_TOWER)
            config = transformers.LlavaNextConfig(
                vision_config=tower, text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
                image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy=STRATEGY[kind])
            built[kind] = _saved(transformers.LlavaNextForConditionalGeneration, config,
                                 f"{__name__}::next_checkpoints[{kind}]", tmp_path_factory.mktemp(f"llava-next-{kind}"))
        return built[kind]

    return get


def _grid(size_hw) -> tuple[int, int]:
    """The tile grid HF's preprocessing and model choose for an image of size_hw (height, width)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(list(size_hw), PINPOINTS)
    return height // NEXT_TOWER["image_size"], width // NEXT_TOWER["image_size"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pack_features_of_encode_images_is_transformers(next_checkpoints, kind):
    """All SIZES' tiles through encode_images in one batch, each image's packed: HF's get_image_features for the
    batch (tiles padded to the most any image has), row for row."""
    import torch

    model, directory = next_checkpoints(kind)
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    assert (vcfg.grid_pinpoints, vcfg.image_newline, vcfg.tokens_per_image) == (tuple(map(tuple, PINPOINTS)), True, 16)
    params = vision.load_params(directory, vcfg)
    grids = [_grid(size) for size in SIZES]
    num_tiles = [1 + rows * cols for rows, cols in grids]
    pixels = fresh.rng().standard_normal((len(SIZES), max(num_tiles), 3, 28, 28), dtype=np.float32)

    with torch.no_grad():
        want = model.model.get_image_features(pixel_values=torch.from_numpy(pixels),
                                              image_sizes=torch.tensor(SIZES)).pooler_output
    tiles = np.concatenate([p[:n] for p, n in zip(pixels, num_tiles)])  # [sum(num_tiles), 3, 28, 28]
    encoded = np.split(np.asarray(_encode(params, vcfg, jnp.asarray(tiles))), np.cumsum(num_tiles)[:-1])
    for size, grid, features, w in zip(SIZES, grids, encoded, want):
        got = anyres.pack_features(vcfg, features, params["image_newline"], grid, size)
        w = w.numpy()
        assert got.shape == w.shape == (anyres.packed_tokens(vcfg, grid, size), TEXT["hidden_size"]), size
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-4 * np.abs(w).max(), err_msg=str(size))


@pytest.mark.parametrize("newline", [True, False], ids=["newline", "no-newline"])
def test_pack_features_is_transformers_pack_image_features(next_checkpoints, newline):
    """Packing alone, on random features: HF's pack_image_features, with its image_newline or without (None), equal
    to the bit."""
    import dataclasses
    import torch

    model, directory = next_checkpoints("clip")
    vcfg = dataclasses.replace(VisionConfig.from_hf_config(_hf_config(directory)), image_newline=newline)
    rng = fresh.rng()
    line = rng.standard_normal(TEXT["hidden_size"], dtype=np.float32) if newline else None
    for size in SIZES:
        grid = _grid(size)
        features = rng.standard_normal((1 + grid[0] * grid[1], 16, TEXT["hidden_size"]), dtype=np.float32)
        with torch.no_grad():
            (want,), lens = model.model.pack_image_features(
                [torch.from_numpy(features)], torch.tensor([size]), "default",
                image_newline=None if line is None else torch.from_numpy(line))
        got = anyres.pack_features(vcfg, features, line, grid, size)
        np.testing.assert_array_equal(got, want.numpy(), err_msg=str(size))
        assert len(got) == anyres.packed_tokens(vcfg, grid, size) == int(lens[0])


def _processor_count(pinpoints, image_size: int, patch_size: int, size_hw) -> int:
    """The placeholder count HF's LlavaNextProcessor gives an image of size_hw (a CLIP tower, "default")."""
    import transformers
    from types import SimpleNamespace

    processor = transformers.LlavaNextProcessor.__new__(transformers.LlavaNextProcessor)  # no tokenizer needed
    processor.image_processor = SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints])
    processor.patch_size, processor.num_additional_image_tokens = patch_size, 1
    return processor._get_number_of_features(*size_hw, image_size, image_size) - 1  # "default" drops the class token


def test_packed_tokens_is_the_processors_count():
    """llava-v1.6's geometry (CLIP 336/14, the default pinpoints), over square, exact-fit, extreme and random sizes:
    packed_tokens is the count of placeholder tokens HF's processor puts in the prompt."""
    from transformers.image_processing_utils import select_best_resolution

    tower = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    vcfg = VisionConfig.from_hf_config({"model_type": "llava_next", "vision_config": tower})
    assert vcfg.grid_pinpoints == vision.LLAVA_NEXT_PINPOINTS and vcfg.tokens_per_image == 576
    sizes = [(336, 336), (672, 672), (336, 1008), (1008, 336), (480, 640), (640, 480), (1, 4000), (4000, 1), (7, 3),
             (55, 176), (88, 99)]  # the last two: HF's rounding to 7 decimals changes the padding
    sizes += [tuple(int(x) for x in pair) for pair in fresh.rng().integers(1, 2000, size=(200, 2))]
    for size in sizes:
        height, width = select_best_resolution(list(size), [list(p) for p in vcfg.grid_pinpoints])
        count = anyres.packed_tokens(vcfg, (height // 336, width // 336), size)
        assert count == _processor_count(vcfg.grid_pinpoints, 336, 14, size), size
    assert anyres.packed_tokens(vcfg, (2, 2), (336, 336)) == 576 + 48 * 49  # llava-v1.6's 2928 for a square image


def test_llava_next_config_and_params(next_checkpoints, tmp_path):
    """image_newline read under either name (and named when missing), in the shapes and random init; a llava config
    has no pinpoints and no newline."""
    from safetensors.numpy import load_file, save_file

    _, directory = next_checkpoints("clip")
    vcfg = VisionConfig.from_hf_config(_hf_config(directory))
    want = vision.load_params(directory, vcfg)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    save_file({("model." if n == "image_newline" else "") + n: a for n, a in tensors.items()},
              str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(vision.load_params(str(tmp_path), vcfg)["image_newline"], want["image_newline"])
    save_file({n: a for n, a in tensors.items() if n != "image_newline"}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'image_newline'"):
        vision.load_params(str(tmp_path), vcfg)

    shapes = vision.param_shapes(vcfg)
    assert shapes["image_newline"] == (TEXT["hidden_size"],) == want["image_newline"].shape
    assert jax.tree.map(lambda a: a.shape, vision.init_params(vcfg, jax.random.key(fresh.seed()))) == shapes
    llava = VisionConfig.from_hf_config(_hf_config(directory) | {"model_type": "llava"})
    assert (llava.grid_pinpoints, llava.image_newline) == ((), False)
    assert "image_newline" not in vision.param_shapes(llava)


def test_llava_next_refusals(next_checkpoints):
    """What HF's LLaVA-NeXT cannot lay out is refused when the config is read: a strategy that leaves a tile other
    than its grid of patches (HF fails: CLIP with "full" is shown), pinpoints that are not pairs of multiples of
    image_size, none; and pack_features' arguments that do not match."""
    import torch

    model, directory = next_checkpoints("clip")
    pixels = torch.from_numpy(fresh.rng().standard_normal((1, 3, 3, 28, 28), dtype=np.float32))
    with pytest.raises(RuntimeError), torch.no_grad():
        model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[28, 56]]),
                                       vision_feature_select_strategy="full")
    base = _hf_config(directory)
    siglip = base | {"vision_config": base["vision_config"] | {"model_type": "siglip_vision_model"}}
    for raw, message in [
        (base | {"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full' leaves 17"),
        (siglip | {"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy 'default' leaves 15"),
        (base | {"image_grid_pinpoints": [[28, 56], [28, 42]]}, r"image_grid_pinpoints \[\[28, 42\]\]"),
        (base | {"image_grid_pinpoints": [[28]]}, "image_grid_pinpoints"),
        (base | {"image_grid_pinpoints": [[0, 28]]}, "image_grid_pinpoints"),
        (base | {"image_grid_pinpoints": []}, "image_grid_pinpoints is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            VisionConfig.from_hf_config(raw)
    assert VisionConfig.from_hf_config(siglip | {"vision_feature_select_strategy": "full"}).tokens_per_image == 16

    vcfg = VisionConfig.from_hf_config(base)
    features, line = np.zeros((5, 16, 24), np.float32), np.zeros(24, np.float32)
    with pytest.raises(ValueError, match="a 1x2 grid takes"):
        anyres.pack_features(vcfg, features, line, (1, 2), (28, 56))
    with pytest.raises(ValueError, match="newline missing"):
        anyres.pack_features(vcfg, features, None, (2, 2), (56, 56))

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

from models import vision
from models.vision import VisionConfig
import fresh

TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)
# 18 pixels in patches of 4: a 4 x 4 grid, the conv dropping the last 2 rows and columns as HF's does
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=18,
             patch_size=4)
IMAGE_TOKEN = 63

_encode = jax.jit(vision.encode_images, static_argnums=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """-> get(kind, num_feature_layers): (a tiny random HF LLaVA in float32, the directory it was saved to), each
    built once per module. Every weight of the tower and projector is perturbed (HF's init leaves biases at 0 and
    LayerNorms at 1)."""
    built = {}

    def get(kind: str, num_feature_layers: int):
        import torch
        import transformers

        if (kind, num_feature_layers) not in built:
            tower = (transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig)(**TOWER)
            config = transformers.LlavaConfig(
                vision_config=tower, text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
                vision_feature_layer=-2 if num_feature_layers == 1 else [-2, -1])
            torch.manual_seed(fresh.seed(f"{__name__}::checkpoints[{kind}-{num_feature_layers}]"))
            model = transformers.LlavaForConditionalGeneration(config).eval()
            with torch.no_grad():
                for name, t in model.named_parameters():
                    if "language_model" not in name:
                        t.add_(0.1 * torch.randn_like(t))
            directory = str(tmp_path_factory.mktemp(f"llava-{kind}-{num_feature_layers}"))
            model.save_pretrained(directory)
            built[kind, num_feature_layers] = (model, directory)
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

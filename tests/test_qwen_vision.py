"""models/qwen_vision.py and engine/qwen_images.py against transformers: tiny random Qwen2-VL, Qwen2.5-VL, Qwen3.5 and
Qwen3-VL models saved as HF checkpoints, read back by `QwenVisionConfig.from_hf_config` / `load_params`, encoded image
by image (padded to a bucket) and compared with HF's image features on several images at once (Qwen3-VL's DeepStack
features too); the patch layout against HF's position ids and window partition, Qwen3.5's position taps against HF's
and torch's bilinear resampling; the image processor against Qwen2VLImageProcessorPil; what the configs refuse."""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from engine.images import ImageError
from engine.qwen_images import QwenImageProcessor
from models import qwen_patches, qwen_vision
from models.errors import ConfigError
from models.qwen_vision import QwenVisionConfig
import fresh

TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=0, eos_token_id=1)
# Qwen3.5's language model: one linear-attention (gated delta) layer, small heads
TEXT_3_5 = TEXT | dict(head_dim=12, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=2)
TEXT_3_VL = TEXT | dict(head_dim=12)
# patches of 14 pixels merged 2 x 2; Qwen2.5-VL's windows 84 pixels = 3 x 3 merge blocks, layers 1 and 3 full;
# Qwen3.5's and Qwen3-VL's learned positions a 6 x 6 table; Qwen3-VL's deepstack mergers on layers 0 and 2 of 4
TOWERS = {
    "qwen2_vl": dict(depth=3, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=TEXT["hidden_size"],
                       window_size=84, fullatt_block_indexes=[1, 3]),
    "qwen3_5": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=TEXT["hidden_size"],
                    patch_size=14, num_position_embeddings=36),
}
TOWERS["qwen3_vl"] = TOWERS["qwen3_5"] | dict(depth=4, deepstack_visual_indexes=[0, 2])
TEXTS = {"qwen2_vl": TEXT, "qwen2_5_vl": TEXT, "qwen3_5": TEXT_3_5, "qwen3_vl": TEXT_3_VL}
# (t, h, w) in patches: 2 x 2 windows (the lower ones partial), 2 x 1 (the lower partial), one window smaller than
# a window; 96, 60 and 16 patches: buckets of 128, 64 and 64 rows
GRIDS = [(1, 8, 12), (1, 10, 6), (1, 4, 4)]
# against Qwen3.5's 6 x 6 positions: up on both axes, up on h and as is on w, down on both, down on h and up on w
POSITION_GRIDS = GRIDS + [(1, 2, 14)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """-> get(kind): (a tiny random HF Qwen2-VL / Qwen2.5-VL / Qwen3.5 / Qwen3-VL in float32, its directory),
    each built once per module, every weight of the vision tower moved off its init (biases 0, norm scales 1, Qwen3.5's
    positions the same for every image)."""
    built = {}

    def get(kind: str):
        import torch
        import transformers

        if kind not in built:
            cls, model_cls = {
                "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
                "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
                "qwen3_5": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration),
                "qwen3_vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration),
            }[kind]
            config = cls(vision_config=TOWERS[kind], text_config=TEXTS[kind], image_token_id=60,
                         vision_start_token_id=61)
            torch.manual_seed(fresh.seed(f"{__name__}::checkpoints[{kind}]"))
            model = model_cls(config).eval()
            with torch.no_grad():
                for name, t in model.named_parameters():
                    if "visual" in name:
                        t.add_(0.1 * torch.randn_like(t))
            directory = str(tmp_path_factory.mktemp(kind))
            model.save_pretrained(directory)
            built[kind] = model, directory
        return built[kind]

    return get


def _hf_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def _hf_features(model, patches: np.ndarray, grids) -> list[np.ndarray]:
    """HF's get_image_features, per image: its rows, and (Qwen3-VL) each deepstack layer's beside them in order."""
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(patches), torch.tensor(grids), return_dict=True)
    # pooler_output: a tensor per image; deepstack_features: per deepstack layer, a tensor per image
    per_image = zip(out.pooler_output, *(getattr(out, "deepstack_features", None) or []))
    return [torch.cat(features, dim=-1).numpy() for features in per_image]


def _encode_all(params, cfg, patches: np.ndarray, grids) -> list[np.ndarray]:
    encode_fn = jax.jit(functools.partial(qwen_vision.encode, cfg=cfg))
    starts = np.cumsum([0] + [t * h * w for t, h, w in grids])
    return [qwen_patches.encode_image(encode_fn, params, cfg, patches[a:b], g)
            for a, b, g in zip(starts[:-1], starts[1:], grids)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_5", "qwen3_vl"])
def test_encode_is_transformers(checkpoints, kind):
    """Several images in one HF call (its cu_seqlens keep them apart) against ours one by one, padded to buckets.
    Qwen3.5's and Qwen3-VL's checkpoints have their towers under `model.visual.` (what transformers 5 saves), their
    positions resampled up and down; Qwen3-VL's rows carry its 2 deepstack features after the merger's."""
    model, directory = checkpoints(kind)
    cfg = QwenVisionConfig.from_hf_config(_hf_config(directory))
    assert (cfg.kind, cfg.text_hidden_size, cfg.image_token_id, cfg.vision_start_token_id) == (kind, 24, 60, 61)
    assert cfg.deepstack_layers == ((0, 2) if kind == "qwen3_vl" else ())
    params = qwen_vision.load_params(directory, cfg)
    grids = POSITION_GRIDS if kind in ("qwen3_5", "qwen3_vl") else GRIDS
    patches = fresh.rng().standard_normal((sum(t * h * w for t, h, w in grids), cfg.patch_dim), dtype=np.float32)
    want = _hf_features(model, patches, grids)
    got = _encode_all(params, cfg, patches, grids)
    for g, w, (_, h, wd) in zip(got, want, grids):
        assert g.shape == w.shape == (h * wd // 4, (1 + cfg.deepstack_count) * TEXT["hidden_size"])
        for part_g, part_w in zip(np.split(g, 1 + cfg.deepstack_count, -1), np.split(w, 1 + cfg.deepstack_count, -1)):
            np.testing.assert_allclose(part_g, part_w, rtol=0, atol=1e-4 * np.abs(part_w).max())


@pytest.mark.slow
def test_older_layout_visual_prefix_bfloat16(checkpoints, tmp_path):
    """The Qwen2.5-VL checkpoint with an older config.json (the language model's fields top-level) and transformers
    4.5x's names (`model.visual.*`; 5.x saves `visual.*`), its tensors in bfloat16 and two shards: the same config,
    weights equal to the float32 ones rounded, features close to HF's float32 ones."""
    import ml_dtypes
    from safetensors.numpy import load_file
    from safetensors.torch import save_file
    import torch

    model, directory = checkpoints("qwen2_5_vl")
    hf = _hf_config(directory)
    flat = {k: v for k, v in hf.items() if k != "text_config"} | hf["text_config"] | {"model_type": "qwen2_5_vl"}
    cfg = QwenVisionConfig.from_hf_config(hf)
    assert QwenVisionConfig.from_hf_config(flat) == cfg
    saved = load_file(os.path.join(directory, "model.safetensors"))
    assert qwen_vision.PREFIXES[0] + qwen_vision.PATCH_NAME in saved
    tensors = {("model." if name.startswith("visual.") else "") + name: torch.from_numpy(a).to(torch.bfloat16)
               for name, a in saved.items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, str(tmp_path / file))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: file for file, shard in shards.items() for n in shard}}, f)

    params = qwen_vision.load_params(str(tmp_path), cfg, dtype=ml_dtypes.bfloat16)
    for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(qwen_vision.load_params(directory, cfg))):
        assert g.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(g, w.astype(ml_dtypes.bfloat16))
    patches = fresh.rng().standard_normal((sum(t * h * w for t, h, w in GRIDS[:2]), cfg.patch_dim), dtype=np.float32)
    for g, w in zip(_encode_all(params, cfg, patches, GRIDS[:2]), _hf_features(model, patches, GRIDS[:2])):
        g = g.astype(np.float32)
        assert np.all(np.isfinite(g))
        assert np.abs(g - w).max() < 0.05 * np.abs(w).max()


def test_patch_layout_is_transformers():
    """Rotary coordinates are HF's get_vision_position_ids; windows are the groups HF's get_vision_window_index
    attends within (as sets of merge blocks: HF permutes them into window order, we gather each into a block),
    several per image, some partial; Qwen2-VL has one."""
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    cfg = QwenVisionConfig.from_hf_config({"model_type": "qwen2_5_vl", "vision_config": TOWERS["qwen2_5_vl"],
                                           "text_config": TEXT})
    for grid in GRIDS + [(1, 14, 2)]:
        layout = qwen_patches.patch_layout(cfg, grid)
        positions = get_vision_position_ids(torch.tensor([grid]), cfg.spatial_merge_size).numpy()
        np.testing.assert_array_equal(np.stack([layout["hpos"], layout["wpos"]], -1), positions)
        window_index, cu = get_vision_window_index(torch.tensor([grid]), cfg.spatial_merge_size, cfg.window_size,
                                                   cfg.patch_size)
        cu = (cu.numpy() // cfg.merge_unit).tolist()  # in merge blocks
        hf_windows = sorted(sorted(window_index[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:]))
        blocks = layout["window"][::cfg.merge_unit]
        assert np.all(layout["window"].reshape(-1, cfg.merge_unit) == blocks[:, None])  # whole merge blocks
        ours = sorted(np.flatnonzero(blocks == w).tolist() for w in np.unique(blocks))
        assert ours == hf_windows
    sizes = np.bincount(qwen_patches.patch_layout(cfg, (1, 8, 12))["window"])
    assert sizes.tolist() == [36, 36, 12, 12]  # 4 x 6 merge blocks in windows of 3 x 3
    qwen2 = QwenVisionConfig.from_hf_config({"model_type": "qwen2_vl", "vision_config": TOWERS["qwen2_vl"],
                                             "text_config": TEXT})
    assert not qwen_patches.patch_layout(qwen2, (1, 8, 12))["window"].any()
    with pytest.raises(ValueError, match="grid_thw"):
        qwen_patches.patch_layout(cfg, (1, 5, 4))


@pytest.mark.parametrize("kind", ["qwen2_5_vl", pytest.param("qwen3_5", marks=pytest.mark.slow),
                                  pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_init_params_padding_blocks_and_dtype(monkeypatch, kind):
    """Random weights: every kind's inputs have the same names; an image's rows do not depend on how much padding
    follows, nor on how many queries a full layer takes at a time; in bfloat16, finite rows."""
    cfg = QwenVisionConfig.from_hf_config({"model_type": kind, "vision_config": TOWERS[kind], "text_config": TEXT})
    params = qwen_vision.init_params(cfg, jax.random.key(fresh.seed()), jnp.float32)
    width = (1 + cfg.deepstack_count) * TEXT["hidden_size"]  # Qwen3-VL: 2 deepstack features beside each row
    assert jax.tree.map(lambda a: a.shape, params) == qwen_vision.param_shapes(cfg)
    grid = (1, 4, 6)
    patches = fresh.rng().standard_normal((24, cfg.patch_dim), dtype=np.float32)
    inputs = qwen_patches.encode_inputs(cfg, patches, grid)
    assert tuple(inputs) == qwen_patches.INPUT_KEYS and qwen_patches.padded_len(cfg, 24) == len(inputs["patches"]) == 64
    assert inputs["pos_index"].shape == ((0, 4) if kind == "qwen2_5_vl" else (64, 4))
    # the image unpadded: its 24 rows of each per-row input (the windows' blocks hold only its rows)
    rows = ("patches", "hpos", "wpos", "valid", "slot", "pos_index", "pos_weight")
    encode = jax.jit(functools.partial(qwen_vision.encode, cfg=cfg))
    exact = encode(params, {k: a[:24] if k in rows else a for k, a in inputs.items()})
    padded = qwen_patches.encode_image(encode, params, cfg, patches, grid)
    assert padded.shape == (6, width)
    np.testing.assert_allclose(padded, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    monkeypatch.setattr(qwen_vision, "FULL_BLOCK", 16)  # the 64 padded rows' full layers in 4 blocks of queries
    blocked = qwen_patches.encode_image(jax.jit(functools.partial(qwen_vision.encode, cfg=cfg)), params, cfg, patches,
                                       grid)
    np.testing.assert_allclose(blocked, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = qwen_patches.encode_image(encode, bf16, cfg, patches, grid)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(out.astype(np.float32)))


def test_position_taps_are_transformers():
    """Qwen3.5's taps into its learned positions are HF's get_vision_interpolation_indices_and_weights (bilinear,
    align_corners): the same rows, the same float32 weights; and a table's rows mixed by them are torch's bilinear
    resampling of the table to the image's grid (align_corners), read in the processor's order. Tables of side 6 and
    48 (the default), grids larger, smaller, equal and mixed."""
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    default_grids = [(1, 64, 40), (1, 20, 96), (1, 48, 48), (1, 2, 2)]
    for table, grids in [(36, POSITION_GRIDS + [(1, 6, 6)]), (2304, default_grids)]:
        cfg = QwenVisionConfig.from_hf_config({"model_type": "qwen3_5", "text_config": TEXT,
                                               "vision_config": TOWERS["qwen3_5"] | {"num_position_embeddings": table}})
        side = cfg.position_side
        embed = fresh.rng().standard_normal((table, 3))
        for grid in grids:
            index, weight = qwen_patches.position_taps(cfg, grid)
            want_index, want_weight = get_vision_interpolation_indices_and_weights(
                torch.tensor([grid]), side, mode="bilinear", align_corners=True, spatial_merge_size=2)
            assert index.dtype == np.int32 and weight.dtype == np.float32 and index.shape == (grid[1] * grid[2], 4)
            np.testing.assert_array_equal(index, want_index.numpy())
            np.testing.assert_array_equal(weight, want_weight.numpy())
            resampled = torch.nn.functional.interpolate(torch.from_numpy(embed.T.reshape(1, 3, side, side)),
                                                        size=grid[1:], mode="bilinear", align_corners=True)[0]
            layout = qwen_patches.patch_layout(cfg, grid)
            want = resampled[:, layout["hpos"], layout["wpos"]].T.numpy()  # [n, 3], the processor's order
            # HF's float32 weights against torch's float64 resampling: the taps' places on the side-48 table carry
            # float32 rounding (~1e-6 of a row), times the table's steps between neighbours (~4 here): ~1e-5
            np.testing.assert_allclose((embed[index] * weight[..., None]).sum(1), want, rtol=0, atol=5e-5)


def test_config_defaults_and_refusals():
    import transformers

    # fields a config.json leaves out read as the HF config classes resolve them (older, flat layout)
    for kind, cls in (("qwen2_vl", transformers.Qwen2VLConfig), ("qwen2_5_vl", transformers.Qwen2_5_VLConfig)):
        cfg = QwenVisionConfig.from_hf_config({"model_type": kind, "vision_config": {}, "hidden_size": 3584})
        hv = cls(vision_config={}, hidden_size=3584).vision_config
        hidden = hv.embed_dim if kind == "qwen2_vl" else hv.hidden_size
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.patch_size, cfg.temporal_patch_size,
                cfg.spatial_merge_size, cfg.in_channels, cfg.hidden_act, cfg.rope_theta) == (
            hidden, hv.depth, hv.num_heads, hv.patch_size, hv.temporal_patch_size, hv.spatial_merge_size,
            hv.in_channels, hv.hidden_act, hv.rope_parameters["rope_theta"])
        assert cfg.image_token_id == 151655 and cfg.patch_dim == 3 * 2 * 14 * 14
    assert cfg.window_merges == 4 and cfg.fullatt_block_indexes == (7, 15, 23, 31) and cfg.intermediate_size == 3420
    assert cfg.num_position_embeddings == 0

    # Qwen3.5 and Qwen3-VL, dense and MoE: an empty vision_config reads as HF's defaults (transformers 5's layout),
    # token ids and Qwen3-VL's deepstack layers too
    for cls, kind in ((transformers.Qwen3_5Config, "qwen3_5"), (transformers.Qwen3_5MoeConfig, "qwen3_5"),
                      (transformers.Qwen3VLConfig, "qwen3_vl"), (transformers.Qwen3VLMoeConfig, "qwen3_vl")):
        hf = cls(vision_config={}, text_config={"hidden_size": 3584})
        hv = hf.vision_config
        cfg = QwenVisionConfig.from_hf_config({"model_type": hf.model_type, "vision_config": {},
                                               "text_config": {"hidden_size": 3584}})
        assert (cfg.kind, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.patch_size,
                cfg.temporal_patch_size, cfg.spatial_merge_size, cfg.in_channels, cfg.hidden_act, cfg.out_hidden_size,
                cfg.num_position_embeddings, cfg.rope_theta, cfg.image_token_id, cfg.vision_start_token_id,
                cfg.deepstack_layers) == (
            kind, hv.hidden_size, hv.intermediate_size, hv.depth, hv.num_heads, hv.patch_size,
            hv.temporal_patch_size, hv.spatial_merge_size, hv.in_channels, hv.hidden_act, hv.out_hidden_size,
            hv.num_position_embeddings, hv.rope_parameters["rope_theta"], hf.image_token_id, hf.vision_start_token_id,
            tuple(getattr(hv, "deepstack_visual_indexes", ())))
        assert cfg.position_side == 48 and cfg.window_rows == 1 and cfg.patch_dim == 3 * 2 * 16 * 16
        assert cfg.deepstack_count == (3 if kind == "qwen3_vl" else 0)
    assert cfg.deepstack_layers == (8, 16, 24) and cfg.image_token_id == 151655
    # Qwen3-VL's config class reads a missing vision_config as its defaults (Qwen3.5's: a text-only model, below)
    assert QwenVisionConfig.from_hf_config({"model_type": "qwen3_vl", "text_config": {"hidden_size": 3584}}) == cfg
    # the MoE models' config.json give the dense ones' towers
    for kind, dense_cls, moe_cls in (("qwen3_5", transformers.Qwen3_5Config, transformers.Qwen3_5MoeConfig),
                                     ("qwen3_vl", transformers.Qwen3VLConfig, transformers.Qwen3VLMoeConfig)):
        dense, moe = (QwenVisionConfig.from_hf_config(c(vision_config=TOWERS[kind], text_config=TEXTS[kind]).to_dict())
                      for c in (dense_cls, moe_cls))
        assert dense == moe and dense.num_position_embeddings == 36
    assert dense.deepstack_layers == (0, 2) and dense.num_layers == 4
    # HF reads rope_type "default" as the towers' axial
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    assert QwenVisionConfig.from_hf_config({"model_type": "qwen3_5", "text_config": TEXT, "vision_config":
                                            TOWERS["qwen3_5"] | {"rope_parameters": rope}}).rope_theta == 5000.0

    # not an image encoder: other models, Qwen3.5's text-only configs
    for raw in ({"model_type": "llava", "vision_config": {}}, {"model_type": "qwen3_5", "text_config": TEXT},
                {"model_type": "qwen3_5_moe", "text_config": TEXT, "vision_config": None},
                {"model_type": "qwen3_5_text", **TEXT}, {"model_type": "qwen3_5_moe_text", **TEXT}):
        assert QwenVisionConfig.from_hf_config(raw) is None
    base = {"model_type": "qwen2_5_vl", "text_config": TEXT}
    base_3_5, table = {"model_type": "qwen3_5", "text_config": TEXT}, "num_position_embeddings"
    base_3_vl, deep = {"model_type": "qwen3_vl", "text_config": TEXT}, "deepstack_visual_indexes"
    for raw, field in [
        ({**base, "vision_config": {**TOWERS["qwen2_5_vl"], "window_size": 20}}, "window_size"),
        ({**base, "vision_config": {**TOWERS["qwen2_5_vl"], "hidden_act": "relu"}}, "hidden_act"),
        ({**base, "vision_config": {**TOWERS["qwen2_5_vl"], "out_hidden_size": 16}}, "out_hidden_size"),
        ({**base, "vision_config": {**TOWERS["qwen2_5_vl"], "num_heads": 16}}, "num_heads"),  # head_dim 2
        ({**base_3_5, "vision_config": {**TOWERS["qwen3_5"], table: 35}}, table),  # not a square grid
        ({**base_3_5, "vision_config": {**TOWERS["qwen3_5"], table: 0}}, table),
        ({**base_3_5, "vision_config": {**TOWERS["qwen3_5"], "out_hidden_size": 16}}, "out_hidden_size"),
        ({**base_3_5, "vision_config": {**TOWERS["qwen3_5"], "rope_parameters": {"rope_type": "yarn"}}}, "rope_type"),
        ({**base_3_vl, "vision_config": {**TOWERS["qwen3_vl"], deep: [0, 4]}}, deep),  # past the last layer (3)
        ({**base_3_vl, "vision_config": {**TOWERS["qwen3_vl"], deep: [-1]}}, deep),
        ({**base_3_vl, "vision_config": {**TOWERS["qwen3_vl"], deep: [2, 0]}}, deep),  # HF's features in layer order
        ({**base_3_vl, "vision_config": {**TOWERS["qwen3_vl"], deep: [2, 2]}}, deep),
        ({**base_3_vl, "vision_config": {**TOWERS["qwen3_vl"], table: 35}}, table),
    ]:
        with pytest.raises(ConfigError, match=field):
            QwenVisionConfig.from_hf_config(raw)
    qwen2_5 = QwenVisionConfig.from_hf_config({**base, "vision_config": TOWERS["qwen2_5_vl"]})
    with pytest.raises(ConfigError, match="num_position_embeddings"):  # a tower without learned positions
        dataclasses.replace(qwen2_5, num_position_embeddings=36)
    with pytest.raises(ConfigError, match=deep):  # nor deepstack mergers
        dataclasses.replace(qwen2_5, deepstack_layers=(0,))


# ---------------------------------------------------------------------------------------------- processor
PIXELS = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 12)
# (height, width): upscaled to min_pixels, within bounds, downscaled to max_pixels, a long strip
SIZES = [(20, 30), (61, 93), (300, 200), (40, 1000), (900, 37)]


def _image(height: int, width: int, mode: str) -> Image.Image:
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    x = fresh.rng().integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(x[..., 0] if bands == 1 else x, mode)


@pytest.mark.parametrize("layout", ["top_level", "size"])
def test_processor_is_transformers(layout):
    import transformers

    d = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
         "merge_size": 2, "resample": 3}
    d |= PIXELS if layout == "top_level" else {"size": {"shortest_edge": PIXELS["min_pixels"],
                                                        "longest_edge": PIXELS["max_pixels"]}}
    ours = QwenImageProcessor.from_dict(d)
    assert (ours.min_pixels, ours.max_pixels) == tuple(PIXELS.values())
    hf = transformers.Qwen2VLImageProcessorPil(**{k: v for k, v in d.items() if k != "image_processor_type"})
    for (height, width), mode in zip(SIZES, ["RGB", "RGBA", "RGB", "L", "RGB"]):
        image = _image(height, width, mode)
        want = hf(images=[image], return_tensors="np")
        patches, grid = ours(image)
        assert [list(grid)] == want["image_grid_thw"].tolist()
        assert patches.dtype == np.float32 and patches.shape == want["pixel_values"].shape
        np.testing.assert_allclose(patches, want["pixel_values"], rtol=0, atol=1e-5)
    with pytest.raises(ImageError, match="aspect ratio"):
        ours(_image(3, 700, "RGB"))


def test_processor_other_options_and_refusals():
    import transformers

    d = {"image_processor_type": "Qwen2VLImageProcessorPil", "patch_size": 16, "temporal_patch_size": 1,
         "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"shortest_edge": 1024,
         "longest_edge": 32 * 32 * 8}, "min_pixels": 32 * 32 * 2, "resample": 2}  # min_pixels overrides size
    ours = QwenImageProcessor.from_dict(d)
    assert (ours.min_pixels, ours.max_pixels) == (2048, 8192)
    hf = transformers.Qwen2VLImageProcessorPil(**{k: v for k, v in d.items() if k != "image_processor_type"})
    image = _image(37, 150, "RGB")
    want = hf(images=[image], return_tensors="np")
    patches, grid = ours(image)
    assert [list(grid)] == want["image_grid_thw"].tolist() and patches.shape[1] == 3 * 16 * 16
    np.testing.assert_allclose(patches, want["pixel_values"], rtol=0, atol=1e-5)

    base = {"image_processor_type": "Qwen2VLImageProcessor"}
    for d, message in [({**base, "do_center_crop": True}, "do_center_crop"),
                       ({**base, "size": {"min_pixels": 10, "max_pixels": 100}}, "size"),
                       ({"image_processor_type": "CLIPImageProcessor"}, "image_processor_type")]:
        with pytest.raises(ValueError, match=message):
            QwenImageProcessor.from_dict(d)

"""The device memory a vision tower takes for its images: XLA's own count of the encoder's temporary buffers
(`memory_analysis`, weights and inputs not included). Nothing runs: each shape is only compiled, so this answers on
any backend (the CPU's figures hold for float32 weights; with bfloat16 ones XLA's CPU keeps a float32 copy of every
weight, which a GPU does not).

Qwen2.5-VL's tower (models/qwen_vision.py), one square image of each side, beside what the float32 scores of one
attention over all of its patches would take alone, [heads, N, N]:

    PYTHONPATH=. .venv/bin/python scripts/vision_memory.py --sides 448 896 1792

Gemma 3's (SigLIP-so400m at 896 x 896, 4,096 patches, models/vision.py), by images per encoder call, with the
attention's queries in blocks (vision.ATTENTION_BLOCK) and all at once:

    PYTHONPATH=. .venv/bin/python scripts/vision_memory.py --tower gemma3 --batches 1 2 4 8
"""
from __future__ import annotations

import argparse
import functools


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[448, 896, 1792], help="image sides in pixels")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tower", default="qwen2_5_vl", choices=["qwen2_5_vl", "gemma3"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="gemma3: images per encoder call")
    args = ap.parse_args(argv)
    if args.tower == "gemma3":
        return gemma3(args)

    import jax
    import numpy as np

    from models import qwen_patches, qwen_vision

    # Qwen2.5-VL-7B's tower: 32 layers of 1,280 over 16 heads, windows of 112 pixels, 4 full layers
    tower = {"hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584, "depth": 32, "num_heads": 16,
             "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
    cfg = qwen_vision.QwenVisionConfig.from_hf_config({"model_type": "qwen2_5_vl", "text_config": {"hidden_size": 3584},
                                                       "vision_config": tower})
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, args.dtype), qwen_vision.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    encode = jax.jit(functools.partial(qwen_vision.encode, cfg=cfg))
    cell = cfg.patch_size * cfg.spatial_merge_size
    print(f"{'image':>11} {'patches':>8} {'padded':>7} {'windows':>8} {'temp GiB':>9} {'N x N scores GiB':>17}")
    for side in args.sides:
        cells = side // cell
        patches = np.zeros((cfg.merge_unit * cells * cells, cfg.patch_dim), np.float32)
        inputs = qwen_patches.encode_inputs(cfg, patches, (1, cfg.spatial_merge_size * cells,
                                                           cfg.spatial_merge_size * cells))
        n = len(inputs["patches"])
        temp = encode.lower(params, inputs).compile().memory_analysis().temp_size_in_bytes
        scores = cfg.num_heads * n * n * 4
        print(f"{side:>5}x{side:<5} {len(patches):>8} {n:>7} {len(inputs['blocks']):>8} {temp / 2**30:>9.2f} "
              f"{scores / 2**30:>17.1f}")


def gemma3(args) -> None:
    import jax
    import numpy as np

    from models import vision

    # Gemma 3 4B's tower: SigLIP-so400m, 27 layers of 1,152 over 16 heads, 896-pixel images in 14-pixel patches
    vcfg = vision.VisionConfig.from_hf_config({"model_type": "gemma3", "text_config": {"hidden_size": 2560},
                                               "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                                                                 "num_hidden_layers": 27, "num_attention_heads": 16,
                                                                 "image_size": 896, "patch_size": 14}})
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, args.dtype), vision.param_shapes(vcfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    tokens = vcfg.grid ** 2
    print(f"{'images':>6} {'patches':>8} {'blocked GiB':>12} {'whole GiB':>10} {'N x N scores GiB':>17}")
    for n in args.batches:
        pixels = jax.ShapeDtypeStruct((n, 3, vcfg.image_size, vcfg.image_size), np.float32)
        temps = []
        for block in (vision.ATTENTION_BLOCK, tokens):  # (the module's value read at trace time)
            saved, vision.ATTENTION_BLOCK = vision.ATTENTION_BLOCK, block
            try:
                encode = jax.jit(functools.partial(vision.encode_images, vcfg=vcfg))
                temps.append(encode.lower(params, pixels=pixels).compile().memory_analysis().temp_size_in_bytes)
            finally:
                vision.ATTENTION_BLOCK = saved
        scores = n * vcfg.num_heads * tokens * tokens * 4
        print(f"{n:>6} {tokens:>8} {temps[0] / 2**30:>12.2f} {temps[1] / 2**30:>10.2f} {scores / 2**30:>17.1f}")


if __name__ == "__main__":
    main()

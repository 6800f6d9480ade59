"""The device memory Qwen2.5-VL's vision tower (models/qwen_vision.py) takes for one image, by image size: XLA's own
count of the encoder's temporary buffers (`memory_analysis`, weights and inputs not included) for a square image of
each side, beside what the float32 scores of one attention over all of its patches would take alone, [heads, N, N].
Nothing runs: each size is only compiled, so this answers on any backend (the CPU's figures hold for float32
weights; with bfloat16 ones XLA's CPU keeps a float32 copy of every weight, which a GPU does not).

    PYTHONPATH=. .venv/bin/python scripts/vision_memory.py --sides 448 896 1792
"""
from __future__ import annotations

import argparse
import functools


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[448, 896, 1792], help="image sides in pixels")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    main()

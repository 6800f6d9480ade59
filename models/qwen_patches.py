"""Where each patch of an image sits, on the host: the inputs of models/qwen_vision.py's `encode` for one image,
from its patches and its grid (t, h, w) in patches.

`encode_inputs` gives them by name (INPUT_KEYS), the rows padded to a power of two (`padded_len`) so that images of
nearby sizes share a compiled program: each patch's grid row and column in the processor's block-major order
(`patch_layout`, HF's get_vision_position_ids), Qwen2.5-VL's windows as gathered blocks (`window_blocks`, the groups
HF's get_vision_window_index attends within) and Qwen3.5's and Qwen3-VL's bilinear taps into their learned position
table (`position_taps`, HF's get_vision_interpolation_indices_and_weights). All of it depends on the grid only.
"""
from __future__ import annotations

import math

import numpy as np

from models.qwen_vision import LEARNED_POSITIONS, TAPS, QwenVisionConfig

INPUT_KEYS = ("patches", "hpos", "wpos", "valid", "blocks", "block_valid", "slot", "pos_index", "pos_weight")


def patch_layout(cfg: QwenVisionConfig, grid_thw: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per patch of one image, in the processor's (block-major) order, int32 [grid_h * grid_w] each: "hpos", "wpos"
    (its grid row and column: HF's get_vision_position_ids) and "window" (Qwen2.5-VL: which window of
    window_merges x window_merges merge blocks, row-major, partial at the bottom and right edges, as HF's
    get_vision_window_index groups them; the other kinds: 0)."""
    t, gh, gw = (int(x) for x in grid_thw)
    m = cfg.spatial_merge_size
    if t != 1 or gh < 1 or gw < 1 or gh % m or gw % m:
        raise ValueError(f"grid_thw {tuple(grid_thw)}: an image is (1, h, w) with h, w positive multiples of "
                         f"spatial_merge_size {m} (videos are not supported)")
    i = np.arange(gh * gw)
    block, inner = i // cfg.merge_unit, i % cfg.merge_unit
    block_row, block_col = block // (gw // m), block % (gw // m)
    layout = {"hpos": block_row * m + inner // m, "wpos": block_col * m + inner % m, "window": np.zeros_like(i)}
    if cfg.kind == "qwen2_5_vl":
        side = cfg.window_merges
        layout["window"] = block_row // side * -(-(gw // m) // side) + block_col // side
    return {k: v.astype(np.int32) for k, v in layout.items()}


def position_taps(cfg: QwenVisionConfig, grid_thw: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3.5, Qwen3-VL: the learned side x side position table resampled to one image's grid_h x grid_w,
    bilinearly with corners on corners, as per patch (processor's order) its TAPS rows of the table (index int32
    [n, TAPS], row-major in the table: (top, left), (top, right), (bottom, left), (bottom, right)) and their weights
    (float32 [n, TAPS], summing to 1). HF's get_vision_interpolation_indices_and_weights(mode="bilinear",
    align_corners=True), in the same float32 steps."""
    _, gh, gw = (int(x) for x in grid_thw)
    layout, side = patch_layout(cfg, grid_thw), cfg.position_side

    def axis(pos: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        # the patch's place on the table's axis (0 .. side - 1, float32: corners on corners), its two neighbours
        # (clamped into the table: border padding) and their hat-kernel weights -> [n, 2] each
        src = pos.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor, offsets = np.floor(src)[:, None], np.arange(2, dtype=np.float32)
        taps = np.clip(floor.astype(np.int64) + np.arange(2), 0, side - 1)
        return taps, np.maximum(np.float32(1) - np.abs(src[:, None] - floor - offsets), np.float32(0))

    (h_taps, h_weights), (w_taps, w_weights) = axis(layout["hpos"], gh), axis(layout["wpos"], gw)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, TAPS)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, TAPS)
    return index.astype(np.int32), weight.astype(np.float32)


def window_blocks(cfg: QwenVisionConfig, window: np.ndarray, num_rows: int) -> tuple[np.ndarray, ...]:
    """An image's windows as blocks for `encode` (its rows' window ids [n], padded to num_rows rows): (blocks
    [B, window_rows] int32, the rows of each window, a partial one's block padded with row 0; block_valid
    [B, window_rows] bool; slot [num_rows] int32, each row's place in blocks flattened, padding rows pointing at
    row 0's). B: the window count rounded up to a power of two (so image sizes share compiled programs); the kinds
    without windows: one dummy block."""
    rows = cfg.window_rows
    count = int(window.max()) + 1 if cfg.kind == "qwen2_5_vl" else 0
    blocks = np.zeros((1 << max(count - 1, 0).bit_length(), rows), np.int32)
    block_valid = np.zeros(blocks.shape, bool)
    slot = np.zeros(num_rows, np.int32)
    if count:  # one pass: rows sorted by window (in order within each), each one's rank among its window's
        order = np.argsort(window, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(window, minlength=count))[:-1]])
        rank = np.arange(len(window)) - starts[window[order]]
        blocks[window[order], rank] = order
        block_valid[window[order], rank] = True
        slot[order] = window[order] * rows + rank
    slot[len(window):] = slot[0]
    return blocks, block_valid, slot


def padded_len(cfg: QwenVisionConfig, num_patches: int) -> int:
    """The bucket an image of num_patches is padded to: merge_unit * a power of two, at least 64 rows (merge 2)."""
    groups = max(num_patches // cfg.merge_unit, -(-64 // cfg.merge_unit))
    return cfg.merge_unit * 2 ** math.ceil(math.log2(groups))


def encode_inputs(cfg: QwenVisionConfig, patches: np.ndarray, grid_thw: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """`encode`'s inputs for one image's patches [n, patch_dim] of grid_thw, by name (INPUT_KEYS, every kind), the
    rows padded to N = padded_len(n) (padding rows: zeros, valid False):
      "patches" [N, patch_dim] (their dtype); "hpos", "wpos" int32 [N], each row's grid row and column; "valid" bool
      [N]; "blocks", "block_valid" [B, window_rows], "slot" int32 [N]: Qwen2.5-VL's windows (`window_blocks`; the
      other kinds: one dummy block); "pos_index" int32, "pos_weight" float32 [N, TAPS]: Qwen3.5's and Qwen3-VL's
      position taps (`position_taps`; the other kinds: [0, TAPS])."""
    layout = patch_layout(cfg, grid_thw)
    n = len(layout["hpos"])
    if patches.shape != (n, cfg.patch_dim):
        raise ValueError(f"patches {patches.shape}: grid_thw {tuple(grid_thw)} takes [{n}, {cfg.patch_dim}]")
    rows = {"patches": patches, "hpos": layout["hpos"], "wpos": layout["wpos"], "valid": np.ones(n, bool)}
    if cfg.kind in LEARNED_POSITIONS:
        rows["pos_index"], rows["pos_weight"] = position_taps(cfg, grid_thw)
    size = padded_len(cfg, n)
    inputs = {k: np.pad(a, [(0, size - n)] + [(0, 0)] * (a.ndim - 1)) for k, a in rows.items()}
    inputs["blocks"], inputs["block_valid"], inputs["slot"] = window_blocks(cfg, layout["window"], size)
    inputs.setdefault("pos_index", np.zeros((0, TAPS), np.int32))  # no learned positions: no taps
    inputs.setdefault("pos_weight", np.zeros((0, TAPS), np.float32))
    return {k: inputs[k] for k in INPUT_KEYS}


def encode_image(encode_fn, params: dict, cfg: QwenVisionConfig, patches: np.ndarray,
                 grid_thw: tuple[int, int, int]) -> np.ndarray:
    """One image's patches [n, patch_dim] (the processor's) -> its rows [n // merge_unit, (1 + deepstack_count) *
    out_hidden_size] (numpy, the weights' dtype; `encode`'s layout), through encode_fn =
    jax.jit(functools.partial(encode, cfg=cfg)) at padded_len(n): one compile per bucket (and window count's), not per
    image size."""
    out = encode_fn(params, encode_inputs(cfg, patches, grid_thw))
    return np.asarray(out[: len(patches) // cfg.merge_unit])

"""LLaVA-NeXT's image rows ("anyres"): the tower encodes an image as tiles of its size, a base tile of the whole image
and then the tiles of a (rows, cols) grid chosen from `image_grid_pinpoints` (engine/images.py's AnyResProcessor).
`pack_features` lays the grid's features back out as one map, crops the map's padding ("spatial_unpad"), appends
`image_newline` to each row and puts the base tile's rows first: an image's rows then number `packed_tokens`, not
the tower's tokens_per_image. On the host (numpy), after the encoder (models/vision.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from models.vision import VisionConfig


def _unpadded(vcfg: VisionConfig, grid: tuple[int, int], size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The window [top:bottom, left:right] of the grid's [rows * side, cols * side] feature map (side = vcfg.grid)
    that an image of size_hw (height, width) covers once resized into the grid's resolution: HF's unpad_image. The
    padding, on the axis the image's aspect ratio leaves short, is cut half from each side (the half floored), the
    image's extent on the map rounded to 7 decimals, then truncated; an equal aspect ratio cuts columns (none)."""
    (height, width), side = size_hw, vcfg.grid
    map_h, map_w = grid[0] * side, grid[1] * side
    if height <= 0 or width <= 0 or grid[0] <= 0 or grid[1] <= 0:
        raise ValueError(f"image size {tuple(size_hw)} or tile grid {tuple(grid)} is not positive")
    if width / height > map_w / map_h:  # wider than the map: padded above and below
        pad = (map_h - int(round(height * (map_w / width), 7))) // 2
        return pad, map_h - pad, 0, map_w
    pad = (map_w - int(round(width * (map_h / height), 7))) // 2
    return 0, map_h, pad, map_w - pad


def packed_tokens(vcfg: VisionConfig, grid: tuple[int, int], size_hw: tuple[int, int]) -> int:
    """The rows `pack_features` makes of an image of size_hw (height, width) tiled on grid (rows, cols): the base
    tile's tokens_per_image, then each row of the unpadded map and its newline (where vcfg.image_newline)."""
    top, bottom, left, right = _unpadded(vcfg, grid, size_hw)
    return vcfg.tokens_per_image + (bottom - top) * (right - left + vcfg.image_newline)


def pack_features(vcfg: VisionConfig, features: np.ndarray, newline: np.ndarray | None, grid: tuple[int, int],
                  size_hw: tuple[int, int]) -> np.ndarray:
    """One image's encoded tiles [1 + rows * cols, tokens_per_image, D] (the base tile, then the grid's row-major: what
    encode_images returns for the image's pixels) -> [packed_tokens, D] in their dtype, as HF's pack_image_features
    with "spatial_unpad". newline: params["image_newline"] [D], None exactly where not vcfg.image_newline. On the host
    (numpy), after the encoder: the row count varies per image, a shape per image under jit."""
    features = np.asarray(features)
    rows, cols = grid
    side, d = vcfg.grid, features.shape[-1]
    if features.shape[:2] != (1 + rows * cols, side * side):
        raise ValueError(f"features {features.shape}: a {rows}x{cols} grid takes [{1 + rows * cols}, {side * side}, D] "
                         f"(the base tile, then the grid's)")
    if (newline is not None) != vcfg.image_newline:
        raise ValueError(f"newline {'given' if newline is not None else 'missing'}: vcfg.image_newline is "
                         f"{vcfg.image_newline}")
    # tiles [rows, cols, side, side, D] -> one map [rows * side, cols * side, D], then its padding cut off
    fmap = features[1:].reshape(rows, cols, side, side, d).transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
    top, bottom, left, right = _unpadded(vcfg, grid, size_hw)
    fmap = fmap[top:bottom, left:right]  # [H', W', D]
    if newline is not None:  # a newline at the end of each row: [H', W' + 1, D]
        ends = np.broadcast_to(np.asarray(newline).astype(features.dtype), (fmap.shape[0], 1, d))
        fmap = np.concatenate([fmap, ends], axis=1)
    return np.concatenate([features[0], fmap.reshape(-1, d)], axis=0)  # the base tile's rows first

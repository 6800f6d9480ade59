"""Qwen2-VL / Qwen2.5-VL image preprocessing: a PIL image -> the patches models/qwen_vision.py encodes.

    QwenImageProcessor(image)    RGB -> smart resize (PIL, on uint8) -> rescale -> normalize -> patchify
        -> (float32 [grid_h * grid_w, C * T * P * P], (1, grid_h, grid_w))

What transformers' Qwen2VLImageProcessorPil returns, to float32 rounding. The image keeps its aspect ratio, each side
rounded to a multiple of patch_size * merge_size, scaled so its area lies in [min_pixels, max_pixels]; so the grid,
hence the number of placeholder tokens (grid_h * grid_w // merge_size**2), varies per image. Patches are in
block-major order (merge x merge blocks row-major, each block's patches row-major), each flattened (C, T, P, P) with
the still image repeated T = temporal_patch_size times.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from engine.images import ImageError, to_rgb

MAX_ASPECT_RATIO = 200  # HF's smart_resize refuses more
_KNOWN_STEPS = {"do_convert_rgb", "do_resize", "do_rescale", "do_normalize"}
_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF's smart_resize: (height, width) rounded to multiples of factor, then, where the area is over max_pixels
    (under min_pixels), scaled down (up) by the square root of the ratio, floored (ceiled) to multiples of factor."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image of {width}x{height} pixels: aspect ratio over {MAX_ASPECT_RATIO} is not supported")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """The steps of transformers' Qwen2VLImageProcessor (PIL backend) for still images, in their order."""

    min_pixels: int = 56 * 56  # resize bounds on the area (HF: size shortest_edge / longest_edge)
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True  # False: the image's sides must already be multiples of patch_size * merge_size
    rescale_factor: float | None = 1 / 255  # None: no rescale
    image_mean: tuple[float, float, float] | None = _CLIP_MEAN  # None (with image_std): no normalize
    image_std: tuple[float, float, float] | None = _CLIP_STD

    def __post_init__(self):
        if (min(self.min_pixels, self.max_pixels, self.patch_size, self.temporal_patch_size, self.merge_size) < 1
                or self.min_pixels > self.max_pixels or self.resample not in range(6)
                or (self.image_mean is None) != (self.image_std is None) or self.image_std
                and (len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std)):
            raise ValueError(f"QwenImageProcessor: sizes >= 1, min_pixels <= max_pixels, a PIL resample filter (0-5), "
                             f"image_mean and image_std both None or 3 values, std non-zero. Got {self}")

    @property
    def factor(self) -> int:  # the sides' granule in pixels: one merge block
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict) -> QwenImageProcessor:
        """A preprocessor_config.json -> the processor transformers would build from it (its PIL backend)."""
        kind = d.get("image_processor_type")
        if kind not in _TYPES:
            raise ValueError(f"image_processor_type {kind!r} is not supported ({', '.join(_TYPES)})")
        for key, value in d.items():
            if value and key.startswith("do_") and key not in _KNOWN_STEPS:
                raise ValueError(f"preprocessor option {key}={value!r} ({kind}) is not supported")
        d = {k: v for k, v in d.items() if v is not None}
        # HF: size {shortest_edge: min_pixels, longest_edge: max_pixels}, min_pixels / max_pixels top-level override
        size = {"shortest_edge": cls.min_pixels, "longest_edge": cls.max_pixels,
                **{k: v for k, v in d.get("size", {}).items() if v is not None}}
        size |= {e: d[k] for e, k in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")) if k in d}
        if set(size) != {"shortest_edge", "longest_edge"}:
            raise ValueError(f"preprocessor size={d['size']!r} is not supported: expected {{'shortest_edge': "
                             "min_pixels, 'longest_edge': max_pixels}")
        normalize = d.get("do_normalize", True)
        return cls(min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]),
                   patch_size=int(d.get("patch_size", cls.patch_size)),
                   temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
                   merge_size=int(d.get("merge_size", cls.merge_size)), resample=int(d.get("resample", cls.resample)),
                   do_resize=bool(d.get("do_resize", True)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else None,
                   image_mean=tuple(map(float, d.get("image_mean", _CLIP_MEAN))) if normalize else None,
                   image_std=tuple(map(float, d.get("image_std", _CLIP_STD))) if normalize else None)

    # The keys of its config a deployment may replace (model.mm_processor_kwargs): what bounds an image's positions
    OVERRIDABLE = ("min_pixels", "max_pixels", "size")

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """A PIL image -> (patches float32 [grid_h * grid_w, C * T * P * P], grid_thw (1, grid_h, grid_w))."""
        image = to_rgb(image)
        height, width = image.height, image.width
        if self.do_resize:
            height, width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
            image = image.resize((width, height), resample=self.resample)  # in PIL, on uint8, like HF
        elif height % self.factor or width % self.factor:
            raise ImageError(f"image of {width}x{height} pixels: without do_resize its sides must be multiples of "
                             f"{self.factor}")
        x = np.asarray(image).transpose(2, 0, 1)  # [C, H, W] uint8
        # HF: rescale in float64, then float32; normalize in float32
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.rescale_factor else \
            x.astype(np.float32)
        if self.image_mean is not None:
            mean, std = (np.array(v, np.float32)[:, None, None] for v in (self.image_mean, self.image_std))
            x = (x - mean) / std
        # patchify: [C, gh/m, m, P, gw/m, m, P] -> [gh/m, gw/m, m, m, C, P, P], then T copies after C
        c, p, m = x.shape[0], self.patch_size, self.merge_size
        grid_h, grid_w = height // p, width // p
        x = x.reshape(c, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], self.temporal_patch_size, p, p))
        return np.ascontiguousarray(x.reshape(grid_h * grid_w, -1)), (1, grid_h, grid_w)

"""Image inputs for LLaVA-style models and Gemma 3: a source -> an RGB image -> the pixels the vision tower reads
-> a hash.

    load_image(source, policy)   data: URL | http(s) URL | path or file:// URL | bytes | PIL image | uint8 array
        -> PIL RGB image           EXIF orientation applied, transparency composited over white (HF's convert_to_rgb)
    ImageProcessor(image)        resize (PIL, on uint8) -> center crop -> rescale -> normalize
        -> float32 [3, H, W]       what transformers' CLIP / SigLIP / Gemma 3 PIL-backend processors return, bit
                                   for bit
    AnyResProcessor(image)       LLaVA-NeXT: a base tile of the whole image + the tiles of a grid, each as above
        -> Tiles                   float32 [1 + rows * cols, 3, S, S], (rows, cols), the image's (height, width)
    image_hash(pixels)           -> 16 bytes: the prefix cache's name for an image (equal pixels, equal hash)

Every bad input raises ImageError (a ValueError) naming the source and what is wrong with it; a server answers it
with a 400. Which sources a server accepts (remote fetches, local files under one directory) is a MediaPolicy.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import http.client
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image source that is refused or does not decode; the message names which source and why."""


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """What image sources a server accepts. Data URLs, bytes, arrays and PIL images are always accepted."""

    allow_remote: bool = True  # http(s) URLs, fetched within timeout_s and max_bytes
    local_root: str | None = None  # paths and file:// URLs only under this directory; None: none at all
    timeout_s: float = 10.0  # a whole remote fetch, connect to last byte
    max_bytes: int = 20 * 2**20  # largest encoded image, from any source

    def __post_init__(self):
        if self.timeout_s <= 0 or self.max_bytes <= 0:
            raise ValueError(f"MediaPolicy needs timeout_s > 0 and max_bytes > 0, got {self}")


def _name(source) -> str:
    """A short name for a source in messages (a data URL can be megabytes long)."""
    if not isinstance(source, (str, os.PathLike)):
        return f"<{len(source)} image bytes>" if isinstance(source, bytes) else f"<{type(source).__name__}>"
    s = os.fspath(source)
    return s if len(s) <= 80 else f"{s[:60]}... ({len(s)} chars)"


# NOTE: http(s) handlers only, so that a redirect to ftp:// or file:// fails: a remote URL never reads a local file.
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                 urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                 urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
    _OPENER.add_handler(_handler)


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise ImageError(f"remote image URLs are not allowed here: {_name(url)}")
    deadline = time.monotonic() + policy.timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "radixlm", "Accept": "image/*"})
    try:
        with _OPENER.open(request, timeout=policy.timeout_s) as response:
            mime = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if mime and not mime.startswith("image/") and mime != "application/octet-stream":
                raise ImageError(f"{_name(url)} serves {mime!r}, not an image")
            chunks, num_bytes = [], 0
            while num_bytes <= policy.max_bytes and (chunk := response.read(2**16)):
                if time.monotonic() > deadline:
                    raise ImageError(f"fetching {_name(url)} took more than {policy.timeout_s} s")
                chunks.append(chunk)
                num_bytes += len(chunk)
            return b"".join(chunks)  # over max_bytes: _decode refuses it
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"fetching {_name(url)} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageError(f"fetching {_name(url)} failed: {e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # a timeout, a dropped connection, a bad URL
        raise ImageError(f"fetching {_name(url)} failed: {e or type(e).__name__}") from None


def _read_file(path: str, source: str, policy: MediaPolicy) -> bytes:
    if policy.local_root is None:
        raise ImageError(f"local image files are not allowed here (no local media root is set): {_name(source)}")
    root, real = os.path.realpath(policy.local_root), os.path.realpath(path)  # NOTE: symlinks resolved, then checked
    if os.path.commonpath([root, real]) != root:
        raise ImageError(f"{_name(source)} is outside the allowed local media directory")
    try:
        with open(real, "rb") as f:
            return f.read(policy.max_bytes + 1)  # over max_bytes: _decode refuses it
    except FileNotFoundError:
        raise ImageError(f"{_name(source)}: no such file") from None
    except OSError as e:
        raise ImageError(f"cannot read {_name(source)}: {e.strerror or e}") from None


def _data_url(url: str) -> bytes:
    header, comma, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma:
        raise ImageError(f"malformed data URL (no ','): {_name(url)}")
    if not params[0].startswith("image/"):
        raise ImageError(f"data URL has content type {params[0] or 'text/plain'!r}, not image/*: {_name(url)}")
    if "base64" not in params[1:]:
        raise ImageError(f"data URL is not base64-encoded (';base64,' missing): {_name(url)}")
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL has invalid base64 ({e}): {_name(url)}") from None


def _read(source: str, policy: MediaPolicy) -> bytes:
    """A string source -> its encoded bytes: a data URL, an http(s) or file:// URL, else a local path."""
    if source[:5].lower() == "data:":
        return _data_url(source)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", source)
    scheme = scheme and scheme[1].lower()
    if scheme in ("http", "https"):
        return _fetch(source, policy)
    if scheme == "file":
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file:// URL names a host ({parts.netloc!r}); only local files are read: {_name(source)}")
        return _read_file(urllib.request.url2pathname(parts.path), source, policy)
    if scheme:
        raise ImageError(f"image URL scheme {scheme!r} is not supported (data:, http(s)://, file://): {_name(source)}")
    return _read_file(source, source, policy)


def _decode(data: bytes, source, policy: MediaPolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise ImageError(f"{_name(source)} is more than the {policy.max_bytes} bytes allowed")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Image.open reads the header only: truncated or corrupt pixel data fails here
        return ImageOps.exif_transpose(image)  # as HF's load_image and browsers show it
    except UnidentifiedImageError:
        raise ImageError(f"{_name(source)} is not a decodable image: no image format Pillow reads") from None
    except Exception as e:  # NOTE: untrusted bytes; a malformed file can raise nearly anything inside a decoder
        raise ImageError(f"{_name(source)} is not a decodable image: {e or type(e).__name__}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """HF's convert_to_rgb: an image with transparency (an alpha band or a palette/tRNS transparent colour) is
    composited over opaque white; any other mode is converted to RGB as Pillow does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def load_image(source, policy: MediaPolicy = MediaPolicy()) -> Image.Image:
    """Any accepted image source -> an RGB PIL image, or ImageError naming the source. Encoded images (bytes, URLs,
    files) are turned upright by their EXIF orientation; PIL images and arrays are taken as they are."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (source.ndim == 2 or source.ndim == 3 and source.shape[2] in (3, 4)):
            raise ImageError(f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                             f"got {source.dtype} {list(source.shape)}")
        image = Image.fromarray(np.ascontiguousarray(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), bytes(source), policy)
    elif isinstance(source, (str, os.PathLike)):
        image = _decode(_read(os.fspath(source), policy), os.fspath(source), policy)
    else:
        raise ImageError(f"unsupported image source type {type(source).__name__}: a URL, path, bytes, PIL image "
                         "or uint8 array")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{_name(source)} is empty ({image.width}x{image.height} pixels)")
    return to_rgb(image)


_KNOWN_STEPS = {"do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad"}
_DEFAULTS = {  # transformers' class defaults, for keys a preprocessor_config.json leaves out (resample: bicubic)
    "CLIP": dict(size={"shortest_edge": 224}, do_center_crop=True, crop_size={"height": 224, "width": 224},
                 image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711)),
    "Siglip": dict(size={"height": 224, "width": 224}, do_center_crop=False, image_mean=(0.5,) * 3,
                   image_std=(0.5,) * 3),
}
# Gemma3ImageProcessor: SigLIP's steps, bilinear; an int size is a square (its default_to_square). NOTE: its class
# default size is 224 x 224 (published configs say 896 x 896); do_pan_and_scan is refused (an unknown do_ step)
_DEFAULTS["Gemma3"] = {**_DEFAULTS["Siglip"], "resample": Image.Resampling.BILINEAR}
_DEFAULTS["Llava"] = _DEFAULTS["CLIP"]  # LlavaImageProcessor: CLIP's, and do_pad (pad_square)
# LlavaNextImageProcessor: CLIP's, anyres pinpoints (height, width), and do_pad (pad the tile count for batching)
_DEFAULTS["LlavaNext"] = {**_DEFAULTS["CLIP"],
                          "image_grid_pinpoints": ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))}


def _size(value, key: str, square: bool) -> int | tuple[int, int]:
    """HF's size forms (get_size_dict) -> n (resize the shorter side to n) or (height, width)."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
        if set(value) == {"height", "width"}:
            return int(value["height"]), int(value["width"])
        if set(value) == {"shortest_edge"} and not square:
            return int(value["shortest_edge"])
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    elif isinstance(value, int):
        return (value, value) if square else value
    raise ValueError(f"preprocessor {key}={value!r} is not supported: expected an int, [height, width], "
                     + ("" if square else "{'shortest_edge': n} ") + "or {'height': h, 'width': w}")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """The steps of HF's CLIPImageProcessor / SiglipImageProcessor / LlavaImageProcessor / Gemma3ImageProcessor that
    LLaVA and Gemma 3 checkpoints use, in their order."""

    shortest_edge: int | None = None  # resize: the shorter side to this, the longer to int(n * long / short) (CLIP)
    size_hw: tuple[int, int] | None = None  # or resize to exactly (height, width) (SigLIP); neither: no resize
    resample: int = Image.Resampling.BICUBIC  # PIL filter; HF's classes default to bicubic (Gemma 3: bilinear)
    crop_hw: tuple[int, int] | None = None  # center crop, zero-padded where the image is smaller; None: no crop
    rescale_factor: float | None = 1 / 255  # None: no rescale
    image_mean: tuple[float, float, float] | None = None  # per channel; None (with image_std): no normalize
    image_std: tuple[float, float, float] | None = None
    # LlavaImageProcessor's do_pad: first pad to a square of the longer side, centered, in this colour (its mean x 255)
    pad_square: tuple[int, int, int] | None = None

    def __post_init__(self):
        sizes = [n for n in (self.shortest_edge, *(self.size_hw or ()), *(self.crop_hw or ())) if n is not None]
        if (self.shortest_edge and self.size_hw or any(n < 1 for n in sizes) or self.resample not in range(6)
                or (self.image_mean is None) != (self.image_std is None) or self.image_std
                and (len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std)):
            raise ValueError(f"ImageProcessor: shortest_edge or size_hw, not both; sizes >= 1; a PIL resample filter "
                             f"(0-5); image_mean and image_std both None or 3 values, std non-zero. Got {self}")

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessor | AnyResProcessor:
        """A preprocessor_config.json -> the processor transformers would build from it (its PIL backend):
        an AnyResProcessor for LlavaNextImageProcessor, else an ImageProcessor."""
        kind = d.get("image_processor_type") or d.get("feature_extractor_type")
        # CLIPFeatureExtractor: older configs (openai/clip-vit-*); *Fast, *Pil: other backends of one processor
        match = re.fullmatch(r"(CLIP|Siglip|Gemma3|LlavaNext|Llava)(ImageProcessor(Fast|Pil)?|FeatureExtractor)",
                             kind or "")
        defaults = match and _DEFAULTS[match[1]]
        if defaults is None:
            raise ValueError(f"image_processor_type {kind!r} is not supported (CLIPImageProcessor, "
                             "SiglipImageProcessor, Gemma3ImageProcessor, LlavaImageProcessor or "
                             "LlavaNextImageProcessor)")
        for key, value in d.items():
            if value and (key.startswith("do_") and key not in _KNOWN_STEPS or key == "use_square_size"
                          or key == "do_pad" and match[1] not in ("Llava", "LlavaNext")
                          or key == "image_grid_pinpoints" and match[1] != "LlavaNext"):
                raise ValueError(f"preprocessor option {key}={value!r} ({kind}) is not supported")
        if match[1] == "LlavaNext":
            return AnyResProcessor.from_dict(d, defaults)
        d = {"do_resize": True, "resample": Image.Resampling.BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, **defaults, **{k: v for k, v in d.items() if v is not None}}
        size = _size(d["size"], "size", square=match[1] == "Gemma3") if d["do_resize"] else None
        return cls(shortest_edge=size if isinstance(size, int) else None,
                   size_hw=size if isinstance(size, tuple) else None, resample=int(d["resample"]),
                   crop_hw=_size(d.get("crop_size"), "crop_size", square=True) if d["do_center_crop"] else None,
                   rescale_factor=float(d["rescale_factor"]) if d["do_rescale"] else None,
                   image_mean=tuple(map(float, d["image_mean"])) if d["do_normalize"] else None,
                   image_std=tuple(map(float, d["image_std"])) if d["do_normalize"] else None,
                   pad_square=tuple(int(x * 255) for x in d["image_mean"]) if d.get("do_pad") else None)

    # The keys of its config a deployment may replace (model.mm_processor_kwargs): none, a LLaVA tower reads one size
    OVERRIDABLE = ()

    @classmethod
    def from_dir(cls, path: str) -> ImageProcessor | AnyResProcessor | None:
        """The processor of an HF checkpoint directory (`processor_config`); None where it has none."""
        d = processor_config(path)
        return None if d is None else cls.from_dict(d)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> float32 [3, H, W]. Each step computes as transformers' does, so the result is equal."""
        image = to_rgb(image)  # a no-op copy for load_image's output
        if self.pad_square is not None and image.width != image.height:
            side = max(image.size)
            square = Image.new("RGB", (side, side), self.pad_square)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        if self.shortest_edge is not None or self.size_hw is not None:
            width, height = image.size
            if self.size_hw is not None:
                height, width = self.size_hw
            elif width <= height:  # HF's get_resize_output_image_size: the long side truncated, not rounded
                height, width = int(self.shortest_edge * height / width), self.shortest_edge
            else:
                height, width = self.shortest_edge, int(self.shortest_edge * width / height)
            image = image.resize((width, height), resample=self.resample)  # in PIL, on uint8, like HF
        x = np.asarray(image)  # [H, W, 3] uint8
        if self.crop_hw is not None:
            x = _center_crop(x, self.crop_hw)
        # HF: rescale in float64, then float32; normalize in float32
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.rescale_factor else \
            x.astype(np.float32)
        if self.image_mean is not None:
            x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, H, W]


def processor_config(path: str) -> dict | None:
    """An HF checkpoint directory's image processor config: preprocessor_config.json, else processor_config.json's
    "image_processor"; None where it has neither."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if os.path.isfile(file := os.path.join(path, name)):
            with open(file) as f:
                d = json.load(f)
            if key is None or d.get(key):
                return d if key is None else d[key]
    return None


def _center_crop(x: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [*crop_hw, C] as HF's center_crop: per axis, from offset (n - c) // 2 where the image is larger,
    else the image on zeros, ceil((c - n) / 2) of them before it."""
    for axis, (n, c) in enumerate(zip(x.shape, crop_hw)):
        if n < c:
            x = np.pad(x, [(0, 0)] * axis + [((c - n + 1) // 2, (c - n) // 2)] + [(0, 0)] * (2 - axis))
        start = (x.shape[axis] - c) // 2
        x = x[start:start + c] if axis == 0 else x[:, start:start + c]
    return x


def select_best_resolution(size_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """HF's select_best_resolution: the (height, width) of `pinpoints` that keeps the most of the image's pixels when
    it is scaled (aspect kept, sides truncated) to fit inside, ties to the least wasted area, then to the first."""
    height, width = size_hw

    def merit(hw):
        scale = min(hw[1] / width, hw[0] / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, kept - hw[0] * hw[1]  # most pixels kept, then least wasted: -(area - kept)

    best = max(pinpoints, key=merit)  # NOTE: max keeps the first of equals, as HF's strict comparisons do
    return int(best[0]), int(best[1])


def _patch_resize_hw(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """HF's get_patch_output_size: the image scaled to fit target_hw, the side that fits exactly set to the target's,
    the other ceil()ed (in HF's float expression: a product like 224.00000000000003 rounds up) and capped."""
    (height, width), (target_h, target_w) = size_hw, target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One image as LLaVA-NeXT's vision tower reads it."""

    pixels: np.ndarray  # float32 [1 + rows * cols, 3, S, S]: the base tile (the whole image), then the grid row-major
    grid: tuple[int, int]  # (rows, cols) = the best resolution // S
    size_hw: tuple[int, int]  # the image's own (height, width) after RGB conversion: HF's image_sizes


@dataclasses.dataclass(frozen=True)
class AnyResProcessor:
    """HF's LlavaNextImageProcessor ("anyres"), PIL backend: the image resized (aspect kept) and zero-padded to the
    best of grid_pinpoints, cut into tile_size squares, and the whole image squashed to base_hw in front; then every
    tile through `tile`. Everything before `tile`'s rescale works on uint8, as HF's does."""

    tile: ImageProcessor  # the steps each tile goes through (resize shortest edge, crop, rescale, normalize)
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) each, multiples of tile_size
    tile_size: int  # S: HF's patch size for patching (crop_size height, else size height or shortest edge)
    resample: int = Image.Resampling.BICUBIC  # PIL filter of the resize for patching and of the base tile's
    base_hw: tuple[int, int] | None = None  # the base tile's resize (HF: size; shortest edge n: n x n); None: S x S

    def __post_init__(self):
        if (self.tile_size < 1 or self.resample not in range(6) or not self.grid_pinpoints
                or any(len(hw) != 2 or min(hw) < 1 or hw[0] % self.tile_size or hw[1] % self.tile_size
                       for hw in self.grid_pinpoints) or self.base_hw is not None and min(self.base_hw) < 1):
            raise ValueError(f"AnyResProcessor: tile_size >= 1, a PIL resample filter (0-5), grid_pinpoints "
                             f"(height, width) pairs of positive multiples of tile_size, base_hw >= 1. Got {self}")

    @classmethod
    def from_dict(cls, d: dict, defaults: dict) -> AnyResProcessor:
        """A LlavaNextImageProcessor's preprocessor_config.json (its options checked by ImageProcessor.from_dict)."""
        d = {"resample": Image.Resampling.BICUBIC, **defaults, **{k: v for k, v in d.items() if v is not None}}
        size = _size(d["size"], "size", square=False)
        crop = _size(d.get("crop_size"), "crop_size", square=True) if d.get("crop_size") else None
        base_hw = (size, size) if isinstance(size, int) else size
        # the tiles: HF's CLIP steps, without LlavaImageProcessor's pad to a square (do_pad means something else here)
        tile = ImageProcessor.from_dict({**d, "image_processor_type": "CLIPImageProcessor", "do_pad": False,
                                         "image_grid_pinpoints": None})
        try:
            pinpoints = tuple((int(h), int(w)) for h, w in d["image_grid_pinpoints"])
        except (TypeError, ValueError):
            raise ValueError(f"preprocessor image_grid_pinpoints={d['image_grid_pinpoints']!r} is not a list of "
                             "[height, width] pairs") from None
        tile_size = crop[0] if crop else base_hw[0]
        # NOTE: HF cuts other sizes too (its class defaults do: 224 tiles of 336 pinpoints), into edge tiles that
        # its resize and crop then stretch, and that its model's grid (pinpoint // tile) does not count
        if not pinpoints or any(min(hw) < 1 or hw[0] % tile_size or hw[1] % tile_size for hw in pinpoints):
            raise ValueError(f"preprocessor image_grid_pinpoints={d['image_grid_pinpoints']!r}: a grid of tiles needs "
                             f"positive multiples of the tile size {tile_size} (crop_size height, else size)")
        return cls(tile=tile, grid_pinpoints=pinpoints, tile_size=tile_size, resample=int(d["resample"]),
                   base_hw=base_hw)

    def __call__(self, image: Image.Image) -> Tiles:
        image = to_rgb(image)
        size_hw = image.height, image.width
        best_h, best_w = select_best_resolution(size_hw, self.grid_pinpoints)
        # resize for patching (PIL, uint8), then paste centered on zeros: HF's pad puts the odd pixel after
        new_h, new_w = _patch_resize_hw(size_hw, (best_h, best_w))
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), resample=self.resample), ((best_w - new_w) // 2,
                                                                            (best_h - new_h) // 2))
        s = self.tile_size
        rows, cols = best_h // s, best_w // s
        base_h, base_w = self.base_hw or (s, s)
        tiles = [image.resize((base_w, base_h), resample=self.resample)]  # the whole image, aspect not kept
        tiles += [canvas.crop((j * s, i * s, (j + 1) * s, (i + 1) * s)) for i in range(rows) for j in range(cols)]
        return Tiles(pixels=np.stack([self.tile(t) for t in tiles]), grid=(rows, cols), size_hw=size_hw)


_HASH_TAG = b"radixlm/image-hash/v1"


def image_hash(pixels: np.ndarray) -> bytes:
    """A 16-byte blake2b of processed pixels (dtype, shape and values): what the vision tower reads, hence what its
    output, and the K/V of the image's placeholder tokens, depend on. Equal images give equal hashes."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(_HASH_TAG, digest_size=16)
    digest.update(f"{pixels.dtype.str}{list(pixels.shape)}".encode())
    digest.update(pixels.data)
    return digest.digest()

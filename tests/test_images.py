"""engine/images.py: sources -> RGB image, preprocessing against transformers' PIL-backend CLIP/SigLIP/LLaVA-NeXT
processors, refusals, and the pixel hash. No network: remote images come from a server on 127.0.0.1."""
import base64
import http.server
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import fresh
from engine.images import (AnyResProcessor, ImageError, ImageProcessor, MediaPolicy, Tiles, image_hash, load_image,
                           select_best_resolution)

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CONFIGS = {
    "llava-1.5": {  # llava-hf/llava-1.5-7b-hf's preprocessor_config.json
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
        "rescale_factor": 0.00392156862745098, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "clip-legacy-small": {  # openai/clip-vit-*'s older form: int size (shortest edge) and crop_size (square)
        "feature_extractor_type": "CLIPFeatureExtractor", "size": 30, "crop_size": 28, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "clip-odd-pad": {  # a crop larger than the resized image on one axis (zero padding), odd sizes, bilinear
        "image_processor_type": "CLIPImageProcessorFast", "size": {"shortest_edge": 21},
        "crop_size": {"height": 27, "width": 19}, "resample": 2},
    "siglip": {  # google/siglip-so400m-patch14-384's
        "image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}, "resample": 3,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "rescale_factor": 0.00392156862745098,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "siglip-small-bilinear": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 27, "width": 33},
                              "resample": 2},
    # LlavaImageProcessor's do_pad: the image first padded to a square in its mean colour
    "llava-pad": {"image_processor_type": "LlavaImageProcessor", "do_pad": True, "size": {"shortest_edge": 30},
                  "crop_size": {"height": 28, "width": 28}},
}


def random_image(rng, mode: str, height: int, width: int) -> Image.Image:
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "P": 1}[mode]
    x = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        x[..., 3] = rng.choice([0, 255, *rng.integers(0, 256, 6)], (height, width))  # opaque, clear and between
    image = Image.fromarray(x[..., 0] if channels == 1 else x, "L" if mode == "P" else mode)
    if mode == "P":  # a palette image with a transparent colour (info["transparency"]), as GIFs and PNGs have
        image = image.quantize(16)
        image.info["transparency"] = 3
    return image


def random_sizes(rng) -> list[tuple[str, int, int]]:
    """(mode, height, width): portrait, landscape, square-ish odd, and one each of grayscale, RGBA, palette."""
    short, long = (int(v) for v in rng.integers(17, 120, 2)), int(rng.integers(121, 500))
    short_a, short_b = short
    return [("RGB", long, short_a), ("RGB", short_b, long), ("RGB", 2 * (short_a // 2) + 1, 2 * (short_b // 2) + 1),
            ("L", short_a, long), ("RGBA", long, short_b), ("P", short_b + 3, short_a)]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name, tmp_path):
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIGS[name]))
    reference = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(reference).__name__.endswith("Pil"), type(reference)  # the slow, PIL-based processor
    processor = ImageProcessor.from_dir(str(tmp_path))
    rng = fresh.rng()
    for mode, height, width in random_sizes(rng):
        image = random_image(rng, mode, height, width)
        want = reference(images=[image], return_tensors="np")["pixel_values"][0]
        got = processor(load_image(image))
        assert got.dtype == np.float32 and got.shape == want.shape, (mode, height, width, got.shape, want.shape)
        if processor.crop_hw or processor.size_hw:
            assert got.shape == (3, *(processor.crop_hw or processor.size_hw))
        # same PIL resize on the same uint8 pixels, then the same float64/float32 arithmetic: bit-equal in practice
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{name} {mode} {height}x{width}")
        np.testing.assert_array_equal(processor(image), got)  # the processor converts to RGB itself too


def test_from_dict_refusals_and_from_dir(tmp_path):
    clip = CONFIGS["llava-1.5"]
    with pytest.raises(ValueError, match="LlavaNextVideoImageProcessor"):
        ImageProcessor.from_dict({**clip, "image_processor_type": "LlavaNextVideoImageProcessor"})
    with pytest.raises(ValueError, match="image_grid_pinpoints"):  # anyres belongs to LlavaNextImageProcessor only
        ImageProcessor.from_dict({**clip, "image_grid_pinpoints": [[336, 672]]})
    with pytest.raises(ValueError, match="image_processor_type None"):
        ImageProcessor.from_dict({"size": 224})
    for key in ("do_pad", "do_image_splitting", "use_square_size"):
        with pytest.raises(ValueError, match=key):
            ImageProcessor.from_dict({**clip, key: True})
    assert ImageProcessor.from_dict({**clip, "do_pad": False}) == ImageProcessor.from_dict(clip)
    with pytest.raises(ValueError, match="longest_edge"):
        ImageProcessor.from_dict({**clip, "size": {"shortest_edge": 336, "longest_edge": 600}})
    p = ImageProcessor.from_dict(clip)
    assert (p.shortest_edge, p.size_hw, p.crop_hw, p.resample) == (336, None, (336, 336), 3)
    siglip = ImageProcessor.from_dict({"image_processor_type": "SiglipImageProcessorFast"})  # HF defaults
    assert (siglip.size_hw, siglip.crop_hw, siglip.resample, siglip.image_mean) == ((224, 224), None, 3, (0.5,) * 3)

    for bad in (dict(shortest_edge=4, size_hw=(4, 4)), dict(crop_hw=(0, 4)), dict(resample=7),
                dict(image_mean=(0.5,) * 3), dict(image_mean=(0.5,) * 3, image_std=(0.5, 0.0, 0.5))):
        with pytest.raises(ValueError, match="ImageProcessor"):
            ImageProcessor(**bad)

    assert ImageProcessor.from_dir(str(tmp_path)) is None
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": clip, "patch_size": 14}))
    assert ImageProcessor.from_dir(str(tmp_path)) == p


PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ANYRES_CONFIGS = {
    "llava-v1.6": {  # llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config.json
        "image_processor_type": "LlavaNextImageProcessor", "aspect_ratio_setting": "anyres",
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": PINPOINTS_336, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336}},
    "tiny": {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 28},
             "crop_size": {"height": 28, "width": 28}, "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56],
                                                                                [84, 28], [28, 84]]},
    # tiles resized up to 30 and cropped back to 28; the base tile squashed to 30 x 30 first; bilinear
    "tiny-resize-crop": {"image_processor_type": "LlavaNextImageProcessorFast", "size": {"shortest_edge": 30},
                         "crop_size": 28, "resample": 2, "do_pad": False,
                         "image_grid_pinpoints": [[56, 28], [28, 56], [84, 84], [28, 112], [112, 56]]},
    # no crop: tiles (28, the crop_size height) resized to 32 x 24, the base tile too
    "tiny-size-hw": {"image_processor_type": "LlavaNextImageProcessorPil", "size": {"height": 32, "width": 24},
                     "crop_size": {"height": 28, "width": 28}, "do_center_crop": False,
                     "image_grid_pinpoints": [[28, 56], [56, 56], [84, 28]]},
}


@pytest.mark.parametrize("name", list(ANYRES_CONFIGS))
def test_anyres_matches_transformers(name, tmp_path):
    from transformers import AutoImageProcessor
    from transformers.image_processing_utils import select_best_resolution as hf_best

    config = ANYRES_CONFIGS[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(reference).__name__ == "LlavaNextImageProcessorPil", type(reference)
    processor = ImageProcessor.from_dir(str(tmp_path))
    assert isinstance(processor, AnyResProcessor)
    assert processor.grid_pinpoints == tuple(map(tuple, config["image_grid_pinpoints"]))
    rng = fresh.rng()
    s = processor.tile_size
    big = 2 * max(max(hw) for hw in processor.grid_pinpoints)
    sizes = [("RGB", int(rng.integers(s, 3 * s)), int(rng.integers(3 * s, big))),  # landscape
             ("RGB", int(rng.integers(3 * s, big)), int(rng.integers(s, 3 * s))),  # portrait
             ("RGB", int(rng.integers(1, 12)), int(rng.integers(1, 12))),  # tiny: scaled up
             ("RGB", int(rng.integers(big // 2, big)), int(rng.integers(big // 2, big))),  # large, near square
             ("RGB", 1, int(rng.integers(s, big))),  # a line: the fit rounds a side to zero, then ceil()s it to 1
             ("RGBA", int(rng.integers(s // 2, 2 * s)), int(rng.integers(s // 2, 2 * s)))]
    if s < 100:  # the tiny configs are cheap: add random_sizes' modes and odd aspect ratios
        sizes += random_sizes(rng)
    images = [random_image(rng, *size) for size in sizes]
    # two images a call: HF pads the tile dimension to the larger count (do_pad), so compare the first 1 + rows * cols
    for pair in (images[i:i + 2] for i in range(0, len(images), 2)):
        want = reference(images=pair, return_tensors="np")
        for image, pixels, image_size in zip(pair, want["pixel_values"], want["image_sizes"]):
            got = processor(load_image(image))
            rows, cols = got.grid
            where = f"{name} {image.mode} {image.height}x{image.width}"
            assert isinstance(got, Tiles) and got.pixels.dtype == np.float32, where
            assert got.size_hw == tuple(image_size) == (image.height, image.width), where
            best = hf_best(got.size_hw, config["image_grid_pinpoints"])
            assert got.grid == (best[0] // s, best[1] // s), (where, best)
            assert got.pixels.shape == (1 + rows * cols, *pixels.shape[1:]), (where, got.pixels.shape, pixels.shape)
            np.testing.assert_allclose(got.pixels, pixels[:1 + rows * cols], rtol=0, atol=1e-5, err_msg=where)
            if len(pixels) > 1 + rows * cols:  # the batch padding is zeros: nothing of this image is left out
                assert not pixels[1 + rows * cols:].any(), where
            np.testing.assert_array_equal(processor(image).pixels, got.pixels)  # converts to RGB itself too


def test_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_best

    rng = fresh.rng()
    for _ in range(3000):
        unit = int(rng.choice([1, 14, 28, 336]))
        pinpoints = [(unit * int(h), unit * int(w)) for h, w in rng.integers(1, 5, (int(rng.integers(1, 7)), 2))]
        if rng.random() < 0.3:  # repeats and same-area shapes: ties on kept pixels, then on waste
            pinpoints += [pinpoints[0][::-1], pinpoints[-1]]
        size_hw = tuple(int(n) for n in rng.integers(1, int(rng.choice([8, 200, 3000])), 2))
        got = select_best_resolution(size_hw, pinpoints)
        assert got == tuple(hf_best(size_hw, [list(p) for p in pinpoints])), (size_hw, pinpoints, got)
    assert select_best_resolution((300, 100), PINPOINTS_336) == (336, 672)  # 1008 x 336 keeps as much, wastes more
    assert select_best_resolution((500, 500), PINPOINTS_336) == (672, 672)


def test_anyres_from_dict_and_refusals():
    tiny = ANYRES_CONFIGS["tiny"]
    p = ImageProcessor.from_dict(tiny)
    assert (p.tile_size, p.base_hw, p.resample, p.tile.shortest_edge, p.tile.crop_hw, p.tile.pad_square) == \
        (28, (28, 28), 3, 28, (28, 28), None)
    assert ImageProcessor.from_dict({**tiny, "do_pad": True}) == p  # HF's pad for batching: no change to an image
    assert ImageProcessor.from_dict({**tiny, "do_pad": False}) == p
    default = ImageProcessor.from_dict({"image_processor_type": "LlavaNextImageProcessorFast", "size": 336,
                                        "crop_size": 336})  # HF's class defaults for the rest
    assert (default.tile_size, default.base_hw, default.tile.crop_hw) == (336, (336, 336), (336, 336))
    assert default.grid_pinpoints == tuple(map(tuple, PINPOINTS_336))
    with pytest.raises(ValueError, match="image_grid_pinpoints.*multiples of the tile size 224"):  # all HF's defaults
        ImageProcessor.from_dict({"image_processor_type": "LlavaNextImageProcessor"})
    assert ImageProcessor.from_dict(ANYRES_CONFIGS["tiny-size-hw"]).base_hw == (32, 24)
    for key, value in (("do_image_splitting", True), ("use_square_size", True), ("do_reduce_labels", True),
                       ("size", {"shortest_edge": 28, "longest_edge": 56}), ("crop_size", {"shortest_edge": 28}),
                       ("image_grid_pinpoints", [[28, 56, 84]]), ("image_grid_pinpoints", 28)):
        with pytest.raises(ValueError, match=key):
            ImageProcessor.from_dict({**tiny, key: value})
    for pinpoints in ([[28, 50]], [[0, 28]], []):  # a tile grid needs multiples of the tile size
        with pytest.raises(ValueError, match="image_grid_pinpoints"):
            ImageProcessor.from_dict({**tiny, "image_grid_pinpoints": pinpoints})
    for bad in (dict(resample=9), dict(grid_pinpoints=((28, 50),)), dict(grid_pinpoints=()), dict(base_hw=(0, 28))):
        with pytest.raises(ValueError, match="AnyResProcessor"):
            AnyResProcessor(**{"tile": p.tile, "grid_pinpoints": ((28, 56),), "tile_size": 28, **bad})


ROUTES: dict[str, tuple[int, str | None, bytes]] = {}  # path -> (status, content type, body), set per test


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(1.0)
        status, mime, body = ROUTES.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        if mime:
            self.send_header("Content-Type", mime)
        if self.path.startswith("/redirect"):
            self.send_header("Location", body.decode())
            body = b""
        if not self.path.startswith("/unsized"):  # no Content-Length: HTTP/1.0, the body ends at close
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:  # the client stopped reading: an oversize body or a timeout, as intended
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_every_source_gives_the_same_pixels(server, tmp_path):
    rng = fresh.rng()
    original = random_image(rng, "RGB", int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    policy = MediaPolicy(local_root=str(tmp_path))
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        data = png_bytes(original, fmt)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if fmt == "PNG":
            np.testing.assert_array_equal(decoded, np.asarray(original))  # lossless
        (tmp_path / f"a {fmt}.img").write_bytes(data)  # a space: file:// URLs are percent-encoded
        ROUTES[f"/img.{fmt}"] = (200, mime, data)
        ROUTES[f"/unsized.{fmt}"] = (200, "application/octet-stream", data)
        ROUTES[f"/redirect.{fmt}"] = (302, None, f"{server}/img.{fmt}".encode())
        sources = [data, data_url(data, mime), f"{server}/img.{fmt}", f"{server}/unsized.{fmt}",
                   f"{server}/redirect.{fmt}", str(tmp_path / f"a {fmt}.img"), tmp_path / f"a {fmt}.img",
                   (tmp_path / f"a {fmt}.img").as_uri(), Image.open(io.BytesIO(data)), decoded]
        for source in sources:
            image = load_image(source, policy)
            assert image.mode == "RGB", source
            np.testing.assert_array_equal(np.asarray(image), decoded, err_msg=str(source)[:80])
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=2))
    rgba = np.concatenate([np.full((2, 2, 3), 10, np.uint8), np.array([[[0], [255]], [[128], [255]]], np.uint8)], 2)
    assert np.asarray(load_image(rgba))[:, :, 0].tolist() == [[255, 10], [132, 10]]  # over white: 10*.5 + 255*.5
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: turn 90 degrees clockwise to display; load_image applies it
    buf = io.BytesIO()
    original.save(buf, "PNG", exif=exif)
    turned = np.asarray(original.transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(load_image(buf.getvalue())), turned)


def test_refusals_name_the_problem(server, tmp_path):
    rng = fresh.rng()
    png = png_bytes(random_image(rng, "RGB", 31, 17))
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(png)
    (tmp_path / "outside.png").write_bytes(png)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    # (a timeout far from the others' times: a loaded machine took 0.3 s to refuse a file by its size)
    small = MediaPolicy(local_root=str(root), max_bytes=len(png) - 1, timeout_s=30)
    policy = MediaPolicy(local_root=str(root), timeout_s=30)
    quick = MediaPolicy(local_root=str(root), timeout_s=0.3)  # against /slow's second
    ROUTES.update({"/big.png": (200, "image/png", png), "/unsized-big.png": (200, "image/png", png),
                   "/page.html": (200, "text/html; charset=utf-8", b"<html></html>"), "/slow": (200, "image/png", png),
                   "/redirect-ftp": (302, None, b"ftp://127.0.0.1/a.png"),
                   "/redirect-file": (302, None, (root / "ok.png").as_uri().encode())})
    refusals = [
        ("data:image/png;base64,@@not-base64@@", policy, "invalid base64"),
        ("data:image/png;base64,iVBORw0KGgo", policy, "invalid base64"),  # bad padding
        ("data:text/plain;base64,aGVsbG8=", policy, "'text/plain', not image/"),
        ("data:,hello", policy, "'text/plain', not image/"),
        ("data:image/png," + png.hex(), policy, "not base64-encoded"),
        ("data:image/png;base64", policy, "no ','"),
        (data_url(png), small, "bytes allowed"),
        (data_url(png[: len(png) // 2]), policy, "not a decodable image"),  # truncated PNG
        (data_url(png[:100] + bytes(rng.integers(0, 256, 200, dtype=np.uint8))), policy, "not a decodable image"),
        (data_url(b"GIF89a not really"), policy, "not a decodable image"),
        (b"hello, not an image", policy, "not a decodable image"),
        (png, small, "bytes allowed"),
        (str(tmp_path / "outside.png"), policy, "outside the allowed local media directory"),
        (str(root / ".." / "outside.png"), policy, "outside the allowed local media directory"),
        (str(root / "link.png"), policy, "outside the allowed local media directory"),
        ((tmp_path / "outside.png").as_uri(), policy, "outside the allowed local media directory"),
        (str(root / "ok.png"), MediaPolicy(), "local image files are not allowed"),
        ((root / "ok.png").as_uri(), MediaPolicy(), "local image files are not allowed"),
        ("file://otherhost" + str(root / "ok.png"), policy, "names a host"),
        (str(root / "missing.png"), policy, "no such file"),
        (str(root), policy, "cannot read"),
        (str(root / "ok.png"), small, "bytes allowed"),
        (f"{server}/big.png", small, "bytes allowed"),
        (f"{server}/unsized-big.png", small, "bytes allowed"),
        (f"{server}/page.html", policy, "serves 'text/html', not an image"),
        (f"{server}/missing.png", policy, "HTTP 404"),
        (f"{server}/slow", quick, "timed out"),
        (f"{server}/redirect-ftp", policy, "fetching .* failed"),
        (f"{server}/redirect-file", policy, "fetching .* failed"),
        (f"{server}/big.png", MediaPolicy(allow_remote=False), "remote image URLs are not allowed"),
        ("ftp://127.0.0.1/a.png", policy, "scheme 'ftp' is not supported"),
        ("gopher://x/y", policy, "scheme 'gopher' is not supported"),
        (np.zeros((4, 4, 3), np.float32), policy, "must be uint8"),
        (np.zeros((4, 4, 2), np.uint8), policy, "must be uint8"),
        (np.zeros((0, 4, 3), np.uint8), policy, "is empty"),
        (12345, policy, "unsupported image source type int"),
    ]
    for source, pol, message in refusals:
        with pytest.raises(ImageError, match=message) as info:
            load_image(source, pol)
        assert "Traceback" not in str(info.value) and len(str(info.value)) < 400, str(info.value)
    assert load_image(str(root / "ok.png"), policy).size == (17, 31)  # the same policy accepts what it should
    with pytest.raises(ImageError, match=r"data:image/png;base64,.*\.\.\. \(\d+ chars\)"):  # a long source, shortened
        load_image(data_url(png[:-40]), policy)


def test_hash_equal_for_equal_pixels_only(tmp_path):
    rng = fresh.rng()
    # shorter side 30 = the processor's shortest_edge: its resize keeps every pixel, so a one-level change in one
    # pixel reaches the processed pixels (after a downscale it could round away, and equal pixels hash equal)
    image = random_image(rng, "RGB", 30, int(rng.integers(30, 60)))
    (tmp_path / "x.png").write_bytes(png := png_bytes(image))
    processor = ImageProcessor.from_dict(CONFIGS["clip-legacy-small"])
    a = processor(load_image(data_url(png)))
    b = processor(load_image(str(tmp_path / "x.png"), MediaPolicy(local_root=str(tmp_path))))
    assert isinstance(image_hash(a), bytes) and len(image_hash(a)) == 16
    assert image_hash(a) == image_hash(b) == image_hash(a.copy())
    x = np.asarray(image).copy()
    y, z = x.shape[0] // 2, x.shape[1] // 2  # the centre pixel survives the crop
    x[y, z, 0] ^= 1
    assert image_hash(processor(load_image(x))) != image_hash(a)
    assert image_hash(a.reshape(3, -1)) != image_hash(a)  # same bytes, other shape
    assert image_hash(a.view(np.int32)) != image_hash(a)  # same bytes, other dtype

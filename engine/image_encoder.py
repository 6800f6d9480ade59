"""The vision encoder of a model that takes images, on the device: `ImageEncoder` runs the tower for the images a
step's chunks reach and gives the step its image rows (engine/runner.py's pack), keeping features by image hash.
What an image is in a prompt (spans, ids, framing) is engine/multimodal.py's.
"""
from __future__ import annotations

import collections
import logging

import numpy as np

from engine.multimodal import ImageSpan, attends_both_ways, is_grid_model, spans_reached, step_rows

log = logging.getLogger(__name__)


class ImageEncoder:
    """The vision tower and projector (models/vision.py) on the device, run for the images a step reaches: the rows
    of the step's `mm_embeds` (runner.pack). Features are kept by image hash, least recently used out past
    CACHE_BYTES (vLLM's encoder cache): requests in flight with the same new image, or one whose pages the prefix
    cache has let go, run the tower once."""

    MAX_BATCH = 8  # tiles per encoder call (calls take 1, 2, 4 or 8: one compiled program each)
    CACHE_BYTES = 256 * 2**20  # host memory for kept features (llava-1.5's are 4.5 MiB an image in bfloat16)

    def __init__(self, vcfg, params, dtype, to_device):
        import functools

        import jax

        from models import vision

        self.vcfg = vcfg
        # LLaVA-NeXT's row-end vector, on the host where its tiles' features are laid out
        self.newline = np.asarray(params["image_newline"], np.float32) if "image_newline" in params else None
        self.params = to_device(params)
        self.dtype = np.dtype(dtype)
        self._to_device = to_device
        if is_grid_model(vcfg):
            from models import qwen_vision

            self._encode = jax.jit(functools.partial(qwen_vision.encode, cfg=vcfg))
        else:
            self._encode = jax.jit(functools.partial(vision.encode_images, vcfg=vcfg))
        self._kept: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()  # digest -> features
        self._kept_bytes = 0
        self.num_encoded = 0  # images run through the tower (a cached image's positions need none)
        self.num_reused = 0  # images whose features were kept from an earlier encoding
        # Qwen3-VL: the DeepStack rows each image position also has (`rows`); 0 for the other models
        self.deepstack = vcfg.deepstack_count if is_grid_model(vcfg) else 0
        self._shapes: set[tuple[int, int]] = set()  # Qwen2-VL: the padded call shapes compiled so far

    def rows(self, chunks, num_tokens: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The step's image rows (engine.multimodal.step_rows: mm_embeds, and Qwen3-VL's DeepStack rows mm_deep);
        None when no chunk reaches an image. Encodes the images whose features are not known yet."""
        hits = spans_reached(chunks)
        if not hits:
            return None
        self.encode(list({id(s): s for _, s, _, _ in hits if s.features is None}.values()))
        return step_rows(hits, num_tokens, self.vcfg.text_hidden_size, self.dtype, self.deepstack)

    @property
    def bidirectional(self) -> bool:
        """Whether an image's positions attend to each other both ways (Gemma 3): steps with images carry kv_limits."""
        return attends_both_ways(self.vcfg)

    def offload(self) -> None:
        """The tower's weights to host memory, their device buffers freed now (LLMEngine.sleep)."""
        import jax

        host = jax.device_get(self.params)
        for array in jax.tree.leaves(self.params):
            array.delete()
        self.params = host

    def restore(self) -> None:
        """The weights back on the devices (LLMEngine.wake_up)."""
        self.params = self._to_device(self.params)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The tile counts of the calls warm-up compiles (none for Qwen2-VL's towers: one call per image, its patches
        padded to a power of two, compiled at an image size's first use)."""
        return () if is_grid_model(self.vcfg) else tuple(1 << i for i in range(self.MAX_BATCH.bit_length()))

    def compile(self, num_images: int) -> None:
        """Compiles the encoder for calls of `num_images` (engine warm-up)."""
        size = self.vcfg.image_size
        pixels = np.zeros((num_images, self.vcfg.num_channels, size, size), np.float32)
        np.asarray(self._encode(self.params, pixels=self._to_device(pixels)))

    def encode(self, spans: list[ImageSpan]) -> None:
        """Each span's features: kept ones, else through the tower, each distinct image once (`_tiles_features`,
        `_grid_features`)."""
        todo: dict[bytes, list[ImageSpan]] = {}
        for span in spans:
            kept = self._kept.get(span.digest)
            if kept is not None:
                self._kept.move_to_end(span.digest)
                span.features = kept
                self.num_reused += 1
            else:
                todo.setdefault(span.digest, []).append(span)
        images = [same[0] for same in todo.values()]
        if not images:
            return
        features = (self._grid_features if is_grid_model(self.vcfg) else self._tiles_features)(images)
        for span, rows in zip(images, features):
            rows = rows.astype(self.dtype)
            for same in todo[span.digest]:
                same.features = rows
            self._keep(span.digest, rows)
        self.num_encoded += len(images)

    def _tiles_features(self, images: list[ImageSpan]) -> list[np.ndarray]:
        """LLaVA: every image's tiles through the tower, MAX_BATCH per call (padded to a power of two); LLaVA-NeXT's
        then laid out as their image's rows (models.anyres.pack_features)."""
        from models import anyres

        tiles = np.concatenate([span.pixels for span in images])  # [all tiles, C, S, S]
        out = []
        for i in range(0, len(tiles), self.MAX_BATCH):
            group = tiles[i : i + self.MAX_BATCH]
            n = 1 << (len(group) - 1).bit_length()
            pixels = np.zeros((n, *group.shape[1:]), np.float32)
            pixels[: len(group)] = group
            out.append(np.asarray(self._encode(self.params, pixels=self._to_device(pixels)))[: len(group)])
        features = np.concatenate(out)  # [all tiles, tokens_per_image, D]
        firsts = np.cumsum([0] + [len(span.pixels) for span in images])
        return [features[a] if span.grid is None else
                anyres.pack_features(self.vcfg, features[a:b], self.newline, span.grid, span.size_hw)
                for span, a, b in zip(images, firsts[:-1], firsts[1:])]

    def _grid_features(self, images: list[ImageSpan]) -> list[np.ndarray]:
        """Qwen2-VL: one call per image, its patches padded to a power of two (models.qwen_patches.encode_inputs); a
        new padded shape compiles, once, and says so."""
        from models import qwen_patches

        m, out = self.vcfg.spatial_merge_size, []
        for span in images:
            t, h, w = span.thw
            inputs = qwen_patches.encode_inputs(self.vcfg, span.pixels, (t, h * m, w * m))
            shape = (len(inputs["patches"]), len(inputs["blocks"]))  # (rows, windows)
            if shape not in self._shapes:
                self._shapes.add(shape)
                log.info("compiling the vision tower for images of up to %d patches in %d windows (once per size "
                         "bucket)", *shape)
            features = self._encode(self.params, self._to_device(inputs))
            out.append(np.asarray(features[: t * h * w]))
        return out

    def clear(self) -> None:
        """Forgets the kept features (LLMEngine.reset_prefix_cache, sleep)."""
        self._kept.clear()
        self._kept_bytes = 0

    def _keep(self, digest: bytes, features: np.ndarray) -> None:
        self._kept[digest] = features
        self._kept_bytes += features.nbytes
        while self._kept_bytes > self.CACHE_BYTES and len(self._kept) > 1:
            self._kept_bytes -= self._kept.popitem(last=False)[1].nbytes

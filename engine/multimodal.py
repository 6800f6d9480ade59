"""Images in prompts (LLaVA-style models): where each sits in the token sequence, and the ids the prefix cache keys it by.

A chat renders one placeholder token (the checkpoint's `image_token_id`) per image. `ImagePrompts.prepare` loads and
preprocesses each image (engine/images.py) and widens its placeholder to the positions its features fill
(`tokens_per_image`; LLaVA-NeXT: a count from the image's size). Those positions carry ids past the vocabulary, drawn from the image's content hash (`image_ids`): the radix tree,
the host and disk tiers' block hashes and the router all key on token ids, so a cached image is reused only by the
same image at the same place, and none of them knows images exist. The model never embeds those ids: the step's
`mm_embeds` rows take their place (models/llama.py), computed by the vision encoder when a chunk first covers them
(engine/runner.py), so an image whose positions all come from the cache is never encoded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Sequence as Seq

import numpy as np

from engine.request import RequestError

ID_BITS = 30  # an image position's id: vocab_size + 30 bits of its hash (int32 for vocabularies under 2**30)


@dataclasses.dataclass(eq=False)
class ImageSpan:
    """One image of a prompt: the positions it fills and what fills them. Also a prompt given as embeddings
    (engine/prompt_embeds.py): no pixels, its rows the features from the start."""

    start: int  # its first position in the prompt
    num_tokens: int
    pixels: np.ndarray | None  # [T, C, H, W] float32 tiles, as the tower reads them (LLaVA: T = 1); None: rows given
    digest: bytes  # of the tiles, their grid and the image's size (`_digest`)
    vocab_size: int  # its positions' ids are past the vocabulary (`image_ids`): every sampled id is below this
    grid: tuple[int, int] | None = None  # LLaVA-NeXT: the (rows, cols) its tiles after the first lie on
    size_hw: tuple[int, int] | None = None  # ... and the image's own (height, width): what unpadding keeps
    features: Any = None  # [num_tokens, text hidden] host array, once encoded (kept while the request lives: a
    # preempted sequence recomputes its positions from them)
    # Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5: the (temporal, height, width) grid its positions fill, row-major
    # (after the tower's patch merge), which M-RoPE turns them by (`mrope_positions`); pixels are then [patches,
    # patch_dim] (models/qwen_vision.py)
    thw: tuple[int, int, int] | None = None
    # Gemma 3: its positions attend to each other both ways (`kv_limits`), so a step computes all of those it has
    # not cached or none (`chunk_cut`)
    bidirectional: bool = False

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def given(self) -> bool:
        """Its rows came with the request (prompt embeddings): no tower runs for it."""
        return self.pixels is None


def _digest(tiles: np.ndarray, grid=None, size_hw=None) -> bytes:
    """What an image's positions are named by: its tiles' hash (engine.images.image_hash), and with LLaVA-NeXT's
    tiles the grid and the size that say how their features are laid out."""
    from engine.images import image_hash

    digest = image_hash(tiles)
    return digest if grid is None else hashlib.blake2b(digest + repr((grid, size_hw)).encode(), digest_size=16).digest()


def image_ids(digest: bytes, num_tokens: int, vocab_size: int) -> list[int]:
    """The ids of an image's positions: position j's is vocab_size + 30 bits of SHAKE-128(digest)'s j-th word. Two
    images share a cached prefix only if every one of their positions' ids agrees."""
    words = np.frombuffer(hashlib.shake_128(digest).digest(4 * num_tokens), "<u4")
    return (vocab_size + (words & ((1 << ID_BITS) - 1)).astype(np.int64)).tolist()


def mrope_positions(spans: Seq[ImageSpan], start: int, num: int) -> np.ndarray:
    """[3, num] int32: the (temporal, height, width) M-RoPE positions of a sequence's positions start..start + num - 1
    (models.config.LlamaConfig.mrope_section), as Qwen2-VL's get_rope_index lays them out: an image's rows take
    base + (t, row, col) of its grid, base being where text there would be; text takes its index shifted by what the
    images before it saved (an image of grid (1, h, w) advances later text by max(h, w), not by its h * w rows).
    spans: the sequence's images in prompt order. A function of the tokens before each position only, so a cached
    prefix's positions are the ones it was computed with."""
    pos = np.arange(start, start + num, dtype=np.int64)
    out = np.broadcast_to(pos, (3, num)).copy()
    shift = 0  # text after the images so far sits this far from its index
    for span in spans:
        if span.start >= start + num:
            break
        if span.thw is None:  # given rows (prompt embeddings) take text's positions
            continue
        t, h, w = span.thw
        inside = (pos >= span.start) & (pos < span.end)
        if inside.any():
            j = pos[inside] - span.start
            base = span.start + shift
            out[:, inside] = base + np.stack([j // (h * w), j // w % h, j % w])
        shift += max(h, w) - span.num_tokens
        out[:, pos >= span.end] += max(h, w) - span.num_tokens
    return out.astype(np.int32)


def kv_limits(spans: Seq[ImageSpan], start: int, num: int) -> np.ndarray:
    """[num] int32: the last position each of a sequence's positions start..start + num - 1 attends to: its own, or
    the last of its image where the image attends both ways (Gemma 3: `ImageSpan.bidirectional`)."""
    out = np.arange(start, start + num, dtype=np.int32)
    for span in spans:
        lo, hi = max(span.start, start), min(span.end, start + num)
        if span.bidirectional and lo < hi:
            out[lo - start : hi - start] = span.end - 1
    return out


def chunk_cut(spans: Seq[ImageSpan], start: int, n: int) -> int:
    """How many of a sequence's next `n` positions from `start` a step may compute: all, unless the last would fall
    inside an image that attends both ways. Then the chunk ends before that image (0 when it starts in or at it:
    this step cannot finish the image, and the sequence waits for one that can)."""
    end = start + n
    for span in spans:
        if span.bidirectional and span.start < end < span.end:
            return max(span.start - start, 0)
    return n


def spans_reached(chunks) -> list[tuple[int, ImageSpan, int, int]]:
    """(row of the step, span, first and last + 1 of the span's rows) for each span whose positions a step's chunks
    (engine.scheduler.Chunk, back to back in the step) compute."""
    hits, row = [], 0
    for c in chunks:
        n = len(c.token_ids)
        for span in c.seq.images:
            lo, hi = max(span.start, c.start), min(span.end, c.start + n)
            if lo < hi:
                hits.append((row + lo - c.start, span, lo - span.start, hi - span.start))
        row += n
    return hits


def step_rows(hits, num_tokens: int, width: int, dtype, deepstack: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(mm_embeds [num_tokens, width]: each reached position's feature row at its row of the step, zeros elsewhere;
    mm_deep [deepstack, num_tokens, width] alike, the rows Qwen3-VL adds after its first layers, or None). hits:
    `spans_reached`'s, every span's features known ([positions, k x width]: its mm_embeds row, then k - 1 DeepStack
    rows, side by side; given rows have k = 1 and no DeepStack rows)."""
    out = np.zeros((1 + deepstack, num_tokens, width), dtype)
    for r, span, a, b in hits:
        k = span.features.shape[1] // width
        out[:k, r : r + b - a] = span.features[a:b].reshape(b - a, k, width).transpose(1, 0, 2)
    return out[0], out[1:] if deepstack else None


def check_whole_images(scheduler, tokens_per_image: int) -> None:
    """A model whose images attend both ways computes an image's uncached positions in one step, beside a decode of
    every other running sequence: refuses a scheduler (engine.config.SchedulerConfig) whose steps cannot hold that."""
    from engine.config import ConfigKeyError

    need = tokens_per_image + scheduler.max_running - 1
    if scheduler.max_batch_tokens < need:
        raise ConfigKeyError(f"scheduler.max_batch_tokens ({scheduler.max_batch_tokens}) must be >= {need} for this "
                             f"model: a step computes an image's {tokens_per_image} positions together (they attend "
                             f"to each other) beside one token of each other running sequence "
                             f"(scheduler.max_running {scheduler.max_running})")
    if 0 < scheduler.long_prefill_tokens < tokens_per_image:
        raise ConfigKeyError(f"scheduler.long_prefill_tokens ({scheduler.long_prefill_tokens}) must be 0 or >= "
                             f"{tokens_per_image} for this model: a step computes an image's positions together")


def text_ids(prompt_ids: Seq[int], vocab_size: int, image_token_id: int) -> list[int]:
    """The prompt with each image position as the placeholder token again (what a tokenizer can read)."""
    return [t if t < vocab_size else image_token_id for t in prompt_ids]


class ImagePrompts:
    """A model's image inputs: its vision config (models/vision.py), its processor (engine/images.py), what sources a
    request may name (engine.images.MediaPolicy; the Python API's and the offline job's callers are trusted with any
    local file, the server's are not: it passes its own)."""

    def __init__(self, vcfg, processor, vocab_size: int, policy=None, newlines: dict[int, int] | None = None):
        """newlines: the tokenizer's tokens of only newlines, {count: id} (`newline_tokens`): Gemma 3 frames each
        image in blank lines, merged into the newlines around it as its tokenizer would (`_frame`)."""
        from engine.images import MediaPolicy

        if vocab_size + (1 << ID_BITS) >= 1 << 31:
            raise ValueError(f"vocab_size {vocab_size} leaves no int32 ids for image positions")
        _check_processor(vcfg, processor)
        self.vcfg = vcfg
        self.processor = processor
        self.vocab_size = vocab_size
        self.policy = policy or MediaPolicy(local_root="/")
        self.boi = vcfg.boi_token_id if attends_both_ways(vcfg) else None  # Gemma 3: its template's image placeholder
        if self.boi is not None and 2 not in (newlines or {}):
            raise ValueError("a Gemma 3 vision model's tokenizer needs a token of two newlines (its images' framing)")
        self.newlines = newlines or {}
        self.newline_counts = {i: n for n, i in self.newlines.items()}

    @property
    def placeholder_id(self) -> int:
        """The token a chat renders where an image goes: Gemma 3's <start_of_image>, else the image token."""
        return self.vcfg.image_token_id if self.boi is None else self.boi

    @property
    def tokens_per_image(self) -> int:
        return self.vcfg.tokens_per_image

    @property
    def summary(self) -> str:
        """What the engine's log says of its images."""
        v, p = self.vcfg, self.processor
        if is_grid_model(v):
            cell = p.patch_size * p.merge_size
            return (f"{v.kind} vision tower, an image at its own size in {cell}x{cell}-pixel positions, "
                    f"{p.min_pixels // cell**2} to {p.max_pixels // cell**2} of them")
        return (f"{v.kind} vision tower, {v.tokens_per_image} positions per {v.image_size}x{v.image_size} tile"
                f"{' (anyres: a base tile and a grid of them)' if v.grid_pinpoints else ''}")

    def load(self, sources: Seq[Any], policy=None) -> list:
        """Each source as a PIL image (data and http(s) URLs, paths as the policy allows (default: this one's), bytes,
        arrays, images); a bad one raises RequestError naming it. Fetches remote ones: a server runs this off its event
        loop."""
        from engine.images import ImageError, load_image

        out = []
        for i, source in enumerate(sources):
            try:
                out.append(load_image(source, policy or self.policy))
            except ImageError as e:
                raise RequestError(f"image {i}: {e}") from None
        return out

    def prepare(self, prompt_ids: Seq[int], sources: Seq[Any], policy=None) -> tuple[list[int], list[ImageSpan]]:
        """(prompt ids with each placeholder widened to its image's ids, the images' spans). The prompt holds one
        placeholder per image (or a run of exactly as many as the image has positions: a processor's expanded
        prompt). LLaVA-NeXT: an image's positions depend on its size (models.anyres.packed_tokens)."""
        images = self.load(sources, policy)
        if self.boi is not None:
            prompt_ids = self._frame(prompt_ids)
        runs = _runs(prompt_ids, self.vcfg.image_token_id)
        if len(runs) != len(images):
            raise RequestError(f"the prompt has {len(runs)} image placeholders (token {self.vcfg.image_token_id}) "
                               f"for {len(images)} images")
        ids, spans, prev = [], [], 0
        for i, ((start, length), image) in enumerate(zip(runs, images)):
            ids += prompt_ids[prev:start]
            span = self._span(len(ids), image)
            if length not in (1, span.num_tokens):
                raise RequestError(f"image {i}'s placeholder is a run of {length} tokens; it is 1 token, or "
                                   f"{span.num_tokens} (the image's positions)")
            spans.append(span)
            ids += image_ids(span.digest, span.num_tokens, self.vocab_size)
            prev = start + length
        ids += prompt_ids[prev:]
        return ids, spans

    def _frame(self, ids: Seq[int]) -> list[int]:
        """Gemma 3: each <start_of_image> not already followed by its image token becomes what its processor puts in
        the text there, "\n\n<start_of_image><image_soft_token><end_of_image>\n\n" (the image token widened later),
        each blank line merged into the newline tokens beside it as the tokenizer reads a run of newlines."""
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != self.boi or ids[i + 1 : i + 2] == [self.vcfg.image_token_id]:
                out.append(ids[i])
                i += 1
                continue
            before = 0
            while out and out[-1] in self.newline_counts:
                before += self.newline_counts[out.pop()]
            after, i = 0, i + 1
            while i < len(ids) and ids[i] in self.newline_counts:
                after += self.newline_counts[ids[i]]
                i += 1
            out += self._newline_ids(before + 2) + [self.boi, self.vcfg.image_token_id, self.vcfg.eoi_token_id]
            out += self._newline_ids(after + 2)
        return out

    def _newline_ids(self, count: int) -> list[int]:
        """A run of `count` newlines as tokens: the longest first."""
        out = []
        while count:
            n = max(k for k in self.newlines if k <= count)
            out.append(self.newlines[n])
            count -= n
        return out

    def _span(self, start: int, image) -> ImageSpan:
        """An image's span at `start`: its tiles (Qwen2-VL: patches), their count of positions, its digest."""
        from engine.images import Tiles
        from models import anyres

        processed = self.processor(image)
        if is_grid_model(self.vcfg):  # (patches, grid of patches): positions are its merged grid's cells
            patches, (t, h, w) = processed
            m = self.vcfg.spatial_merge_size
            thw = (t, h // m, w // m)
            return ImageSpan(start, t * h * w // m**2, patches, _digest(patches, thw), self.vocab_size, thw=thw)
        if not isinstance(processed, Tiles):  # LLaVA, Gemma 3: one tile
            return ImageSpan(start, self.tokens_per_image, processed[None], _digest(processed[None]), self.vocab_size,
                             bidirectional=self.boi is not None)
        grid, size = tuple(processed.grid), tuple(processed.size_hw)
        return ImageSpan(start, anyres.packed_tokens(self.vcfg, grid, size), processed.pixels,
                         _digest(processed.pixels, grid, size), self.vocab_size, grid, size)

    def check(self, prompt_ids: Seq[int], spans: Seq[ImageSpan]) -> None:
        """A prepared prompt: every span's positions hold its image's ids, and no other id is past the vocabulary."""
        covered = 0
        for span in spans:
            if not isinstance(span, ImageSpan):
                raise RequestError("images must be prepared (ImagePrompts.prepare) with the prompt they belong to")
            if list(prompt_ids[span.start:span.end]) != image_ids(span.digest, span.num_tokens, self.vocab_size):
                raise RequestError(f"the prompt's positions {span.start}..{span.end - 1} are not its image's")
            covered += span.num_tokens
        if sum(1 for t in prompt_ids if t >= self.vocab_size) != covered:
            raise RequestError(f"prompt token ids past the vocabulary [0, {self.vocab_size}) that are no image's")


def attends_both_ways(vcfg) -> bool:
    """Whether an image's positions attend to each other both ways (Gemma 3: its config names the tokens that frame
    an image): its spans are `bidirectional`, its steps with images carry kv_limits."""
    return getattr(vcfg, "boi_token_id", None) is not None


def is_grid_model(vcfg) -> bool:
    """Whether a vision config is Qwen2-VL's kind (models/qwen_vision.py: images at their own resolution, a grid of
    patches each, positions turned by M-RoPE), not LLaVA's (models/vision.py: fixed-size tiles)."""
    from models.qwen_vision import QwenVisionConfig

    return isinstance(vcfg, QwenVisionConfig)


def _check_processor(vcfg, processor) -> None:
    """That a checkpoint's image processor makes what its vision tower reads (sizes, tiling, patches)."""
    from engine.images import AnyResProcessor

    if is_grid_model(vcfg):
        made = (processor.patch_size, processor.temporal_patch_size, processor.merge_size)
        wanted = (vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size)
        if made != wanted:
            raise ValueError(f"the image processor's (patch_size, temporal_patch_size, merge_size) {made} are not the "
                             f"vision tower's {wanted}")
        return
    size = (vcfg.image_size, vcfg.image_size)
    tiled = isinstance(processor, AnyResProcessor)
    made = processor.tile.crop_hw or processor.tile.size_hw if tiled else processor.crop_hw or processor.size_hw
    if made != size:
        raise ValueError(f"the image processor makes images of {'varying size (no crop)' if made is None else made}; "
                         f"the vision tower reads {size}")
    if tiled != bool(vcfg.grid_pinpoints) or tiled and tuple(map(tuple, processor.grid_pinpoints)) != tuple(
            map(tuple, vcfg.grid_pinpoints)):
        raise ValueError("the image processor's image_grid_pinpoints are not the model's "
                         f"({getattr(processor, 'grid_pinpoints', None)} vs {vcfg.grid_pinpoints or None})")


def _runs(ids: Seq[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in ids."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def load_image_model(path: str, dtype, processor_kwargs: dict | None = None) -> tuple | None:
    """(vision config, vision params, image processor) of an HF checkpoint directory that takes images (a LLaVA,
    LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 config.json), else None. A vision model without a
    preprocessor_config.json is refused by name. processor_kwargs (model.mm_processor_kwargs): keys of that config
    replaced, those its processor lets be (`OVERRIDABLE`)."""
    import json
    import os

    from models.loader import checkpoint_kind, resolve_path

    path = resolve_path(path)
    if checkpoint_kind(path) != "safetensors":
        return None
    from engine.images import ImageProcessor
    from engine.qwen_images import QwenImageProcessor
    from models import qwen_vision, vision
    from models.gguf_loader import CheckpointError

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    vcfg = vision.VisionConfig.from_hf_config(config)
    module, processor_cls = vision, ImageProcessor
    if vcfg is None:
        vcfg = qwen_vision.QwenVisionConfig.from_hf_config(config)
        module, processor_cls = qwen_vision, QwenImageProcessor
    if vcfg is None:
        return None
    from engine.images import processor_config

    stored = processor_config(path)
    if stored is None:
        raise CheckpointError(f"{path}: a model that takes images needs the preprocessor_config.json its images are "
                              "prepared by (resize, crop, normalization); none is there")
    processor = _processor(processor_cls, stored, processor_kwargs)
    return vcfg, module.load_params(path, vcfg, dtype), processor


def load_mmproj(path: str, dtype, tokenizer, text_hidden_size: int, processor_kwargs: dict | None = None) -> tuple:
    """(vision config, vision params, image processor) of a llama.cpp mmproj GGUF (model.mmproj: Gemma 3's tower and
    projector beside a GGUF text model, models/mmproj.py); the ids of the tokens around an image from the text model's
    tokenizer, each refused by name where it has none."""
    from engine.config import ConfigKeyError
    from engine.images import ImageProcessor
    from models.loader import resolve_path
    from models.mmproj import read_mmproj

    ids = {}
    for key, token in (("image_token_id", "<image_soft_token>"), ("boi_token_id", "<start_of_image>"),
                       ("eoi_token_id", "<end_of_image>")):
        ids[key] = tokenizer.token_to_id(token)
        if ids[key] is None:
            raise ConfigKeyError(f"model.mmproj: the text model's tokenizer has no {token} (a Gemma 3 mmproj serves a "
                                 "Gemma 3 text model)")
    vcfg, params, stored = read_mmproj(resolve_path(path), text_hidden_size=text_hidden_size, dtype=dtype, **ids)
    return vcfg, params, _processor(ImageProcessor, stored, processor_kwargs)


def _processor(processor_cls, stored: dict, processor_kwargs: dict | None):
    """processor_cls from its stored config with model.mm_processor_kwargs' keys replaced (those it lets be set)."""
    from engine.config import ConfigKeyError

    processor_kwargs = processor_kwargs or {}
    unknown = sorted(set(processor_kwargs) - set(processor_cls.OVERRIDABLE))
    if unknown:
        raise ConfigKeyError(f"model.mm_processor_kwargs: {unknown} cannot be set for this model's image processor "
                             f"(it takes {', '.join(processor_cls.OVERRIDABLE) or 'none'})")
    return processor_cls.from_dict({**stored, **processor_kwargs})


# ------------------------------------------------------------------------------------------- chat messages
_PART_TYPE = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b|selectattr\(\s*['"]type['"]""")


def template_wants_parts(template: str | None) -> bool:
    """Whether a chat template reads a message's content as a list of typed parts (vision models' templates: it loops
    over them and renders an image part as its placeholder) rather than as a string."""
    return bool(template) and _PART_TYPE.search(template) is not None


def split_images(messages: Seq[dict], parts: bool, placeholder: str) -> tuple[list[dict], list[Any]]:
    """Chat messages whose content may hold image parts -> (messages for the chat template, the image sources in
    order). Image parts: OpenAI's {"type": "image_url", "image_url": {"url": ...}} (or the URL as a string) and HF's
    {"type": "image", "image" | "url" | "path": ...}. parts: the template reads typed parts (`template_wants_parts`):
    content becomes a list of {"type": "text", "text"} and {"type": "image"}, a string content one text part; else
    text with each image as `placeholder` and a newline where it was (what such templates' users write by hand).
    (Only for models that take images: a text model's messages go to its template as they are.)"""
    out, sources = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            if parts and isinstance(content, str):
                message = {**message, "content": [{"type": "text", "text": content}]}
            out.append(message)
            continue
        rendered = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "image"):
                source = _image_source(part)
                sources.append(source)
                rendered.append({"type": "image"} if parts else placeholder + "\n")
            elif kind == "text":
                rendered.append({"type": "text", "text": part.get("text", "")} if parts else part.get("text", ""))
            else:
                raise RequestError(f"a message's content part of type {kind!r} is not supported (text, image_url, image)")
        out.append({**message, "content": rendered if parts else "".join(rendered)})
    return out, sources


def encode_chat(tokenizer, image_prompts: ImagePrompts | None, messages: list[dict], **kwargs) -> tuple[list[int], list]:
    """A chat's prompt ids through `tokenizer`'s chat template (`Tokenizer.encode_chat`'s arguments), and the sources
    of the images its messages hold, in order; image parts for a model without `image_prompts` are refused."""
    if image_prompts is None:
        if has_images(messages):
            raise RequestError("this model takes no images (its checkpoint has no vision tower)")
        return tokenizer.encode_chat(messages, **kwargs), []
    placeholder = tokenizer.decode([image_prompts.placeholder_id], skip_special_tokens=False)
    messages, sources = split_images(messages, template_wants_parts(tokenizer.chat_template), placeholder)
    return tokenizer.encode_chat(messages, **kwargs), sources


def newline_tokens(tokenizer, longest: int = 32) -> dict[int, int]:
    """{count: id} of the tokenizer's tokens that are a run of `count` newlines alone (ImagePrompts' newlines)."""
    out = {}
    for n in range(1, longest + 1):
        ids = tokenizer.encode("\n" * n, add_special_tokens=False)
        if len(ids) == 1:
            out[n] = ids[0]
    return out


def has_images(messages: Seq[dict]) -> bool:
    """Whether any message's content holds an image part."""
    return any(isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"]) for m in messages)


def _image_source(part: dict) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise RequestError('an image_url part needs {"image_url": {"url": "data:... | https://..."}}')
        return url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    raise RequestError('an image part needs "image", "url" or "path"')

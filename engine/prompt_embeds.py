"""Prompts given as embeddings (vLLM's `prompt_embeds`, SGLang's `input_embeds`): [T, hidden] rows the model reads in
place of its token embeddings (soft prompts, embeddings from another model, research on the input space).

Such a prompt is one span of the prompt's positions with its rows already known (engine.multimodal.ImageSpan with
no pixels): the steps' `mm_embeds` carry them as they carry an image's features, so every path that computes, caches
or recomputes (after preemption) an image's positions does the same for them. Each position's id is past the
vocabulary and chains the hashes of its row and every row before it (`row_ids`): the radix tree, the host and disk
tiers and the block hashes key on ids as ever, so two prompts share cached pages exactly as far as their rows agree
(a soft prompt or a shared document's embeddings is computed once), and a row never matches a token.

Rows are the first layer's inputs, after any embedding scale: for most models a prompt's rows of the embedding table
(`LLM.token_embeddings`), for Gemma those times sqrt(hidden). They are cast to the model's dtype before hashing, so
float32 and bfloat16 copies of the same values are one prompt. Over HTTP a prompt's rows come base64-encoded as
safetensors (one tensor) or as a .npy file (`decode`; server.max_body_bytes bounds them); a torch.save payload
(vLLM's) is refused by name: reading it means unpickling what a client sent.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os

import ml_dtypes
import numpy as np
import safetensors

from engine.multimodal import ID_BITS, ImageSpan
from engine.request import RequestError

# safetensors' float dtypes a payload may hold
FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def row_ids(rows: np.ndarray, vocab_size: int) -> tuple[list[int], bytes]:
    """(the ids of a prompt's positions, the digest of all its rows): position j's id is vocab_size + 30 bits of the
    hash chained over rows 0..j, so prompts agreeing in their first k rows agree in their first k ids and (but for a
    2**-30 chance per position) no further."""
    ids, digest = [], b""
    mask = (1 << ID_BITS) - 1
    for row in np.ascontiguousarray(rows):
        digest = hashlib.blake2b(digest + row.tobytes(), digest_size=16).digest()
        ids.append(vocab_size + (int.from_bytes(digest[:4], "little") & mask))
    return ids, digest


def rows_of(embeds, hidden_size: int, dtype) -> np.ndarray:
    """A prompt's rows in the model's dtype, from a [T, hidden_size] array (numpy, JAX, or anything np.asarray reads,
    in a float dtype); RequestError naming what is wrong otherwise."""
    try:
        rows = np.asarray(embeds)
    except Exception as e:  # (a ragged nested list, an object numpy cannot read)
        raise RequestError(f"prompt_embeds: not an array ({e})") from None
    if rows.ndim != 2 or rows.shape[1] != hidden_size:
        raise RequestError(f"prompt_embeds must be [num_tokens, {hidden_size}] (the model's hidden size), got shape "
                           f"{list(rows.shape)}")
    if len(rows) == 0:
        raise RequestError("prompt_embeds is empty")
    if not np.issubdtype(rows.dtype, np.floating) and rows.dtype.name != "bfloat16":
        raise RequestError(f"prompt_embeds must hold floats, got {rows.dtype.name}")
    rows = rows.astype(dtype)
    finite = np.isfinite(rows.astype(np.float32)).all(axis=1)
    if not finite.all():
        raise RequestError(f"prompt_embeds row {int(np.argmin(finite))} is not finite (NaN or inf)")
    return rows


def span_of(rows: np.ndarray, vocab_size: int) -> tuple[list[int], ImageSpan]:
    """(prompt ids, the span of its rows) of a prompt's rows (`rows_of`'s)."""
    ids, digest = row_ids(rows, vocab_size)
    return ids, ImageSpan(start=0, num_tokens=len(ids), pixels=None, digest=digest, vocab_size=vocab_size,
                          features=rows)


def decode(payload: str) -> np.ndarray:
    """The array a base64 payload holds: a safetensors file of one tensor, or a .npy file (no pickled objects)."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("prompt_embeds: not valid base64") from None
    return parse(data)


def read(source: str) -> np.ndarray:
    """The offline job's `prompt_embeds` (its lines are trusted with local files): a .npy or safetensors file's path,
    else a base64 payload as `decode` reads it."""
    if os.path.isfile(source):
        try:
            with open(source, "rb") as f:
                return parse(f.read())
        except OSError as e:
            raise RequestError(f"prompt_embeds: cannot read {source} ({e.strerror})") from None
    return decode(source)


def parse(data: bytes) -> np.ndarray:
    """The array of a .npy file or a safetensors file of one tensor (no pickled objects)."""
    if data.startswith(b"\x93NUMPY"):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise RequestError(f"prompt_embeds: not a readable .npy file ({e})") from None
    if data.startswith(b"PK"):
        raise RequestError("prompt_embeds: a torch.save payload (a zip of pickles) is not read; send the tensor as "
                           "safetensors (safetensors.torch.save({'embeds': t})) or as a .npy file, base64-encoded")
    try:
        tensors = safetensors.deserialize(data)  # [(name, {"dtype", "shape", "data"})] (numpy's reader has no bfloat16)
    except Exception as e:
        raise RequestError(f"prompt_embeds: neither a .npy nor a safetensors file ({e})") from None
    if len(tensors) != 1:
        raise RequestError(f"prompt_embeds: the safetensors file holds {len(tensors)} tensors; send one")
    info = tensors[0][1]
    if info["dtype"] not in FLOATS:
        raise RequestError(f"prompt_embeds must hold floats ({', '.join(FLOATS)}), got {info['dtype']}")
    return np.frombuffer(info["data"], FLOATS[info["dtype"]]).reshape(info["shape"])

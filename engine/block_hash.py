"""Chained block hashes: one stable 64-bit name per full page of a token sequence.

The hash of page i covers every token up to the end of page i (and the namespace), because it
chains through the hash of page i - 1:

    root = H(TAG, namespace)    h_0 = H(root, page 0 tokens)    h_i = H(h_{i-1}, page i tokens)

so equal hashes mean equal prefixes (up to 64-bit collisions), which is exactly when two caches can
share KV. The radix cache names pages in its "stored"/"removed" events with these hashes, and the
router recomputes them from tokenized requests; both must agree across processes and machines,
hence blake2b over a fixed byte encoding and never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

_TAG = b"radixlm/block-hash/v1"
_MASK_64 = (1 << 64) - 1

ADAPTER_NAMESPACE = "\x00"  # starts the namespace of a LoRA adapter's requests; no cache_salt may start with it


def cache_namespace(salt: str | None, adapter: str | None = None) -> str | None:
    """The cache namespace of a request: its `cache_salt`, within its LoRA adapter's own namespace when it has one
    (an adapter's K/V differ from the base model's). The engine and the router both name pages with it."""
    if adapter is None:
        return salt
    return ADAPTER_NAMESPACE + adapter + ("" if salt is None else ADAPTER_NAMESPACE + salt)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _root_hash(namespace: str | None) -> int:
    """Hash that the first page of a sequence chains from. None and "" are different namespaces."""
    ns = b"\x00" if namespace is None else b"\x01" + namespace.encode("utf-8")
    return _digest(_TAG + ns)


def page_hashes(
    tokens: Sequence[int],
    page_size: int,
    namespace: str | None = None,
    parent: int | None = None,
) -> list[int]:
    """One unsigned 64-bit hash per FULL page of `tokens`; a trailing partial page gets none.

    `parent` is the hash of the page just before `tokens[0]`, to continue a chain:
    `page_hashes(a + b, ps, ns) == page_hashes(a, ps, ns) + page_hashes(b, ps, parent=<last of a>)`
    when `len(a)` is a multiple of `ps`. With `parent` given, `namespace` is ignored: the parent
    hash already carries it. Tokens are encoded as signed 64-bit little-endian ints.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if parent is not None and not 0 <= parent <= _MASK_64:
        raise ValueError(f"parent hash {parent} is not an unsigned 64-bit int")
    prev = _root_hash(namespace) if parent is None else parent
    page_struct = struct.Struct(f"<Q{page_size}q")
    hashes = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        prev = _digest(page_struct.pack(prev, *tokens[start : start + page_size]))
        hashes.append(prev)
    return hashes

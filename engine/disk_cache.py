"""The disk tier of the prefix cache: every KV page the radix tree stores, also kept in files, by block hash.

The device tree and the host tier live and die with the process. With `cache.disk_path` set, each full page that
enters the tree is also written to a file named by its chained block hash (`engine.block_hash`: the namespace and
every token up to the page's end, so equal hashes mean equal K/V), under a directory named by everything else the
K/V depends on (`layout_key`: the weights, model, dtypes, page size, tensor parallelism, attention backend). A
replica that restarts, or another replica on the same machine that shares the directory, continues a prompt's
match there: the pages are read in the background while the request waits (others keep running), then copied into
fresh device pages instead of being prefilled.

`DiskCache` owns the files: a writer thread and a reader pool, an index of the hashes it knows to be there (files
of other processes are found on a miss), and a capacity in pages, least recently used files deleted first. Recency
is the files' mtime (set on write, touched on read), and the writer lists the directory again every
`rescan_every` pages it writes: replicas sharing a directory keep it, together, near one capacity (each may run
over by what it writes between listings) instead of one capacity each. The
scheduler decides what to write and read (`StepPlan.disk_saves`, `disk_loads`); the runner hands it the bytes.

File format, `<dir>/<key>/<hh>/<hash:016x>.kv`: a 24-byte header (magic, block hash, payload bytes), then each
cache array's page ([L, Hkv, page_size, D] K and V, [L, Hkv, page_size] scales of an 8-bit cache) as raw bytes.
Files appear by rename, so a reader sees a whole file or none; a file whose header or size does not match is a
miss, and is deleted.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

_MAGIC = b"RXKVpg01"
_HEADER = struct.Struct("<8sQQ")  # magic, block hash, payload bytes
FORMAT_VERSION = 1  # in every layout key: a new file format never reads old files
MAX_PENDING_WRITES = 4096  # pages queued for the writer; beyond this new pages are not written (counted)
RESCAN_EVERY = 256  # pages written between two listings of the directory (other processes' files, and deletions)

Payload = tuple[np.ndarray, ...]  # one page of each cache array: [L, Hkv, ps, D] (K, V) and [L, Hkv, ps] (scales)


def layout_key(fields: dict) -> str:
    """The directory name for K/V computed under `fields` (JSON-serializable): 16 hex digits of their digest."""
    data = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def weights_identity(path: str) -> dict:
    """What names a checkpoint's bytes without reading them: each weight file's resolved path, size and mtime."""
    root = Path(path).resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]}


class DiskCache:
    """KV pages in files named by block hash, under `directory/key`; at most `capacity_pages` of them.

    `specs`: (shape, dtype) of one page of each cache array, the layout of every file. Thread safety: `present`,
    `wanted`, `put`, `fetch` are called by the engine thread; the writer thread and reader pool share the index
    under a lock."""

    def __init__(self, directory: str | os.PathLike, key: str, specs: Sequence[tuple[tuple[int, ...], np.dtype]],
                 capacity_pages: int, describe: dict | None = None, rescan_every: int = RESCAN_EVERY):
        if capacity_pages < 1:
            raise ValueError(f"the disk tier needs room for at least one page, got {capacity_pages}")
        self.specs = [(tuple(s), np.dtype(d)) for s, d in specs]
        self.page_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in self.specs)
        self.capacity_pages = capacity_pages
        self.rescan_every = rescan_every
        self._written_since_scan = 0
        self.root = Path(directory)
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[int, None] = collections.OrderedDict()  # hashes on disk, LRU first
        self._writing: set[int] = set()  # queued for the writer, not yet renamed into place
        self._unreadable: set[int] = set()  # reads failed (a file that cannot be opened or deleted): never looked up
        # pages_written, pages_read, write_skipped, write_errors, read_errors, pages_deleted
        self.stats = collections.Counter()
        self.key: str | None = None
        self.dir: Path | None = None
        self.set_key(key, describe)
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="disk-cache-writer", daemon=True)
        self._writer.start()
        self._readers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="disk-cache-reader")
        atexit.register(_flush_at_exit, weakref.ref(self))  # the writer is a daemon: finish its queue first

    # --------------------------------------------------------------------------------- identity
    def set_key(self, key: str | None, describe: dict | None = None) -> None:
        """Serve the directory of `key` from now on (new weights: a new key); None turns the tier off (weights
        with no stable name). Lists the files already there, oldest first."""
        with self._lock:
            self.key, self._index, self._unreadable = key, collections.OrderedDict(), set()
            self.dir = None if key is None else self.root / key
        if self.dir is None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if describe is not None:
                (self.dir / "layout.json").write_text(json.dumps(describe, indent=1, sort_keys=True, default=str))
        except OSError as e:
            raise ValueError(f"cache.disk_path: cannot write {self.dir}: {e}") from e
        found = self._rescan(self.dir)
        log.info("disk tier: %d pages in %s (capacity %d pages of %.2f MiB)", found, self.dir, self.capacity_pages,
                 self.page_bytes / 2**20)

    def _rescan(self, directory: Path) -> int:
        """Makes the index the files under `directory` now, least recently used (oldest mtime) first, and deletes
        the oldest past capacity. -> how many files there were."""
        found = []
        for sub in directory.iterdir():
            if sub.is_dir():
                for f in os.scandir(sub):
                    if not f.name.endswith(".kv"):
                        continue  # a write in progress (.tmp)
                    try:  # a file another process deletes meanwhile, or a name not ours, is skipped
                        found.append((f.stat().st_mtime_ns, int(f.name.removesuffix(".kv"), 16)))
                    except (OSError, ValueError):
                        continue
        found.sort()
        with self._lock:
            if directory != self.dir:
                return len(found)  # the key changed meanwhile
            self._index = collections.OrderedDict((h, None) for _, h in found)
            self._written_since_scan = 0
        self._evict_over_capacity()
        return len(found)

    def _path(self, block_hash: int) -> Path:
        name = f"{block_hash:016x}"
        return self.dir / name[:2] / f"{name}.kv"

    # ------------------------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._index)

    def present(self, hashes: Sequence[int]) -> int:
        """How many of `hashes`, in a row from the first, have a file (known, or written by another process)."""
        if self.dir is None:
            return 0
        n = 0
        for h in hashes:
            with self._lock:
                known, bad = h in self._index, h in self._unreadable
            if bad:
                break
            if not known:
                if not self._path(h).exists():
                    break
                with self._lock:
                    self._index[h] = None
            n += 1
        return n

    def writing(self, hashes: set[int]) -> bool:
        """Whether any of `hashes` is queued for the writer or being written."""
        with self._lock:
            return not self._writing.isdisjoint(hashes)

    def wanted(self, block_hash: int) -> bool:
        """Whether a page the tree stores should be written: the tier is on and has no file for it."""
        with self._lock:
            return self.dir is not None and block_hash not in self._index and block_hash not in self._writing

    # ------------------------------------------------------------------------------------ write
    def put(self, hashes: Sequence[int], pages: Payload, key: str | None) -> None:
        """Queues pages for the writer: `pages` holds each cache array's [L, Hkv, n, ...] (host memory; page i is
        `hashes[i]`), computed under layout `key` (dropped unless it is still the key served). Never blocks: past
        MAX_PENDING_WRITES queued pages, the rest are skipped."""
        with self._lock:
            if self.dir is None or key != self.key:
                return
            todo = [i for i, h in enumerate(hashes) if h not in self._index and h not in self._writing]
            room = MAX_PENDING_WRITES - len(self._writing)
            if len(todo) > room:
                self.stats["write_skipped"] += len(todo) - max(room, 0)
                todo = todo[: max(room, 0)]
            self._writing.update(hashes[i] for i in todo)
        if todo:
            self._writes.put((self.dir, [hashes[i] for i in todo], pages, todo))

    def flush(self) -> None:
        """Blocks until every queued page is written (tests, and a clean shutdown)."""
        self._writes.join()

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:  # close()
                self._writes.task_done()
                return
            directory, hashes, pages, index = item
            try:
                for h, i in zip(hashes, index):
                    self._write_one(directory, h, tuple(np.ascontiguousarray(a[:, :, i]) for a in pages))
            finally:
                self._writes.task_done()

    def _write_one(self, directory: Path, block_hash: int, payload: Payload) -> None:
        try:
            if directory == self.dir:  # a page of the weights still served
                name = f"{block_hash:016x}"
                path = directory / name[:2] / f"{name}.kv"
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
                try:
                    with open(tmp, "wb") as f:
                        f.write(_HEADER.pack(_MAGIC, block_hash, self.page_bytes))
                        for a in payload:
                            if a.size:  # (an array of no elements, LFM2's ssm state, has no bytes to write)
                                f.write(memoryview(a).cast("B"))
                    os.replace(tmp, path)
                except Exception:
                    tmp.unlink(missing_ok=True)  # a full disk (or anything else) keeps no half-written file
                    raise
                with self._lock:
                    if directory == self.dir:
                        self._index[block_hash] = None
                        self._unreadable.discard(block_hash)
                        self.stats["pages_written"] += 1
                        self._written_since_scan += 1
        except Exception as e:  # (not only OSError: whatever fails, the writer thread lives on for the next pages)
            self.stats["write_errors"] += 1
            if self.stats["write_errors"] in (1, 10) or self.stats["write_errors"] % 1000 == 0:  # not one per page
                log.warning("disk tier: could not write page %016x (%d write errors so far): %s", block_hash,
                            self.stats["write_errors"], e)
        finally:
            with self._lock:
                self._writing.discard(block_hash)
        if self._written_since_scan >= self.rescan_every and directory == self.dir:
            try:
                self._rescan(directory)
            except OSError as e:  # the directory went away: the next write says so
                log.warning("disk tier: could not list %s: %s", directory, e)
        self._evict_over_capacity()

    def _evict_over_capacity(self) -> None:
        while True:
            with self._lock:
                if len(self._index) <= self.capacity_pages:
                    return
                victim, _ = self._index.popitem(last=False)
                path = self._path(victim)
            try:
                path.unlink(missing_ok=True)
                self.stats["pages_deleted"] += 1
            except OSError as e:
                log.warning("disk tier: could not delete %s: %s", path, e)

    # ------------------------------------------------------------------------------------- read
    def fetch(self, hashes: Sequence[int]) -> concurrent.futures.Future:
        """Reads pages in the background. The future's result: {hash: payload} for the pages read in a row from the
        first (a missing or damaged file ends the run), each payload the cache arrays' page [L, Hkv, ps, ...]."""
        return self._readers.submit(self._read_run, self.dir, list(hashes))

    def _read_run(self, directory: Path | None, hashes: list[int]) -> dict[int, Payload]:
        out = {}
        for h in hashes:
            payload = None if directory != self.dir else self._read_one(h)
            if payload is None:
                break
            out[h] = payload
        return out

    def _read_one(self, block_hash: int) -> Payload | None:
        path = self._path(block_hash)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # recency survives a restart (the next start-up lists files by mtime)
        except OSError as e:  # gone (deleted by a process sharing the directory), or unreadable
            with self._lock:
                self._index.pop(block_hash, None)
                if not isinstance(e, FileNotFoundError):
                    self._unreadable.add(block_hash)
                    self.stats["read_errors"] += 1
            return None
        magic, stored_hash, size = _HEADER.unpack_from(data)
        if magic != _MAGIC or stored_hash != block_hash or size != self.page_bytes \
                or len(data) != _HEADER.size + self.page_bytes:
            log.warning("disk tier: %s is damaged or of another layout; deleting it", path)
            self.stats["read_errors"] += 1
            with self._lock:
                self._index.pop(block_hash, None)
            try:
                path.unlink(missing_ok=True)
            except OSError:
                with self._lock:
                    self._unreadable.add(block_hash)
            return None
        payload, offset = [], _HEADER.size
        for shape, dtype in self.specs:
            n = int(np.prod(shape)) * dtype.itemsize
            payload.append(np.frombuffer(data, dtype, offset=offset, count=n // dtype.itemsize).reshape(shape))
            offset += n
        with self._lock:
            if block_hash in self._index:
                self._index.move_to_end(block_hash)
            self.stats["pages_read"] += 1
        return tuple(payload)

    def close(self) -> None:
        """Writes what is queued, then stops the writer and the readers."""
        self._writes.put(None)
        self._writer.join()
        self._readers.shutdown(wait=True)


def _flush_at_exit(ref) -> None:
    disk = ref()
    if disk is not None and disk._writer.is_alive():
        with disk._lock:
            queued = len(disk._writing)
        if queued >= 64:  # seconds of writing: say why the process has not ended yet
            log.warning("disk tier: writing %d queued pages (%.0f MiB) to %s before exit", queued,
                        queued * disk.page_bytes / 2**20, disk.dir)
        disk.flush()


def arrays_digest(tree) -> str:
    """A digest of weights given as arrays (no file names them): every array's bytes, in tree order."""
    import jax

    h = hashlib.blake2b(digest_size=16)
    for a in jax.tree.leaves(tree):
        a = np.asarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def replica_layout(config, model_cfg, dtype, kv_dtype, backend: str, hybrid: bool, weights: dict | str,
                   draft: dict | None = None) -> dict:
    """Everything a replica's K/V bytes depend on besides the tokens (which the block hash covers): the weights, the
    model as served (after tensor-parallel preparation), the dtypes and quantization, the page size, the tensor
    parallelism (reductions in another order round differently), the attention backend and whether the cache is
    hybrid (windowed layers read their window from slots); and a draft model's (`draft`: its "config", "weights" and
    "quantization"), whose K/V the pages hold too."""
    m = config.model
    extra = {} if draft is None else {"draft": [repr(draft["config"]), draft["weights"], draft["quantization"]]}
    return {**extra, "weights": weights, "model": repr(model_cfg), "dtype": str(np.dtype(dtype)), "hybrid": hybrid,
            "kv_dtype": str(np.dtype(kv_dtype)), "quantization": [m.quantization, m.smoothquant_alpha,
                                                                 m.quantize_embeddings, m.quantization_group_size],
            "page_size": config.cache.page_size, "tensor": config.parallel.tensor, "attention": backend}

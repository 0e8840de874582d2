"""The persistent prompt cache: the KV of a prompt prefix saved to disk and restored after a restart.

An app with a long system prompt (or a shared document) recomputes it after every restart; with the
cache, the first run saves the prompt's KV and later runs -- in any process -- load it and prefill
only what follows it. ``edgeinfer.load(..., prompt_cache=True)`` turns it on (docs/prompt-cache.md).

What an entry is keyed by: the package's identity (sha256 of its manifest, which lists the sha256 of
every graph), the decoder kind, the execution provider, the onnxruntime version, the KV layout (layers,
heads, head size and dtype of every cache), this file format's version, and the exact token ids of
the prefix. A new prompt restores the longest prefix it shares with any entry of the same key: the
KV of positions ``[0, k)`` depends only on tokens ``[0, k)``, so any entry that starts like the
prompt serves, whatever came after.

Where: ``$EDGEINFER_HOME/prompts`` (default ``~/.cache/edgeinfer/prompts``), beside the package
cache. One file per entry, named ``KEYHASH-TOKENSHASH.kv`` (edgeinfer/prompt_cache/entry.py)::

    magic (8 bytes) | version u32 | JSON length u32 | token count u32 | CRC-32 of JSON + tokens u32
    | JSON (the key, the payload's length and CRC-32) | token ids (int32) | payload

The payload holds positions ``[0, n)`` only, cache by cache, layer by layer, keys then values.
Files are written to a temporary file in the same folder and renamed into place (never a partial
entry), and the folder is bounded in bytes (default 1 GiB) by evicting the least recently used
entries (file mtimes, touched on every hit). A file that is truncated, corrupt or foreign (another
package, dtype, provider or version under our key's name) is ignored with a warning and removed:
the prompt is then computed as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgeinfer.decoders.base import PREFILL_TAIL
from edgeinfer.errors import EdgeInferError
from edgeinfer.package import MANIFEST
from edgeinfer.package_cache import cache_root

from .entry import VERSION, BadEntry, EntryHeader, entry_head, key_difference, read_header, read_payload

log = logging.getLogger("edgeinfer.prompt_cache")

SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MIN_TOKENS = 256
STALE_TMP_S = 3600  # a temporary file this old was left by a killed process


class PromptCacheError(EdgeInferError):
    """A prompt-cache option that cannot be honoured (a bad bound, an unusable folder)."""


def prompts_dir() -> Path:
    """``$EDGEINFER_HOME/prompts`` or ``~/.cache/edgeinfer/prompts``."""
    return cache_root() / "prompts"


def parse_bytes(value) -> int:
    """A byte bound: an int, or text such as ``512MB`` / ``1GiB``."""
    if isinstance(value, bool):
        raise PromptCacheError(f"the prompt cache's bound must be a number of bytes, not {value!r}.")
    if isinstance(value, int):
        n = value
    else:
        from edgeinfer.memory import parse_memory_budget

        try:
            n = parse_memory_budget(value)
        except EdgeInferError:
            raise PromptCacheError(f"the prompt cache's bound {value!r} is not a size (e.g. 512MB, 1GiB).") from None
    if n is None or n <= 0:
        raise PromptCacheError(f"the prompt cache's bound must be a positive number of bytes (got {value!r}).")
    return int(n)


@dataclass
class Entry:
    """One file of the cache, as ``edgeinfer cache list`` shows it."""

    path: Path
    model: str
    tokens: int
    size_bytes: int
    last_used: float  # the file's mtime: touched on every hit
    problem: str = ""  # why the file is unusable ("" when it reads fine)


class PromptCache:
    """A folder of saved prompt prefixes. Pass one to ``edgeinfer.load(..., prompt_cache=...)``;
    several models may share it (their entries are keyed apart).

    max_bytes: the folder's bound (int or "512MB"); least recently used entries go first.
    min_tokens: prompts shorter than this are neither saved nor restored, and a prompt is saved only
    when it adds at least this many tokens to what the cache already holds of it.
    background: write entries on a thread (the prompt's KV is copied first) instead of before the
    generation returns.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_bytes: int | str = DEFAULT_MAX_BYTES,
                 min_tokens: int = DEFAULT_MIN_TOKENS, background: bool = True):
        self.root = Path(path).expanduser() if path is not None else prompts_dir()
        if self.root.exists() and not self.root.is_dir():
            raise PromptCacheError(f"the prompt cache folder '{self.root}' is a file: give a folder.")
        self.max_bytes = parse_bytes(max_bytes)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise PromptCacheError(f"min_tokens must be a positive integer (got {min_tokens!r}).")
        self.min_tokens = min_tokens
        self.background = bool(background)
        self._writers: list[threading.Thread] = []
        self._headers: dict[str, tuple[tuple, EntryHeader]] = {}  # file name -> ((size, inode), header)
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "saved": 0, "restored_tokens": 0, "bad_files": 0, "evicted": 0}

    # -- the folder ----------------------------------------------------------------------------------
    def files(self, prefix: str = "") -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"{prefix}*{SUFFIX}") if not p.name.startswith(TMP_PREFIX))

    def entries(self) -> list[Entry]:
        """Every entry, most recently used first (unreadable ones with their problem)."""
        out = []
        for p in self.files():
            try:
                st = p.stat()
                with open(p, "rb") as f:
                    h = read_header(f, st.st_size)
                out.append(Entry(p, h.model, len(h.tokens), st.st_size, st.st_mtime))
            except BadEntry as e:
                out.append(Entry(p, "?", 0, st.st_size, st.st_mtime, str(e)))
            except OSError:
                continue
        return sorted(out, key=lambda e: -e.last_used)

    def total_bytes(self) -> int:
        total = 0
        for p in self.files():
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and leftover temporary files); returns (files, bytes) removed."""
        self.wait()
        n = size = 0
        if not self.root.is_dir():
            return 0, 0
        for p in list(self.root.glob(f"*{SUFFIX}")) + list(self.root.glob(f"{TMP_PREFIX}*")):
            try:
                s = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            n, size = n + 1, size + s
        self._headers.clear()
        return n, size

    def wait(self) -> None:
        """Wait for the entries being written in the background."""
        with self._lock:
            writers, self._writers = self._writers, []
        for t in writers:
            t.join()

    # -- a model's view --------------------------------------------------------------------------------
    def bind(self, model) -> BoundPromptCache | None:
        """The cache as MODEL uses it, or None (with one warning) where its decoder's KV cannot be saved."""
        decoder = model.decoder
        caches = decoder.kv_caches()
        if caches is None:
            skip_unsupported(model.name, f"its decoder ({type(decoder).__name__}, provider {model.target.name})")
            return None
        import onnxruntime as ort

        manifest = model.package.root / MANIFEST
        key = {
            "format": VERSION,
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "decoder": type(decoder).__name__,
            "provider": model.target.name,
            "onnxruntime": ort.__version__,
            "kv": [[c.layers.start, c.layers.stop, c.kv_heads, c.head_dim, np.dtype(c.dtype).str] for c in caches],
        }
        return BoundPromptCache(self, key, caches, decoder, model.name)

    # -- files -----------------------------------------------------------------------------------------
    def header(self, path: Path) -> EntryHeader:
        """The header of PATH (memoized by size and inode); raises BadEntry or OSError."""
        st = path.stat()
        stamp = (st.st_size, st.st_ino, st.st_ctime_ns)
        hit = self._headers.get(path.name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with open(path, "rb") as f:
            h = read_header(f, st.st_size)
        self._headers[path.name] = (stamp, h)
        return h

    def discard(self, path: Path, reason: str) -> None:
        """Warn about an unusable file and remove it."""
        self.stats["bad_files"] += 1
        log.warning("edgeinfer: warning: ignoring the prompt cache file '%s': %s; it is removed and the prompt "
                    "computed from scratch.", path.name, reason)
        self._headers.pop(path.name, None)
        try:
            path.unlink()
        except OSError:
            pass

    def write(self, name: str, meta: dict, tokens: np.ndarray, payload: np.ndarray) -> Path | None:
        """Write one entry atomically (temporary file + rename), then evict down to the bound."""
        head = entry_head(meta, tokens, payload)
        if len(head) + payload.nbytes > self.max_bytes:
            log.warning("edgeinfer: warning: a prompt of %d tokens needs %.1f MB of KV, more than the prompt "
                        "cache's bound of %.1f MB: it is not saved.", len(tokens), payload.nbytes / 1e6,
                        self.max_bytes / 1e6)
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.write(memoryview(payload))
                f.flush()
                os.fsync(f.fileno())
            final = self.root / name
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.stats["saved"] += 1
        self.evict(keep=final)
        return final

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the folder fits the bound; returns how many went."""
        rows = []
        now = time.time()
        for p in self.root.glob("*"):
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.startswith(TMP_PREFIX):
                if now - st.st_mtime > STALE_TMP_S:  # left by a killed writer
                    try:
                        p.unlink()
                    except OSError:
                        pass
                continue
            if p.suffix == SUFFIX:
                rows.append((st.st_mtime, p, st.st_size))
        total = sum(r[2] for r in rows)
        removed = 0
        for _, p, size in sorted(rows, key=lambda r: (r[0], r[1].name)):
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            try:
                p.unlink()
            except OSError:
                continue
            self._headers.pop(p.name, None)
            total -= size
            removed += 1
        self.stats["evicted"] += removed
        return removed

    def submit(self, job) -> None:
        """Run JOB (a write) now or on a writer thread."""
        if not self.background:
            job()
            return
        t = threading.Thread(target=job, name="edgeinfer-prompt-cache", daemon=False)
        with self._lock:
            self._writers = [w for w in self._writers if w.is_alive()] + [t]
        t.start()


def as_prompt_cache(value) -> PromptCache | None:
    """What ``load(prompt_cache=...)`` takes: None/False (off), True (the default folder), a folder, a PromptCache."""
    if value is None or value is False:
        return None
    if value is True:
        return PromptCache()
    if isinstance(value, PromptCache):
        return value
    if isinstance(value, (str, os.PathLike)):
        return PromptCache(value)
    raise PromptCacheError(f"prompt_cache must be True, False, a folder or a PromptCache (got {type(value).__name__}).")


def skip_unsupported(model_name: str, what: str) -> None:
    """The one warning of a model that runs without the prompt cache."""
    log.warning("edgeinfer: warning: the prompt cache is off for '%s': %s keeps no KV cache in host memory that "
                "can be saved and restored.", model_name, what)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class DecoderKV:
    """Where the prompt cache reads and writes a prefix's KV: the one-sequence decoder's caches. (A
    batched model's slot is another such target: edgeinfer/batching/slots.py's SlotKV.)"""

    def __init__(self, decoder, caches: list):
        self.decoder, self.caches = decoder, caches
        self.capacity = decoder.capacity

    def arrays(self, cache) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """CACHE's (one of the decoder's kv_caches) layer -> (keys, values), each (1, kv heads, capacity, head dim)."""
        return cache.host_arrays()

    def length(self) -> int:
        """Positions the caches hold."""
        return min(c.length for c in self.caches)

    def loaded(self, ids: list[int], k: int) -> None:
        """Positions [0, K) now hold the KV of IDS[:K]."""
        self.decoder.reset()
        for c in self.caches:
            c.length = k


class BoundPromptCache:
    """A PromptCache as one model uses it: the model's key and the layout of its decoder's KV caches.
    restore and save act on the decoder's caches, or on another KV target of the same layout (a slot)."""

    def __init__(self, cache: PromptCache, key: dict, caches: list, decoder, model_name: str):
        self.cache = cache
        self.key = key
        self.caches = caches
        self.kv = DecoderKV(decoder, caches)
        self.model_name = model_name
        self.prefix = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.token_bytes = sum(2 * c.kv_heads * c.head_dim * np.dtype(c.dtype).itemsize * len(c.layers)
                               for c in caches)
        self._covered: tuple[list[int], int, list[Path]] | None = None  # the last lookup: ids, match, prefixes
        self.last = {"restored_tokens": 0, "saved_tokens": 0}  # the last generation's, for its stats

    def _candidates(self, ids: np.ndarray) -> list[tuple[int, Path, EntryHeader]]:
        out = []
        for p in self.cache.files(self.prefix + "-"):
            try:
                h = self.cache.header(p)
            except BadEntry as e:
                self.cache.discard(p, str(e))
                continue
            except OSError:
                continue  # evicted meanwhile
            if h.key != self.key:
                self.cache.discard(p, key_difference(h.key, self.key))
                continue
            if h.payload_bytes != len(h.tokens) * self.token_bytes:
                self.cache.discard(p, "its payload does not have the size its key implies (corrupt)")
                continue
            out.append((_common_prefix(h.tokens, ids), p, h))
        return sorted(out, key=lambda r: (-r[0], r[1].name))

    def restore(self, ids: list[int], reuse: int, kv=None) -> int:
        """Before a prefill: load the longest cached prefix of IDS that beats the REUSE tokens already in the
        decoder's cache, or KV's (at most all but the last two tokens). Returns the number of prompt tokens
        that cache now holds."""
        self._covered = None
        self.last = {"restored_tokens": 0, "saved_tokens": 0}
        if len(ids) < self.cache.min_tokens:
            return reuse
        arr = np.asarray(ids, dtype=np.int64)
        candidates = self._candidates(arr)
        unusable: set[Path] = set()
        try:
            return self._restore(ids, reuse, candidates, unusable, kv or self.kv)
        finally:  # what save() needs: how much of IDS the usable entries hold, and which are prefixes of it
            usable = [(common, p, h) for common, p, h in candidates if p not in unusable]
            self._covered = (list(ids), usable[0][0] if usable else 0,
                             [p for common, p, h in usable if common == len(h.tokens)])

    def _restore(self, ids: list[int], reuse: int, candidates: list, unusable: set, kv) -> int:
        limit = min(len(ids), kv.capacity) - PREFILL_TAIL  # reproduces a cold prompt's output
        for common, path, h in candidates:
            k = min(common, limit)
            if k <= reuse or k < self.cache.min_tokens:
                break
            try:
                payload = read_payload(path, h)
            except BadEntry as e:
                self.cache.discard(path, str(e))
                unusable.add(path)
                continue
            except OSError:
                unusable.add(path)
                continue
            kv.loaded(ids, 0)  # holds nothing while it is overwritten (a failure midway leaves it empty, not wrong)
            self._load(payload, len(h.tokens), k, kv)
            kv.loaded(ids, k)
            try:
                os.utime(path)  # least recently used: this one was just used
            except OSError:
                pass
            self.cache.stats["hits"] += 1
            self.cache.stats["restored_tokens"] += k
            self.last["restored_tokens"] = k
            return k
        self.cache.stats["misses"] += 1
        return reuse

    def _load(self, payload: np.ndarray, n: int, k: int, kv) -> None:
        """Write positions [0, K) of a payload of N positions into KV's caches."""
        offset = 0
        for c in self.caches:
            arrays = kv.arrays(c)
            dtype = np.dtype(c.dtype)
            count = c.kv_heads * n * c.head_dim
            for i in c.layers:
                for target in arrays[i]:
                    block = payload[offset: offset + count * dtype.itemsize].view(dtype)
                    target[0, :, :k, :] = block.reshape(c.kv_heads, n, c.head_dim)[:, :k, :]
                    offset += count * dtype.itemsize

    def save(self, ids: list[int], kv=None) -> None:
        """After a prefill (or a generation): save the prompt's KV, from the decoder's caches or KV's, if it
        adds at least min_tokens to what the cache holds."""
        kv = kv or self.kv
        covered = self._covered if self._covered is not None and self._covered[0] == list(ids) else None
        self._covered = None
        n = min(len(ids), kv.length())
        if covered is None or n - covered[1] < self.cache.min_tokens:
            return  # too short to be looked up, or the cache already holds all but a few of its tokens
        payload = np.empty(n * self.token_bytes, np.uint8)
        offset = 0
        for c in self.caches:
            dtype = np.dtype(c.dtype)
            size = c.kv_heads * n * c.head_dim * dtype.itemsize
            for i in c.layers:
                for source in kv.arrays(c)[i]:  # one copy, straight into the payload
                    payload[offset: offset + size].view(dtype).reshape(c.kv_heads, n, c.head_dim)[...] = \
                        source[0, :, :n, :]
                    offset += size
        tokens = np.asarray(ids[:n], dtype="<i4")
        name = f"{self.prefix}-{hashlib.sha256(tokens.tobytes()).hexdigest()[:24]}{SUFFIX}"
        meta = {"key": self.key, "model": self.model_name, "created": datetime.now(timezone.utc).isoformat()}
        superseded = [p for p in covered[2] if p.name != name]  # entries that are prefixes of this one

        def job():
            try:
                if self.cache.write(name, meta, tokens, payload) is not None:
                    for p in superseded:
                        try:
                            p.unlink()
                        except OSError:
                            pass
            except OSError as e:
                log.warning("edgeinfer: warning: the prompt cache could not save an entry in '%s' (%s).",
                            self.cache.root, e)

        self.last["saved_tokens"] = n
        self.cache.submit(job)

    def report(self) -> dict:
        """The last generation's use of the cache: tokens restored from disk, tokens saved (0: none)."""
        return dict(self.last)

"""The expert cache: loaded experts by (layer, expert), within a byte budget.

How a read record becomes runnable depends on the store's format:

- int4/int8 block-quantized (or fp32) records: a small onnxruntime session of the
  package's ``expert_ffn`` graph whose weights are that record (handed over as
  external initializers, so nothing is copied into a model proto). onnxruntime
  prepacks the weights when it creates the session, which is what the cache holds.
  Measured on the benchmark's 1.5 MB int4 experts (docs/moe.md, ``apps/bench/moe.py
  ffn-options``): fast calls, about 100x faster than MatMulNBits fed the same weights
  as graph inputs (it unpacks them on every call); its price is the build, 3-6 ms of
  CPU per load, and memory for the record plus its prepacked copy.
- ``int8-channel`` records (exported with ``expert_bits=8``, flagged
  ``weights_as_inputs`` in the index): no session per expert. One shared session of
  ``expert_ffn`` takes the weights as inputs (DynamicQuantizeMatMul); "building" an
  expert only wraps its record's arrays in OrtValues (no copy), and the cache holds
  the record alone. A call costs about twice a prepacked int4 call (the int8 GEMM
  packs its operand each time), a load only its read.

The budget counts a cached expert as ``store.resident_records`` store records
(budget.py). Layers are visited in a fixed cycle, which makes plain LRU evict
exactly the layer about to run; instead each layer gets an equal share of the
budget and the victim is the least recently used expert of the layer furthest
above its share. Experts in use (the current layer's) and those being prefetched
(prefetch.py reads them ahead through ``prefetch_one``) are pinned.

Correctness never depends on prediction: an expert that is neither cached nor
in flight is read synchronously.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import onnxruntime as ort

from ..errors import PackageError
from .budget import cache_budget
from .store import ExpertStore

_TRIM_EVERY = 64 << 20


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


@dataclass
class CacheStats:
    hits: int = 0  # needed and already cached
    late_prefetches: int = 0  # needed while its prefetch was still reading: waited for it
    misses: int = 0  # needed, neither cached nor in flight: read synchronously
    prefetched: int = 0  # experts the background reader loaded
    prefetch_used: int = 0  # ... of which were used before being evicted
    bytes_read: int = 0
    read_s: float = 0.0  # time spent reading expert records (both threads)
    build_s: float = 0.0  # time spent turning records into sessions (onnxruntime prepacks the weights)
    wait_s: float = 0.0  # time the decode thread stood still for experts
    predicted: int = 0  # experts predicted for the next layer
    predicted_right: int = 0  # ... that the router then chose
    tokens: int = 0

    def as_dict(self) -> dict:
        needed = self.hits + self.late_prefetches + self.misses
        d = dict(self.__dict__)
        d.update(needed=needed, hit_rate=round(self.hits / needed, 4) if needed else None,
                 prefetch_accuracy=round(self.predicted_right / self.predicted, 4) if self.predicted else None,
                 bytes_read_per_token=round(self.bytes_read / self.tokens) if self.tokens else None,
                 read_s=round(self.read_s, 4), build_s=round(self.build_s, 4), wait_s=round(self.wait_s, 4))
        return d

    def minus(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{k: getattr(self, k) - getattr(other, k) for k in self.__dict__})


@dataclass(eq=False)  # identity: it holds a session and arrays
class CachedExpert:
    """A loaded expert: its session (or, read ahead but not built yet, its record's arrays), and a
    binding the decoder may attach for one-token runs. With weights as graph inputs the session is
    the shared one, ``tensors`` stay (the prompt path feeds them) and ``weights`` are OrtValues over
    them (the one-token binding binds them)."""

    session: ort.InferenceSession | None
    prefetched: bool = False
    used: bool = False
    binding: ort.IOBinding | None = None
    tensors: dict | None = None
    weights: dict | None = None

    def feeds(self) -> dict:
        """The weight inputs ``session.run`` needs besides the expert input (none for a prepacked session)."""
        return self.tensors if self.weights is not None else {}


@dataclass
class _InFlight:
    done: threading.Event = field(default_factory=threading.Event)
    entry: CachedExpert | None = None
    error: BaseException | None = None


class ExpertCache:
    """Expert sessions by (layer, expert), within ``budget`` bytes of store records."""

    def __init__(self, store: ExpertStore, ffn_graph: bytes, session_options, budget: int | None,
                 sparse_layers: list[int], top_k: int):
        self.store = store
        self.ffn_graph = ffn_graph
        self.session_options = session_options
        # Weights as graph inputs: one session for every expert, made once.
        self.shared_session = self._session(ffn_graph, session_options()) if store.weights_as_inputs else None
        self.record = store.record_size
        self.layers: dict[int, OrderedDict] = {i: OrderedDict() for i in sparse_layers}
        self.count = 0
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.expert_bytes = store.resident_records * self.record  # what a cached expert costs in memory
        self.budget = cache_budget(budget, self.expert_bytes, len(store.records), top_k)
        self.capacity = self.budget // self.expert_bytes  # experts that fit
        self.quota = self.capacity / max(1, len(sparse_layers))
        self.pinned: Counter = Counter()
        self.inflight: dict[tuple[int, int], _InFlight] = {}
        self._freed = 0  # bytes evicted since memory was last handed back
        # Whether the background reader also builds sessions. On a machine whose cores are all busy
        # computing, building in the reader only moves CPU work around (and wastes it on wrong
        # guesses); reading ahead alone hides the disk and never competes for a core.
        self.build_ahead = False

    @property
    def resident_bytes(self) -> int:
        return self.count * self.expert_bytes

    # -- loading ---------------------------------------------------------------
    def load(self, layer: int, expert: int, build: bool = True) -> CachedExpert:
        """Read one record and (if BUILD) build its session (no cache bookkeeping)."""
        t0 = time.perf_counter()
        tensors = self.store.read(layer, expert)
        with self.lock:
            self.stats.bytes_read += self.record
            self.stats.read_s += time.perf_counter() - t0
        entry = CachedExpert(None, tensors=tensors)
        if build:
            self.build(entry, layer, expert)
        return entry

    def build(self, entry: CachedExpert, layer: int, expert: int) -> None:
        """Make a read record runnable: its own session (onnxruntime prepacks the weights: CPU work),
        or, when the weights are graph inputs, OrtValues over its arrays for the shared session."""
        if entry.session is not None:
            return
        t1 = time.perf_counter()
        if self.shared_session is not None:
            entry.weights = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in entry.tensors.items()}
            entry.session = self.shared_session
        else:
            tensors, entry.tensors = entry.tensors, None
            names = list(tensors)
            values = [ort.OrtValue.ortvalue_from_numpy(tensors[n]) for n in names]
            so = self.session_options()
            so.add_external_initializers(names, values)
            entry.session = self._session(self.ffn_graph, so, f"expert {expert} of layer {layer}")
        with self.lock:
            self.stats.build_s += time.perf_counter() - t1

    @staticmethod
    def _session(graph: bytes, so: ort.SessionOptions, what: str = "the expert graph") -> ort.InferenceSession:
        try:
            return ort.InferenceSession(graph, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:200]
            raise PackageError(f"{what} could not be loaded ({msg}): the package is corrupt, re-export it.") from None

    # -- bookkeeping (callers hold self.lock) ------------------------------------
    def _lookup(self, key: tuple[int, int]) -> CachedExpert | None:
        entries = self.layers[key[0]]
        entry = entries.get(key[1])
        if entry is not None:
            entries.move_to_end(key[1])
        return entry

    def _make_room(self) -> bool:
        """Evict until one more expert fits; False if only pinned experts are left."""
        while self.count + 1 > self.capacity:
            best, best_over = None, None
            for layer, entries in self.layers.items():
                over = len(entries) - self.quota
                if best_over is not None and over <= best_over:
                    continue
                victim = next((e for e in entries if (layer, e) not in self.pinned), None)
                if victim is not None:
                    best, best_over = (layer, victim), over
            if best is None:
                return False
            self.layers[best[0]].pop(best[1])
            self.count -= 1
            self._freed += self.expert_bytes
        return True

    def return_freed_memory(self) -> None:
        """Give evicted experts' memory back to the system now and then: freed by one thread and
        reused by another, it otherwise stays in the allocator's per-thread arenas (resident)."""
        if self._freed >= _TRIM_EVERY and _malloc_trim is not None:
            self._freed = 0
            _malloc_trim(0)

    def _insert(self, key: tuple[int, int], entry: CachedExpert) -> bool:
        if key[1] in self.layers[key[0]]:
            return True
        if not self._make_room():
            return False
        self.layers[key[0]][key[1]] = entry
        self.count += 1
        return True

    # -- decode thread -----------------------------------------------------------
    def acquire(self, layer: int, experts: list[int]) -> list[CachedExpert]:
        """EXPERTS of LAYER, loading what is missing; they stay pinned until ``release``."""
        waits, misses, found = [], [], {}
        with self.lock:
            for e in experts:
                key = (layer, e)
                self.pinned[key] += 1
                entry = self._lookup(key)
                if entry is not None:
                    self.stats.hits += 1
                    self._mark_used(entry)
                    found[e] = entry
                elif key in self.inflight:
                    waits.append((e, self.inflight[key]))
                else:
                    misses.append(e)
                    self.inflight[key] = _InFlight()
        t0 = time.perf_counter()
        for e in misses:
            key = (layer, e)
            try:
                entry = self.load(layer, e)
            except BaseException as err:
                with self.lock:
                    flight = self.inflight.pop(key)
                flight.error = err
                flight.done.set()
                self.release(layer, experts)
                raise
            with self.lock:
                self.stats.misses += 1
                self._insert(key, entry)  # may not fit beside pinned ones: then used once, uncached
                flight = self.inflight.pop(key)
            flight.entry = entry
            flight.done.set()
            found[e] = entry
        for e, flight in waits:
            flight.done.wait()
            if flight.error is not None or flight.entry is None:  # the reader failed or dropped it: read here
                entry = self.load(layer, e)
                with self.lock:
                    self.stats.misses += 1
                    self._insert((layer, e), entry)
            else:
                entry = flight.entry
                with self.lock:
                    self.stats.late_prefetches += 1
                    self._mark_used(entry)
            found[e] = entry
        for e in experts:  # read ahead, not built yet: the build is this thread's
            self.build(found[e], layer, e)
        with self.lock:
            self.stats.wait_s += time.perf_counter() - t0
        if misses:
            self.return_freed_memory()
        return [found[e] for e in experts]

    def _mark_used(self, entry: CachedExpert) -> None:
        if entry.prefetched and not entry.used:
            self.stats.prefetch_used += 1
        entry.used = True

    def release(self, layer: int, experts: list[int]) -> None:
        with self.lock:
            for e in experts:
                key = (layer, e)
                self.pinned[key] -= 1
                if self.pinned[key] <= 0:
                    del self.pinned[key]

    # -- reader thread -------------------------------------------------------------
    def prefetch_one(self, layer: int, expert: int) -> None:
        key = (layer, expert)
        with self.lock:
            if expert in self.layers[layer] or key in self.inflight:
                return
            # Room must come from experts nobody is using; otherwise skip (the decode thread will read it).
            if self.count + 1 > self.capacity and not self._make_room():
                return
            flight = self.inflight[key] = _InFlight()
            self.pinned[key] += 1
        try:
            entry = self.load(layer, expert, build=self.build_ahead)
            entry.prefetched = True
        except BaseException as err:  # the decode thread reads it again and reports the error
            flight.error = err
            entry = None
        with self.lock:
            self.pinned[key] -= 1
            if self.pinned[key] <= 0:
                del self.pinned[key]
            if entry is not None and self._insert(key, entry):
                self.stats.prefetched += 1
            self.inflight.pop(key, None)
        flight.entry = entry
        flight.done.set()

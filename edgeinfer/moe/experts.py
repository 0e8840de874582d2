"""Loaded experts: how read records become runnable, on the package's execution target.

- ``SessionExperts`` (the package-precision formats): a small onnxruntime session of the
  ``expert_ffn`` graph per loaded expert, the record handed over as external initializers;
  onnxruntime prepacks them when the session is made (fast calls, ~2 ms of CPU per load).
- ``SharedGraphExperts`` (``int8-channel``, ``int4-channel``): one session of ``expert_ffn`` for
  every expert, its weights bound as inputs. Cached experts live in the slots of one arena
  allocated for the budget (page-aligned, committed as it fills, never freed and reallocated):
  an int8-channel record is read straight into its slot, an int4-channel one into a scratch
  buffer and widened into its slot (formats.py). A slot's arrays and OrtValues are made once and
  serve every expert it ever holds (the decoder binds them once per slot too): loading costs no
  session, no allocation and no bindings.

Sessions get their provider and options from the package's execution target, like the dense
decoder's graphs (runtimes/): the expert graphs are small and already fused, so they skip graph
optimization.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import threading
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgeinfer.runtimes import PROVIDERS, ExecutionTarget

from ..errors import PackageError
from .budget import expert_memory
from .formats import CHANNEL_INT8, slot_filler, slot_layout, tensor_views
from .store import ExpertStore
from .widener import shared_region


@dataclass(eq=False)  # identity: it holds a session and arrays
class CachedExpert:
    """A loaded expert: its session (the shared one when weights are inputs), the weights as OrtValues
    (bound per call) and as arrays (fed by the prompt path), its arena slot (None: a session per expert,
    or loaded once past the budget), and a binding the decoder may attach for one-token runs."""

    session: ort.InferenceSession | None
    tensors: dict | None = None
    weights: dict | None = None
    slot: int | None = None
    prefetched: bool = False
    used: bool = False
    binding: ort.IOBinding | None = None

    def feeds(self) -> dict:
        """The weight inputs ``session.run`` needs besides the expert input (none for a prepacked session)."""
        return self.tensors if self.weights is not None else {}


def expert_session(graph: bytes, target: ExecutionTarget, prepare=None, what: str = "the expert graph"):
    """A session of an expert graph (bytes) on TARGET; PREPARE(session_options) adds to its options."""
    provider = PROVIDERS[target.name]
    so = provider.session_options(target.threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fused at export already
    if prepare is not None:
        prepare(so)
    try:
        if target.devices:
            so.add_provider_for_devices(list(target.devices), provider.provider_options())
            return ort.InferenceSession(graph, sess_options=so)
        providers = [(target.ort_name, target.options)] + provider.companions()
        if target.name != "cpu":
            providers.append(("CPUExecutionProvider", {}))
        return ort.InferenceSession(graph, sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PackageError(f"{what} could not be loaded on the {target.name} provider ({msg}): the package is "
                           "corrupt or was built for another runtime.") from None


class _Timer:
    """Read and build seconds, added up over the threads that load experts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.read_s = self.build_s = 0.0

    def add(self, read: float, build: float) -> None:
        with self.lock:
            self.read_s += read
            self.build_s += build


class SessionExperts:
    """A prepacked session per loaded expert (int4/int8 block-quantized and fp32 records)."""

    shared_session = None

    def __init__(self, store: ExpertStore, graph: bytes, target: ExecutionTarget):
        self.store, self.graph, self.target = store, graph, target
        self.expert_bytes = expert_memory(store.index)
        self.timer = _Timer()

    def allocate(self, slots: int) -> None:
        pass  # sessions own their memory

    def load(self, keys: list[tuple[int, int]], slots: list[int | None]) -> list[CachedExpert]:
        """Read KEYS' records and make them runnable (reader threads, or reads on the decode thread)."""
        t0 = time.perf_counter()
        size = self.store.record_size
        scratch = self.store.scratch(len(keys))
        bufs = [memoryview(scratch)[i * size:(i + 1) * size] for i in range(len(keys))]
        self.store.read_into(keys, bufs)
        self.timer.add(time.perf_counter() - t0, 0.0)
        return self.fill(keys, bufs, slots)

    def fill(self, keys: list[tuple[int, int]], records: list, slots: list[int | None],
             tensors: list | None = None) -> list[CachedExpert]:
        """Make read RECORDS (buffers) runnable: a session each (over a copy: TENSORS, views of the buffers, are
        not needed)."""
        t1 = time.perf_counter()
        # A copy into allocator memory: the session keeps referring to it.
        records = [self.store.views(np.frombuffer(b, np.uint8).copy()) for b in records]
        out = []
        for (layer, e), tensors in zip(keys, records):
            names = list(tensors)
            values = [ort.OrtValue.ortvalue_from_numpy(tensors[n]) for n in names]

            def prepare(so, names=names, values=values):
                so.add_external_initializers(names, values)

            out.append(CachedExpert(expert_session(self.graph, self.target, prepare, f"expert {e} of layer {layer}")))
        self.timer.add(0.0, time.perf_counter() - t1)
        return out


class SharedGraphExperts:
    """One shared session; cached experts' weights in the slots of one preallocated arena."""

    def __init__(self, store: ExpertStore, graph: bytes, target: ExecutionTarget):
        self.store = store
        self.shared_session = expert_session(graph, target)
        self.expert_bytes = expert_memory(store.index)  # the slot stride
        self.layout = slot_layout(store.index)
        self._fill = slot_filler(store.index)
        # int8-channel records are laid out as the slots are: read them in place.
        same = [t[:2] for t in store.layout] == [t[:2] for t in self.layout]  # names and offsets
        self.in_place = store.precision == CHANNEL_INT8 and same
        self.arena: mmap.mmap | None = None
        self.share_arena = False  # set before ``allocate``: the arena in memory a widener process maps too
        self.arena_fd: int | None = None
        self._slot_tensors: dict[int, tuple[dict, dict]] = {}  # slot -> (arrays, OrtValues), made once
        self.timer = _Timer()
        names = {i.name for i in self.shared_session.get_inputs()}
        missing = [n for n, *_ in self.layout if n not in names]
        if missing:
            raise PackageError(f"the expert store's tensor '{missing[0]}' is not an input of the expert graph: the "
                               "store's layout does not match the package, re-export it.")

    def allocate(self, slots: int) -> None:
        """Reserve the arena for SLOTS cached experts (anonymous memory: committed as slots are filled; shared
        with the widener process, through ``arena_fd``, when ``share_arena`` was set before)."""
        size = max(1, slots) * self.expert_bytes
        if self.share_arena:
            self.arena_fd, self.arena = shared_region("edgeinfer-experts", size)
        else:
            self.arena = mmap.mmap(-1, size)

    def entry(self, slot: int | None, target=None) -> CachedExpert:
        """The expert whose weights were just written into SLOT (None: into TARGET, a buffer outside the arena)."""
        arrays, weights = self._tensors(slot, target)
        return CachedExpert(self.shared_session, tensors=arrays, weights=weights, slot=slot)

    def _slot_buffer(self, slot: int | None):
        if slot is None:  # past the budget: loaded once, not cached
            return memoryview(mmap.mmap(-1, self.expert_bytes))
        return memoryview(self.arena)[slot * self.expert_bytes:(slot + 1) * self.expert_bytes]

    def _tensors(self, slot: int | None, buf=None) -> tuple[dict, dict]:
        """(arrays, OrtValues) of the graph inputs in BUF (None: the slot's), the buffer of SLOT: made once per
        slot (the arena never moves), fresh for a buffer outside the arena."""
        got = self._slot_tensors.get(slot) if slot is not None else None
        if got is None:
            arrays = tensor_views(buf if buf is not None else self._slot_buffer(slot), self.layout)
            got = (arrays, {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
            if slot is not None:
                self._slot_tensors[slot] = got
        return got

    def load(self, keys: list[tuple[int, int]], slots: list[int | None]) -> list[CachedExpert]:
        """Read KEYS' records into their slots and make them runnable (reader threads, or reads on the
        decode thread)."""
        t0 = time.perf_counter()
        targets = [self._slot_buffer(s) for s in slots]
        size = self.store.record_size
        if self.in_place:
            self.store.read_into(keys, [b[:size] for b in targets])
            self.timer.add(time.perf_counter() - t0, 0.0)
            return self._entries(slots, targets, time.perf_counter())
        scratch = self.store.scratch(len(keys))
        bufs = [memoryview(scratch)[i * size:(i + 1) * size] for i in range(len(keys))]
        self.store.read_into(keys, bufs)
        self.timer.add(time.perf_counter() - t0, 0.0)
        return self.fill(keys, bufs, slots, targets)

    def fill(self, keys: list[tuple[int, int]], records: list, slots: list[int | None],
             targets: list | None = None, tensors: list | None = None) -> list[CachedExpert]:
        """Make read RECORDS (buffers; TENSORS: their views, when the caller keeps them) runnable in SLOTS: widen
        (int4-channel) or copy into the slot."""
        t1 = time.perf_counter()
        targets = targets or [self._slot_buffer(None) if s is None else None for s in slots]  # (past the budget)
        tensors = tensors or [self.store.views(buf) for buf in records]
        for record, slot, target in zip(tensors, slots, targets):
            self._fill(record, self._tensors(slot, target)[0])
        return self._entries(slots, targets, t1)

    def _entries(self, slots: list[int | None], targets: list, t1: float) -> list[CachedExpert]:
        out = [self.entry(slot, target) for slot, target in zip(slots, targets)]
        self.timer.add(0.0, time.perf_counter() - t1)
        return out


# A record is handed to the helper thread when making it runnable costs more than this: three times a
# hand-over's round trip through a one-thread executor (~45 us measured on the 2-core benchmark machine).
_HAND_OVER_S = 150e-6


class RecordFiller:
    """Makes read records runnable in their slots (a checksum checked the first time, then the loader's
    fill), timing it; on a helper thread while the decode thread computes when a record costs more than
    handing it over (large int4-channel records; not small ones)."""

    def __init__(self, loader):
        self.loader, self.store = loader, loader.store
        self.fill_s: float | None = None  # seconds to make one record runnable (smoothed)
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None
        self.widener = None  # widener.Widener: records widened in another process (set by the decoder)

    def load(self, key: tuple[int, int], view, slot: int | None, tensors: dict | None = None) -> CachedExpert:
        """The record of KEY read into VIEW (TENSORS: its views, when the caller keeps them), made runnable in
        SLOT; any thread."""
        t0 = time.perf_counter()
        self.store.verify([key], [view])
        entry = self.loader.fill([key], [view], [slot], tensors=[tensors] if tensors is not None else None)[0]
        dt = time.perf_counter() - t0
        self.fill_s = dt if self.fill_s is None else 0.9 * self.fill_s + 0.1 * dt
        return entry

    def start(self, key: tuple[int, int], reads, buffer: int, slot: int | None, helper) -> _Job:
        """Make the record of KEY, read into BUFFER of READS (reads.ReadQueue), runnable in SLOT: in the widener
        process when there is one and both lie in memory it shares (the decode thread pays a post), else on the
        HELPER thread (None: on this thread, now). The job's ``result()`` is the entry."""
        view = reads.view(buffer)
        if self.widener is not None and slot is not None and buffer < reads.shared_buffers:
            self.store.verify([key], [view])
            return _Posted(self, buffer, self.widener.widen(buffer, slot), slot)
        if helper is not None:
            return _Future(helper.submit(self.load, key, view, slot, reads.tensors(buffer)))
        return _Done(self.load(key, view, slot, reads.tensors(buffer)))

    def post_loads(self, keys: list[tuple[int, int]], slots: list[int]) -> list[_Done]:
        """Have the widener process read KEYS' records and widen them into SLOTS (one post); their jobs."""
        store = self.store
        seqs = self.widener.load([(store.records[k][0], s, store.expected_crc(k)) for k, s in zip(keys, slots)])
        return [_Loading(self, key, slot, seq) for key, slot, seq in zip(keys, slots, seqs)]

    def helper(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The helper thread, when a record measures dearer than the hand-over; else None (fill here)."""
        if self.fill_s is None or self.fill_s < _HAND_OVER_S:
            return None
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeinfer-experts")
        return self._helper

    @property
    def helping(self) -> bool:
        """Whether the helper thread has been started (and not closed)."""
        return self._helper is not None

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
        if self.widener is not None:
            self.widener.close()
            self.widener = None


class _Done:
    """A record made runnable on the decode thread."""

    def __init__(self, entry: CachedExpert):
        self.entry = entry

    def result(self) -> CachedExpert:
        return self.entry

    def settle(self) -> None:
        pass


class _Future(_Done):
    """A record being made runnable on the helper thread."""

    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def result(self) -> CachedExpert:
        return self.future.result()

    def settle(self) -> None:
        """Until the helper is done with the record's buffer and slot (whatever came of it)."""
        concurrent.futures.wait([self.future])


class _Posted(_Done):
    """A record being widened in the widener process."""

    def __init__(self, filler: RecordFiller, buffer: int, seq: int, slot: int):
        self.filler, self.buffer, self.seq, self.slot = filler, buffer, seq, slot

    def result(self) -> CachedExpert:
        self.filler.widener.wait(self.buffer, self.seq)
        return self.filler.loader.entry(self.slot)

    def settle(self) -> None:
        with contextlib.suppress(PackageError):
            self.filler.widener.wait(self.buffer, self.seq)


class _Loading(_Done):
    """A record being read and widened by the widener process."""

    def __init__(self, filler: RecordFiller, key: tuple[int, int], slot: int, seq: int):
        self.filler, self.key, self.slot, self.seq = filler, key, slot, seq

    def result(self) -> CachedExpert:
        self.filler.widener.wait_slot(self.slot, self.seq, self.key)
        self.filler.store.mark_verified(self.key)
        return self.filler.loader.entry(self.slot)

    def settle(self) -> None:
        with contextlib.suppress(PackageError):
            self.filler.widener.wait_slot(self.slot, self.seq, self.key)


_Job = _Done


def expert_loader(store: ExpertStore, graph: bytes, target: ExecutionTarget):
    """The loader for this store's format."""
    return (SharedGraphExperts if store.weights_as_inputs else SessionExperts)(store, graph, target)

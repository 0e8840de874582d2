"""The stage graphs of a decoder package run over several sequences at once.

Every layer has one key and one value buffer of shape ``(slots, kv_heads, capacity,
head_dim)``: row ``s`` is the cache of the sequence in slot ``s``, with its own length.
GroupQueryAttention takes one length per row (``seqlens_k``) and writes each row's new
key/value in place at that row's position, so one run of the graphs advances every slot
by one token however long each context is. A prompt is prefilled into its slot alone, as a
batch-1 view of that row.

Each slot records the token ids its cache holds (``held``), and keeps them after its sequence
ends: a later prompt that starts with the same tokens (a client's system prompt, the previous
turn of a chat) reuses them and prefills only the rest (``reusable``, as llama.cpp's server
reuses a slot's prompt), whichever slot holds them: rows move between slots (``swap``,
``copy_prefix``), so a shared system prompt is prefilled once, not once per slot, and a
sequence can always take the lowest free slot.

A batched step runs rows ``[0, n)``, ``n`` one past the highest slot that steps; rows in
between that do not step (a free slot, or one still prefilling) get a dummy token at their
next position, which their own next write overwrites (a free slot's is past the tokens it
holds). Slots are handed out lowest first to keep ``n`` small.

Measured on SmolLM2-135M int4 (``apps/bench/batching.py``): each row's logits are
bit-identical to the same sequence decoded alone.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgeinfer.decoders.base import PREFILL_TAIL
from edgeinfer.decoders.kv_cache import kv_buffer_dtype
from edgeinfer.decoders.staged import StagedDecoder, bind_step
from edgeinfer.errors import ContextLengthError

_ov = ort.OrtValue.ortvalue_from_numpy
PREFILL_CHUNK = 256  # prompt tokens per prefill run: running streams wait at most one chunk for a new one


class SlotCaches:
    """KV buffers for SLOTS sequences over the stage sessions of DECODER (which keeps its own
    one-sequence caches for unbatched use)."""

    def __init__(self, decoder: StagedDecoder, slots: int):
        self.decoder = decoder
        self.slots = int(slots)
        self.capacity = decoder.capacity
        self.io = decoder.io
        kv = decoder.package.kv_cache
        shape = (self.slots, kv.num_kv_heads, self.capacity, kv.head_dim)
        dtype = kv_buffer_dtype(kv)  # fp32, or the fp16 / int8 cache a package was exported with
        layers = [i for st in decoder.stages for i in range(st.first, st.last)]
        self.keys = {i: np.zeros(shape, dtype) for i in layers}  # paged in by commit() or as used
        self.values = {i: np.zeros(shape, dtype) for i in layers}
        self.lengths = np.zeros(self.slots, np.int64)  # len(held[s]), as the array a step's seqlens come from
        self.held: list[list[int]] = [[] for _ in range(self.slots)]  # the tokens in each slot's cache, in order
        self._plans: dict[int, tuple] = {}  # rows -> the bindings of a batched step over rows [0, rows)

    def commit(self, slot: int) -> None:
        """Page in SLOT's rows of every buffer by writing zeros past the tokens it holds (so it is safe
        whatever the slot holds). GroupQueryAttention touches a slot's whole buffer the first time it
        runs on it; left to then, the page faults cost ~0.3 s per slot of a SmolLM2 cache at 4,096 tokens
        (measured; 0.04-0.5 s on this VM, whose fresh memory is slow to fault in) inside the first
        requests. llama.cpp clears its KV cache at load too."""
        n = len(self.held[slot])
        for buffers in (self.keys, self.values):
            for buf in buffers.values():
                buf[slot, :, n:].fill(0)

    def reset(self, slot: int) -> None:
        self.keep(slot, 0)

    def keep(self, slot: int, n: int) -> None:
        """Keep the first N tokens of SLOT's cache (the rest is overwritten by what comes next)."""
        del self.held[slot][n:]
        self.lengths[slot] = len(self.held[slot])

    def reusable(self, slot: int, ids: list[int]) -> int:
        """How many leading tokens of IDS SLOT's cache holds already, leaving at least PREFILL_TAIL of
        IDS to prefill (so the output is that of a cold prompt, edgeinfer/decoders/base.py)."""
        held, n = self.held[slot], 0
        limit = min(len(held), len(ids) - PREFILL_TAIL, self.capacity - 1)
        while n < limit and held[n] == ids[n]:
            n += 1
        return n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """DST's cache holds the first N tokens of SRC's from now on (a copy of those rows, every layer)."""
        for buffers in (self.keys, self.values):
            for buf in buffers.values():
                buf[dst, :, :n] = buf[src, :, :n]
        self.held[dst] = self.held[src][:n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Slots A and B exchange what their caches hold."""
        na, nb = len(self.held[a]), len(self.held[b])
        for buffers in (self.keys, self.values):
            for buf in buffers.values():
                rows_a = buf[a, :, :na].copy()
                buf[a, :, :nb] = buf[b, :, :nb]
                buf[b, :, :na] = rows_a
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self.lengths[a], self.lengths[b] = nb, na

    def park(self, slot: int) -> None:
        """SLOT stops being stepped and keeps what it holds; the dummy token a batched step writes for
        an idle row goes to its next position, so at least that one stays free."""
        self.keep(slot, min(len(self.held[slot]), self.capacity - 1))

    # -- running -------------------------------------------------------------------
    def _run(self, stage, x: np.ndarray, rows: slice, seqlens: np.ndarray, total: int) -> np.ndarray:
        """STAGE on X (rows, n, ...) over the cache rows ROWS; its main output."""
        io = self.io
        b = stage.session.io_binding()
        b.bind_ortvalue_input(io["input_ids"] if stage.embed else io["hidden_in"], _ov(np.ascontiguousarray(x)))
        b.bind_ortvalue_input(io["seqlens_k"], _ov(np.ascontiguousarray(seqlens, np.int32)))
        b.bind_ortvalue_input(io["total_sequence_length"], _ov(np.array(total, np.int32)))
        if stage.head:
            b.bind_ortvalue_input(io["logits_to_keep"], _ov(np.ones((1,), np.int64)))
            b.bind_output(io["logits"], "cpu")
        else:
            b.bind_output(io["hidden_out"], "cpu")
        self._bind_rows(stage, b, rows)
        stage.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def prefill_chunk(self, slot: int, ids: list[int]) -> np.ndarray:
        """Feed IDS (a chunk of a prompt) into SLOT's cache; the last position's logits (V,)."""
        start, n = int(self.lengths[slot]), len(ids)
        if start + n > self.capacity:
            raise ContextLengthError(f"{start + n} tokens do not fit the context of {self.capacity}: shorten the "
                                     "prompt or max_new_tokens.")
        x = np.asarray([ids], np.int64)
        rows = slice(slot, slot + 1)
        seqlens = np.array([start + n - 1], np.int32)
        for stage in self.decoder.stages:
            x = self._run(stage, x, rows, seqlens, start + n)
        self.held[slot].extend(ids)
        self.lengths[slot] = start + n
        return x[0, -1]

    def _bind_rows(self, stage, b: ort.IOBinding, rows: slice) -> None:
        """Bind STAGE's KV inputs and outputs to the cache rows ROWS (written in place)."""
        for i, pk, pv, ok, ov in stage.layer_names:
            k, v = _ov(self.keys[i][rows]), _ov(self.values[i][rows])
            b.bind_ortvalue_input(pk, k)
            b.bind_ortvalue_input(pv, v)
            b.bind_ortvalue_output(ok, k)
            b.bind_ortvalue_output(ov, v)

    def _plan(self, n: int) -> tuple:
        """Bindings that run one token for each of rows [0, N) through every stage, over buffers
        written in place before each step (the one-sequence decoder's plans, N rows wide)."""
        if n not in self._plans:
            dec = self.decoder
            seqlens, total = np.zeros((n,), np.int32), np.zeros((), np.int32)
            ids, bindings, out = bind_step(dec.stages, self.io, dec.vocab_size, dec.hidden_size, n,
                                           lambda st: (seqlens, total),
                                           lambda st, b: self._bind_rows(st, b, slice(0, n)))
            self._plans[n] = (ids, seqlens, total, list(zip((st.session for st in dec.stages), bindings)), out)
        return self._plans[n]

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One token for each slot in TOKENS, in one run of the graphs; each slot's logits (V,), views of
        the plan's output buffer, valid until the next step (the engine samples from them at once)."""
        n = max(tokens) + 1
        if any(self.lengths[s] + 1 > self.capacity for s in tokens):
            raise ContextLengthError(f"a sequence fills the context of {self.capacity} tokens.")
        ids, seqlens, total, bindings, out = self._plan(n)
        ids[:] = 0
        for s, t in tokens.items():
            ids[s, 0] = t
        np.minimum(self.lengths[:n], self.capacity - 1, out=seqlens, casting="unsafe")
        total[...] = int(seqlens.max()) + 1
        for session, b in bindings:
            session.run_with_iobinding(b)
        for s, t in tokens.items():
            self.held[s].append(t)
            self.lengths[s] += 1
        return {s: out[s, -1] for s in tokens}


class SlotKV:
    """Row SLOT of the slot caches in the layout of the decoder's one-sequence caches: what the prompt
    cache on disk restores into and saves from (edgeinfer/prompt_cache/), so entries are shared between
    batched and unbatched loads of a package."""

    def __init__(self, caches: SlotCaches, slot: int):
        self.slots, self.slot = caches, slot
        self.capacity = caches.capacity

    def arrays(self, cache) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """CACHE's (one of the decoder's kv_caches) layer -> (keys, values) of this row: (1, heads, capacity,
        dim) views."""
        s = self.slot
        return {i: (self.slots.keys[i][s:s + 1], self.slots.values[i][s:s + 1]) for i in cache.layers}

    def length(self) -> int:
        return int(self.slots.lengths[self.slot])

    def loaded(self, ids: list[int], k: int) -> None:
        """Positions [0, K) of the row now hold the KV of IDS[:K]."""
        self.slots.held[self.slot] = list(ids[:k])
        self.slots.lengths[self.slot] = k

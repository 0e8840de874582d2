"""Run a decoder package's stage graphs over per-stage KV caches, with IO binding.

Each stage owns the KV buffers of its layers and its own length; the pending rows
between stages and the order they run in are the one stage chain's
(:mod:`edgeinfer.decoders.chain`), so a strategy can run only the first stages for
some tokens (a draft, an early exit) and the rest later.

The one-token paths (full depth, and up to an exit) reuse bindings and
preallocated buffers: a step costs one ``run_with_iobinding`` per stage, a few
scalar writes, and no allocation.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgeinfer.errors import ContextLengthError, PackageError
from edgeinfer.package import GraphEntry, Package
from edgeinfer.runtimes import ExecutionTarget, create_session

from .base import Decoder
from .chain import StageChain
from .kv_cache import KVCache, kv_buffer_dtype

_ov = ort.OrtValue.ortvalue_from_numpy
MAX_EXIT_CONTEXT = 2048  # the most context tokens a VocabTrim exit head scores besides its own list


class Stage:
    """One stage graph: its session and its layers' KV cache."""

    def __init__(self, pkg: Package, entry: GraphEntry, target: ExecutionTarget, capacity: int):
        self.name = entry.name
        if entry.layers is None:
            raise PackageError(f"stage graph '{entry.path}' lists no layers: re-export the package.")
        self.first, self.last = entry.layers
        self.embed = bool(entry.embed)
        self.head = bool(entry.head)
        self.session = create_session(pkg.path(entry.path), target)
        got = {i.name for i in self.session.get_inputs()}
        expected = set(entry.inputs)
        if expected and got != expected:
            raise PackageError(f"graph '{entry.path}' does not have the inputs its manifest lists: "
                               "the package is inconsistent, re-export it.")
        kv, io = pkg.kv_cache, pkg.spec.io
        self.cache = KVCache(range(self.first, self.last), kv.num_kv_heads, kv.head_dim, capacity,
                             dtype=kv_buffer_dtype(kv), device=target.device_memory)
        self.layer_names = [(i, io["past_key"].format(layer=i), io["past_value"].format(layer=i),
                             io["present_key"].format(layer=i), io["present_value"].format(layer=i))
                            for i in range(self.first, self.last)]
        # Position inputs of the one-token plans, written in place before each step.
        self.step_seqlens = np.zeros((1,), np.int32)
        self.step_total = np.zeros((), np.int32)

    @property
    def length(self) -> int:
        return self.cache.length

    def bind_cache(self, binding: ort.IOBinding) -> None:
        for i, pk, pv, ok, ov in self.layer_names:
            binding.bind_ortvalue_input(pk, self.cache.keys[i])
            binding.bind_ortvalue_input(pv, self.cache.values[i])
            binding.bind_ortvalue_output(ok, self.cache.keys[i])
            binding.bind_ortvalue_output(ov, self.cache.values[i])



def bind_step(stages: list[Stage], io: dict, vocab_size: int, hidden_size: int, rows: int, positions, bind_cache):
    """IO bindings that run one token for each of ROWS rows through STAGES in order, over
    buffers the caller writes in place before each run: returns (ids (ROWS, 1) to write the
    tokens into, one binding per stage, the last stage's output buffer). POSITIONS(stage)
    gives the stage's (seqlens_k, total_sequence_length) arrays; BIND_CACHE(stage, binding)
    binds its KV buffers. The one-sequence decoder and the batched slots both build theirs here."""
    ids = np.zeros((rows, 1), np.int64)
    keep = _ov(np.ones((1,), np.int64))
    bindings, x, out = [], _ov(ids), None
    for st in stages:
        seqlens, total = positions(st)
        b = st.session.io_binding()
        b.bind_ortvalue_input(io["input_ids"] if st.embed else io["hidden_in"], x)
        b.bind_ortvalue_input(io["seqlens_k"], _ov(seqlens))
        b.bind_ortvalue_input(io["total_sequence_length"], _ov(total))
        if st.head:
            out = np.zeros((rows, 1, vocab_size), np.float32)
            b.bind_ortvalue_input(io["logits_to_keep"], keep)
            b.bind_ortvalue_output(io["logits"], _ov(out))
        else:
            out = np.zeros((rows, 1, hidden_size), np.float32)
            x = _ov(out)
            b.bind_ortvalue_output(io["hidden_out"], x)
        bind_cache(st, b)
        bindings.append(b)
    return ids, bindings, out


class StagedDecoder(StageChain, Decoder):
    """A decoder package loaded for inference: stage sessions, caches, exit head."""

    staged = True
    slots = True

    def __init__(self, pkg: Package, target: ExecutionTarget, max_context: int | None = None):
        super().__init__()
        self.package = pkg
        self.package_context = pkg.kv_cache.max_context
        self.capacity = min(int(max_context or self.package_context), self.package_context)
        self.stages = [Stage(pkg, e, target, self.capacity) for e in pkg.stages]
        self._init_chain(len(self.stages))
        if not self.stages or not self.stages[0].embed or not self.stages[-1].head:
            raise PackageError(f"package '{pkg.root}' has no complete chain of stage graphs: re-export it.")
        spec = pkg.spec
        self.io = spec.io
        self.vocab_size = spec.vocab_size
        self.hidden_size = spec.dimension("hidden_size")
        head = spec.graph("exit_head")
        self.exit_head = create_session(pkg.path(head.path), target) if head else None
        # A VocabTrim exit head (export --exit-vocab) also scores the context's own tokens (set_exit_context).
        extra = self.io.get("exit_extra_tokens")
        self.exit_context = np.zeros((1,), np.int64) if head and extra and extra in head.inputs else None
        # exit layer -> number of stages to run before applying the exit head
        self.exits = spec.exit_stages
        # Fitted exit adapters (export --exit-adapters), keyed like exit_logits' STAGES argument.
        self.adapters = {}
        for e in spec.exits:
            if e.adapter:
                adapter = spec.graph_named(e.adapter)
                if adapter is None:
                    raise PackageError(f"exit {e.layer} names an adapter graph the package lacks: re-export it.")
                self.adapters[e.stages] = create_session(pkg.path(adapter.path), target)
        self._plans: dict = {}

    # -- state -----------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens fed so far (processed by the first stage; later stages may lag)."""
        return self.stages[0].length

    def stage_length(self, s: int) -> int:
        return self.stages[s].length

    def _cut_stage(self, s: int, n: int) -> None:
        self.stages[s].cache.truncate(n)

    def trim(self, n: int) -> None:
        self.truncate(self.length - n)

    def reset(self) -> None:
        self.truncate(0)

    def kv_caches(self) -> list | None:
        caches = [st.cache for st in self.stages]
        return caches if all(c.host_arrays() is not None for c in caches) else None

    def _check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            limit = (f"the package allows up to {self.package_context}" if self.capacity < self.package_context
                     else "the package's maximum")
            raise ContextLengthError(
                f"{self.length + n} tokens do not fit the context of {self.capacity} ({limit}): "
                "shorten the prompt or max_new_tokens.")

    # -- general path ----------------------------------------------------------
    def forward(self, ids, logits_to_keep: int = 1, stages: int | None = None) -> np.ndarray:
        """Feed IDS (1-D) through the first STAGES stages (all by default).

        Full depth returns LM-head logits (logits_to_keep, vocab) of the last
        positions; fewer stages return the exit head's logits on the last
        stage's output (the package must have an exit there).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        stop = len(self.stages) if stages is None else stages
        if n == 1 and logits_to_keep == 1 and stop == len(self.stages) and not self.lagging():
            return self.step(int(ids[0, 0]))[None]
        self._check_room(n)
        x = self.run_chain(ids, stop, logits_to_keep)[0]
        if stop == len(self.stages):
            return x
        return self.exit_logits(x[-logits_to_keep:], stop)

    def catch_up(self, stages: int | None = None, logits_to_keep: int = 1) -> np.ndarray | None:
        """Run the pending positions of stages [1, STAGES) (all by default).

        At full depth returns the LM-head logits of the last LOGITS_TO_KEEP
        positions; otherwise the output rows of stage STAGES-1, which stay
        pending for stage STAGES. None if nothing was pending.
        """
        out = super().catch_up(stages, logits_to_keep)
        return None if out is None else out[0]

    def exit_logits(self, hidden: np.ndarray, stages: int | None = None) -> np.ndarray:
        """Exit head on residual-stream states (P, hidden) → logits (P, vocab). STAGES: how many
        stages produced them, which selects that exit's adapter if the package has one."""
        if self.exit_head is None:
            raise PackageError("this package has no early exits: export it with --exits.")
        adapter = self.adapters.get(stages)
        if adapter is not None:
            hidden = adapter.run(None, {self.io["hidden_in"]: hidden[None].astype(np.float32)})[0][0]
        feeds = {self.io["hidden_in"]: hidden[None].astype(np.float32),
                 self.io["logits_to_keep"]: np.array([len(hidden)], np.int64)}
        if self.exit_context is not None:
            feeds[self.io["exit_extra_tokens"]] = self.exit_context
        return self.exit_head.run([self.io["logits"]], feeds)[0][0]

    def set_exit_context(self, tokens) -> None:
        """The context's tokens (a prompt) that a VocabTrim exit head scores besides its own list; no-op for
        a full exit head."""
        if self.exit_context is not None:
            ids = np.unique(np.asarray(list(tokens)[-MAX_EXIT_CONTEXT:], np.int64))
            ids = ids[(ids >= 0) & (ids < self.vocab_size)]
            self.exit_context = ids if len(ids) else np.zeros((1,), np.int64)

    def _run_stage(self, s: int, x: np.ndarray, logits_to_keep: int | None) -> np.ndarray:
        """Run stage S on rows X (1, n, ...) after its cache; returns its main output (numpy)."""
        st = self.stages[s]
        n = x.shape[1]
        start = st.length
        b = st.session.io_binding()
        b.bind_ortvalue_input(self.io["input_ids"] if st.embed else self.io["hidden_in"], _ov(np.ascontiguousarray(x)))
        b.bind_ortvalue_input(self.io["seqlens_k"], _ov(np.array([start + n - 1], np.int32)))
        b.bind_ortvalue_input(self.io["total_sequence_length"], _ov(np.array(start + n, np.int32)))
        # The main output is bound first: get_outputs() lists outputs in binding order.
        if st.head:
            b.bind_ortvalue_input(self.io["logits_to_keep"], _ov(np.array([min(logits_to_keep or 1, n)], np.int64)))
            b.bind_output(self.io["logits"], "cpu")
        else:
            b.bind_output(self.io["hidden_out"], "cpu")
        st.bind_cache(b)
        st.session.run_with_iobinding(b)
        st.cache.length = start + n
        return b.get_outputs()[0].numpy()

    # -- one-token hot paths -----------------------------------------------------
    def _plan(self, stop: int):
        """Bindings that run the first STOP stages on one token held in a buffer."""
        if stop not in self._plans:
            stages = self.stages[:stop]
            ids, bindings, out = bind_step(stages, self.io, self.vocab_size, self.hidden_size, 1,
                                           lambda st: (st.step_seqlens, st.step_total),
                                           lambda st, b: st.bind_cache(b))
            self._plans[stop] = (ids, list(zip(stages, bindings)), out)
        return self._plans[stop]

    def _run_plan(self, stop: int, token: int) -> np.ndarray:
        self._check_room(1)
        ids, bindings, out = self._plan(stop)
        ids[0, 0] = token
        for st, b in bindings:
            pos = st.cache.length
            st.step_seqlens[0] = pos
            st.step_total[...] = pos + 1
            st.session.run_with_iobinding(b)
            st.cache.length = pos + 1
        return out[0, 0]

    def step(self, token: int) -> np.ndarray:
        """Append one token at full depth; returns its logits (vocab,) — a view, valid until the next step."""
        if self.lagging():
            return self.forward([token])[-1]
        return self._run_plan(len(self.stages), token)

    def step_partial(self, token: int, stages: int) -> np.ndarray:
        """Run one token through the first STAGES stages only; returns that stage's output
        (hidden,) and leaves it pending for the next stage."""
        if self.lagging(stages):
            raise RuntimeError("step_partial needs the first stages caught up")
        hidden = self._run_plan(stages, token).copy()
        self.add_pending(stages, hidden[None, None])
        return hidden

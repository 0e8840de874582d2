"""Run a sparse-MoE package: per-layer graphs up to the router, experts from the
expert cache in between, and reads of the next layer's likely experts started
while this layer computes (reads.py, prefetch.py).

Same interface as :class:`edgeinfer.decoders.staged.StagedDecoder` for the decode loop
and the strategies that need no stages (plain, lookup): ``forward``, ``step``,
``truncate``, ``trim``, ``reset``, ``length``, ``capacity``, ``vocab_size``,
``exits`` (none).

Prediction (routing ahead): layer j's experts are ranked before layer j runs by
scoring a stream vector with layer j's router (numpy, hidden x experts: microseconds).
``predict_from="stream"`` (the default) uses the stream after the previous sparse
layer's attention, normalized with layer j's pre-feed-forward norm; ``"input"`` uses
the previous layer's input, before its attention, which gives the reads one more
attention's time but guesses worse (docs/moe.md has both measured). Between the two
points only small updates to a large residual stream happen, so the top-k of these
scores is usually the set layer j will choose. prefetch.py decides which guesses to read.

Sessions and the KV cache follow the package's execution target (provider, device).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import onnxruntime as ort

from edgeinfer.runtimes import ExecutionTarget, create_session

from ..decoders.base import Decoder
from ..decoders.kv_cache import KVCache
from ..errors import ContextLengthError, PackageError
from ..package import Package
from .cache import ExpertCache
from .experts import expert_loader
from .formats import CHANNEL_INT4
from .prefetch import ReadAhead
from .reader import ReaderPool
from .reads import ReadQueue
from .residency import ResidencyPlan
from .stats import CacheStats
from .store import ExpertStore
from .widener import Widener, worker_cpu

PREDICT_FROM = ("stream", "input")
log = logging.getLogger("edgeinfer.moe")

_ov = ort.OrtValue.ortvalue_from_numpy


def top_experts(logits: np.ndarray, k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the K experts of highest softmax probability (descending) and their weights."""
    if logits.ndim == 1:  # one token (the decode path): the same arithmetic without the row machinery
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        idx = np.argsort(-probs, kind="stable")[:k]
        w = probs[idx]
        if renormalize:
            w = w / w.sum()
        return idx, w.astype(np.float32)
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(probs, idx, axis=-1)
    if renormalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return idx, w.astype(np.float32)


class MoEDecoder(Decoder):
    exit_head = None

    def __init__(self, pkg: Package, target: ExecutionTarget, max_context: int | None = None,
                 memory_budget: int | None = None, prefetch: bool = True, direct_io: bool = False,
                 readers: int = 0, predict_from: str = "stream", resident_fraction: float | None = None,
                 budget_split: str = "miss-cost", widener: bool | None = None):
        """READERS: reader threads that read and widen experts (guesses into slots, a layer's misses in
        parallel); 0: reads are started ahead without threads (native AIO, else the page cache: reads.py) and
        finished by the decode thread when it needs them -- no thread to schedule, nothing evicted for a
        guess. DIRECT_IO: synchronous reads bypass the page cache. PREDICT_FROM:
        where read-ahead's guesses come from (module docstring). RESIDENT_FRACTION: of each layer's
        share of the budget, the part kept for its most frequent experts (residency.py; None: default).
        BUDGET_SPLIT: "miss-cost" (by the package's measured routing frequencies, residency.py) or "equal".
        WIDENER: int4-channel records read and widened in a worker process (widener.py); None: where the compute
        threads leave it a core of its own (Linux), True: wherever memfd exists (tests), False: never."""
        super().__init__()
        if predict_from not in PREDICT_FROM:
            raise ValueError(f"predict_from is one of {', '.join(PREDICT_FROM)}, not {predict_from!r}")
        if budget_split not in ("miss-cost", "equal"):
            raise ValueError(f"budget_split is 'miss-cost' or 'equal', not {budget_split!r}")
        spec = pkg.spec
        moe, kv = spec.moe, pkg.kv_cache
        self.io = spec.io
        self.package_context = kv.max_context
        self.capacity = min(int(max_context or self.package_context), self.package_context)
        self.vocab_size = spec.vocab_size
        self.hidden_size = spec.dimension("hidden_size")
        self.top_k = moe.top_k
        self.renormalize = moe.norm_topk_prob
        graphs = {role: spec.graph(role) for role in ("embed", "head", "expert_ffn")}
        layers = sorted(spec.graphs_with_role("moe_layer"), key=lambda g: g.layer if g.layer is not None else -1)
        self.num_layers = kv.num_layers
        if graphs["embed"] is None or graphs["head"] is None or [g.layer for g in layers] != list(
                range(self.num_layers)):
            raise PackageError(f"package '{pkg.root}' lacks some of its MoE graphs: re-export it.")
        self.embed = create_session(pkg.path(graphs["embed"].path), target)
        self.head = create_session(pkg.path(graphs["head"].path), target)
        self.layers = [create_session(pkg.path(g.path), target) for g in layers]
        self.sparse = [bool(g.sparse) for g in layers]
        self.has_shared = bool(moe.shared_expert_intermediate)
        self.kv = KVCache(range(self.num_layers), kv.num_kv_heads, kv.head_dim, self.capacity,
                          device=target.device_memory)
        sparse_layers = [i for i, s in enumerate(self.sparse) if s]
        self.cache: ExpertCache | None = None
        self.pool: ReaderPool | None = None
        self.readahead: ReadAhead | None = None
        self.predict_from = predict_from
        self.trace = None  # a callable(layer, input, stream, experts) the exporter's calibration sets
        if sparse_layers:
            router = moe.router
            self.routers = _load_array(pkg, router["weights"], (self.num_layers, moe.num_experts,
                                                                self.hidden_size))
            self.router_norms = _load_array(pkg, router["norms"], (self.num_layers, self.hidden_size))
            self.eps = float(router["eps"])
            self._rank_weights = self.routers * self.router_norms[:, None, :]  # (rank_experts)
            if graphs["expert_ffn"] is None:
                raise PackageError(f"package '{pkg.root}' has no expert_ffn graph: re-export it.")
            ffn_graph = pkg.path(graphs["expert_ffn"].path).read_bytes()
            store = ExpertStore(pkg, moe.expert_store, direct_io=direct_io, async_reads=readers == 0)
            missing = [i for i in sparse_layers if (i, 0) not in store.records]
            if missing:
                raise PackageError(f"the expert store index has no experts for layer {missing[0]}: re-export it.")
            loader = expert_loader(store, ffn_graph, target)
            # int4-channel records are widened in a worker process where a core is left for it (widener.py)
            widen_cpu = None
            if widener is not False and readers == 0 and store.precision == CHANNEL_INT4:
                widen_cpu = worker_cpu(target.threads if widener is None else 0)
            if widener and widen_cpu is None:
                raise ValueError("widener=True needs an int4-channel expert store, no reader threads and Linux "
                                 "(memfd): leave it None to use the widener where it can run.")
            loader.share_arena = widen_cpu is not None

            def plan_for(capacity: int) -> ResidencyPlan:
                if budget_split == "equal":
                    return ResidencyPlan.equal(sparse_layers, capacity, self.top_k)
                return ResidencyPlan.from_manifest(moe, sparse_layers, capacity, self.top_k, resident_fraction)

            self.cache = ExpertCache(loader, memory_budget, sparse_layers, self.top_k, plan_for)
            streaming = self.cache.capacity < len(store.records)
            if readers > 0 and streaming:
                self.pool = ReaderPool(self.cache, readers)
            elif streaming:
                self.cache.reads = ReadQueue(store, shared=widen_cpu is not None)
                if widen_cpu is not None:
                    try:
                        self.cache.filler.widener = Widener.start(
                            store.index, str(store.path), loader.arena_fd, len(loader.arena), loader.expert_bytes,
                            self.cache.reads.shared_fd, self.cache.reads.shared_buffers, widen_cpu)
                    except OSError as e:  # (a frozen app's executable is no Python): the decode thread widens
                        if widener:
                            raise
                        log.warning("expert records are read and widened on the decoding thread: %s", e)
            if loader.share_arena:  # the worker has its own descriptor; the mapping stays
                os.close(loader.arena_fd)
                loader.arena_fd = None
            if prefetch and streaming:
                self.readahead = ReadAhead(self.cache, self.pool, self.top_k)
        self._next_sparse = {i: next((j for j in range(i + 1, self.num_layers) if self.sparse[j]), None)
                             for i in range(self.num_layers)}
        self._predicted: dict[int, tuple] = {}  # layer -> (ranked guesses, those not cached)
        self._step = 0
        self._plan: _StepPlan | None = None
        self._slot_bindings: dict = {}  # arena slot -> its expert binding over the plan's buffers

    # -- state -----------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.kv.length

    def truncate(self, n: int) -> None:
        self.kv.truncate(n)

    def trim(self, n: int) -> None:
        self.kv.trim(n)

    def reset(self) -> None:
        self.kv.reset()

    def kv_caches(self) -> list:
        return [self.kv]  # every layer's KV in one host cache; the expert cache holds weights only

    def expert_stats(self, since: CacheStats | None = None) -> CacheStats:
        """Cumulative expert-cache counters (minus SINCE); ``.as_dict()`` for reports."""
        if self.cache is None:
            return CacheStats()
        with self.cache.lock:
            now = CacheStats(**self.cache.stats.__dict__)
        now.read_s, now.build_s = self.cache.loader.timer.read_s, self.cache.loader.timer.build_s
        return now.minus(since) if since is not None else now

    def stop_prefetch(self) -> None:
        """Stop reading ahead: from now on experts are read only when needed (a layer's misses together)."""
        self.readahead = None

    def close(self) -> None:
        self.stop_prefetch()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
            self.cache.reader = None
        if self.cache is not None:
            self.cache.close()
            if self.cache.reads is not None:
                self.cache.reads.close()
            self.cache.store.close()

    # -- running ----------------------------------------------------------------
    def forward(self, ids, logits_to_keep: int = 1, stages: int | None = None) -> np.ndarray:
        """Feed IDS (1-D); returns the logits (logits_to_keep, vocab) of the last positions."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if n == 1 and logits_to_keep == 1:
            return self.step(int(ids[0, 0]))[None].copy()
        self._check_room(n)
        self._step += 1
        start = self.length
        x = self.embed.run([self.io["hidden_out"]], {self.io["input_ids"]: ids})[0]
        for i in range(self.num_layers):
            x = self._layer(i, x, start, n)
        self.kv.length = start + n
        if self.cache is not None:
            self.cache.stats.tokens += n
            self.cache.end_token()
        keep = np.array([min(logits_to_keep, n)], np.int64)
        out = self.head.run([self.io["logits"]], {self.io["hidden_in"]: x, self.io["logits_to_keep"]: keep})[0]
        return out[0]

    def _check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise ContextLengthError(f"{self.length + n} tokens do not fit the context of {self.capacity}: "
                                     "shorten the prompt or max_new_tokens.")

    def step(self, token: int) -> np.ndarray:
        """Append one token; returns its logits (vocab,) — a view, valid until the next step.

        The hot path: every graph runs on bindings made once, over preallocated buffers."""
        widener = self.cache.filler.widener if self.cache is not None else None
        if widener is None:
            return self._decode(token)
        with widener.pinned():  # off the widener's core while it works for this token
            return self._decode(token)

    def _decode(self, token: int) -> np.ndarray:
        self._check_room(1)
        plan = self._plan or self._make_plan()
        self._step += 1
        wall0 = time.perf_counter()
        pos = self.length
        plan.seqlens[0] = pos
        plan.total[...] = pos + 1
        plan.token[0, 0] = token
        self.embed.run_with_iobinding(plan.embed)
        x = plan.x[0, 0]
        ahead = self.readahead is not None and self.readahead.start_token()
        for i in range(self.num_layers):
            if ahead and self.predict_from == "input" and self.sparse[i]:
                self._predict_next(i, plan.x[0])
            self.layers[i].run_with_iobinding(plan.layers[i])
            if not self.sparse[i]:
                x[:] = plan.dense_out[0, 0]
                continue
            stream = plan.stream[0]
            experts, weights = top_experts(plan.logits[0, 0], self.top_k, self.renormalize)
            chosen = experts.tolist()
            if ahead and self.predict_from == "stream":  # this layer's reads first, the next layer's behind
                self._predict_next(i, stream, needed=chosen if self.pool is None else None)
            self._score_prediction(i, chosen)
            plan.h[:] = plan.ffn_in[0]
            y = self._experts_one_token(i, chosen, weights, plan)
            np.add(stream[0], y, out=x)
            if self.has_shared:
                x += plan.shared[0, 0]
        self.kv.length = pos + 1
        if self.cache is not None:
            self.cache.stats.tokens += 1
            self.cache.end_token()
            if self.readahead is not None:
                self.readahead.observe_token(time.perf_counter() - wall0)
        self.head.run_with_iobinding(plan.head)
        return plan.out[0, 0]

    def _make_plan(self) -> _StepPlan:
        io, hidden = self.io, self.hidden_size
        plan = _StepPlan(hidden, self.vocab_size, self.routers.shape[1] if self.cache is not None else 1, self.top_k)
        plan.embed = self.embed.io_binding()
        plan.embed.bind_ortvalue_input(io["input_ids"], _ov(plan.token))
        plan.embed.bind_ortvalue_output(io["hidden_out"], _ov(plan.x))
        for i, sess in enumerate(self.layers):
            b = sess.io_binding()
            b.bind_ortvalue_input(io["hidden_in"], _ov(plan.x))
            b.bind_ortvalue_input(io["seqlens_k"], _ov(plan.seqlens))
            b.bind_ortvalue_input(io["total_sequence_length"], _ov(plan.total))
            b.bind_ortvalue_input(io["past_key"].format(layer=i), self.kv.keys[i])
            b.bind_ortvalue_input(io["past_value"].format(layer=i), self.kv.values[i])
            if self.sparse[i]:
                b.bind_ortvalue_output(io["stream"], _ov(plan.stream))
                b.bind_ortvalue_output(io["ffn_in"], _ov(plan.ffn_in))
                b.bind_ortvalue_output(io["router_logits"], _ov(plan.logits))
                if self.has_shared:
                    b.bind_ortvalue_output(io["shared_out"], _ov(plan.shared))
            else:
                b.bind_ortvalue_output(io["hidden_out"], _ov(plan.dense_out))
            b.bind_ortvalue_output(io["present_key"].format(layer=i), self.kv.keys[i])
            b.bind_ortvalue_output(io["present_value"].format(layer=i), self.kv.values[i])
            plan.layers.append(b)
        plan.head = self.head.io_binding()
        plan.head.bind_ortvalue_input(io["hidden_in"], _ov(plan.x))
        plan.head.bind_ortvalue_input(io["logits_to_keep"], _ov(plan.keep))
        plan.head.bind_ortvalue_output(io["logits"], _ov(plan.out))
        self._plan = plan
        return plan

    def _experts_one_token(self, i: int, chosen: list[int], weights: np.ndarray, plan: _StepPlan) -> np.ndarray:
        """The chosen experts on one token: each run as soon as it is runnable (the cached ones while the
        others are still being read), their outputs summed in the router's order (the same sum whatever the
        cache held)."""
        self.cache.position = (self._step, i)
        outs = plan.expert_outs
        each = self.cache.acquire_each(i, chosen)
        finished = False
        try:
            for r, entry in each:
                if entry.binding is None:
                    entry.binding = self._binding(entry, plan)
                entry.session.run_with_iobinding(entry.binding)
                outs[r] = plan.expert_out[0]
            finished = True
        finally:
            if finished:
                self.cache.release(i, chosen)
            else:
                each.close()  # releases them
        y = np.zeros(self.hidden_size, np.float32)
        for r, w in enumerate(weights):
            y += w * outs[r]
        return y

    def _binding(self, entry, plan: _StepPlan):
        """The one-token binding of a cached expert over the plan's buffers: made once per arena slot when its
        weights are inputs of the shared graph (a slot's OrtValues never change, only the bytes in them), else
        once per loaded expert."""
        shared = entry.weights is not None and entry.slot is not None
        b = self._slot_bindings.get(entry.slot) if shared else None
        if b is None:
            b = entry.session.io_binding()
            b.bind_ortvalue_input(self.io["expert_in"], _ov(plan.h))
            b.bind_ortvalue_output(self.io["expert_out"], _ov(plan.expert_out))
            for name, value in (entry.weights or {}).items():
                b.bind_ortvalue_input(name, value)
            if shared:
                self._slot_bindings[entry.slot] = b
        return b

    def _layer(self, i: int, x: np.ndarray, start: int, n: int) -> np.ndarray:
        """Layer I on N positions (the prompt path; one token goes through ``step``)."""
        io = self.io
        sess = self.layers[i]
        b = sess.io_binding()
        b.bind_ortvalue_input(io["hidden_in"], _ov(np.ascontiguousarray(x, np.float32)))
        b.bind_ortvalue_input(io["seqlens_k"], _ov(np.array([start + n - 1], np.int32)))
        b.bind_ortvalue_input(io["total_sequence_length"], _ov(np.array(start + n, np.int32)))
        b.bind_ortvalue_input(io["past_key"].format(layer=i), self.kv.keys[i])
        b.bind_ortvalue_input(io["past_value"].format(layer=i), self.kv.values[i])
        # Main outputs are bound first: get_outputs() lists outputs in binding order.
        if not self.sparse[i]:
            names = [io["hidden_out"]]
        else:
            names = [io["stream"], io["ffn_in"], io["router_logits"]] + ([io["shared_out"]] if self.has_shared else [])
        for name in names:
            b.bind_output(name, "cpu")
        b.bind_ortvalue_output(io["present_key"].format(layer=i), self.kv.keys[i])
        b.bind_ortvalue_output(io["present_value"].format(layer=i), self.kv.values[i])
        sess.run_with_iobinding(b)
        if not self.sparse[i]:
            return b.get_outputs()[0].numpy()
        outs = [v.numpy() for v in b.get_outputs()[: len(names)]]
        stream, h, logits = outs[0][0], outs[1][0], outs[2][0]
        experts, weights = top_experts(logits, self.top_k, self.renormalize)
        if self.trace is not None:
            self.trace(i, x[0], stream, experts)
        out = stream + self._experts_rows(i, h, experts, weights)
        if self.has_shared:
            out += outs[3][0]
        return out[None]

    def rank_experts(self, j: int, v: np.ndarray) -> np.ndarray:
        """Layer J's experts ranked (best first) for the stream vector V: its router on V normalized with its
        pre-feed-forward norm (the RMS scale is one positive factor for every expert, so it does not change
        the order and is left out; the norm's weights are folded into the router once)."""
        return np.argsort(-(self._rank_weights[j] @ v), kind="stable")

    def _predict_next(self, i: int, stream: np.ndarray, needed: list[int] | None = None) -> None:
        """Guess the next sparse layer's experts from STREAM and read ahead; NEEDED: layer I's experts, whose
        misses are read first, in the same submit."""
        j = self._next_sparse[i]
        if j is None:  # (called only on tokens that read ahead)
            if needed:
                self.cache.advise(i, needed)
            return
        ranked = self.rank_experts(j, stream[-1])[: self.readahead.depth].tolist()
        self._predicted[j] = (ranked, self.readahead.request(self._step, j, ranked,
                                                             (i, needed) if needed else None))

    def _score_prediction(self, i: int, chosen: list[int]) -> None:
        guess = self._predicted.pop(i, None)
        if guess is not None and self.cache is not None:
            ranked, uncached = guess
            with self.cache.lock:
                self.cache.stats.predicted += self.top_k
                self.cache.stats.predicted_right += len(set(ranked[: self.top_k]) & set(chosen))
            if self.readahead is not None:
                self.readahead.observe(i, ranked, chosen, uncached)

    def _experts_rows(self, i: int, h: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Prompt rows: each expert once over the rows that chose it, pinned one at a time (the
        union of a prompt's experts may be larger than the budget)."""
        name_in, name_out = self.io["expert_in"], self.io["expert_out"]
        y = np.zeros_like(h)
        unique = np.unique(experts).tolist()
        if self.cache.reads is not None:  # start the reads of the layer's experts at once
            self.cache.advise(i, unique)
        for e in unique:
            rows, slot = np.nonzero(experts == e)
            entry = self.cache.acquire(i, [e])[0]
            try:
                out = entry.session.run([name_out], {name_in: np.ascontiguousarray(h[rows]), **entry.feeds()})[0]
            finally:
                self.cache.release(i, [e])
            y[rows] += out * weights[rows, slot][:, None]
        return y


class _StepPlan:
    """Buffers and bindings of the one-token path (made on the first step)."""

    def __init__(self, hidden: int, vocab: int, experts: int, top_k: int):
        self.token = np.zeros((1, 1), np.int64)
        self.x = np.zeros((1, 1, hidden), np.float32)  # the residual stream entering each layer
        self.seqlens = np.zeros((1,), np.int32)
        self.total = np.zeros((), np.int32)
        self.keep = np.ones((1,), np.int64)
        self.stream = np.zeros((1, 1, hidden), np.float32)
        self.ffn_in = np.zeros((1, 1, hidden), np.float32)
        self.logits = np.zeros((1, 1, experts), np.float32)
        self.shared = np.zeros((1, 1, hidden), np.float32)
        self.dense_out = np.zeros((1, 1, hidden), np.float32)
        self.h = np.zeros((1, hidden), np.float32)  # expert input
        self.expert_out = np.zeros((1, hidden), np.float32)
        self.expert_outs = np.zeros((top_k, hidden), np.float32)  # each chosen expert's output, in router order
        self.out = np.zeros((1, 1, vocab), np.float32)
        self.embed = self.head = None
        self.layers: list = []


def _load_array(pkg: Package, rel: str, shape: tuple) -> np.ndarray:
    try:
        a = np.load(pkg.path(rel), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PackageError(f"'{rel}' could not be read ({e}): re-export the package.") from None
    if a.shape != shape or a.dtype != np.float32:
        raise PackageError(f"'{rel}' has shape {a.shape}, expected {shape}: re-export the package.")
    return a

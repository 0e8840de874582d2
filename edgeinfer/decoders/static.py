"""Run a static-shape decoder package (``--target npu``) with the StagedDecoder interface.

The package holds two graphs of the same weights with fixed shapes: a prefill
graph for chunks of ``chunk`` tokens and a decode graph for one token. Both read
the whole KV cache as fixed-size inputs and return only the chunk's new keys and
values, which this class writes into its buffers; the positions and the
attention mask it builds tell the graph which cache slots are real. A chunk
shorter than the graph's is padded (padded rows see only themselves, their
outputs are dropped). The context is fixed at export: more tokens than it holds
is a :class:`ContextLengthError`, never a silent truncation.

The strategies and the decode loop see the same ``forward`` / ``step`` /
``truncate`` / ``trim`` / ``reset`` / ``length`` / ``capacity`` as with
StagedDecoder; there are no stages or exits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edgeinfer.errors import ContextLengthError, PackageError
from edgeinfer.package import Package, StaticSpec
from edgeinfer.runtimes import ExecutionTarget, create_session

from .base import Decoder

# Additive mask value of hidden positions when the manifest does not give one (export/npu/graph.py).
MASK_VALUE = -80.0


class StaticGraph:
    """One fixed-chunk graph: its session, chunk size and the shapes its mask is built for."""

    def __init__(self, session: ort.InferenceSession, chunk: int, max_context: int, groups: int,
                 windows: bool, quant: dict | None = None):
        self.session = session
        # edge tensor -> {"scale", "zero_point", "dtype"} where the graph reads/writes quantized values
        self.quant = quant or {}
        self.chunk = chunk
        self.max_context = max_context
        self.groups = groups
        self.windows = windows
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_names = {i.name for i in session.get_inputs()}


class StaticDecoder(Decoder):
    exit_head = None
    stages: list = []
    context_remedy = "re-export with a larger --max-context (an npu package's context is fixed at export)"

    def __init__(self, pkg: Package, target: ExecutionTarget, max_context: int | None = None):
        super().__init__()
        spec = pkg.spec
        static = spec.static
        if not static:
            raise PackageError(f"package '{pkg.root}' has no static-shape description: re-export it with "
                               "--target npu.")
        graphs = {role: spec.graph(role) for role in ("static_prefill", "static_decode")}
        if None in graphs.values():
            raise PackageError(f"package '{pkg.root}' lacks its prefill or decode graph: re-export it.")
        sessions = {role: create_session(pkg.path(g.path), target, pkg.spec) for role, g in graphs.items()}
        self._setup(sessions["static_prefill"], sessions["static_decode"], static, spec.io,
                    vocab_size=spec.vocab_size, max_context=max_context,
                    quant=(graphs["static_prefill"].io_quantization, graphs["static_decode"].io_quantization))

    @classmethod
    def from_sessions(cls, prefill: ort.InferenceSession, decode: ort.InferenceSession, static: StaticSpec,
                      io: dict, vocab_size: int) -> StaticDecoder:
        """For the exporter's calibration and checks: sessions not read from a package."""
        self = cls.__new__(cls)
        self._setup(prefill, decode, static, io, vocab_size=vocab_size, max_context=None)
        return self

    def _setup(self, prefill, decode, static: StaticSpec, io: dict, vocab_size: int, max_context: int | None,
               quant: tuple = (None, None)) -> None:
        self.package_context = static.max_context
        # Shapes are fixed: a smaller max_context only lowers the limit, it saves no memory.
        self.capacity = min(int(max_context or self.package_context), self.package_context)
        self.vocab_size = vocab_size
        self.io = io
        kvh, hd, heads = static.kv_heads, static.head_dim, static.heads
        self.num_layers = static.num_layers
        self.mask_value = float(MASK_VALUE if static.mask_value is None else static.mask_value)
        self.sliding_windows = list(static.sliding_windows)
        self.window = max([w for w in self.sliding_windows if w > 0], default=0)
        groups = heads // kvh
        self.prefill_graph = StaticGraph(prefill, static.chunk, self.package_context, groups,
                                         self.window > 0, quant[0])
        self.decode_graph = StaticGraph(decode, 1, self.package_context, groups, self.window > 0, quant[1])
        shape = (1, kvh, self.package_context, hd)
        self.keys = [self._kv_buffer(shape, io["past_key"].format(layer=i)) for i in range(self.num_layers)]
        self.values = [self._kv_buffer(shape, io["past_value"].format(layer=i)) for i in range(self.num_layers)]
        self._length = 0
        # Called with (graph chunk, feeds) before every run: the exporter records calibration inputs.
        self.feed_hook: Callable[[int, dict], None] | None = None

    def _kv_buffer(self, shape: tuple, name: str) -> np.ndarray:
        """A KV buffer: float, or the 16-bit values both graphs read (one scale for both: the exporter gives
        their past inputs the same range; a package where they differ is refused)."""
        p, d = self.prefill_graph.quant.get(name), self.decode_graph.quant.get(name)
        if p is None and d is None:
            return np.zeros(shape, np.float32)
        if p != d:
            raise PackageError(f"the npu graphs quantize the KV cache '{name}' differently: re-export the package.")
        return np.full(shape, p["zero_point"], np.dtype(p["dtype"]))  # the quantized zero

    # -- state -----------------------------------------------------------------
    @property
    def length(self) -> int:
        return self._length

    def truncate(self, n: int) -> None:
        # Slots past the length are hidden by the mask, so dropping them needs no clearing.
        self._length = max(0, min(int(n), self._length))

    def trim(self, n: int) -> None:
        self.truncate(self._length - n)

    def reset(self) -> None:
        self._length = 0

    # -- running ---------------------------------------------------------------
    def forward(self, ids, logits_to_keep: int = 1, stages: int | None = None) -> np.ndarray:
        """Feed IDS (1-D); returns the logits (logits_to_keep, vocab) of the last positions."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if self._length + n > self.capacity:
            raise ContextLengthError(
                f"{self._length + n} tokens do not fit the fixed context of {self.capacity} this package was "
                f"exported with: shorten the prompt or max_new_tokens, or {self.context_remedy}.")
        rows = []
        done = 0
        while done < n:
            graph = self.decode_graph if n - done == 1 else self.prefill_graph
            take = min(graph.chunk, n - done)
            logits = self._run(graph, ids[done:done + take])
            if n - done - take < logits_to_keep:  # only rows among the last LOGITS_TO_KEEP are kept
                rows.append(logits)
            done += take
        out = np.concatenate(rows) if len(rows) > 1 else rows[0]
        return out[-min(logits_to_keep, n):]

    def step(self, token: int) -> np.ndarray:
        """Append one token; returns its logits (vocab,)."""
        return self.forward([token])[-1]

    def _run(self, graph: StaticGraph, ids: np.ndarray) -> np.ndarray:
        n, c, start = len(ids), graph.chunk, self._length
        padded = np.zeros((1, c), np.int32)
        padded[0, :n] = ids
        # Padded rows get the last real position (a valid rotary row); their outputs are dropped.
        positions = np.minimum(np.arange(start, start + c), start + n - 1).astype(np.int32)[None]
        feeds = {self.io["input_ids"]: padded, self.io["position_ids"]: positions}
        masks = [("attention_mask", 0)] + ([("attention_mask_local", self.window)] if graph.windows else [])
        for key, window in masks:
            name = self.io[key]
            feeds[name] = _quantize(self._mask(graph, start, n, window), graph.quant.get(name))
        for i in range(self.num_layers):
            feeds[self.io["past_key"].format(layer=i)] = self.keys[i]
            feeds[self.io["past_value"].format(layer=i)] = self.values[i]
        if self.feed_hook is not None:
            self.feed_hook(c, feeds)
        outs = dict(zip(graph.output_names, graph.session.run(graph.output_names, feeds)))
        for i in range(self.num_layers):
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                new = self.io[f"new_{kind}"].format(layer=i)
                past = self.io[f"past_{kind}"].format(layer=i)
                bufs[i][:, :, start:start + n] = _requantize(outs[new][:, :, :n], graph.quant.get(new),
                                                             graph.quant.get(past))
        self._length = start + n
        logits = self.io["logits"]
        return _dequantize(outs[logits][0, :n], graph.quant.get(logits))

    def _mask(self, graph: StaticGraph, start: int, n: int, window: int) -> np.ndarray:
        """Additive mask (1, 1, groups * chunk, max_context + chunk): row r (token r % chunk of the
        chunk) sees cache slots [lo, start) and chunk tokens [0, r]; padded rows see only themselves."""
        c, m = graph.chunk, graph.max_context
        mask = np.full((c, m + c), self.mask_value, np.float32)
        for r in range(c):
            if r < n:
                pos = start + r
                lo = max(0, pos - window + 1) if window > 0 else 0
                mask[r, lo:start] = 0.0
                first_new = max(0, lo - start)
                mask[r, m + first_new:m + r + 1] = 0.0
            else:
                mask[r, m + r] = 0.0
        return np.tile(mask, (graph.groups, 1))[None, None]


def _quantize(x: np.ndarray, q: dict | None) -> np.ndarray:
    if q is None:
        return x
    info = np.iinfo(np.dtype(q["dtype"]))
    return np.clip(np.rint(x / q["scale"]) + q["zero_point"], info.min, info.max).astype(q["dtype"])


def _dequantize(x: np.ndarray, q: dict | None) -> np.ndarray:
    if q is None:
        return x
    return (x.astype(np.float32) - np.float32(q["zero_point"])) * np.float32(q["scale"])


def _requantize(x: np.ndarray, src: dict | None, dst: dict | None) -> np.ndarray:
    """New keys/values as the graph wrote them, in the scale the cache is read with."""
    if src is None or src == dst:
        return x
    info = np.iinfo(np.dtype(dst["dtype"]))
    real = (x.astype(np.float32) - np.float32(src["zero_point"])) * np.float32(src["scale"] / dst["scale"])
    return np.clip(np.rint(real) + dst["zero_point"], info.min, info.max).astype(dst["dtype"])

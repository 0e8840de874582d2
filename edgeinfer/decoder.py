"""Run a decoder package's stage graphs over a KV cache, with IO binding.

``forward(ids)`` appends tokens to the cache and returns logits. The one-token
decode path reuses its bindings and preallocated buffers: a step costs one
``run_with_iobinding`` per stage, a few scalar writes, and no allocation.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgeinfer.runtimes import ExecutionTarget, create_session

from .errors import ContextLengthError, PackageError
from .kv_cache import KVCache
from .package import Package


class Stage:
    """One stage graph: its session, the layers it owns, and its IO names."""

    def __init__(self, pkg: Package, entry: dict, target: ExecutionTarget):
        self.name = entry["name"]
        self.first, self.last = (int(v) for v in entry["layers"])
        self.embed = bool(entry.get("embed"))
        self.head = bool(entry.get("head"))
        self.session = create_session(pkg.path(entry["path"]), target)
        io = pkg.manifest["io"]
        self.io = io
        got = {i.name for i in self.session.get_inputs()}
        expected = set(entry.get("inputs", []))
        if expected and got != expected:
            raise PackageError(f"graph '{entry['path']}' does not have the inputs its manifest lists: "
                               "the package is inconsistent, re-export it.")
        self.layer_names = [(io["past_key"].format(layer=i), io["past_value"].format(layer=i),
                             io["present_key"].format(layer=i), io["present_value"].format(layer=i))
                            for i in range(self.first, self.last)]

    def bind_cache(self, binding: ort.IOBinding, cache: KVCache) -> None:
        for i, (pk, pv, ok, ov) in zip(range(self.first, self.last), self.layer_names):
            binding.bind_ortvalue_input(pk, cache.keys[i])
            binding.bind_ortvalue_input(pv, cache.values[i])
            binding.bind_ortvalue_output(ok, cache.keys[i])
            binding.bind_ortvalue_output(ov, cache.values[i])


class StagedDecoder:
    """A decoder package loaded for inference: stages + one KV cache."""

    def __init__(self, pkg: Package, target: ExecutionTarget, max_context: int | None = None):
        kv = pkg.kv_cache
        self.package_context = int(kv["max_context"])
        capacity = min(int(max_context or self.package_context), self.package_context)
        self.stages = [Stage(pkg, e, target) for e in pkg.stages]
        if not self.stages or not self.stages[0].embed or not self.stages[-1].head:
            raise PackageError(f"package '{pkg.root}' has no complete chain of stage graphs: re-export it.")
        self.io = pkg.manifest["io"]
        self.vocab_size = int(pkg.manifest["architecture"]["vocab_size"])
        self.hidden_size = int(pkg.manifest["architecture"]["hidden_size"])
        self.cache = KVCache(int(kv["num_layers"]), int(kv["num_kv_heads"]), int(kv["head_dim"]), capacity)
        self._step_ready = False

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    # -- general path: any number of new tokens --------------------------------
    def forward(self, ids: np.ndarray | list[int], logits_to_keep: int = 1) -> np.ndarray:
        """Append IDS (1-D) at the cache's end; returns logits (logits_to_keep, vocab)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if n == 1 and logits_to_keep == 1:
            return self.step(int(ids[0, 0]))[None]
        self._check_room(n)
        start = self.cache.length
        seqlens = ort.OrtValue.ortvalue_from_numpy(np.array([start + n - 1], np.int32))
        total = ort.OrtValue.ortvalue_from_numpy(np.array(start + n, np.int32))
        keep = ort.OrtValue.ortvalue_from_numpy(np.array([min(logits_to_keep, n)], np.int64))
        hidden = ort.OrtValue.ortvalue_from_numpy(ids)
        for stage in self.stages:
            b = stage.session.io_binding()
            b.bind_ortvalue_input(self.io["input_ids"] if stage.embed else self.io["hidden_in"], hidden)
            b.bind_ortvalue_input(self.io["seqlens_k"], seqlens)
            b.bind_ortvalue_input(self.io["total_sequence_length"], total)
            # The main output is bound first: get_outputs() lists outputs in binding order.
            if stage.head:
                b.bind_ortvalue_input(self.io["logits_to_keep"], keep)
                b.bind_output(self.io["logits"], "cpu")
            else:
                b.bind_output(self.io["hidden_out"], "cpu")
            stage.bind_cache(b, self.cache)
            stage.session.run_with_iobinding(b)
            hidden = b.get_outputs()[0]
        self.cache.length = start + n
        return hidden.numpy()[0]

    # -- decode hot path: one token, everything preallocated ------------------
    def _prepare_step(self) -> None:
        self._ids = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._logits = np.zeros((1, 1, self.vocab_size), np.float32)
        ov = ort.OrtValue.ortvalue_from_numpy
        ids, seqlens, total = ov(self._ids), ov(self._seqlens), ov(self._total)
        keep, logits = ov(np.ones((1,), np.int64)), ov(self._logits)
        self._bindings = []
        hidden = ids
        for stage in self.stages:
            b = stage.session.io_binding()
            b.bind_ortvalue_input(self.io["input_ids"] if stage.embed else self.io["hidden_in"], hidden)
            b.bind_ortvalue_input(self.io["seqlens_k"], seqlens)
            b.bind_ortvalue_input(self.io["total_sequence_length"], total)
            stage.bind_cache(b, self.cache)
            if stage.head:
                b.bind_ortvalue_input(self.io["logits_to_keep"], keep)
                b.bind_ortvalue_output(self.io["logits"], logits)
            else:
                hidden = ov(np.zeros((1, 1, self.hidden_size), np.float32))
                b.bind_ortvalue_output(self.io["hidden_out"], hidden)
            self._bindings.append((stage.session, b))
        self._step_ready = True

    def step(self, token: int) -> np.ndarray:
        """Append one token; returns its logits (vocab,) — a view, valid until the next step."""
        if not self._step_ready:
            self._prepare_step()
        self._check_room(1)
        pos = self.cache.length
        self._ids[0, 0] = token
        self._seqlens[0] = pos
        self._total[...] = pos + 1
        for session, binding in self._bindings:
            session.run_with_iobinding(binding)
        self.cache.length = pos + 1
        return self._logits[0, 0]

    def _check_room(self, n: int) -> None:
        if self.cache.length + n > self.cache.capacity:
            limit = (f"the package allows up to {self.package_context}" if self.capacity < self.package_context
                     else "the package's maximum")
            raise ContextLengthError(
                f"{self.cache.length + n} tokens do not fit the context of {self.capacity} ({limit}): "
                "shorten the prompt or max_new_tokens.")

    def reset(self) -> None:
        self.cache.reset()

"""Run a monolithic decoder graph (the optimum fallback): the KV cache travels as
past/present tensors that grow each step. Same interface as StagedDecoder for the
decode loop and the strategies that need no stages (plain, lookup); slower than
the hand-built graphs, which is why those exist."""

from __future__ import annotations

import numpy as np

from edgeinfer.errors import ContextLengthError
from edgeinfer.package import Package
from edgeinfer.runtimes import ExecutionTarget, create_session

from .base import Decoder


class MonolithicDecoder(Decoder):
    exit_head = None

    def __init__(self, pkg: Package, target: ExecutionTarget, max_context: int | None = None):
        super().__init__()
        entry = pkg.spec.graph("monolithic")
        self.session = create_session(pkg.path(entry.path), target)
        self.package = pkg
        self.io = pkg.spec.io
        kv = pkg.kv_cache
        self.package_context = kv.max_context
        self.capacity = min(int(max_context or self.package_context), self.package_context)
        self.num_layers = kv.num_layers
        self.vocab_size = pkg.spec.vocab_size
        self.shape = (1, kv.num_kv_heads, 0, kv.head_dim)
        self.stages: list = []
        self.reset()

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self.past = [(np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32))
                     for _ in range(self.num_layers)]
        self._length = 0

    def truncate(self, n: int) -> None:
        n = max(0, min(n, self._length))
        self.past = [(k[:, :, :n], v[:, :, :n]) for k, v in self.past]
        self._length = n

    def trim(self, n: int) -> None:
        self.truncate(self._length - n)

    def forward(self, ids, logits_to_keep: int = 1, stages: int | None = None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if self._length + n > self.capacity:
            raise ContextLengthError(f"{self._length + n} tokens do not fit the context of {self.capacity}: "
                                     "shorten the prompt or max_new_tokens.")
        io = self.io
        feeds = {io["input_ids"]: ids}
        if io.get("attention_mask"):
            feeds[io["attention_mask"]] = np.ones((1, self._length + n), np.int64)
        if io.get("position_ids"):
            feeds[io["position_ids"]] = np.arange(self._length, self._length + n, dtype=np.int64)[None]
        for i, (k, v) in enumerate(self.past):
            feeds[io["past_key"].format(layer=i)] = k
            feeds[io["past_value"].format(layer=i)] = v
        names = [io["logits"]] + [io[f"present_{w}"].format(layer=i) for i in range(self.num_layers)
                                  for w in ("key", "value")]
        out = self.session.run(names, feeds)
        self.past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        self._length += n
        return out[0][0, -min(logits_to_keep, n):]

    def step(self, token: int) -> np.ndarray:
        return self.forward([token])[-1]

"""Confidence-based early exit (lossy, CALM style).

Each token climbs the exits in order and leaves at the first whose confidence
(max probability, or top-1 minus top-2 probability) reaches the threshold. The
layers it skipped still get its KV: its hidden state waits as a pending input
of the next stage and is computed, batched with later positions, before any
later token reaches that stage.
"""

from __future__ import annotations

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler, softmax

from .base import Strategy, prefill_full
from .self_speculative import check_threshold


class EarlyExit(Strategy):
    name = "early-exit"

    def __init__(self, decoder: StagedDecoder, threshold: float = 0.9, confidence: str = "max-prob",
                 exit_layer: int | None = None):
        if not decoder.exits:
            raise GenerationError("this package has no early exits: export it with --exits (e.g. --exits 8,16).")
        if confidence not in ("max-prob", "margin"):
            raise GenerationError(f"confidence must be 'max-prob' or 'margin', got {confidence!r}.")
        if exit_layer is not None and exit_layer not in decoder.exits:
            raise GenerationError(f"exit layer {exit_layer} is not in this package (exits: "
                                  f"{', '.join(map(str, sorted(decoder.exits)))}).")
        self.decoder = decoder
        self.threshold = check_threshold(threshold)
        self.confidence = confidence
        exits = sorted(decoder.exits.items())
        self.exits = [e for e in exits if exit_layer is None or e[0] == exit_layer]
        self.num_layers = decoder.stages[-1].last
        self.stats = {"strategy": self.name, "threshold": self.threshold,
                      "exits": {str(layer): 0 for layer, _ in self.exits}, "full": 0, "layers_run": 0,
                      "num_layers": self.num_layers}

    def prefill(self, ids: list[int]) -> np.ndarray:
        return prefill_full(self.decoder, ids)

    def _confident(self, logits: np.ndarray) -> bool:
        p = softmax(logits)
        if self.confidence == "max-prob":
            return float(p.max()) >= self.threshold
        top2 = np.partition(p, -2)[-2:]
        return float(top2[1] - top2[0]) >= self.threshold

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        dec = self.decoder
        first = True
        for layer, stages in self.exits:
            hidden = dec.step_partial(token, stages) if first else dec.catch_up(stages=stages)[-1]
            first = False
            logits = dec.exit_logits(hidden[None], stages)[0]
            # confident after the logits processors: a token an exit picks obeys the same rules
            if self._confident(sampler.penalized(logits, history)):
                self.stats["exits"][str(layer)] += 1
                self._record(layer)
                tok, lp = sampler(logits, history)
                return [(tok, lp, f"exit@{layer}")]
        logits = dec.catch_up() if not first else None
        logits = dec.step(token) if logits is None else logits[-1]
        self.stats["full"] += 1
        self._record(self.num_layers)
        tok, lp = sampler(logits, history)
        return [(tok, lp, "model")]

    def _record(self, depth: int) -> None:
        st = self.stats
        st["layers_run"] += depth
        st["average_depth"] = st["layers_run"] / (sum(st["exits"].values()) + st["full"])
        st["average_depth_fraction"] = st["average_depth"] / self.num_layers

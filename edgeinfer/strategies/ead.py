"""Entropy Adaptive Decoding: the little model writes while it is sure.

The little model decodes; the Shannon entropy of its next-token distribution
(before temperature) is averaged over a rolling window. When that average
rises above ``tau`` the big model takes over — from the uncertain token on,
after catching its cache up on everything it missed in one prefill-style
pass — and hands control back once its own rolling entropy falls to ``tau``
or below, after at least ``min_hold`` tokens. Lossy by design: the result
reports the share of tokens each model wrote and the weights read against the
big model decoding alone.

``entropy_of`` says whose entropy decides: ``"writer"`` (the paper's rule above:
the model writing, so the big model's own entropy hands control back) or
``"little"``: the little model scores every position (its cache never falls
behind) and the big model writes exactly the positions where the little
model's rolling entropy is above ``tau`` (at least ``min_hold`` in a row). On
Qwen2.5-Coder 0.5B/1.5B the little model's entropy is the better signal for
handing back: a teacher-forced replay puts 95% quality at a 36% big-model share
against 44% with the paper's rule (docs/big-little.md). ``edgeinfer calibrate``
chooses between them per pair.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler

from .pair import PairStrategy, entropy

DEFAULT_TAU = 1.5  # nats; see docs/big-little.md for the sweep behind it
ENTROPY_OF = ("writer", "little")  # whose rolling entropy decides (see the module's docstring)


class EntropyAdaptive(PairStrategy):
    name = "ead"

    def __init__(self, big: StagedDecoder, little: StagedDecoder | None = None,
                 exit_layer: int | None = None, tau: float = DEFAULT_TAU, window: int = 5, min_hold: int = 1,
                 entropy_of: str = "writer"):
        if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
            raise GenerationError(f"tau (the entropy threshold, in nats) must be a number >= 0, got {tau!r}.")
        if not isinstance(window, int) or window < 1:
            raise GenerationError(f"window must be an integer >= 1, got {window!r}.")
        if not isinstance(min_hold, int) or min_hold < 1:
            raise GenerationError(f"min_hold must be an integer >= 1, got {min_hold!r}.")
        if entropy_of not in ENTROPY_OF:
            raise GenerationError(f"entropy_of must be one of {', '.join(ENTROPY_OF)}, got {entropy_of!r}.")
        super().__init__(big, little, exit_layer)
        self.tau, self.min_hold, self.entropy_of = float(tau), min_hold, entropy_of
        self.entropies: deque[float] = deque(maxlen=window)
        self.active, self.held = "little", 0
        self.source = "little"
        self.stats.update(tau=self.tau, window=window, entropy_of=entropy_of, switches=0)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.active, self.held = "little", 0
        self.entropies.clear()
        return self._next(self.prompt or list(ids))

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        logits = self._next(history)
        tok, lp = sampler(logits, history)
        return [(tok, lp, self.source)]

    def _rolling(self) -> float:
        return sum(self.entropies) / len(self.entropies)

    def _switch(self, to: str) -> None:
        self.active, self.held = to, 0
        if self.entropy_of == "writer":  # the other model's entropy starts a window of its own
            self.entropies.clear()
        self.stats["switches"] += 1

    def _next(self, seq: list[int]) -> np.ndarray:
        """Logits for the token after SEQ from whichever model holds control (and update who does)."""
        if self.entropy_of == "little":
            return self._next_by_little(seq)
        if self.active == "little":
            logits = self.little.logits(seq)[-1]
            self.entropies.append(entropy(logits))
            if self._rolling() <= self.tau:
                return self._emit("little", logits)
            self._switch("big")  # the uncertain token itself is the big model's
        logits = self.big.logits(seq)[-1]
        self.entropies.append(entropy(logits))
        self.held += 1
        out = self._emit("big", logits)
        if self.held >= self.min_hold and self._rolling() <= self.tau:
            self._switch("little")
        return out

    def _next_by_little(self, seq: list[int]) -> np.ndarray:
        """entropy_of="little": the little model scores the position; the big model writes it when the little
        model's rolling entropy is above tau, or to finish its min_hold."""
        logits = self.little.logits(seq)[-1]
        self.entropies.append(entropy(logits))
        holding = self.active == "big" and self.held < self.min_hold
        to = "big" if holding or self._rolling() > self.tau else "little"
        if to != self.active:
            self._switch(to)
        if to == "little":
            return self._emit("little", logits)
        self.held += 1
        return self._emit("big", self.big.logits(seq)[-1])

    def _emit(self, source: str, logits: np.ndarray) -> np.ndarray:
        self.source = source
        self.count(source)
        self._refresh()
        return logits

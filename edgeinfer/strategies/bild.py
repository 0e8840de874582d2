"""BiLD (Big Little Decoder): fallback and rollback.

The little model decodes while its top probability stays at or above the
fallback threshold, for at most ``draft_len`` tokens. Then the big model runs
once over everything since its last call; the first little token whose
cross-entropy under the big model exceeds the rollback threshold is cut, with
everything after it, and replaced by the big model's own token (when nothing
is cut the big model's token follows the little ones). Both caches are
trimmed to what was kept. Lossy, but bounded: no kept token is one the big
model finds very unlikely. Little tokens are held back until the big model
has checked them, so nothing is ever retracted from the stream.
"""

from __future__ import annotations

import math

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler

from .pair import PairStrategy, max_probability


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float64)
    m = float(np.max(x))
    return float(x[token] - m - np.log(np.exp(x - m).sum()))


class BiLD(PairStrategy):
    name = "bild"

    def __init__(self, big: StagedDecoder, little: StagedDecoder | None = None,
                 exit_layer: int | None = None, fallback_threshold: float = 0.6, rollback_threshold: float = 5.0,
                 draft_len: int = 10):
        if not isinstance(fallback_threshold, (int, float)) or not 0.0 <= fallback_threshold <= 1.0:
            raise GenerationError(f"fallback_threshold must be a probability in [0, 1], got {fallback_threshold!r}.")
        if (not isinstance(rollback_threshold, (int, float)) or math.isnan(rollback_threshold)
                or rollback_threshold < 0):
            raise GenerationError(f"rollback_threshold (a cross-entropy, in nats) must be >= 0, "
                                  f"got {rollback_threshold!r}.")
        if not isinstance(draft_len, int) or draft_len < 1:
            raise GenerationError(f"draft length (BiLD's most little steps in a row) must be an integer >= 1, "
                                  f"got {draft_len!r}.")
        super().__init__(big, little, exit_layer)
        self.fallback, self.rollback, self.max_steps = float(fallback_threshold), float(rollback_threshold), draft_len
        self.stats.update(fallback_threshold=self.fallback, rollback_threshold=self.rollback, big_calls=0,
                          rollbacks=0, fallbacks=0)

    def prefill(self, ids: list[int]) -> np.ndarray:
        tokens = self.prompt or list(ids)
        logits = self.big.logits(tokens)[-1]  # the big model reads the prompt once anyway
        self.count("big")
        return logits

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        seq = history
        room = min(self.big.decoder.capacity, self.little.decoder.capacity) - len(seq) - 1
        drafts: list[int] = []
        while len(drafts) < min(self.max_steps, room):
            ctx = seq + drafts
            logits = self.little.logits(ctx)[-1]
            if max_probability(logits) < self.fallback:
                self.stats["fallbacks"] += 1
                break
            drafts.append(sampler(logits, ctx)[0])
        rows = self.big.logits(seq + drafts, keep=len(drafts) + 1)
        self.stats["big_calls"] += 1
        cut = next((j for j, d in enumerate(drafts) if -_log_softmax_at(rows[j], d) > self.rollback), len(drafts))
        if cut < len(drafts):
            self.stats["rollbacks"] += 1
        out = [(d, sampler.logprob(rows[j], d), "little") for j, d in enumerate(drafts[:cut])]
        tok, lp = sampler(rows[cut], seq + drafts[:cut])
        out.append((tok, lp, "big"))
        self.big.truncate(len(seq) + cut)
        self.little.truncate(len(seq) + cut)
        self.count("little", cut)
        self.count("big")
        self._refresh()
        return out

"""Speculative decoding with a little model (lossless).

The little model drafts tokens; the big model verifies them in one pass and :func:`accept_draft` keeps
the longest prefix it agrees with (greedy) or applies the speculative sampling rule with residual
resampling (sampling), so the output is the big model's. Both caches are trimmed to what was accepted.

How many tokens to draft is decided per step by the cost model (:mod:`.cost_model`): after each drafted
token, one more is drafted only if it is expected to raise tokens per second, given the measured cost of
a draft, the measured cost of a verifying pass as a function of its rows, and the acceptance expected of
drafts as confident as the ones so far (all estimated online, seeded by ``cost_model`` when a calibration
stored one; a model's later generations continue from what its earlier ones learned: :meth:`resume`). When
no draft pays, the round is a plain step of the big model. ``adaptive=False`` drafts
``draft_len`` tokens every round; ``threshold`` stops drafting when the little model's top probability
falls below it.
"""

from __future__ import annotations

import time
import weakref

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler

from .base import accept_draft
from .cost_model import CostModel, OnlineCosts
from .pair import PairStrategy, max_probability
from .self_speculative import check_threshold

# Draft lengths of the first rounds when no stored cost model seeds the estimates: a plain step (the
# cost of one row) and rounds of several lengths (the cost of a draft and of passes over 2..6 rows).
WARMUP = (0, 2, 4, 1, 5, 3)
PROBE_EVERY = 12  # rounds without a draft before one draft is tried again (acceptance keeps being measured)


class Speculative(PairStrategy):
    name = "speculative"

    def __init__(self, big: StagedDecoder, little: StagedDecoder | None = None,
                 exit_layer: int | None = None, draft_len: int = 8, threshold: float = 0.0,
                 adaptive: bool = True, cost_model: CostModel | None = None):
        if not isinstance(draft_len, int) or draft_len < 1:
            raise GenerationError(f"draft length must be an integer >= 1, got {draft_len!r}.")
        super().__init__(big, little, exit_layer)
        self.threshold = check_threshold(threshold)
        self.max_k, self.adaptive = draft_len, adaptive
        self.online = OnlineCosts(max_k=draft_len, prior=cost_model)
        self.warmup = [] if cost_model is not None else [min(k, draft_len) for k in WARMUP]
        self.idle = 0
        self.stats.update(rounds=0, drafted=0, accepted=0, draft_lengths={},
                          cost_model="stored" if cost_model is not None else "measured online")

    def resume(self, learned: dict) -> None:
        """Continue from the estimates an earlier generation of this pair left (no warm-up rounds, the acceptance
        map already learned: short generations would otherwise spend a good part of their rounds measuring)."""
        key = (self.name, id(self.little.decoder), self.little.stages, self.max_k)
        drafter, earlier = learned.get(key, (None, None))
        if drafter is not None and drafter() is self.little.decoder and earlier.ready:  # not a freed one's id
            self.online, self.warmup = earlier, []
            self.stats["cost_model"] = "learned by earlier generations"
        else:
            learned[key] = (weakref.ref(self.little.decoder), self.online)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.count("big")
        prompt = self.prompt or list(ids)
        logits = self.big.logits(prompt)[-1]
        if self.little.decoder is not self.big.decoder:  # the little model reads the prompt now, not in the
            self.little.logits(prompt)  # first draft's timing (an exit of the big model shares its cache)
        return logits

    def _draft_limit(self, seq: list[int]) -> int:
        room = min(self.big.decoder.capacity, self.little.decoder.capacity) - len(seq) - 1
        left = self.tokens_left - 1 if self.tokens_left else self.max_k  # a round emits accepted + 1 tokens
        return max(0, min(self.max_k, room, left))

    def _wants_more(self, confidences: list[float]) -> bool:
        if not self.adaptive:
            return True
        if self.warmup:
            return len(confidences) < self.warmup[0]
        if self.online.keep_drafting(confidences):
            return True
        if not confidences and self.idle >= PROBE_EVERY:  # keep measuring acceptance while not drafting
            return True
        return False

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        seq = history
        k_max = self._draft_limit(seq)
        drafts: list[int] = []
        confidences: list[float] = []
        dists: list[np.ndarray] = []
        timed = [0, 0.0]  # drafts whose call fed at most 2 rows, and their seconds
        while len(drafts) < k_max and self._wants_more(confidences):
            ctx = seq + drafts
            started = time.perf_counter()
            lag = len(ctx) - self.little.length  # rows this call feeds: more after plain rounds (catching up)
            logits = self.little.logits(ctx)[-1]
            if sampler.greedy:
                d = int(np.argmax(sampler.penalized(logits, ctx)))
                conf = max_probability(logits)
            else:
                q = sampler.probabilities(logits, ctx)
                conf = float(q.max())
                d = int(sampler.rng.choice(len(q), p=q))
            if conf < self.threshold:
                break
            drafts.append(d)
            confidences.append(conf)
            if not sampler.greedy:
                dists.append(q)
            if lag <= 2:  # a catch-up is not the cost of a draft: timed, it would stop drafting after plain rounds
                timed[0] += 1
                timed[1] += time.perf_counter() - started
        t1 = time.perf_counter()
        fed_before = self.big.length
        rows = self.big.logits(seq + drafts, keep=len(drafts) + 1)
        verify_rows = len(seq) + len(drafts) - fed_before
        out = accept_draft(sampler, rows, drafts, None if sampler.greedy else dists, history, bonus=True)
        t2 = time.perf_counter()
        accepted = len(out) - 1
        self.big.truncate(len(seq) + accepted)
        self.little.truncate(len(seq) + accepted)
        self._learn(drafts, confidences, accepted, timed, verify_rows, t2 - t1)
        self.count("little", accepted)
        self.count("big")
        return [(t, lp, "little" if i < accepted else "big") for i, (t, lp) in enumerate(out)]

    def _learn(self, drafts: list[int], confidences: list[float], accepted: int, timed_drafts: list,
               verify_rows: int, verify_s: float) -> None:
        """Update the statistics and the online estimates after a round; TIMED_DRAFTS: [drafts, seconds] of the
        drafts timed (those whose call was not a catch-up)."""
        st = self.stats
        k = len(drafts)
        if self.warmup:
            self.warmup.pop(0)
        self.idle = 0 if k else self.idle + 1
        st["rounds"] += 1
        st["drafted"] += k
        st["accepted"] += accepted
        st["draft_lengths"][k] = st["draft_lengths"].get(k, 0) + 1
        st["acceptance_rate"] = st["accepted"] / st["drafted"] if st["drafted"] else None
        st["tokens_per_verify"] = (st["accepted"] + st["rounds"]) / st["rounds"]
        self.online.record_timing(timed_drafts[0], timed_drafts[1], max(1, verify_rows), verify_s)
        if k:
            self.online.record_acceptance(confidences, accepted)
        on = self.online
        st["estimates"] = {"draft_ms": round(1e3 * on.draft_s, 2) if on.draft_s else None,
                           "verify_ms": {r: round(1e3 * s, 2) for r, s in sorted(on.verify_s.items())}}
        self._refresh()

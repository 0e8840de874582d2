"""The cost model of draft-and-verify decoding (speculative with a little model, self-speculative with an exit).

A round drafts k tokens with the cheap model, each costing ``draft_s``, then the big model verifies them
in one pass over k + 1 rows (the last emitted token and the k drafts), costing ``verify(k + 1)``. Draft j
is accepted with probability α_j given that drafts 1..j-1 were (greedy: the big model's argmax equals it),
and the pass always yields one token of the big model's own after the accepted ones, so a round gives

    E(k) = 1 + Σ_{i=1..k} Π_{j≤i} α_j  tokens  in  C(k) = k · draft_s + verify(k + 1)  seconds,

against ``verify(1)`` per token for the big model alone: speedup(k) = E(k) · verify(1) / C(k).
``verify`` is a measured table (rows → seconds), not a formula: on a CPU a pass over one row reads every
weight once (memory-bound), while each extra row adds compute that, on 2 cores and a 1.5B model, is
not small; it is extended linearly beyond its last measured row.

:class:`OnlineCosts` keeps these quantities up to date while decoding (exponential averages of the timings,
decayed counts of acceptance per draft position and per confidence of the drafter), and
:meth:`OnlineCosts.keep_drafting` decides after every drafted token whether one more is worth its cost:
the draft length is chosen per step, from the confidence of the drafts so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CONFIDENCE_BINS = 10  # the drafter's top probability, in tenths


@dataclass
class CostModel:
    """Measured costs (seconds) and acceptance of one drafter/verifier pair on one machine."""

    draft_s: float
    verify_s: dict[int, float]  # rows -> seconds of one verifying pass (rows = 1: a plain step)
    acceptance: list[float]  # α_1, α_2, ...: P(draft j accepted | drafts before it accepted)

    def verify(self, rows: int) -> float:
        table = self.verify_s
        if rows in table:
            return table[rows]
        known = sorted(table)
        if rows < known[0]:
            return table[known[0]]
        lo = [r for r in known if r < rows]
        hi = [r for r in known if r > rows]
        if hi and lo:  # interpolate
            a, b = lo[-1], hi[0]
            return table[a] + (table[b] - table[a]) * (rows - a) / (b - a)
        if len(known) >= 2 and known[-1] > 1:  # extend the last stretch (multi-row passes) linearly
            a, b = (known[-2], known[-1]) if known[-2] > 1 else (known[-1], known[-1])
            slope = (table[b] - table[a]) / (b - a) if b != a else 0.0
            return table[b] + max(slope, 0.0) * (rows - b)
        return table[known[-1]]

    def alpha(self, j: int) -> float:
        """α_j (1-based); past the measured positions, the last one."""
        if not self.acceptance:
            return 0.0
        return self.acceptance[min(j, len(self.acceptance)) - 1]

    def expected_tokens(self, k: int) -> float:
        e, p = 1.0, 1.0
        for j in range(1, k + 1):
            p *= self.alpha(j)
            e += p
        return e

    def round_s(self, k: int) -> float:
        return k * self.draft_s + self.verify(k + 1)

    def speedup(self, k: int) -> float:
        """Tokens per second of rounds of K drafts over the big model alone's."""
        return self.expected_tokens(k) * self.verify(1) / self.round_s(k) if k > 0 else 1.0

    def best(self, max_k: int = 12) -> tuple[int, float]:
        """The fixed draft length with the highest speedup (0: drafting does not pay)."""
        k = max(range(0, max_k + 1), key=self.speedup)
        return k, self.speedup(k)

    def project(self, memory: float, compute: float) -> CostModel:
        """The same pair on a machine whose memory reads are MEMORY times faster and whose arithmetic is
        COMPUTE times faster: a one-row pass is taken as pure weight reading, each further row as pure
        arithmetic (what the measured table shows on a CPU), and a draft as a one-row pass."""
        one = self.verify(1)
        table = {r: one / memory + max(0.0, s - one) / compute for r, s in self.verify_s.items()}
        return CostModel(self.draft_s / memory, table, list(self.acceptance))

    def to_dict(self) -> dict:
        return {"draft_s": self.draft_s, "verify_s": {str(r): s for r, s in sorted(self.verify_s.items())},
                "acceptance": list(self.acceptance)}

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(float(d["draft_s"]), {int(r): float(s) for r, s in d["verify_s"].items()},
                   [float(a) for a in d["acceptance"]])


def acceptance_by_position(agree: list[bool], max_k: int) -> list[float]:
    """α_j from a token-by-token agreement trace (the drafter's greedy token equals the big model's, each
    conditioned on the big model's own prefix): among start positions whose first j-1 drafts agree, the
    share whose j-th does too."""
    runs = run_lengths(agree)
    out = []
    for j in range(1, max_k + 1):
        reached = sum(1 for r in runs if r >= j - 1)
        out.append(sum(1 for r in runs if r >= j) / reached if reached else 0.0)
    return out


def run_lengths(agree: list[bool]) -> list[int]:
    """For every position t, how many consecutive agreements start at t."""
    out = [0] * len(agree)
    run = 0
    for t in range(len(agree) - 1, -1, -1):
        run = run + 1 if agree[t] else 0
        out[t] = run
    return out


def simulate(agree: list[bool], model: CostModel, draft_len) -> tuple[float, float]:
    """Replay a greedy agreement trace through rounds whose draft length is DRAFT_LEN(t) at position t
    (an int for a fixed length): returns (tokens, seconds). Exact for greedy decoding with a fixed
    length: which drafts are accepted depends only on the trace."""
    runs = run_lengths(agree)
    t, tokens, seconds = 0, 0, 0.0
    while t < len(agree):
        k = draft_len(t) if callable(draft_len) else draft_len
        m = min(runs[t], k)
        seconds += model.round_s(k) if k else model.verify(1)
        tokens += m + 1
        t += m + 1
    return tokens, seconds


def oracle_speedup(agree: list[bool], model: CostModel, max_k: int = 16) -> float:
    """The ceiling of any draft-length rule: every round drafts exactly the tokens that will be accepted
    (none where the first draft would fail), so no draft is wasted."""
    runs = run_lengths(agree)
    tokens, seconds = simulate(agree, model, lambda t: min(runs[t], max_k))
    return tokens * model.verify(1) / seconds if seconds else 1.0


@dataclass
class OnlineCosts:
    """Running estimates of a pair's costs and acceptance, and the per-step draft-length rule.

    Timings are exponential averages; acceptance counts decay (``decay`` per update) so the estimates
    follow the text. PRIOR (a stored :class:`CostModel`, e.g. from ``edgeinfer calibrate``) seeds them;
    without one the first rounds measure them.
    """

    max_k: int = 8
    prior: CostModel | None = None
    decay: float = 0.98
    draft_s: float | None = None
    verify_s: dict[int, float] = field(default_factory=dict)
    # per confidence bin of the drafter: [accepted, drafted] (decayed), seeded with the bin's centre
    by_confidence: list[list[float]] = field(default_factory=list)
    # a round's first draft, before its confidence is known: [accepted, drafted] (decayed), seeded with α_1
    first: list[float] = field(default_factory=list)

    def __post_init__(self):
        alpha_1 = 0.7
        if self.prior is not None:
            self.draft_s = self.prior.draft_s
            self.verify_s = dict(self.prior.verify_s)
            alpha_1 = self.prior.alpha(1) if self.prior.acceptance else alpha_1
        self.by_confidence = [[(b + 0.5) / CONFIDENCE_BINS, 1.0] for b in range(CONFIDENCE_BINS)]
        self.first = [2.0 * alpha_1, 2.0]

    @property
    def ready(self) -> bool:
        return self.draft_s is not None and 1 in self.verify_s and len(self.verify_s) >= 2

    def model(self) -> CostModel:
        return CostModel(self.draft_s or 0.0, dict(self.verify_s), [])

    def verify(self, rows: int) -> float:
        return self.model().verify(rows)

    def acceptance(self, confidence: float) -> float:
        """Estimated probability that a draft whose drafter gave it top probability CONFIDENCE is accepted."""
        acc, n = self.by_confidence[_bin(confidence)]
        return acc / n

    def record_timing(self, drafted: int, draft_s: float, rows: int, verify_s: float) -> None:
        ema = lambda old, new: new if old is None else 0.8 * old + 0.2 * new  # noqa: E731
        if drafted:
            self.draft_s = ema(self.draft_s, draft_s / drafted)
        self.verify_s[rows] = ema(self.verify_s.get(rows), verify_s)

    def record_acceptance(self, confidences: list[float], accepted: int) -> None:
        """The drafts of one round (their drafter confidences) and how many were accepted (a prefix)."""
        if confidences:
            self.first = [self.decay * self.first[0] + (1.0 if accepted else 0.0), self.decay * self.first[1] + 1.0]
        for j, c in enumerate(confidences):
            if j > accepted:  # after the first rejection nothing was tested
                break
            row = self.by_confidence[_bin(c)]
            row[0] = self.decay * row[0] + (1.0 if j < accepted else 0.0)
            row[1] = self.decay * row[1] + 1.0

    def keep_drafting(self, confidences: list[float]) -> bool:
        """After drafting len(CONFIDENCES) tokens: is one more draft expected to raise tokens per second?

        E and C of the round so far use each draft's own acceptance estimate; the next draft is expected
        to be accepted as often as the last one was likely to be (confidence runs in streaks), a round's
        first as often as first drafts have been. Looking up
        to three drafts ahead lets a run of confident drafts outgrow a step in the verification cost."""
        i = len(confidences)
        if i >= self.max_k:
            return False
        if not self.ready:
            return i < 2  # measure a few short rounds first
        p, e = 1.0, 1.0
        for c in confidences:
            p *= self.acceptance(c)
            e += p
        cost = i * self.draft_s + self.verify(i + 1)
        rate = e / cost
        a_next = self.acceptance(confidences[-1]) if confidences else self.first[0] / self.first[1]
        gain, q = 0.0, p
        for h in range(1, min(3, self.max_k - i) + 1):
            q *= a_next
            gain += q
            if (e + gain) / (cost + h * self.draft_s + self.verify(i + 1 + h) - self.verify(i + 1)) > rate:
                return True
        return False


def _bin(confidence: float) -> int:
    if not math.isfinite(confidence):
        return 0
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))

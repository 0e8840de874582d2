"""Self-speculative decoding (lossless; LayerSkip / Kangaroo style) and its
adaptive variant (DEL style), which also takes prompt-lookup drafts whenever the context offers one.

Draft: run each token through the stages before an exit and read the exit
head. Verify: run the remaining stages once over all drafted positions (their
first stages' KV is reused as is), accept by :func:`accept_draft`, trim every
stage's cache to what was accepted.

Cost model (per round, k drafts at exit e): k·c_draft(e) + c_verify(e, k);
expected tokens per round E = Σ_{j=1..k} α_e^j + (1 − α_e^k), α_e the per-token
acceptance at exit e. Plain decoding costs c_full per token. A round pays off
when E / cost > 1 / c_full. ``adaptive`` measures c and α online and picks the
(exit, k) with the best E / cost, falling back to plain steps (with occasional
probes) when no exit pays off.
"""

from __future__ import annotations

import time

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler, softmax

from .base import Strategy, accept_draft, prefill_full
from .lookup import PromptLookup


def exit_stages(decoder: StagedDecoder, exit_layer: int | None) -> tuple[int, int]:
    """(exit layer, stages to run) for EXIT_LAYER (default: the deepest exit)."""
    if not decoder.exits:
        raise GenerationError("this package has no early exits: export it with --exits (e.g. --exits 8,16).")
    if exit_layer is None:
        exit_layer = max(decoder.exits)
    if exit_layer not in decoder.exits:
        raise GenerationError(f"exit layer {exit_layer} is not in this package (exits: "
                              f"{', '.join(map(str, sorted(decoder.exits)))}).")
    return exit_layer, decoder.exits[exit_layer]


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise GenerationError(f"threshold must be in [0, 1], got {threshold!r}.")
    return float(threshold)


class SelfSpeculative(Strategy):
    name = "self-speculative"

    def __init__(self, decoder: StagedDecoder, exit_layer: int | None = None, draft_len: int = 4,
                 threshold: float = 0.0):
        if draft_len < 1:
            raise GenerationError(f"draft length must be >= 1, got {draft_len}.")
        self.decoder = decoder
        self.exit_layer, self.exit_stage = exit_stages(decoder, exit_layer)
        self.draft_len = draft_len
        self.threshold = check_threshold(threshold)
        self.stats = {"strategy": self.name, "exit_layer": self.exit_layer, "draft_len": draft_len,
                      "threshold": self.threshold, "rounds": 0, "drafted": 0, "accepted": 0, "emitted": 0}

    def prefill(self, ids: list[int]) -> np.ndarray:
        return prefill_full(self.decoder, ids)

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        out, _ = self.round(token, sampler, history, self.exit_stage, self.draft_len)
        return out

    def round(self, token: int, sampler: Sampler, history: list[int], exit_stage: int, k: int):
        """One draft-verify round; returns (emitted, (drafted, accepted))."""
        dec = self.decoder
        k = max(1, min(k, dec.capacity - dec.length - 1, self.tokens_left or k))
        drafts: list[int] = []
        dists: list[np.ndarray] = []
        t, fed = token, 0
        while len(drafts) < k:
            hidden = dec.step_partial(t, exit_stage)
            fed += 1
            logits = dec.exit_logits(hidden[None], exit_stage)[0]
            if sampler.greedy:  # confidence, as the token, after the logits processors
                scores = sampler.penalized(logits, history + drafts)
                d = int(np.argmax(scores))
                conf = float(softmax(scores).max()) if self.threshold > 0 else 1.0
            else:
                q = sampler.probabilities(logits, history + drafts)
                d = int(sampler.rng.choice(len(q), p=q))
                conf = float(q.max())
                dists.append(q)
            if conf < self.threshold:
                if not sampler.greedy:
                    dists.pop()
                break
            drafts.append(d)
            t = d
        target = dec.catch_up(logits_to_keep=fed)
        out = accept_draft(sampler, target, drafts, dists if not sampler.greedy else None, history,
                           bonus=fed > len(drafts))
        dec.trim(fed - len(out))
        accepted = sum(1 for i, (tok, _) in enumerate(out) if i < len(drafts) and tok == drafts[i])
        st = self.stats
        st["rounds"] += 1
        st["drafted"] += len(drafts)
        st["accepted"] += accepted
        st["emitted"] += len(out)
        st["acceptance_rate"] = st["accepted"] / max(1, st["drafted"])
        st["tokens_per_verify"] = st["emitted"] / st["rounds"]
        return [(tok, lp, "draft" if i < accepted else "model") for i, (tok, lp) in enumerate(out)], \
            (len(drafts), accepted)


class AdaptiveSelfSpeculative(SelfSpeculative):
    """Chooses the exit and the draft length online from measured acceptance and cost."""

    name = "adaptive"
    PROBE_EVERY = 16

    def __init__(self, decoder: StagedDecoder, exit_layer: int | None = None, draft_len: int = 6,
                 threshold: float = 0.0):
        super().__init__(decoder, exit_layer, draft_len, threshold)
        self.candidates = sorted(decoder.exits.items()) if exit_layer is None else [(self.exit_layer,
                                                                                       self.exit_stage)]
        self.alpha = {layer: 0.5 for layer, _ in self.candidates}  # prior acceptance
        self.round_cost: dict[int, list[float]] = {layer: [] for layer, _ in self.candidates}
        self.draft_cost: dict[int, float] = {}
        self.full_cost: float | None = None
        self.since_probe = 0
        # n-gram drafts from the context cost nothing to propose: try them first.
        self.lookup = PromptLookup(decoder, draft_len=8)
        self.stats.update(strategy=self.name, exit_layer=None, plain_steps=0, lookup_rounds=0, choices={})

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.lookup.prefill(ids)

    def _expected(self, alpha: float, k: int) -> float:
        return sum(alpha ** j for j in range(1, k + 1)) + 1 - alpha ** k

    def _choose(self) -> tuple[int, int, int] | None:
        """Best (layer, stages, k) by expected tokens per second, or None for a plain step."""
        best, best_rate = None, (1.0 / self.full_cost) if self.full_cost else 0.0
        for layer, stages in self.candidates:
            c_d = self.draft_cost.get(layer)
            if c_d is None:
                return layer, stages, 2  # measure every exit once
            c_v = max(self.full_cost or 0.0, 0.0)  # verifying k tokens costs about one full pass
            for k in range(1, self.draft_len + 1):
                rate = self._expected(self.alpha[layer], k) / (k * c_d + c_v)
                if rate > best_rate:
                    best, best_rate = (layer, stages, k), rate
        return best

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        lk = self.lookup
        if len(lk.index.tokens) < len(history):
            lk.index.extend(history[len(lk.index.tokens):])
        if lk.index.propose(1):
            lk.tokens_left = self.tokens_left
            out = lk.advance(token, sampler, history)
            self.stats["lookup_rounds"] += 1
            self.stats["emitted"] += len(out)
            self._refresh()
            return out
        choice = self._choose() if self.full_cost else None
        self.since_probe += 1
        if choice is None and self.full_cost and self.since_probe >= self.PROBE_EVERY:
            layer, stages = max(self.candidates, key=lambda c: self.alpha[c[0]])
            choice, self.since_probe = (layer, stages, 1), 0
        if choice is None:
            t0 = time.perf_counter()
            tok, lp = sampler(self.decoder.step(token), history)
            dt = time.perf_counter() - t0
            self.full_cost = dt if self.full_cost is None else 0.9 * self.full_cost + 0.1 * dt
            self.stats["plain_steps"] += 1
            self.stats["emitted"] += 1
            self._refresh()
            return [(tok, lp, "model")]
        layer, stages, k = choice
        t0 = time.perf_counter()
        out, (drafted, accepted) = self.round(token, sampler, history, stages, k)
        dt = time.perf_counter() - t0
        if drafted:
            a = accepted / drafted
            self.alpha[layer] = 0.8 * self.alpha[layer] + 0.2 * a
            per_draft = max(1e-6, (dt - (self.full_cost or 0.0)) / drafted)
            old = self.draft_cost.get(layer)
            self.draft_cost[layer] = per_draft if old is None else 0.9 * old + 0.1 * per_draft
        key = f"exit{layer}/k{k}"
        self.stats["choices"][key] = self.stats["choices"].get(key, 0) + 1
        self.stats["alpha"] = {str(k_): round(v, 3) for k_, v in self.alpha.items()}
        self._refresh()
        return out

    def _refresh(self) -> None:
        """Acceptance and tokens per verification over exit and lookup rounds together."""
        st, lk = self.stats, self.lookup.stats
        drafted, accepted = st["drafted"] + lk["drafted"], st["accepted"] + lk["accepted"]
        verifies = st["rounds"] + lk["verify_calls"]
        st["acceptance_rate"] = accepted / drafted if drafted else None
        st["tokens_per_verify"] = (accepted + verifies) / verifies if verifies else None

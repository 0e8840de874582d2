"""Prompt-lookup decoding (lossless, draftless): when the last n tokens occurred
before in the prompt or the text so far, propose the tokens that followed them,
and verify the whole proposal in one full-depth pass. Summaries, edits and code
repeat their context, so long proposals are often accepted."""

from __future__ import annotations

import time

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler

from .base import Strategy, accept_draft, prefill_full


class NgramIndex:
    """Most recent end position of every n-gram (n in [n_min, n_max]) of a token list."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.last_end: dict[tuple, int] = {}

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            # Index the n-grams ending at the old end before adding T: the tail itself
            # is never its own match.
            end = len(self.tokens)
            for n in range(self.n_min, self.n_max + 1):
                if end >= n:
                    self.last_end[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        toks = self.tokens
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(toks) < n:
                continue
            end = self.last_end.get(tuple(toks[-n:]))
            if end is not None and end < len(toks):
                return toks[end:end + k]
        return []


class DraftLengthPolicy:
    """Chooses how many proposed tokens to verify, from measured costs and acceptance.

    Verifying k drafted tokens costs ``c_step + k * c_token`` (one decode step plus
    the extra rows; on a CPU where the int4 kernels are compute-bound for several
    rows, c_token is ~0.2 of c_step), and yields ``1 + sum_{j<k} P(drafts 0..j all
    accepted)`` tokens. Acceptance is tracked per draft position, conditioned on
    the earlier positions being accepted, because copies come in runs: once a
    lookup draft has matched four tokens, the fifth is likelier to match than the
    first was. k = 0 (a plain step) is chosen when no k beats it.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        # Prior counts: the first drafted token is accepted half the time, each later one (given the
        # earlier ones were) three times in four. Optimistic for deep positions so that they get tried.
        self.tried = np.full(max_len, 2.0)
        self.kept = np.full(max_len, 1.5)
        self.kept[0] = 1.0
        self.c_step: float | None = None  # seconds per plain step (one row)
        self.c_token: float | None = None  # seconds per extra verified row

    def observe_step(self, seconds: float) -> None:
        self.c_step = seconds if self.c_step is None else 0.9 * self.c_step + 0.1 * seconds

    def observe_verify(self, drafted: int, accepted: int, seconds: float) -> None:
        positions = min(drafted, accepted + 1)  # positions whose outcome was seen
        self.tried[:positions] += 1
        self.kept[:accepted] += 1
        if self.c_step is not None and drafted:
            per = max(0.0, (seconds - self.c_step) / drafted)
            self.c_token = per if self.c_token is None else 0.9 * self.c_token + 0.1 * per

    def choose(self, available: int) -> int:
        k_max = min(available, self.max_len)
        if self.c_step is None or self.c_token is None:
            return k_max  # measure first
        run = np.cumprod(self.kept[:k_max] / self.tried[:k_max])
        gain = 1.0 + np.cumsum(run)  # tokens per round for k = 1..k_max
        rate = gain / (self.c_step + self.c_token * np.arange(1, k_max + 1))
        best = int(np.argmax(rate)) if k_max else -1
        return best + 1 if k_max and rate[best] > 1.0 / self.c_step else 0


class PromptLookup(Strategy):
    name = "lookup"

    def __init__(self, decoder: StagedDecoder, draft_len: int = 8, ngram_max: int = 4, ngram_min: int = 2):
        if draft_len < 1:
            raise GenerationError(f"draft length must be >= 1, got {draft_len}.")
        self.decoder = decoder
        self.draft_len = draft_len
        self.policy = DraftLengthPolicy(draft_len)
        self.index = NgramIndex(ngram_min, ngram_max)
        self.stats = {"strategy": self.name, "rounds": 0, "drafted": 0, "accepted": 0, "verify_calls": 0,
                      "plain_steps": 0}
        self._since_step = self.REMEASURE_EVERY  # the first round is a plain step: it measures c_step

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.index = NgramIndex(self.index.n_min, self.index.n_max)
        return prefill_full(self.decoder, ids)

    # Re-measure a plain step this often, so the cost model follows the machine's load.
    REMEASURE_EVERY = 64

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        if len(self.index.tokens) < len(history):
            self.index.extend(history[len(self.index.tokens):])
        room = self.decoder.capacity - self.decoder.length - 1
        if self.tokens_left is not None:  # a verification emits the accepted drafts and one more token
            room = min(room, self.tokens_left - 1)
        draft = self.index.propose(min(self.draft_len, room))
        self.stats["rounds"] += 1
        self._since_step += 1
        if draft and self._since_step <= self.REMEASURE_EVERY:
            draft = draft[:self.policy.choose(len(draft))]
        if not draft:
            t0 = time.perf_counter()
            tok, lp = sampler(self.decoder.step(token), history)
            self.policy.observe_step(time.perf_counter() - t0)
            self._since_step = 0
            self.stats["plain_steps"] += 1
            return [(tok, lp, "model")]
        t0 = time.perf_counter()
        logits = self.decoder.forward([token, *draft], logits_to_keep=len(draft) + 1)
        out = accept_draft(sampler, logits, draft, None, history, bonus=True)
        self.policy.observe_verify(len(draft), len(out) - 1, time.perf_counter() - t0)
        accepted = len(out) - 1
        # Fed: token + draft. Keep token + the accepted drafts; the last emitted token is fed next round.
        self.decoder.trim(len(draft) - accepted)
        self.stats["drafted"] += len(draft)
        self.stats["accepted"] += accepted
        self.stats["verify_calls"] += 1
        self.stats["acceptance_rate"] = self.stats["accepted"] / max(1, self.stats["drafted"])
        self.stats["tokens_per_verify"] = (self.stats["accepted"] + self.stats["verify_calls"]) / self.stats[
            "verify_calls"]
        return [(t, lp, "draft" if i < accepted else "model") for i, (t, lp) in enumerate(out)]

"""Prompt-lookup decoding (lossless, draftless): when the last n tokens occurred
before in the prompt or the text so far, propose the tokens that followed them,
and verify the whole proposal in one full-depth pass. Summaries, edits and code
repeat their context, so long proposals are often accepted."""

from __future__ import annotations

import numpy as np

from edgeinfer.decoder import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.sampling import Sampler

from .base import accept_draft, prefill_full


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


class PromptLookup:
    name = "lookup"

    def __init__(self, decoder: StagedDecoder, draft_len: int = 8, ngram_max: int = 4, ngram_min: int = 2):
        if draft_len < 1:
            raise GenerationError(f"draft length must be >= 1, got {draft_len}.")
        self.decoder = decoder
        self.draft_len = draft_len
        self.k = draft_len  # current proposal length: shrinks after rejections, grows after full accepts
        self.index = NgramIndex(ngram_min, ngram_max)
        self.stats = {"strategy": self.name, "rounds": 0, "drafted": 0, "accepted": 0, "verify_calls": 0}

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.index = NgramIndex(self.index.n_min, self.index.n_max)
        return prefill_full(self.decoder, ids)

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        if len(self.index.tokens) < len(history):
            self.index.extend(history[len(self.index.tokens):])
        room = self.decoder.capacity - self.decoder.length - 1
        draft = self.index.propose(min(self.k, room))
        self.stats["rounds"] += 1
        if not draft:
            tok, lp = sampler(self.decoder.step(token), history)
            return [(tok, lp, "model")]
        logits = self.decoder.forward([token, *draft], logits_to_keep=len(draft) + 1)
        out = accept_draft(sampler, logits, draft, None, history, bonus=True)
        accepted = len(out) - 1
        # Fed: token + draft. Keep token + the accepted drafts; the last emitted token is fed next round.
        self.decoder.trim(len(draft) - accepted)
        self.k = min(self.draft_len, self.k + 2) if accepted == len(draft) else max(2, accepted + 1)
        self.stats["drafted"] += len(draft)
        self.stats["accepted"] += accepted
        self.stats["verify_calls"] += 1
        self.stats["acceptance_rate"] = self.stats["accepted"] / max(1, self.stats["drafted"])
        self.stats["tokens_per_verify"] = (self.stats["accepted"] + self.stats["verify_calls"]) / self.stats[
            "verify_calls"]
        return [(t, lp, "draft" if i < accepted else "model") for i, (t, lp) in enumerate(out)]

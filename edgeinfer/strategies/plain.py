"""Plain decoding: one full-depth forward per token."""

from __future__ import annotations

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.generation import Sampler

from .base import Strategy, prefill_full


class Plain(Strategy):
    name = "plain"

    def __init__(self, decoder: StagedDecoder):
        self.decoder = decoder
        self.stats: dict = {"strategy": self.name}

    def prefill(self, ids: list[int]) -> np.ndarray:
        return prefill_full(self.decoder, ids)

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        tok, lp = sampler(self.decoder.step(token), history)
        return [(tok, lp, "model")]

"""One sequence of an encoder-decoder package's decoder behind the decoder protocol."""

from __future__ import annotations

import numpy as np

from edgeinfer.decoders.base import Decoder
from edgeinfer.errors import ContextLengthError


class Seq2SeqDecoder(Decoder):
    """One sequence of an encoder-decoder package's decoder over fixed cross K/V, behind the
    decoder protocol (edgeinfer.decoders.base), so that the strategies and the one decode loop
    (edgeinfer.generation.loop) run on it. A staged package (``export --exits/--stages``) is a
    staged decoder: its exits serve early exit and self-speculative decoding.
    LOGITS_LOG: a list that receives the logits row of every full-depth position the decoder
    returns (plain decoding: one per token), to score the tokens without another pass."""

    def __init__(self, model, cross: list[np.ndarray], logits_log: list[np.ndarray] | None = None):
        super().__init__()
        self.model, self.cross, self.logits_log = model, cross, logits_log
        self.state = model.new_state(cross, 1)
        self.capacity = model.max_target_positions
        self.vocab_size = model.vocab_size
        self.stages = model.stages
        self.staged = bool(self.stages)
        self.exits = dict(model.exits)

    @property
    def length(self) -> int:
        return self.state.length

    def forward(self, ids, logits_to_keep: int = 1, stages: int | None = None) -> np.ndarray:
        """Feed IDS (1-D) through the first STAGES stages (all by default): the logits
        (logits_to_keep, V) of the last positions, from the exit head below full depth."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        if self.length + ids.shape[1] > self.capacity:
            raise ContextLengthError(f"the decoder holds {self.capacity} positions: ask for fewer new tokens.")
        if stages is not None and stages < len(self.stages):
            return self.exit_logits(self.state.forward(ids, stages)[0, -logits_to_keep:], stages)
        return self._logged(self.state.forward(ids)[0, -logits_to_keep:])

    def step(self, token: int) -> np.ndarray:
        return self.forward([token])[0]

    @property
    def pending(self) -> list:
        return self.state.pending

    def stage_length(self, s: int) -> int:
        return self.state.stage_length(s)

    def step_partial(self, token: int, stages: int) -> np.ndarray:
        """One token through the first STAGES stages: that stage's output (D,), left pending."""
        return self.state.forward(np.asarray([[token]], np.int64), stages)[0, -1]

    def catch_up(self, stages: int | None = None, logits_to_keep: int = 1) -> np.ndarray | None:
        """Run the pending rows of stages [1, STAGES): full-depth logits of the last
        LOGITS_TO_KEEP rows, else the rows stage STAGES - 1 produced; None if nothing was pending."""
        out = self.state.catch_up(stages)
        if out is None:
            return None
        if stages is None or stages == len(self.stages):
            return out[0, -logits_to_keep:]
        return out[0]

    def exit_logits(self, hidden: np.ndarray, stages: int | None = None) -> np.ndarray:
        """The exit head on hidden states (P, D) → (P, V)."""
        return self.state.exit_logits(hidden[None])[0]

    def truncate(self, n: int) -> None:
        self.state.truncate(n)

    def trim(self, n: int) -> None:
        self.truncate(self.length - n)

    def reset(self) -> None:
        self.state = self.model.new_state(self.cross, 1)

    def _logged(self, logits: np.ndarray) -> np.ndarray:
        if self.logits_log is not None:
            self.logits_log.append(np.array(logits[-1], np.float32))
        return logits

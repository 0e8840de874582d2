"""The one stage chain: stage graphs run in order, each with its own cache length.

A staged package splits the decoder layers into stage graphs so that a strategy can
run only the first stages for some tokens (a draft, an early exit) and the rest later.
Positions a stage has not run yet wait as *pending* rows -- the previous stage's
outputs, shaped (batch, rows, hidden) -- and run, in front of the next rows, the next
time that stage runs. So every stage's cache is complete before a later token
attends to it, and truncating keeps each stage's cached and pending positions below
the cut.

:class:`StageChain` owns those rules once for both kinds of package: the decoder-only
:class:`~edgeinfer.decoders.staged.StagedDecoder` (fixed KV buffers, batch 1) and the
encoder-decoder :class:`~edgeinfer.seq2seq.state.StagedDecoderState` (grown caches
with cross K/V, batch = beams). They say how one stage runs and how its cache is cut.
"""

from __future__ import annotations

import numpy as np


class StageChain:
    """Pending rows between stages, and the order in which stages run them."""

    def _init_chain(self, num_stages: int) -> None:
        self.pending: list[np.ndarray | None] = [None] * num_stages

    # -- what a chain provides ------------------------------------------------------
    def _run_stage(self, s: int, x: np.ndarray, logits_to_keep: int | None) -> np.ndarray:
        """Run stage S on rows X (batch, n, ...) after its cache; its main output for them."""
        raise NotImplementedError

    def stage_length(self, s: int) -> int:
        """Positions stage S holds in its cache."""
        raise NotImplementedError

    def _cut_stage(self, s: int, n: int) -> None:
        """Keep the first N cached positions of stage S."""
        raise NotImplementedError

    # -- the rules ------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.pending)

    def lagging(self, stop: int | None = None) -> bool:
        """Whether any of stages [1, STOP) (all by default) has pending rows."""
        return any(p is not None for p in self.pending[1:stop])

    def add_pending(self, s: int, rows: np.ndarray) -> None:
        """Queue ROWS (batch, rows, hidden) for stage S, after those already waiting."""
        p = self.pending[s]
        self.pending[s] = rows if p is None else np.concatenate([p, rows], axis=1)

    def run_chain(self, x: np.ndarray, stop: int | None = None, logits_to_keep: int | None = None) -> np.ndarray:
        """Feed X through the first STOP stages (all by default), each taking its pending rows
        first; the last stage's output. Below full depth that output stays pending for stage STOP.
        LOGITS_TO_KEEP goes to the head stage."""
        n = self.num_stages
        stop = n if stop is None else stop
        for s in range(stop):
            x = self._run_stage(s, self._with_pending(s, x), logits_to_keep if s == n - 1 else None)
        if stop < n:
            self.add_pending(stop, x)
        return x

    def catch_up(self, stages: int | None = None, logits_to_keep: int | None = None) -> np.ndarray | None:
        """Run the pending rows of stages [1, STAGES) (all by default). Returns the output of
        stage STAGES - 1 for the rows it ran (logits at full depth, else hidden states left
        pending for stage STAGES), or None if nothing was pending."""
        n = self.num_stages
        stop = n if stages is None else stages
        out = None
        for s in range(1, stop):
            if self.pending[s] is None:
                continue
            out = self._run_stage(s, self._with_pending(s, None), logits_to_keep if s == n - 1 else None)
            if s + 1 < n:
                self.add_pending(s + 1, out)
        return out

    def truncate(self, n: int) -> None:
        """Keep positions [0, n) in every stage: cached ones in its cache, the rest pending."""
        for s in range(self.num_stages):
            have = self.stage_length(s)
            p = self.pending[s]
            if p is not None:
                keep = max(0, min(p.shape[1], n - have))
                self.pending[s] = p[:, :keep] if keep else None
            if have > n:
                self._cut_stage(s, n)

    def _with_pending(self, s: int, x: np.ndarray | None) -> np.ndarray:
        """X with stage S's pending rows in front (which are then no longer pending)."""
        p = self.pending[s]
        if s == 0 or p is None:
            return x
        self.pending[s] = None
        return p if x is None else np.concatenate([p, x], axis=1)

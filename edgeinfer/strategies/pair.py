"""Shared machinery of the big/little strategies (speculative, EAD, BiLD).

A :class:`Track` is one model's view of the token sequence: a decoder, the
tokens its cache holds, and (for an early-exit "little") how many stages to
run before the exit head. ``track.logits(seq)`` brings the cache to SEQ —
keeping the common prefix, trimming what diverged, feeding the rest in one
pass — and returns the logits of the last positions. Catch-up after a
hand-over, verification of a draft and re-sync after a rollback are all
that one call; ``track.truncate(n)`` trims after a rejection.

Each track counts its forward calls and the bytes of weights they read (a forward reads every weight of the stages
it runs once, however many positions it carries), which is how the
strategies report the compute they spent.
"""

from __future__ import annotations

import time

import numpy as np

from edgeinfer.decoders import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.package import GraphEntry

from .base import PREFILL_CHUNK, Strategy


def entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(LOGITS), before any temperature. The exponentials in float32 (a
    152k vocabulary: 0.2 ms instead of 1.4 in float64), their sum in float64: ~1e-6 relative."""
    z = np.asarray(logits, np.float32) - np.float32(np.max(logits))
    p = np.exp(z)
    s = p.sum(dtype=np.float64)
    return float(np.log(s) - float(np.dot(p, z)) / s)


def max_probability(logits: np.ndarray) -> float:
    z = logits.astype(np.float64) - float(np.max(logits))
    return float(1.0 / np.exp(z).sum())


def _file_bytes(decoder: StagedDecoder, entry: GraphEntry) -> int:
    """Bytes of weights a graph reads per forward (recorded at export when graphs share a data file)."""
    if entry.weight_bytes is not None:
        return entry.weight_bytes
    path = decoder.package.path(entry.path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def drafting_head(decoder: StagedDecoder) -> int | None:
    """Stages before an exit after DECODER's last layer (``--exits L``, usually with ``--exit-vocab``: a
    trimmed drafting head), or None: a little model with one drafts through it."""
    if not decoder.staged or not decoder.stages:
        return None
    return decoder.exits.get(decoder.stages[-1].last)


class Track:
    """A decoder (up to STAGES stages + exit head, or full depth) and the tokens it holds.

    OWN_EXIT: STAGES stop before a head-only last stage of a little model's own package (its drafting
    head), whose rows are never needed later: they are not kept pending."""

    def __init__(self, name: str, decoder: StagedDecoder, fed: list[int] | None = None, stages: int | None = None,
                 own_exit: bool = False):
        self.name = name
        self.decoder = decoder
        self.stages = stages
        self.own_exit = own_exit
        self.fed = [] if fed is None else fed  # shared between the two views of one decoder
        spec = decoder.package.spec
        graphs = spec.stages or spec.graphs_with_role("monolithic")
        self.stage_bytes = [_file_bytes(decoder, e) for e in graphs]
        head = spec.graph("exit_head")
        head_bytes = _file_bytes(decoder, head) if head is not None and stages is not None else 0
        # Bytes of weights one forward of this view reads, whatever the number of positions it carries.
        self.weight_bytes = sum(self.stage_bytes[: stages or len(self.stage_bytes)]) + head_bytes
        self.calls = 0
        self.bytes_read = 0
        self.seconds = 0.0

    @property
    def length(self) -> int:
        return len(self.fed)

    def truncate(self, n: int) -> None:
        if n < len(self.fed):
            self.decoder.truncate(n)
            del self.fed[n:]

    def logits(self, seq: list[int], keep: int = 1) -> np.ndarray:
        """Logits (KEEP, vocab) for the last KEEP positions of SEQ, feeding what the cache lacks."""
        n = min(len(self.fed), len(seq))
        if self.fed[:n] != seq[:n]:  # usually equal (one slice compare); else find where they part
            n = next(i for i, (a, b) in enumerate(zip(self.fed, seq)) if a != b)
        dec = self.decoder
        t0 = time.perf_counter()
        if dec.staged and self.stages is None and n == len(seq) and n - keep >= dec.stage_length(len(dec.stages) - 1):
            # The first stages have all of SEQ (an exit view fed it): finish the remaining stages.
            self.truncate(n)
            self.bytes_read += sum(b for p, b in zip(dec.pending, self.stage_bytes) if p is not None)
            out = dec.catch_up(logits_to_keep=keep)
        else:
            n = min(n, len(seq) - keep)
            self.truncate(n)
            if len(self.fed) > dec.length:  # the decoder was truncated underneath (e.g. a reset)
                del self.fed[dec.length:]
                n = len(self.fed)
            new = seq[n:]
            out = None
            for start in range(0, len(new), PREFILL_CHUNK):
                chunk = new[start:start + PREFILL_CHUNK]
                k = min(keep - (len(new) - start - len(chunk)), len(chunk))
                rows = self._forward(chunk, max(k, 1))
                if k > 0:
                    out = rows[-k:] if out is None else np.concatenate([out, rows[-k:]])
            self.fed.extend(new)
            self.bytes_read += self.weight_bytes * -(-len(new) // PREFILL_CHUNK)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def _forward(self, ids: list[int], keep: int) -> np.ndarray:
        dec = self.decoder
        if self.stages is None:
            return dec.forward(ids, logits_to_keep=keep)
        if len(ids) == 1 and keep == 1:
            hidden = dec.step_partial(ids[0], self.stages)
            out = dec.exit_logits(hidden[None], self.stages)
        else:
            out = dec.forward(ids, logits_to_keep=keep, stages=self.stages)
        if self.own_exit:  # the head-only stage caches nothing: its rows need no catching up
            dec.pending[self.stages] = None
        return out

    def report(self) -> dict:
        return {"calls": self.calls, "weight_bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 4)}


class PairStrategy(Strategy):
    """Base of the big/little strategies: two tracks, the prompt, shared statistics.

    LITTLE is another package's decoder, or None to use the big package's own
    exit (``exit_layer``; default the deepest) as the little model.
    """

    name = "pair"

    def __init__(self, big: StagedDecoder, little: StagedDecoder | None = None, exit_layer: int | None = None):
        self.decoder = big  # the decode loop checks this one's capacity
        if little is None:
            from .self_speculative import exit_stages

            if not big.exits:
                raise GenerationError(f"strategy '{self.name}' needs a little model: load one with little=PATH "
                                      "(CLI: --little PACKAGE), or export the package with --exits to draft "
                                      "from its own early layers.")
            layer, stages = exit_stages(big, exit_layer)
            shared: list[int] = []
            self.big = Track("big", big, shared)
            self.little = Track(f"exit{layer}", big, shared, stages=stages)
        else:
            if exit_layer is not None:
                raise GenerationError("exit_layer applies when the little model is the package's own exit; "
                                      "a separate little package was given.")
            self.big = Track("big", big)
            head = drafting_head(little)
            self.little = Track("little" if head is None else "little/drafting-head", little, stages=head,
                                own_exit=head is not None)
        self.prompt: list[int] = []
        self.source = "big"  # which model wrote the last token handed to the decode loop
        self.stats: dict = {"strategy": self.name, "little": self.little.name, "tokens": {"big": 0, "little": 0}}

    def begin(self, prompt_ids: list[int], little_fed: list[int] | None = None) -> None:
        """Called by the model before prefill: the whole prompt (the big cache holds a prefix
        of it) and, for a separate little model, the list of tokens its cache holds (kept up
        to date in place, so the little model's own prefix reuse stays right)."""
        super().begin(prompt_ids, little_fed)
        self.prompt = list(prompt_ids)
        self.big.fed[:] = self.prompt[: self.big.decoder.length]
        if little_fed is not None and self.little.fed is not self.big.fed:
            self.little.fed = little_fed

    @property
    def prefill_source(self) -> str:
        return self.source

    def count(self, source: str, n: int = 1) -> None:
        """Running tally while generating (``finish`` replaces it with what was emitted)."""
        self.stats["tokens"][source] += n

    def finish(self, sources: dict[str, int]) -> None:
        """The decode loop's count of the tokens it emitted (a last round may be cut short)."""
        self.stats["tokens"] = {"big": sources.get("big", 0), "little": sources.get("little", 0)}
        self._refresh()

    def _refresh(self) -> None:
        """Shares of tokens and compute: weights read, relative to the big model decoding alone."""
        st = self.stats
        made = st["tokens"]["big"] + st["tokens"]["little"]
        st["big_share"] = st["tokens"]["big"] / made if made else None
        st["big_model"], st["little_model"] = self.big.report(), self.little.report()
        spent = st["big_model"]["weight_bytes_read"] + st["little_model"]["weight_bytes_read"]
        alone = made * self.big.weight_bytes  # plain big decoding: one full read per token
        st["compute_vs_big_alone"] = spent / alone if alone else None

"""The decoder caches of one encoder-decoder generation (batch = beams): the
self-attention K/V it grows and the cross K/V it reads (computed once per input by
the cross_kv graph).

:class:`DecoderState` runs the one ``decoder`` graph of an unstaged package.
:class:`StagedDecoderState` runs the ``decoder_stage{i}`` graphs of a staged one
(``export --exits/--stages``): each holds a run of decoder layers with their
self-attention cache and cross K/V. Every stage keeps its own cache length, so an
early exit can run only the first stages for a token; the hidden states a later stage
has not processed yet wait as *pending* rows and are run, batched in front of the next
rows, before any later token reaches that stage (the one stage chain,
edgeinfer.decoders.chain, which the decoder-only staged decoder runs too).

Both have ``step``, ``forward``, ``reorder``, ``truncate`` and ``length`` (beam search,
edgeinfer.generation.beam, drives them directly); the staged one also ``catch_up`` and
``exit_logits``. :class:`~edgeinfer.seq2seq.decoder.Seq2SeqDecoder` puts one sequence of
either behind the decoder protocol.
"""

from __future__ import annotations

import numpy as np

from edgeinfer.decoders.chain import StageChain
from edgeinfer.errors import GenerationError, PackageError


class DecoderState:
    """Self-attention cache and cross K/V of one generation, batch = beams."""

    def __init__(self, model, cross: list[np.ndarray], batch: int):
        self.model = model
        self.cross = [np.ascontiguousarray(np.repeat(c, batch, axis=0)) if batch > 1 else c for c in cross]
        heads, head_dim = model.heads, model.head_dim
        empty = np.zeros((batch, heads, 0, head_dim), np.float32)
        self.past = [empty] * (2 * model.layers)

    @property
    def length(self) -> int:
        return self.past[0].shape[2]

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Feed IDS (B, n); the logits (B, n, V) of every fed position."""
        if self.length + ids.shape[1] > self.model.max_target_positions:
            raise GenerationError(f"the decoder holds {self.model.max_target_positions} positions: "
                                  "ask for fewer new tokens.")
        outs = self.model.run_decoder(ids, self.past, self.cross)
        self.past = outs[1:]
        return outs[0]

    def step(self, ids: np.ndarray) -> np.ndarray:
        return self.forward(ids)[:, -1, :]

    def truncate(self, n: int) -> None:
        """Keep positions [0, n)."""
        if self.length > n:
            self.past = [p[:, :, :n] for p in self.past]

    def reorder(self, index: np.ndarray) -> None:
        if not np.array_equal(index, np.arange(len(index))):
            self.past = [p[index] for p in self.past]


class DecoderStage:
    """One stage graph: its session, its layers and the IO names it is fed by."""

    def __init__(self, entry, session, io: dict):
        """ENTRY: its edgeinfer.package.GraphEntry."""
        self.name = entry.name
        if entry.layers is None:
            raise PackageError(f"decoder stage '{self.name}' lists no layers: re-export the package.")
        self.first, self.last = entry.layers
        self.embed, self.head = bool(entry.embed), bool(entry.head)
        if not 0 <= self.first < self.last:
            raise PackageError(f"decoder stage '{self.name}' lists layers {list(entry.layers)}: re-export the package.")
        self.session = session
        self.input_name = io["input_ids"] if self.embed else io["hidden_in"]
        layers = range(self.first, self.last)
        self.past_names = [n.format(layer=i) for i in layers for n in (io["past_key"], io["past_value"])]
        self.cross_names = [n.format(layer=i) for i in layers for n in (io["cross_key"], io["cross_value"])]


def check_chain(stages: list[DecoderStage], num_layers: int, root) -> None:
    """The stages must cover layers 0..num_layers in order, the first embedding, the last with the head."""
    ends = [0] + [s.last for s in stages]
    if (not stages or [s.first for s in stages] != ends[:-1] or ends[-1] != num_layers
            or not stages[0].embed or not stages[-1].head):
        raise PackageError(f"package '{root}' has no complete chain of decoder stages: re-export it.")


class StagedDecoderState(StageChain):
    """Self-attention caches (one list per stage), cross K/V and pending rows of one
    generation; batch = beams. The pending rows and the order stages run them in are the
    one stage chain's (edgeinfer.decoders.chain)."""

    def __init__(self, model, cross: list[np.ndarray], batch: int):
        self.model = model
        self.stages: list[DecoderStage] = model.stages
        if batch > 1:
            cross = [np.ascontiguousarray(np.repeat(c, batch, axis=0)) for c in cross]
        heads, head_dim = model.heads, model.head_dim
        empty = np.zeros((batch, heads, 0, head_dim), np.float32)
        self.past = [[empty] * (2 * (s.last - s.first)) for s in self.stages]
        self.cross = [cross[2 * s.first:2 * s.last] for s in self.stages]
        self._init_chain(len(self.stages))

    # -- state -------------------------------------------------------------------
    def stage_length(self, s: int) -> int:
        return self.past[s][0].shape[2]

    def _cut_stage(self, s: int, n: int) -> None:
        self.past[s] = [p[:, :, :n] for p in self.past[s]]

    @property
    def length(self) -> int:
        """Tokens fed so far (stage 0's cache; later stages may lag behind it)."""
        return self.stage_length(0)

    def reorder(self, index: np.ndarray) -> None:
        if np.array_equal(index, np.arange(len(index))):
            return
        self.past = [[p[index] for p in past] for past in self.past]
        self.pending = [None if p is None else p[index] for p in self.pending]

    # -- running -------------------------------------------------------------------
    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed IDS (B, n) at full depth; the last position's logits (B, V)."""
        return self.forward(ids)[:, -1, :]

    def forward(self, ids: np.ndarray, stages: int | None = None) -> np.ndarray:
        """Feed IDS (B, n) through the first STAGES stages (all by default). Full depth returns
        the logits (B, rows, V) of every row the last stage ran (pending rows first); fewer
        stages return that stage's hidden states (B, rows, D), which stay pending for the next."""
        if self.length + ids.shape[1] > self.model.max_target_positions:
            raise GenerationError(f"the decoder holds {self.model.max_target_positions} positions: "
                                  "ask for fewer new tokens.")
        return self.run_chain(ids, stages)

    def exit_logits(self, hidden: np.ndarray) -> np.ndarray:
        """The exit head (final norm + LM head) on hidden states (B, rows, D) → (B, rows, V)."""
        head = self.model.exit_head
        if head is None:
            raise GenerationError(f"'{self.model.name}' has no early exits: export it with --exits.")
        return head.run(None, {self.model.io["hidden_in"]: np.ascontiguousarray(hidden, np.float32)})[0]

    def _run_stage(self, s: int, x: np.ndarray, logits_to_keep: int | None = None) -> np.ndarray:
        """Stage S on rows X after its cache; its main output for all of them (the seq2seq
        graphs return every row's logits, so LOGITS_TO_KEEP is the caller's to apply)."""
        st = self.stages[s]
        feed = {st.input_name: np.ascontiguousarray(x)}
        feed.update(zip(st.past_names, self.past[s]))
        feed.update(zip(st.cross_names, self.cross[s]))
        outs = st.session.run(None, feed)
        self.past[s] = outs[1:]
        return outs[0]

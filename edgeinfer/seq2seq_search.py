"""The decoding parameters of encoder-decoder packages and their one-sequence search
(greedy or sampled). The logits processors are the chain every package uses
(:mod:`edgeinfer.generation.processors`); beam search is :mod:`edgeinfer.generation.beam`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import GenerationError
from .generation import GenerationConfig, LogitsProcessors, Sampler


@dataclass
class Seq2SeqConfig:
    """Decoding parameters of an encoder-decoder generation."""

    max_new_tokens: int = 224
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    forced_bos_token_id: int | None = None  # the first generated token (mBART's target language, BART's <s>)
    forced_eos_token_id: int | None = None  # forced at the last step the length allows

    def validate(self) -> Seq2SeqConfig:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise GenerationError(f"num_beams must be an integer >= 1, got {self.num_beams!r}.")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise GenerationError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}.")
        if not np.isfinite(self.length_penalty):
            raise GenerationError(f"length_penalty must be a finite number, got {self.length_penalty!r}.")
        if self.num_beams > 1 and self.temperature > 0:
            raise GenerationError("beam search is deterministic here: use temperature 0 with num_beams > 1.")
        GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                         top_p=self.top_p, seed=self.seed,
                         repetition_penalty=self.repetition_penalty).validate()
        return self


def greedy_search(state, prompt: list[int], config: Seq2SeqConfig, eos: set[int], rules: LogitsProcessors,
                  on_token=None, constraint=None) -> list[int]:
    """One sequence, token by token: argmax (temperature 0) or sampled. Returns the new tokens.
    CONSTRAINT (edgeinfer.constraints): only the tokens it admits are chosen."""
    sampler = Sampler(GenerationConfig(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                       seed=config.seed))
    mask = constraint.start(len(prompt)) if constraint is not None else None
    seq = list(prompt)
    logits = state.step(np.asarray([prompt], np.int64))
    for _ in range(config.max_new_tokens):
        scores = rules(np.array(logits, np.float32), [seq])[0]
        if mask is not None:
            scores = mask.apply(scores, seq)
        if config.temperature == 0:
            token = int(np.argmax(scores))
        else:
            token, _ = sampler(scores)
        seq.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos or len(seq) - len(prompt) >= config.max_new_tokens:
            break
        logits = state.step(np.asarray([[token]], np.int64))
    return seq[len(prompt):]

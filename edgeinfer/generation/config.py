"""Decoding parameters of one generation, for every kind of package."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgeinfer.errors import GenerationError


@dataclass
class GenerationConfig:
    """Decoding parameters. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    max_time_s: float | None = None  # wall-time bound on the whole generation
    constraint: object | None = None  # an edgeinfer.constraints.Constraint: a token mask before sampling
    # logits processors (edgeinfer.generation.processors), as transformers' generate() names them
    no_repeat_ngram_size: int = 0
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)  # not as the first new token
    forced_bos_token_id: int | None = None  # the first new token
    forced_eos_token_id: int | None = None  # forced at the last step max_new_tokens allows
    timestamp_rules: object | None = None  # a processors.TimestampRules: Whisper's timestamp grammar
    # beam search (encoder-decoder packages; decoder packages decode one sequence and refuse these)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def validate(self, limit: int | None = None) -> GenerationConfig:
        def bad(msg):
            raise GenerationError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if limit is not None and self.max_new_tokens > limit:
            bad(f"max_new_tokens {self.max_new_tokens} exceeds the context of {limit} tokens.")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}.")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}.")
        if self.max_time_s is not None and (not isinstance(self.max_time_s, (int, float))
                                            or not math.isfinite(self.max_time_s) or self.max_time_s <= 0):
            bad(f"max_time_s must be a positive number of seconds, got {self.max_time_s!r}.")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}.")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop must be a list of non-empty strings.")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            bad(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}.")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in v):
                bad(f"{name} must be a list of token ids, got {v!r}.")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(f"{name} must be a token id, got {v!r}.")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad(f"num_beams must be an integer >= 1, got {self.num_beams!r}.")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            bad(f"length_penalty must be a finite number, got {self.length_penalty!r}.")
        if self.early_stopping not in (True, False, "never"):
            bad(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
        if self.num_beams > 1 and self.temperature > 0:
            bad("beam search is deterministic here: use temperature 0 with num_beams > 1.")
        if self.constraint is not None and self.ignore_eos:
            bad("ignore_eos cannot be combined with a constraint: a constrained output ends with EOS.")
        return self

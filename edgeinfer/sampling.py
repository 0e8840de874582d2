"""Choosing the next token from logits: greedy, temperature, top-k, top-p,
repetition penalty — plain numpy on one row of logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import GenerationError


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
        if self.constraint is not None and self.ignore_eos:
            bad("ignore_eos cannot be combined with a constraint: a constrained output ends with EOS.")
        return self


class Sampler:
    def __init__(self, config: GenerationConfig, prompt_tokens: int = 0):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        # The constraint's state; histories passed in start with PROMPT_TOKENS prompt tokens.
        self.mask = config.constraint.start(prompt_tokens) if config.constraint is not None else None

    @property
    def greedy(self) -> bool:
        return self.config.temperature == 0

    def probabilities(self, logits: np.ndarray, history: list[int] | None = None) -> np.ndarray:
        """The distribution sampling draws from (after penalty, temperature, top-k, top-p)."""
        c = self.config
        x = self.penalized(logits, history)
        x = x / max(c.temperature, 1e-6)
        if c.top_k and c.top_k < x.shape[-1]:
            kth = np.partition(x, -c.top_k)[-c.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = softmax(x)
        if c.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            cutoff = int(np.searchsorted(cum, c.top_p)) + 1
            mask = np.zeros_like(p, dtype=bool)
            mask[order[:cutoff]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return p

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> tuple[int, float | None]:
        """Next token and (when asked for) its log-probability under the model."""
        if self.greedy:
            x = self.penalized(logits, history)
            token = int(np.argmax(x))
        else:
            p = self.probabilities(logits, history)
            token = int(self.rng.choice(p.shape[-1], p=p))
        logprob = float(_log_softmax(logits)[token]) if self.config.logprobs else None
        return token, logprob

    def logprob(self, logits: np.ndarray, token: int) -> float | None:
        """log p(token) under the model (before sampling transforms), when asked for."""
        return float(_log_softmax(logits)[token]) if self.config.logprobs else None

    def penalized(self, logits: np.ndarray, history: list[int] | None) -> np.ndarray:
        """LOGITS after the repetition penalty and the constraint's mask (every path samples from these)."""
        pen = self.config.repetition_penalty
        x = logits
        if pen != 1.0 and history:
            x = np.array(logits, dtype=np.float32)
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = x[seen]
            x[seen] = np.where(vals > 0, vals / pen, vals * pen)
        if self.mask is not None:
            x = self.mask.apply(x, history or [])
        return x


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    return x - m - np.log(np.exp(x - m).sum())


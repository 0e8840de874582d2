"""Choosing the next token from logits: the logits processors (repetition penalty,
no-repeat n-grams, suppressed and forced tokens: edgeinfer.generation.processors), the
constraint's mask, then greedy, temperature, top-k, top-p — plain numpy on one row."""

from __future__ import annotations

import numpy as np

from .config import GenerationConfig
from .processors import LogitsProcessors


class Sampler:
    def __init__(self, config: GenerationConfig, prompt_tokens: int = 0):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.processors = LogitsProcessors(config, prompt_tokens)
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
        """LOGITS after the logits processors and the constraint's mask (every path samples from these)."""
        x = self.processors.row(logits, history or [])
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


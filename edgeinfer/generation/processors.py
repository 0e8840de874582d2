"""Logits processors: one chain, for every kind of package, strategy and search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf


@dataclass
class TimestampRules:
    """Whisper's timestamp grammar: timestamps come in (end, start) pairs, never go
    back in time, the first token is a timestamp no later than ``max_initial``."""

    timestamp_begin: int
    no_timestamps: int
    eos: int
    max_initial: int = 50  # 1.0 s in 20 ms steps


def no_repeat_ngram_bans(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in SEQ."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]


class LogitsProcessors:
    """The one chain of logits processors, applied in place to scores (B, V) of the sequences
    SEQS (each the prompt followed by the tokens generated so far), in transformers' order
    where order matters: the repetition penalty, then the masks (suppressed tokens, tokens
    suppressed at the first step, forced first/last tokens, no-repeat n-grams, Whisper's
    timestamp grammar). Decoder and encoder-decoder packages, every strategy and beam search
    go through it."""

    def __init__(self, config, prompt_len: int):
        """CONFIG: a GenerationConfig; its ``timestamp_rules`` switch Whisper's timestamp grammar on."""
        timestamps = config.timestamp_rules
        self.config, self.prompt_len, self.timestamps = config, prompt_len, timestamps
        self.suppress = np.asarray(sorted(set(config.suppress_tokens)), np.int64)
        self.begin = np.asarray(sorted(set(config.begin_suppress_tokens)), np.int64)
        self.penalty = float(config.repetition_penalty)
        self.active = bool(self.penalty != 1.0 or self.suppress.size or self.begin.size or timestamps is not None
                           or config.forced_bos_token_id is not None or config.forced_eos_token_id is not None
                           or config.no_repeat_ngram_size)

    def row(self, logits: np.ndarray, seq: list[int]) -> np.ndarray:
        """One row (V,): LOGITS itself when no processor is on, else a processed copy."""
        if not self.active:
            return logits
        return self(np.array(logits, np.float32)[None], [seq])[0]

    def __call__(self, scores: np.ndarray, seqs: list[list[int]]) -> np.ndarray:
        vocab = scores.shape[1]
        if self.penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor: every token seen so far
            for row, seq in enumerate(seqs):
                if seq:
                    seen = np.unique(np.asarray(seq, np.int64))
                    vals = scores[row, seen]
                    scores[row, seen] = np.where(vals > 0, vals / self.penalty, vals * self.penalty)
        if self.suppress.size:
            scores[:, self.suppress[self.suppress < vocab]] = NEG_INF
        if self.begin.size and len(seqs[0]) == self.prompt_len:
            scores[:, self.begin[self.begin < vocab]] = NEG_INF
        c = self.config
        if c.forced_bos_token_id is not None and len(seqs[0]) == self.prompt_len:
            _force(scores, c.forced_bos_token_id)
        if c.forced_eos_token_id is not None and len(seqs[0]) == self.prompt_len + c.max_new_tokens - 1:
            _force(scores, c.forced_eos_token_id)
        n = self.config.no_repeat_ngram_size
        if n:
            for row, seq in enumerate(seqs):
                banned = no_repeat_ngram_bans(seq, n)
                if banned:
                    scores[row, banned] = NEG_INF
        if self.timestamps is not None:
            for row, seq in enumerate(seqs):
                self._timestamp_rules(scores[row], seq[self.prompt_len:])
        return scores

    def _timestamp_rules(self, s: np.ndarray, sampled: list[int]) -> None:
        ts = self.timestamps
        begin = ts.timestamp_begin
        s[ts.no_timestamps] = NEG_INF
        last_ts = len(sampled) >= 1 and sampled[-1] >= begin
        penult_ts = len(sampled) < 2 or sampled[-2] >= begin
        if last_ts:
            if penult_ts:  # a pair is closed: text must follow
                s[begin:] = NEG_INF
            else:  # an open segment: another timestamp (or the end) must follow
                s[:ts.eos] = NEG_INF
        stamps = [t for t in sampled if t >= begin]
        if stamps:  # time never goes back; a segment never has zero length
            last = stamps[-1] if (last_ts and not penult_ts) else stamps[-1] + 1
            s[begin:last] = NEG_INF
        if not sampled:
            s[:begin] = NEG_INF
            s[begin + ts.max_initial + 1:] = NEG_INF
        # if the timestamps together are likelier than any text token, take a timestamp
        finite = s[np.isfinite(s)]
        if finite.size:
            m = finite.max()
            logp = s - m - np.log(np.exp(finite - m).sum())
            ts_lp = logp[begin:]
            ts_lp = ts_lp[np.isfinite(ts_lp)]
            text_lp = logp[:begin]
            if ts_lp.size and np.isfinite(text_lp).any():
                if np.logaddexp.reduce(ts_lp) > text_lp[np.isfinite(text_lp)].max():
                    s[:begin] = NEG_INF


def _force(scores: np.ndarray, token: int) -> None:
    """Only TOKEN may follow (score 0, as transformers' forced-token processors set it)."""
    scores[:] = NEG_INF
    scores[:, token] = 0.0

"""Decoding searches for encoder-decoder models: greedy/sampling and beam search,
plus the logits rules they share (suppressed tokens, tokens suppressed at the
first step, no-repeat n-grams, Whisper's timestamp grammar).

A search drives a :class:`DecoderState`-like object with two methods:
``step(ids) -> last-position logits (B, V)`` and ``reorder(beam_index)``.
Beam search follows transformers' algorithm step for step (top 2·beams
candidates, length-penalised finished hypotheses, the same early-stop
heuristic), so the same model gives the same beams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import GenerationError
from .sampling import GenerationConfig, Sampler

NEG_INF = -np.inf
_DROP = -1.0e9  # transformers' penalty for candidates that may not continue / may not finish


@dataclass
class Seq2SeqConfig:
    """Decoding parameters of an encoder-decoder generation."""

    max_new_tokens: int = 224
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
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
                         top_p=self.top_p, seed=self.seed).validate()
        return self


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


class LogitsRules:
    """Applies the configured rules in place to scores (B, V) for the sequences SEQS."""

    def __init__(self, config: Seq2SeqConfig, prompt_len: int, timestamps: TimestampRules | None = None):
        self.config, self.prompt_len, self.timestamps = config, prompt_len, timestamps
        self.suppress = np.asarray(sorted(set(config.suppress_tokens)), np.int64)
        self.begin = np.asarray(sorted(set(config.begin_suppress_tokens)), np.int64)

    def __call__(self, scores: np.ndarray, seqs: list[list[int]]) -> np.ndarray:
        vocab = scores.shape[1]
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def greedy_search(state, prompt: list[int], config: Seq2SeqConfig, eos: set[int], rules: LogitsRules,
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


def beam_search(state, prompt: list[int], config: Seq2SeqConfig, eos: set[int], rules: LogitsRules) -> list[int]:
    """Beam search over ``config.num_beams`` beams (state must hold that batch). Returns
    the new tokens of the best finished hypothesis."""
    beams, P = config.num_beams, len(prompt)
    max_length = P + config.max_new_tokens
    keep = max(2, 1 + len(eos)) * beams
    lp, early = config.length_penalty, config.early_stopping
    running = [list(prompt) for _ in range(beams)]
    run_scores = np.full(beams, _DROP, np.float32)
    run_scores[0] = 0.0
    fin_seqs: list[list[int]] = [list(prompt) for _ in range(beams)]
    fin_scores = np.full(beams, _DROP, np.float32)
    fin_done = np.zeros(beams, bool)
    improvable = True
    cur_len = P
    logits = state.step(np.asarray([prompt] * beams, np.int64))
    while True:
        logp = rules(_log_softmax(logits), running)
        acc = (logp + run_scores[:, None]).reshape(-1)
        vocab = logits.shape[1]
        top = np.argsort(-acc, kind="stable")[:keep]
        cand_beam, cand_tok, cand_score = top // vocab, top % vocab, acc[top].astype(np.float32)
        cand_seqs = [running[b] + [int(t)] for b, t in zip(cand_beam, cand_tok)]
        hits = np.array([int(t) in eos or cur_len + 1 >= max_length for t in cand_tok])
        # the best `beams` candidates that may continue
        run_lp = cand_score + hits.astype(np.float32) * _DROP
        nxt = np.argsort(-run_lp, kind="stable")[:beams]
        running = [cand_seqs[i] for i in nxt]
        run_scores = run_lp[nxt]
        # finished hypotheses: only from the top `beams` candidates, length-penalised
        norm = cand_score / np.float32((cur_len + 1 - P) ** lp)
        if fin_done.all() and early is True:
            norm = norm + _DROP
        if not improvable:
            norm = norm + _DROP
        finishing = hits & (np.arange(keep) < beams)
        norm = norm + (~finishing).astype(np.float32) * _DROP
        merged_scores = np.concatenate([fin_scores, norm])
        best = np.argsort(-merged_scores, kind="stable")[:beams]
        merged_seqs = fin_seqs + cand_seqs
        merged_done = np.concatenate([fin_done, finishing])
        fin_seqs = [merged_seqs[i] for i in best]
        fin_scores, fin_done = merged_scores[best], merged_done[best]
        cur_len += 1
        hypothetical = (max_length - P) if (early == "never" and lp > 0) else (cur_len - P)
        best_running = run_scores[0] / np.float32(hypothetical ** lp)
        worst = np.where(fin_done, fin_scores.min(), _DROP)
        improvable = improvable and bool(np.any(best_running > worst))
        open_beam = not (fin_done.all() and early is True)
        if not (improvable and open_beam and not hits.all()):
            break
        state.reorder(cand_beam[nxt])
        logits = state.step(np.asarray([[s[-1]] for s in running], np.int64))
    return fin_seqs[0][P:]

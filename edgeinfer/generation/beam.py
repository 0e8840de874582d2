"""Beam search (encoder-decoder packages): transformers' algorithm step for step (top
2·beams candidates, length-penalised finished hypotheses, the same early-stop heuristic),
so the same model gives the same beams. It drives a state with ``step(ids) -> last-position
logits (B, V)`` and ``reorder(beam_index)``, and applies the same logits processors as
every other search to the log-probabilities, as transformers does.
"""

from __future__ import annotations

import numpy as np

from .processors import LogitsProcessors

_DROP = -1.0e9  # transformers' penalty for candidates that may not continue / may not finish


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def beam_search(state, prompt: list[int], config, eos: set[int], rules: LogitsProcessors) -> list[int]:
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

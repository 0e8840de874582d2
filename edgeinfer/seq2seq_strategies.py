"""Early exit and self-speculative decoding for staged encoder-decoder packages.

Both run greedily over a :class:`~edgeinfer.seq2seq_stages.StagedDecoderState`
and apply the search's :class:`~edgeinfer.seq2seq_search.LogitsProcessors`
(suppressed tokens, forced tokens, no-repeat n-grams, Whisper's timestamp
grammar) to every row they read, exit rows included, so a token an exit picks
obeys the same rules as one the full decoder picks.

* ``early-exit`` (lossy): each token climbs the exits in order and leaves at the
  first whose top probability reaches the threshold. The layers it skipped
  still get its self-attention K/V: its hidden state waits pending at the next
  stage and runs, batched with the next token, before anything attends to it.
* ``self-speculative`` (lossless): draft k tokens one by one through the stages
  up to an exit, run the remaining stages once over all of them, keep the
  longest prefix the full decoder agrees with (plus its own next token) by the
  decoder-only :func:`~edgeinfer.strategies.base.accept_draft`, and cut every
  stage's cache back to what was kept. The tokens are those of plain greedy search.

The decoder-only strategy classes drive a ``StagedDecoder`` with one-token
IO-binding plans and a sampler; here the state, the rules and the beam-free
loop differ enough that a small module of its own is clearer than adapters.
"""

from __future__ import annotations

import numpy as np

from .errors import GenerationError
from .generation import GenerationConfig, LogitsProcessors, Sampler, softmax
from .seq2seq_search import Seq2SeqConfig
from .strategies.base import accept_draft
from .strategies.self_speculative import check_threshold, exit_stages

STRATEGIES = ("plain", "lookup", "early-exit", "self-speculative")


def check_strategy(model, strategy: str, config: Seq2SeqConfig, *, exit_layer: int | None = None,
                   threshold: float | None = None, draft_len: int | None = None) -> dict:
    """The validated options of STRATEGY for MODEL, or a one-sentence GenerationError."""
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown strategy '{strategy}' for an encoder-decoder package: choose one of "
                              f"{', '.join(STRATEGIES)}.")
    if strategy == "plain":
        return {}
    if strategy == "lookup":  # edgeinfer.strategies.PromptLookup through the decode loop; sampling stays lossless
        if config.num_beams > 1:
            raise GenerationError("--strategy lookup decodes one sequence: use num_beams 1.")
        k = 8 if draft_len is None else draft_len
        if not isinstance(k, int) or k < 1:
            raise GenerationError(f"draft length must be an integer >= 1, got {k!r}.")
        if exit_layer is not None or threshold is not None:
            raise GenerationError("--strategy lookup takes draft_len only (no exit layer or threshold).")
        return {"draft_len": k}
    if config.num_beams > 1 or config.temperature > 0:
        raise GenerationError(f"--strategy {strategy} decodes greedily here: use num_beams 1 and temperature 0.")
    layer, stages = exit_stages(model, exit_layer)  # "no early exits" / "exit layer L is not in this package"
    if strategy == "early-exit":
        exits = sorted(model.exits.items()) if exit_layer is None else [(layer, stages)]
        return {"exits": exits, "threshold": check_threshold(0.9 if threshold is None else threshold)}
    k = 4 if draft_len is None else draft_len
    if not isinstance(k, int) or k < 1:
        raise GenerationError(f"draft length must be an integer >= 1, got {k!r}.")
    return {"exit_layer": layer, "exit_stages": stages, "draft_len": k,
            "threshold": check_threshold(0.0 if threshold is None else threshold)}


def early_exit_search(state, prompt: list[int], config: Seq2SeqConfig, eos: set[int], rules: LogitsProcessors,
                      exits: list[tuple[int, int]], threshold: float, stats: dict, on_token=None) -> list[int]:
    """Greedy search that leaves at the first exit (layer, stages) whose top probability
    reaches THRESHOLD; STATS gets per-exit counts and the average depth."""
    num_layers = state.stages[-1].last
    stats.update(strategy="early-exit", threshold=threshold, exits={str(layer): 0 for layer, _ in exits}, full=0,
                 layers_run=0, num_layers=num_layers)
    seq = list(prompt)
    scores = rules(np.array(state.step(np.asarray([prompt], np.int64)), np.float32), [seq])[0]
    while True:
        token = int(np.argmax(scores))
        seq.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos or len(seq) - len(prompt) >= config.max_new_tokens:
            break
        ids = np.asarray([[token]], np.int64)
        scores, done = None, 0
        for layer, stages in exits:
            # the first exit runs the token's first stages; a later one catches the stages between up
            hidden = state.forward(ids, stages) if done == 0 else state.catch_up(stages)
            done = stages
            exit_scores = rules(np.array(state.exit_logits(hidden[:, -1:])[:, 0], np.float32), [seq])[0]
            if float(softmax(exit_scores).max()) >= threshold:
                scores = exit_scores
                stats["exits"][str(layer)] += 1
                stats["layers_run"] += layer
                break
        if scores is None:
            logits = state.step(ids) if done == 0 else state.catch_up()[:, -1]
            scores = rules(np.array(logits, np.float32), [seq])[0]
            stats["full"] += 1
            stats["layers_run"] += num_layers
        _rates(stats)
    return seq[len(prompt):]


def self_speculative_search(state, prompt: list[int], config: Seq2SeqConfig, eos: set[int], rules: LogitsProcessors,
                            exit_layer: int, exit_stages: int, draft_len: int, stats: dict,
                            on_token=None, threshold: float = 0.0) -> list[int]:
    """Greedy search by draft-and-verify rounds; the same tokens as plain greedy search.
    Drafting stops early at a draft whose exit probability is below THRESHOLD (0: never).
    STATS gets rounds, drafted and accepted counts, acceptance and tokens per verification."""
    stats.update(strategy="self-speculative", exit_layer=exit_layer, draft_len=draft_len, threshold=threshold,
                 rounds=0, drafted=0, accepted=0, emitted=0)
    greedy = Sampler(GenerationConfig(temperature=0.0))
    seq = list(prompt)
    limit = len(prompt) + config.max_new_tokens
    logits = state.step(np.asarray([prompt], np.int64))
    emitted = [int(np.argmax(rules(np.array(logits, np.float32), [seq])[0]))]
    while True:
        for t in emitted:
            seq.append(t)
            if on_token is not None:
                on_token(t)
            if t in eos or len(seq) >= limit:
                return seq[len(prompt):]
        token = seq[-1]
        # draft: at most what the length limit and the decoder's positions leave room for
        k = max(1, min(draft_len, limit - len(seq), state.model.max_target_positions - state.length - 1))
        drafts: list[int] = []
        t, fed = token, 0
        while len(drafts) < k:
            hidden = state.forward(np.asarray([[t]], np.int64), exit_stages)
            fed += 1
            scores = rules(np.array(state.exit_logits(hidden[:, -1:])[:, 0], np.float32), [seq + drafts])[0]
            if threshold > 0 and float(softmax(scores).max()) < threshold:
                break  # not confident: the verification pass gives this position's token itself
            drafts.append(int(np.argmax(scores)))
            t = drafts[-1]
            if t in eos:
                break
        # verify: the remaining stages over every fed position at once (one row more than the
        # drafts when drafting stopped early: the full decoder's own next token)
        target = state.catch_up()[0, -fed:]
        ruled = np.stack([rules(np.array(target[j][None], np.float32), [seq + drafts[:j]])[0] for j in range(fed)])
        out = accept_draft(greedy, ruled, drafts, None, seq, bonus=fed > len(drafts))
        emitted = [tok for tok, _ in out]
        state.truncate(len(seq) + len(emitted) - 1)  # cached: everything before the last emitted token
        accepted = sum(1 for a, d in zip(emitted, drafts) if a == d)
        stats["rounds"] += 1
        stats["drafted"] += len(drafts)
        stats["accepted"] += accepted
        stats["emitted"] += len(emitted)
        _rates(stats)


def merge_stats(total: dict | None, part: dict) -> dict:
    """Statistics of several searches (the windows of a transcription) as of one."""
    if total is None:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in part.items()}
    for key in ("rounds", "drafted", "accepted", "emitted", "full", "layers_run"):
        if key in part:
            total[key] = total.get(key, 0) + part[key]
    for layer, count in part.get("exits", {}).items():
        total["exits"][layer] = total["exits"].get(layer, 0) + count
    _rates(total)
    return total


def _rates(stats: dict) -> None:
    """The ratios derived from the counters."""
    if stats.get("rounds"):
        stats["acceptance_rate"] = stats["accepted"] / max(1, stats["drafted"])
        stats["tokens_per_verify"] = stats["emitted"] / stats["rounds"]
    steps = stats.get("full", 0) + sum(stats.get("exits", {}).values())
    if "layers_run" in stats and steps:
        stats["average_depth"] = stats["layers_run"] / steps
        stats["average_depth_fraction"] = stats["average_depth"] / stats["num_layers"]

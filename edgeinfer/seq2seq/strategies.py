"""Which decoding strategies an encoder-decoder package takes, and their statistics over
the windows of a transcription.

The strategies themselves are the decoder-only ones (edgeinfer.strategies) on a
:class:`~edgeinfer.seq2seq.Seq2SeqDecoder`, through the one decode loop: plain (greedy or
sampled), lookup, early exit, self-speculative and adaptive, with the same logits processors
(suppressed and forced tokens, no-repeat n-grams, repetition penalty, Whisper's timestamp
grammar) on every row they read, exit rows included. The big/little ones need a second
decoder package and are not offered here.
"""

from __future__ import annotations

from edgeinfer.errors import GenerationError

SEQ2SEQ_STRATEGIES = ("plain", "lookup", "early-exit", "self-speculative", "adaptive")
SEQ2SEQ_STRATEGY_OPTIONS = ("exit_layer", "threshold", "draft_len", "confidence")


def check_strategy(strategy: str, config, timestamps: bool) -> None:
    """Refuse, in one sentence, a STRATEGY that cannot run with CONFIG here."""
    if strategy not in SEQ2SEQ_STRATEGIES:
        raise GenerationError(f"unknown strategy '{strategy}' for an encoder-decoder package: choose one of "
                              f"{', '.join(SEQ2SEQ_STRATEGIES)}.")
    if strategy != "plain" and config.num_beams > 1:
        raise GenerationError(f"--strategy {strategy} decodes one sequence: use num_beams 1.")
    if strategy == "lookup" and timestamps:
        raise GenerationError("lookup decoding does not keep Whisper's timestamps yet: use strategy plain "
                              "with timestamps, or lookup without them.")


def merge_stats(total: dict | None, part: dict) -> dict:
    """Statistics of several searches (the windows of a transcription) as of one."""
    if total is None:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in part.items()}
    for key in ("rounds", "drafted", "accepted", "emitted", "full", "layers_run"):
        if key in part:
            total[key] = total.get(key, 0) + part[key]
    for layer, count in part.get("exits", {}).items():
        total["exits"][layer] = total["exits"].get(layer, 0) + count
    if total.get("rounds"):
        total["acceptance_rate"] = total["accepted"] / max(1, total["drafted"])
        total["tokens_per_verify"] = total["emitted"] / total["rounds"]
    steps = total.get("full", 0) + sum(total.get("exits", {}).values())
    if "layers_run" in total and steps:
        total["average_depth"] = total["layers_run"] / steps
        total["average_depth_fraction"] = total["average_depth"] / total["num_layers"]
    return total

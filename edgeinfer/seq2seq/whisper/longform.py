"""Long-form Whisper robustness: temperature fallback per 30 s window and conditioning
on the previous window's text, as openai-whisper and faster-whisper do.

A window is decoded at temperature 0 first (greedy, or beam search when asked). The
result is checked: text that compresses too well (gzip ratio > 2.4) is a repetition
loop, tokens whose average log-probability is below -1.0 are a guess. A failing window
is decoded again by seeded sampling at the next temperature of the schedule; the first
result that passes is kept, else the best one. A window where the ``<|nocaptions|>``
token was likely at the first step and the tokens are unsure is silence.

The scores are computed from one teacher-forced decoder pass over the chosen tokens with
the same logits rules the search applied (suppressed tokens, the timestamp grammar), so
every search (greedy, beams, sampling, early-exit strategies) is scored the same way.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from edgeinfer.errors import GenerationError
from edgeinfer.generation import LogitsProcessors

from ..model import SEQ2SEQ_PARAMS
from ..strategies import SEQ2SEQ_STRATEGY_OPTIONS

PROMPT_CAP = 223  # previous-text tokens kept after <|startofprev|> (half the decoder's 448, less one)
RESET_TEMPERATURE = 0.5  # a window that needed at least this temperature does not condition the next one


@dataclass
class LongFormOptions:
    """Temperature fallback and previous-text conditioning of ``transcribe``."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True

    def validate(self) -> LongFormOptions:
        temps = self.temperatures
        if isinstance(temps, (int, float)):
            temps = (float(temps),)
        try:
            temps = tuple(float(t) for t in temps)
        except (TypeError, ValueError):
            raise GenerationError(f"temperatures must be a list of numbers, got {self.temperatures!r}.") from None
        if not temps:
            raise GenerationError("temperatures must hold at least one temperature, e.g. [0.0].")
        if any(not np.isfinite(t) or t < 0 for t in temps):
            raise GenerationError(f"temperatures must be finite numbers >= 0, got {list(temps)}.")
        if any(b <= a for a, b in zip(temps, temps[1:])):
            raise GenerationError(f"temperatures must increase strictly, got {list(temps)}.")
        self.temperatures = temps
        for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not np.isfinite(value)):
                raise GenerationError(f"{name} must be a finite number or None, got {value!r}.")
        if self.no_speech_threshold is not None and not 0 <= self.no_speech_threshold <= 1:
            raise GenerationError(f"no_speech_threshold is a probability in [0, 1], got {self.no_speech_threshold}.")
        return self


@dataclass
class WindowDecode:
    """The kept decoding of one window and the checks that chose it."""

    tokens: list[int]
    temperature: float
    compression_ratio: float
    avg_logprob: float
    no_speech_prob: float
    silent: bool = False
    attempts: list[dict] = field(default_factory=list)  # every temperature tried, in order

    def stats(self) -> dict:
        return {"temperature": self.temperature, "compression_ratio": round(self.compression_ratio, 3),
                "avg_logprob": round(self.avg_logprob, 4), "no_speech_prob": round(self.no_speech_prob, 4),
                "silent": self.silent, "attempts": len(self.attempts)}


def compression_ratio(text: str) -> float:
    """Bytes of TEXT over bytes of its deflate stream: about 1 for prose, high for loops."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def special_token(model, key: str, names: tuple[str, ...]) -> int | None:
    """A special token's id: from the manifest's generation table when it names it, else
    from the tokenizer's vocabulary (packages exported before these keys existed)."""
    if getattr(model.generation, key) is not None:
        return getattr(model.generation, key)
    for name in names:
        tid = model.tokenizer.tokenizer.token_to_id(name)
        if tid is not None:
            return int(tid)
    return None


def score_tokens(model, cross: list[np.ndarray], prompt: list[int], tokens: list[int], timestamps: bool,
                 params: dict, no_speech: int | None, sot_index: int,
                 step_logits: list[np.ndarray] | None = None) -> tuple[float, float]:
    """(average log-probability of TOKENS after PROMPT, probability of the no-speech token
    after the start-of-transcript at SOT_INDEX) under the search's logits rules. The average
    divides by the text tokens + 1, as openai-whisper does. STEP_LOGITS (one row per token,
    logged by a one-sequence search) spare the teacher-forced pass over the tokens; the
    no-speech probability then needs only the prompt up to start-of-transcript."""
    config = model.config(timestamps, **{k: v for k, v in params.items() if k in SEQ2SEQ_PARAMS})
    config.max_new_tokens = min(config.max_new_tokens, model.max_target_positions - len(prompt))
    rules = LogitsProcessors(config, len(prompt))
    seq = list(prompt) + list(tokens)
    if step_logits is not None and len(step_logits) == len(tokens):
        rows = np.stack(step_logits) if tokens else np.zeros((0, 1), np.float32)
        if no_speech is None:
            first = None
        elif sot_index == len(prompt) - 1 and tokens:  # start-of-transcript ends the prompt (timestamps)
            first = rows[0]
        else:
            first = model.decoder_logits(prompt[:sot_index + 1], cross=cross)[sot_index]
    else:
        logits = model.decoder_logits(seq[:-1] if tokens else seq, cross=cross)
        rows = logits[len(prompt) - 1:]
        first = logits[sot_index]
    no_speech_prob = 0.0
    if no_speech is not None:
        first = first.astype(np.float64)
        p = np.exp(first - first.max())
        no_speech_prob = float(p[no_speech] / p.sum())
    total = 0.0
    for i, token in enumerate(tokens):
        pos = len(prompt) + i
        scores = rules(np.array(rows[i:i + 1], np.float32), [seq[:pos]])[0].astype(np.float64)
        finite = scores[np.isfinite(scores)]
        m = finite.max()
        total += float(scores[token] - m - np.log(np.exp(finite - m).sum()))
    text_tokens = sum(1 for t in tokens if t not in model.eos)
    return total / (text_tokens + 1), no_speech_prob


def decode_window(model, hidden: np.ndarray, prompt: list[int], sot_index: int, timestamps: bool, params: dict,
                  options: LongFormOptions, seed: int) -> WindowDecode:
    """Decode one window with temperature fallback (see the module's docstring)."""
    no_speech = special_token(model, "no_speech_token_id", ("<|nocaptions|>", "<|nospeech|>"))
    begin = model.generation.timestamp_begin or 1 << 62
    tried: list[WindowDecode] = []
    cross = model.cross_kv(hidden)  # once per window, shared by every attempt and its scoring
    for i, temperature in enumerate(options.temperatures):
        attempt = dict(params)
        if temperature > 0:  # sampled: one sequence, plain search, seeded per window and temperature
            attempt.update(temperature=temperature, num_beams=1, seed=seed + i)
            for key in ("strategy", *SEQ2SEQ_STRATEGY_OPTIONS):
                attempt.pop(key, None)
        else:
            attempt["temperature"] = 0.0
        logged: list[np.ndarray] = []
        tokens = model.search(hidden, prompt, timestamps, None, attempt, cross=cross, step_logits=logged)
        text = model.tokenizer.decode([t for t in tokens if t not in model.eos and t < begin]).strip()
        scoring = {k: v for k, v in attempt.items() if k in SEQ2SEQ_PARAMS}
        avg, nsp = score_tokens(model, cross, prompt, tokens, timestamps, scoring, no_speech, sot_index,
                                logged or None)
        result = WindowDecode(tokens, temperature, compression_ratio(text), avg, nsp)
        tried.append(result)
        result.attempts = [r.stats() for r in tried]
        failed = ((options.compression_ratio_threshold is not None
                   and result.compression_ratio > options.compression_ratio_threshold)
                  or (options.logprob_threshold is not None and avg < options.logprob_threshold))
        if (options.no_speech_threshold is not None and nsp > options.no_speech_threshold
                and options.logprob_threshold is not None and avg < options.logprob_threshold):
            result.silent = True
            return result
        if not failed:
            return result
    ok = [r for r in tried if options.compression_ratio_threshold is None
          or r.compression_ratio <= options.compression_ratio_threshold] or tried
    best = max(ok, key=lambda r: r.avg_logprob)
    best.attempts = [r.stats() for r in tried]
    return best


def previous_text_prompt(start_of_prev: int, history: list[int], sot_sequence: list[int],
                         max_positions: int = 448) -> list[int]:
    """<|startofprev|>, the last tokens of HISTORY (223 for Whisper's 448 positions: half the
    decoder, less one, as faster-whisper), then the start-of-transcript sequence."""
    cap = min(PROMPT_CAP, max_positions // 2 - 1)
    if not history or cap <= 0:
        return list(sot_sequence)
    return [start_of_prev] + history[-cap:] + list(sot_sequence)


def kept_tokens(tokens: list[int], eos: set[int], timestamp_begin: int, resumed: bool) -> list[int]:
    """The window's tokens that become previous text: without end-of-text, and when the next
    window resumes inside this one, without the open segment that will be decoded again."""
    out = [t for t in tokens if t not in eos]
    if resumed:
        stamps = [i for i, t in enumerate(out) if t >= timestamp_begin]
        if stamps and stamps[-1] < len(out) - 1:  # an open segment: cut at its start stamp
            out = out[:stamps[-1]]
    return out

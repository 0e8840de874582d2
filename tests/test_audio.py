"""The numpy audio front-end: WAV formats, mixdown, resampling, Whisper log-mel
features against transformers' WhisperFeatureExtractor, hostile WAV files, and
bounded memory on a two-hour file."""

from __future__ import annotations

import struct
import tracemalloc
import wave

import numpy as np
import pytest

from edgeinfer.seq2seq.whisper.audio import (
    AudioError,
    iter_windows,
    load_audio,
    log_mel_spectrogram,
    read_wav_info,
    resample,
)


def _signal(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(seed)
    x = 0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def _write_pcm(path, x: np.ndarray, rate: int, width: int, channels: int = 1) -> None:
    frames = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x[:, None]
    if width == 1:
        raw = np.clip(np.round(frames * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.clip(np.round(frames * 8388607), -8388608, 8388607).astype(np.int32).reshape(-1)
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
    else:
        scale = {2: 32767, 4: 2147483647}[width]
        raw = np.round(frames * scale).astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def _write_float(path, x: np.ndarray, rate: int) -> None:
    data = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("width,tol", [(1, 1e-2), (2, 1e-4), (3, 1e-6), (4, 1e-8)])
def test_pcm_widths_read_back(tmp_path, width, tol):
    x = _signal(16000, 0.5)
    path = tmp_path / f"pcm{width}.wav"
    _write_pcm(path, x, 16000, width)
    info = read_wav_info(path)
    assert (info.bits, info.channels, info.frames, info.is_float) == (8 * width, 1, x.size, False)
    np.testing.assert_allclose(load_audio(path), x, atol=tol)


def test_float_and_stereo(tmp_path):
    x = _signal(16000, 0.5)
    _write_float(tmp_path / "f.wav", x, 16000)
    np.testing.assert_array_equal(load_audio(tmp_path / "f.wav"), x)
    _write_pcm(tmp_path / "st.wav", x, 16000, 2, channels=2)
    assert read_wav_info(tmp_path / "st.wav").channels == 2
    np.testing.assert_allclose(load_audio(tmp_path / "st.wav"), x, atol=1e-4)  # mixdown of equal channels


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_a_tone(rate):
    t = np.arange(rate) / rate
    y = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), rate, 16000)
    assert abs(y.size - 16000) <= 1
    ref = np.sin(2 * np.pi * 440 * np.arange(y.size) / 16000)
    assert np.abs(y - ref)[100:-100].max() < 2e-3


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 11025])
def test_polyphase_equals_direct_kernels(rate):
    """The per-phase strided products give what computing every kernel directly gives,
    at the start of a file and in a window in the middle of one."""
    from edgeinfer.seq2seq.whisper.audio import Resampler

    x = np.random.default_rng(rate).standard_normal(rate * 3).astype(np.float32)
    r = Resampler(rate, 16000)
    np.testing.assert_allclose(r(x, 0, 0, 16000), r._direct(x, 0, 0, 16000), atol=1e-5)
    first, last = r.input_span(20000, 9000)
    np.testing.assert_allclose(r(x[first:last + 1], first, 20000, 9000), r._direct(x, 0, 20000, 9000), atol=1e-5)


def test_downsampling_filters_what_cannot_be_kept():
    """Going from 44.1 kHz to 16 kHz (Nyquist 8 kHz): a 7 kHz tone is kept; a 10 kHz tone
    must vanish rather than fold back to 6 kHz."""
    t = np.arange(44100) / 44100
    kept = resample(np.sin(2 * np.pi * 7000 * t).astype(np.float32), 44100, 16000)
    gone = resample(np.sin(2 * np.pi * 10000 * t).astype(np.float32), 44100, 16000)
    assert np.sqrt(np.mean(kept[200:-200] ** 2)) > 0.6
    assert np.sqrt(np.mean(gone[200:-200] ** 2)) < 0.02


def test_windows_stream_across_boundaries(tmp_path):
    """Windows of a resampled file join up to the whole-file resampling."""
    x = _signal(22050, 2.3)
    _write_pcm(tmp_path / "a.wav", x, 22050, 2)
    parts = list(iter_windows(tmp_path / "a.wav", 16000, seconds=0.5))
    assert [p.size for p in parts[:-1]] == [8000] * (len(parts) - 1)
    native = np.concatenate(list(iter_windows(tmp_path / "a.wav", 22050, seconds=100)))  # no resampling
    whole = resample(native, 22050, 16000)
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)


@pytest.mark.parametrize("seconds", [0.3, 7.0, 30.0, 31.0])
def test_log_mel_matches_transformers(seconds):
    from transformers import WhisperFeatureExtractor

    x = _signal(16000, seconds, seed=int(seconds))
    ref = WhisperFeatureExtractor(feature_size=80)(x, sampling_rate=16000, return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(x)
    assert ours.shape == ref.shape == (80, 3000)
    assert np.abs(ours - ref).max() < 1e-4


def test_log_mel_128_bins():
    from transformers import WhisperFeatureExtractor

    x = _signal(16000, 3.0)
    ref = WhisperFeatureExtractor(feature_size=128)(x, sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.abs(log_mel_spectrogram(x, n_mels=128) - ref).max() < 1e-4


def _riff(body: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WAVE" + body


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"hello, I am a text file\n", "not a WAV file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a WAV file"),
    (_riff(b""), "no fmt chunk"),
    (_riff(b"fmt " + struct.pack("<I", 16) + struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)), "no data chunk"),
    (_riff(b"fmt " + struct.pack("<I", 16) + struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
           + b"data" + struct.pack("<I", 0)), "no audio samples"),
    (_riff(b"fmt " + struct.pack("<I", 16) + struct.pack("<HHIIHH", 1, 60000, 16000, 32000, 2, 16)
           + b"data" + struct.pack("<I", 4) + b"\0" * 4), "channels"),
    (_riff(b"fmt " + struct.pack("<I", 16) + struct.pack("<HHIIHH", 1, 1, 4_000_000_000, 32000, 2, 16)
           + b"data" + struct.pack("<I", 4) + b"\0" * 4), "sample rate"),
    (_riff(b"fmt " + struct.pack("<I", 16) + struct.pack("<HHIIHH", 85, 1, 16000, 32000, 2, 16)
           + b"data" + struct.pack("<I", 4) + b"\0" * 4), "encoding 85"),
    (_riff(b"fmt " + struct.pack("<I", 16) + struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 12)
           + b"data" + struct.pack("<I", 4) + b"\0" * 4), "12-bit"),
    (_riff(b"fmt " + struct.pack("<I", 4000) + b"\0" * 16), "malformed fmt"),
])
def test_hostile_wavs_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        read_wav_info(path)


def test_missing_file_and_oversized_data_chunk(tmp_path):
    with pytest.raises(AudioError, match="no audio file"):
        read_wav_info(tmp_path / "nope.wav")
    # a data chunk claiming 4 GB in a small file (a streaming writer's placeholder): read what is there
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 0xFFFFFFF0) + b"\x10\x00" * 100
    (tmp_path / "big.wav").write_bytes(_riff(body))
    assert read_wav_info(tmp_path / "big.wav").frames == 100


def test_two_hour_file_streams_in_bounded_memory(tmp_path):
    """A two-hour 16 kHz WAV (sparse on disk) is read window by window: peak memory
    stays that of a few 30 s windows, far below the 230 MB of the whole file."""
    frames = 2 * 3600 * 16000
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    header = _riff(b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", frames * 2))
    path = tmp_path / "two_hours.wav"
    with open(path, "wb") as f:
        f.write(header[:4] + struct.pack("<I", len(header) - 8 + frames * 2) + header[8:])
        f.truncate(len(header) + frames * 2)
    info = read_wav_info(path)
    assert info.duration_s == 7200
    tracemalloc.start()
    count = 0
    for window in iter_windows(info, 16000, 30.0):
        count += 1
        assert window.size == 480_000
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 240
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"

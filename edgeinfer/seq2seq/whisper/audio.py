"""Audio input for speech models, in numpy only: a WAV reader that streams,
mono mixdown, resampling to 16 kHz, and Whisper's log-mel spectrogram.

The WAV file is untrusted: its header is checked against the file's real size
before anything is read, and long recordings are read one window at a time, so
a two-hour file costs the memory of one 30 s window, not of the whole file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinfer.errors import EdgeInferError
from edgeinfer.package import AudioSpec


class AudioError(EdgeInferError):
    """An audio file is missing, not a WAV file we can read, or holds no samples."""


_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
MAX_CHANNELS = 64
MIN_RATE, MAX_RATE = 1000, 768_000


@dataclass(frozen=True)
class WavInfo:
    path: Path
    sample_rate: int
    channels: int
    bits: int
    is_float: bool
    frames: int
    data_offset: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.bits // 8


def read_wav_info(path: str | os.PathLike) -> WavInfo:
    """Parse and check a WAV header (RIFF chunks: fmt, then data)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"no audio file at '{path}'.")
    size = path.stat().st_size
    if size == 0:
        raise AudioError(f"'{path}' is empty: give a WAV file with audio in it.")
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise AudioError(f"'{path}' is not a WAV file (no RIFF/WAVE header): convert it to WAV first, "
                             "e.g. ffmpeg -i input -ar 16000 -ac 1 out.wav.")
        fmt = None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            body = pos + 8
            if chunk_id == b"fmt ":
                if chunk_size < 16 or body + chunk_size > size:
                    raise AudioError(f"'{path}' has a malformed fmt chunk: the file is corrupt.")
                fmt = f.read(min(chunk_size, 64))
            elif chunk_id == b"data":
                if fmt is None:
                    raise AudioError(f"'{path}' has audio data before its format chunk: the file is corrupt.")
                # streaming writers leave the size at 0 or 0xFFFFFFFF: take what the file holds
                available = size - body
                data_size = available if chunk_size in (0, 0xFFFFFFFF) else min(chunk_size, available)
                return _info(path, fmt, body, data_size)
            pos = body + chunk_size + (chunk_size & 1)
    raise AudioError(f"'{path}' has no {'data' if fmt else 'fmt'} chunk: it is not a complete WAV file.")


def _info(path: Path, fmt: bytes, offset: int, data_size: int) -> WavInfo:
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # first two bytes of the sub-format GUID
    if tag not in (_PCM, _FLOAT):
        raise AudioError(f"'{path}' uses WAV encoding {tag}; only PCM integer and float samples are read: "
                         "convert it, e.g. ffmpeg -i input -ar 16000 -ac 1 out.wav.")
    ok_bits = (32, 64) if tag == _FLOAT else (8, 16, 24, 32)
    if bits not in ok_bits:
        raise AudioError(f"'{path}' has {bits}-bit samples; this reader takes {', '.join(map(str, ok_bits))}.")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"'{path}' claims {channels} channels: the header is corrupt.")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"'{path}' claims a sample rate of {rate} Hz: the header is corrupt.")
    if block_align != channels * bits // 8:
        raise AudioError(f"'{path}' has an inconsistent block size ({block_align} for {channels} x {bits} bits).")
    frames = data_size // block_align
    if frames == 0:
        raise AudioError(f"'{path}' holds no audio samples.")
    return WavInfo(path, rate, channels, bits, tag == _FLOAT, frames, offset)


def read_frames(info: WavInfo, start: int, count: int) -> np.ndarray:
    """Frames [start, start+count) as float32 mono in [-1, 1] (clipped to the file)."""
    start = max(0, start)
    count = max(0, min(count, info.frames - start))
    if count == 0:
        return np.zeros(0, np.float32)
    with open(info.path, "rb") as f:
        f.seek(info.data_offset + start * info.frame_bytes)
        raw = f.read(count * info.frame_bytes)
    count = len(raw) // info.frame_bytes
    raw = raw[: count * info.frame_bytes]
    x = _decode(raw, info)
    return x.reshape(count, info.channels).mean(axis=1, dtype=np.float32)


def _decode(raw: bytes, info: WavInfo) -> np.ndarray:
    if info.is_float:
        return np.frombuffer(raw, "<f4" if info.bits == 32 else "<f8").astype(np.float32)
    if info.bits == 8:  # unsigned, centred on 128
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if info.bits == 16:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if info.bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v & 0x800000, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)


# -- resampling ----------------------------------------------------------------
_ZERO_CROSSINGS = 16  # half-width of the windowed-sinc kernel, in input samples at the cutoff
_BLOCK = 1 << 14  # output samples computed per vectorised step (bounds temporary memory)


class Resampler:
    """Band-limited resampling by a rational factor with a Hann-windowed sinc.

    Output sample ``n`` sits at input time ``n * M / L`` (``M/L`` = rate_in/rate_out in
    lowest terms), so its kernel depends only on the phase ``n % L``: the L kernels are
    computed once and every window reuses them. The cutoff drops to the new Nyquist
    when downsampling, so nothing above it folds back.
    """

    def __init__(self, rate_in: int, rate_out: int):
        g = np.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g  # L, M
        ratio = rate_out / rate_in
        cutoff = min(1.0, ratio)
        self.half = int(np.ceil(_ZERO_CROSSINGS / cutoff)) + 1
        self.taps = np.arange(-self.half + 1, self.half + 1)
        self.table = None
        if self.up <= 4096:  # a table of L kernels; otherwise computed per block
            self.table = self._kernels(np.arange(self.up))

    def _kernels(self, phases: np.ndarray) -> np.ndarray:
        cutoff = min(1.0, self.up / self.down)
        frac = (phases * self.down % self.up) / self.up
        d = frac[:, None] - self.taps[None, :]
        w = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / self.half, -1, 1)))
        return w.astype(np.float32)

    def input_span(self, start: int, count: int) -> tuple[int, int]:
        """Input samples [first, last] that output samples [start, start+count) read."""
        first = start * self.down // self.up - self.half + 1
        last = (start + count - 1) * self.down // self.up + self.half
        return first, last

    def __call__(self, x: np.ndarray, first_input: int, start: int, count: int) -> np.ndarray:
        """Output samples [start, start+count) from X, whose sample 0 is input FIRST_INPUT."""
        if self.table is None:
            return self._direct(x, first_input, start, count)
        width = len(self.taps)
        # X padded so that every tap of every output lands inside it (zeros outside the file)
        lo = start * self.down // self.up - self.half + 1
        hi = (start + count - 1) * self.down // self.up + self.half + 1
        padded = np.zeros(hi - lo + self.down + width, np.float32)
        a, b = max(lo, first_input), min(hi, first_input + len(x))
        if b > a:
            padded[a - lo:b - lo] = x[a - first_input:b - first_input]
        frames = np.lib.stride_tricks.sliding_window_view(padded, width)  # a view, no copy
        out = np.empty(count, np.float32)
        # outputs of one phase are M input samples apart: one strided (rows, taps) @ (taps,) product per phase
        for p in range(min(self.up, count)):
            n0 = start + p  # first output of this phase
            offset = n0 * self.down // self.up - self.half + 1 - lo
            rows = len(range(p, count, self.up))
            out[p::self.up] = frames[offset:offset + rows * self.down:self.down] @ self.table[n0 % self.up]
        return out

    def _direct(self, x: np.ndarray, first_input: int, start: int, count: int) -> np.ndarray:
        """Rates whose ratio has a huge denominator: kernels computed per output block."""
        out = np.empty(count, np.float32)
        padded = np.concatenate([np.zeros(self.half, np.float32), x.astype(np.float32),
                                 np.zeros(self.half, np.float32)])
        for s in range(0, count, _BLOCK):
            n = start + s + np.arange(min(_BLOCK, count - s))
            idx = (n * self.down // self.up)[:, None] + self.taps[None, :] - first_input + self.half
            valid = (idx >= 0) & (idx < len(padded))
            vals = np.where(valid, padded[np.clip(idx, 0, len(padded) - 1)], 0.0)
            out[s:s + len(n)] = np.einsum("ij,ij->i", vals, self._kernels(n % self.up))
        return out


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a whole (short) signal."""
    if rate_in == rate_out:
        return x.astype(np.float32)
    n_out = int(len(x) * rate_out // rate_in)
    return Resampler(rate_in, rate_out)(x, 0, 0, n_out)


def iter_windows(path_or_info: str | os.PathLike | WavInfo, rate: int = 16000,
                 seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Mono float32 audio at RATE in consecutive windows of SECONDS (the last one shorter),
    read from the file window by window."""
    info = path_or_info if isinstance(path_or_info, WavInfo) else read_wav_info(path_or_info)
    n_total = resampled_length(info, rate)
    per = int(round(seconds * rate))
    resampler = Resampler(info.sample_rate, rate) if info.sample_rate != rate else None
    for start in range(0, n_total, per):
        yield read_window(info, start, min(per, n_total - start), rate, resampler)


def resampled_length(info: WavInfo, rate: int) -> int:
    return info.frames * rate // info.sample_rate


def read_window(info: WavInfo, start: int, count: int, rate: int, resampler: Resampler | None = None) -> np.ndarray:
    """Samples [start, start+count) of the file at RATE, reading only the input they need
    (any start: Whisper's long-form decoding seeks to the end of the last full segment)."""
    if info.sample_rate == rate:
        return read_frames(info, start, count)
    resampler = resampler or Resampler(info.sample_rate, rate)
    first, last = resampler.input_span(start, count)
    first = max(first, 0)
    return resampler(read_frames(info, first, last - first + 1), first, start, count)


def load_audio(path: str | os.PathLike, rate: int = 16000) -> np.ndarray:
    """The whole file as mono float32 at RATE (for short files; long ones: iter_windows)."""
    parts = list(iter_windows(path, rate))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# -- log-mel features --------------------------------------------------------------
def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    mel = 3.0 * hz / 200.0
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log_part, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


def mel_filters(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 80) -> np.ndarray:
    """Triangular slaney-normalised filters (n_freqs, n_mels), as Whisper was trained with."""
    fft_freqs = np.linspace(0, sample_rate // 2, 1 + n_fft // 2)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    edges = _mel_to_hz(mels)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[None, :]


_FILTER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, n_samples: int = 480_000, n_fft: int = 400,
                        hop: int = 160, sample_rate: int = 16000) -> np.ndarray:
    """Whisper's input features (n_mels, n_samples // hop) for up to N_SAMPLES of 16 kHz audio:
    zero-padded to the window, centred STFT with a periodic Hann window, power
    spectrum, mel filters, log10, clamped to 8 decades below the peak, scaled."""
    x = np.zeros(n_samples, np.float64)
    x[: min(len(audio), n_samples)] = audio[:n_samples]
    x = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]  # a view: no copy per frame
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spec = np.fft.rfft(frames * window, axis=1)  # (frames, n_freqs)
    power = spec.real ** 2 + spec.imag ** 2
    key = (sample_rate, n_fft, n_mels)
    if key not in _FILTER_CACHE:
        _FILTER_CACHE[key] = mel_filters(sample_rate, n_fft, n_mels)
    mel = power @ _FILTER_CACHE[key]  # (frames, n_mels)
    log_spec = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def window_features(front: AudioSpec, window: np.ndarray) -> np.ndarray:
    """The encoder's input (1, n_mels, frames) for one window of audio at the package's sampling rate
    (FRONT: the manifest's log-mel front end)."""
    return log_mel_spectrogram(window, n_mels=front.num_mel_bins, n_samples=front.frames * front.hop_length,
                               n_fft=front.n_fft, hop=front.hop_length, sample_rate=front.sampling_rate)[None]


def first_window_features(front: AudioSpec, path: str | os.PathLike) -> np.ndarray:
    """window_features of the first window of the WAV file at PATH (resampled to FRONT's rate)."""
    info, rate = read_wav_info(path), front.sampling_rate
    count = min(front.frames * front.hop_length, resampled_length(info, rate))
    return window_features(front, read_window(info, 0, count, rate))

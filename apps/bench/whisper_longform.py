"""Whisper long-form robustness, before and after: one package decoded with the
temperature fallback and previous-text conditioning on, and with both off (the old
behaviour), interleaved per round, on the espeak sentence set and on a 38 s file of ten
sentences whose second 30 s window once came out degenerate (greedy int8, timestamps).

Prints a markdown table (WER, inverse RTF, windows that fell back) and writes a JSON.

    python apps/bench/whisper_longform.py --package build/whisper-bench/whisper-tiny.en-int8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import wave
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from apps.bench.whisper import ROOT, SENTENCES, speak, wer  # noqa: E402

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
MODES = {"before (no fallback, no conditioning)": dict(temperature_fallback=False, condition_on_previous_text=False),
         "fallback only": dict(condition_on_previous_text=False),
         "after (fallback + conditioning)": {}}


def long_file(folder: Path) -> Path:
    """The ten LONG sentences with 0.3 s pauses, one 16 kHz WAV (~38 s)."""
    import numpy as np

    from edgeinfer.seq2seq.whisper.audio import load_audio

    path = folder / "long.wav"
    if path.exists():
        return path
    parts = []
    for p in speak(LONG, folder / "long-parts"):
        parts += [load_audio(p), np.zeros(4800, np.float32)]
    audio = np.concatenate(parts)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def run_mode(model, files: list[Path], kwargs: dict, timestamps: bool) -> dict:
    t0 = time.perf_counter()
    results = [model.transcribe(f, timestamps=timestamps, **kwargs) for f in files]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "texts": [r.text for r in results], "audio_s": sum(r.audio_s for r in results),
            "fallbacks": sum(1 for r in results for w in r.window_stats if w["temperature"] > 0),
            "windows": [w for r in results for w in r.window_stats]}


def main(argv=None) -> int:
    import edgeinfer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, default=ROOT / "build" / "whisper-bench" / "whisper-tiny.en-int8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "whisper-bench")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "whisper-bench" / "longform.json")
    args = p.parse_args(argv)
    sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    sets = {"sentences": (speak(sentences, args.work / "audio"), sentences, False),
            "long 38 s, timestamps": ([long_file(args.work)], [" ".join(LONG)], True)}
    model = edgeinfer.load(args.package, threads=args.threads)
    report: dict = {}
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for set_name, (files, refs, timestamps) in sets.items():
            for mode in order:
                out = run_mode(model, files, MODES[mode], timestamps)
                entry = report.setdefault(set_name, {}).setdefault(mode, {"seconds_all": []})
                entry["seconds_all"].append(out["seconds"])
                entry.update(wer=wer(refs, out["texts"]), texts=out["texts"], fallbacks=out["fallbacks"],
                             audio_s=out["audio_s"], windows=out["windows"])
    print(f"package {args.package.name}, {args.threads} threads, {args.rounds} interleaved rounds, greedy\n")
    print("| audio | mode | WER % | seconds (median) | inverse RTF | windows that fell back |")
    print("|---|---|---|---|---|---|")
    for set_name, modes in report.items():
        for mode, e in modes.items():
            e["seconds_median"] = statistics.median(e["seconds_all"])
            print(f"| {set_name} | {mode} | {e['wer']:.1f} | {e['seconds_median']:.2f} | "
                  f"{e['audio_s'] / e['seconds_median']:.1f}x | {e['fallbacks']} |")
    for set_name, modes in report.items():
        for mode, e in modes.items():
            if set_name.startswith("long"):
                print(f"\n{set_name}, {mode}: {e['texts'][0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

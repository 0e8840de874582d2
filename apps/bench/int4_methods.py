"""int4 quantization methods on a real full-precision source: Whisper tiny.en (fp16 CTranslate2 weights).

For each method (export/quant/methods.py: rtn, mse, hqq) and the fp32/int8 references, greedy word error
rate on espeak-ng speech of two sentence sets -- the 15 sentences of apps/bench/whisper.py and sentences
of the Lee news corpus (gensim 4.4.0's test data: no one here wrote it) -- and the teacher-forced
next-token KL divergence from the fp32 package (fed the fp32 transcript), export time, and decoder
time measured in interleaved rounds.

    .venv/bin/python apps/bench/int4_methods.py                       # fp32,int8,int4 rtn/mse/hqq
    .venv/bin/python apps/bench/int4_methods.py --lee 10 --rounds 0   # quicker

Writes build/int4-methods/results.json and prints a Markdown table (docs/whisper.md, docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from whisper import SENTENCES, speak, wer  # noqa: E402

import edgeinfer  # noqa: E402
from edgeinfer.seq2seq.whisper.audio import first_window_features  # noqa: E402

VARIANTS = {"fp32": ("fp32", None), "int8": ("int8", None), "int4-rtn": ("int4", "rtn"),
            "int4-mse": ("int4", "mse"), "int4-hqq": ("int4", "hqq")}


def lee_sentences(n: int) -> list[str]:
    """N plain sentences (8-22 words, no digits) spread over the Lee corpus."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("gensim") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gensim==4.4.0"], check=True)
    spec = importlib.util.find_spec("gensim")
    text = (Path(spec.origin).parent / "test" / "test_data" / "lee_background.cor").read_text(encoding="utf-8")
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)
             if 8 <= len(s.split()) <= 22 and not re.search(r"[0-9%$]", s)]
    return sents[::max(1, len(sents) // n)][:n]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def features(model, path: Path) -> np.ndarray:
    return first_window_features(model.audio, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--lee", type=int, default=60, help="Lee corpus sentences (0: none)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved decoder-time rounds (0: none)")
    p.add_argument("--out", default=str(ROOT / "build" / "int4-methods"))
    args = p.parse_args(argv)
    names = args.variants.split(",")
    if names[0] != "fp32":
        names.insert(0, "fp32")  # the KL reference
    work = Path(args.out)
    sets = {"bench": [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]}
    if args.lee:
        sets["lee"] = lee_sentences(args.lee)
    audio = {k: speak(v, work / f"audio-{k}") for k, v in sets.items()}
    models, results = {}, {}
    for name in names:
        prec, method = VARIANTS[name]
        pkg = work / f"whisper-{name}"
        t0 = time.perf_counter()
        from edgeinfer.export import export_model

        export_model("whisper-tiny.en", pkg, prec, force=True, progress=False, quant_method=method)
        results[name] = {"export_s": round(time.perf_counter() - t0, 1)}
        models[name] = edgeinfer.load(pkg, threads=1)
    ref = models["fp32"]
    prompt = ref.decoder_prompt(False, None, None)
    for key, files in audio.items():
        kl = {n: [] for n in names}
        hyps = {n: [] for n in names}
        for f in files:
            x = features(ref, f)
            seq = list(prompt) + list(ref.generate_ids(x, prompt, max_new_tokens=96))
            logits = ref.decoder_logits(seq, ref.encode(x))
            rl = log_softmax(logits.reshape(-1, logits.shape[-1])[len(prompt) - 1:])
            for n, m in models.items():
                hyps[n].append(m.transcribe(f, num_beams=1, temperature_fallback=False,
                                            condition_on_previous_text=False).text)
                q_logits = m.decoder_logits(seq, m.encode(x))
                ql = log_softmax(q_logits.reshape(-1, q_logits.shape[-1])[len(prompt) - 1:])
                kl[n] += list((np.exp(rl) * (rl - ql)).sum(-1))
        for n in names:
            results[n][f"wer_{key}"] = round(wer(sets[key], hyps[n]), 2)
            results[n][f"kl_{key}"] = round(float(np.mean(kl[n])), 4)
    if args.rounds:
        times = {n: [] for n in names}
        files = audio["bench"]
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                for f in files:
                    models[n].transcribe(f, num_beams=1, temperature_fallback=False, condition_on_previous_text=False)
                times[n].append(time.perf_counter() - t0)
        for n in names:
            results[n]["transcribe_s"] = round(statistics.median(times[n]), 2)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"sets": {k: len(v) for k, v in sets.items()},
                                                   "results": results}, indent=1))
    cols = [c for c in ("wer_bench", "wer_lee", "kl_bench", "kl_lee", "export_s", "transcribe_s")
            if any(c in r for r in results.values())]
    print("| package | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for n, r in results.items():
        print(f"| {n} | " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

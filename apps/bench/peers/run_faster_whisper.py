"""faster-whisper (CTranslate2) as a benchmark peer: a worker that loads one
model folder with one compute type and transcribes the WAV files it is sent.

Runs under .venv-peers/whisper (apps/bench/peers/install_whisper_peer.sh). It
reads one JSON request per line on stdin ({"files": [...], "beam_size": N}) and
answers one JSON line per request with each file's text and seconds, so the
parent can interleave it with edgeinfer in the same run without reloading.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="CTranslate2 Whisper folder")
    p.add_argument("--compute-type", default="int8", help="int8, float32, ...")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from faster_whisper import WhisperModel

    model = WhisperModel(args.model, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads,
                         num_workers=1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        out = []
        for path in req["files"]:
            t0 = time.perf_counter()
            segments, info = model.transcribe(path, beam_size=req.get("beam_size", 1), language="en",
                                              temperature=0.0, without_timestamps=True,
                                              condition_on_previous_text=False, vad_filter=False)
            text = " ".join(s.text.strip() for s in segments)
            out.append({"file": path, "text": text, "seconds": time.perf_counter() - t0,
                        "audio_s": info.duration})
        print(json.dumps({"results": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

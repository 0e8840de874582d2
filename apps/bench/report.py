"""The whole benchmark report in one command, from a clean checkout.

    .venv/bin/python apps/bench/report.py            # ~30 min on 2 cores: docs/benchmarks.md + pages it links
    .venv/bin/python apps/bench/report.py --quick    # a few minutes: writes build/bench/quick/benchmarks.md only

Installs the peers it needs (apps/bench/peers/install_peers.sh: onnxruntime-genai,
llama.cpp; install_whisper_peer.sh: faster-whisper; optimum's venv comes with
`make setup`), exports the packages it needs, then runs, one after the other
(never two at once: they would measure each other):

  1. SmolLM2-135M: edgeinfer int4 / int8 / fp32 against onnxruntime-genai, llama.cpp,
     optimum (ORTModelForCausalLM) and transformers (torch CPU), prompts of a chat
     turn and 128 / 512 / 2048 tokens — apps/bench/compare.py
  2. Gemma-3-270M: the same, int4, chat and 512 tokens
  3. edgeinfer's decoding strategies on SmolLM2 (lookup, adaptive, self-speculative,
     early exit) — apps/bench/strategies.py
  4. big/little decoding (speculative, EAD, BiLD) — apps/bench/big_little.py
  5. phone-class constraints (1/2 threads, memory cap, sustained decode, CPU-s per
     token, roofline) — apps/bench/mobile.py (10 minutes sustained)
  6. Whisper tiny.en against faster-whisper (WER, inverse real-time factor) — apps/bench/whisper.py
  7. encoder-decoder against decoder-only first-token latency — apps/bench/encoder_vs_decoder.py
  8. sparse MoE under memory budgets (SmolLM2 cut into experts, real text) — apps/bench/moe.py
  9. quality: perplexity, top-1 agreement with fp32 and chat questions of every precision and of
     llama.cpp on the same GGUF (SmolLM2, Gemma-3) — apps/bench/quality.py
 10. the persistent prompt cache: time to first token of a ~1,000-token system prompt after a
     restart, restored from disk vs cold, fresh processes — apps/bench/prompt_cache.py
 11. KV cache precision: decode after 512 / 2048-token prompts with fp32 / fp16 / int8 KV, against
     onnxruntime-genai, and int8's quality against fp32 KV — apps/bench/kv_dtype.py
 12. many clients: aggregate tokens/s at 1, 2, 4, 8 clients of `serve --parallel 4` against llama.cpp's
     llama-server on the same GGUF, one load script — apps/bench/batching.py

and then one table of every engine and strategy, the targets with the distance
to each, and plots (apps/bench/summary.py).

Each step's own page keeps its detail; this script writes the index with the
machine, the date, every command and its wall time, and the peer comparisons.
Every speed figure on every page is a ratio measured in the same run.
--quick runs 1, 3, 4, 5, 6, 8, 9 and 10 in their short forms and writes nothing under docs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")
BENCH = ROOT / "apps" / "bench"
sys.path.insert(0, str(BENCH))

import summary  # noqa: E402


def steps(quick: bool, out: Path) -> list[tuple[str, list[str], Path | None]]:
    """(title, command, markdown page it writes)."""
    b = ROOT / "build" / "bench"
    if quick:
        return [
            ("SmolLM2-135M: edgeinfer and the peers (quick)",
             [PY, BENCH / "compare.py", "--quick", "--markdown", out / "compare-smollm2.md"],
             out / "compare-smollm2.md"),
            ("Decoding strategies (quick)", [PY, BENCH / "strategies.py", "--quick", "--markdown",
                                             out / "strategies.md"], out / "strategies.md"),
            ("Big/little decoding (quick)", [PY, BENCH / "big_little.py", "--quick", "--out", out],
             out / "big-little.md"),
            ("Phone-class constraints (quick)", [PY, BENCH / "mobile.py", "--package", b / "smollm2-int4", "--quick",
                                                 "--out", out], None),
            ("Whisper tiny.en (quick)", [PY, BENCH / "whisper.py", "--rounds", "1", "--beams", "1",
                                         "--precisions", "int8", "--peer-types", "int8", "--out", out / "whisper.md"],
             out / "whisper.md"),
            ("Sparse MoE under memory budgets (quick)", [PY, BENCH / "moe.py", "all", "--models",
                                                         "moefied,moefied-int8", "--quick", "--no-doc"], None),
            ("Quality against llama.cpp (quick)", [PY, BENCH / "quality.py", "--models", "smollm2-135m",
                                                   "--windows", "4", "--out", out / "quality.md", "--json",
                                                   out / "quality.json"], out / "quality.md"),
            ("Prompt cache after a restart (quick)", [PY, BENCH / "prompt_cache.py", "--rounds", "2", "--new-tokens",
                                                      "8", "--json", b / "prompt-cache.json", "--markdown",
                                                      out / "prompt-cache.md"], out / "prompt-cache.md"),
            ("KV cache precision (quick)", [PY, BENCH / "kv_dtype.py", "--quick", "--markdown",
                                            out / "kv-cache-bench.md", "--json", out / "kv-dtype.json"],
             out / "kv-cache-bench.md"),
            ("Many clients: continuous batching (quick)",
             [PY, BENCH / "batching.py", "--clients", "1,4", "--requests", "2", "--rounds", "1", "--markdown",
              out / "batching.md", "--json", b / "batching.json"], out / "batching.md"),
        ]
    docs = ROOT / "docs"
    return [
        ("SmolLM2-135M: edgeinfer and the peers",
         [PY, BENCH / "compare.py", "--model", "smollm2-135m", "--rounds", "2", "--repeats", "1", "--new-tokens", "64",
          "--markdown", out / "compare-smollm2.md"], out / "compare-smollm2.md"),
        ("Gemma-3-270M: edgeinfer and the peers",
         [PY, BENCH / "compare.py", "--model", "gemma3-270m", "--precisions", "int4", "--prompt-tokens", "chat,512",
          "--rounds", "2", "--repeats", "1", "--new-tokens", "32", "--markdown", out / "compare-gemma3.md"],
         out / "compare-gemma3.md"),
        ("Decoding strategies", [PY, BENCH / "strategies.py"], docs / "early-exit-a4.md"),
        ("Big/little decoding", [PY, BENCH / "big_little.py", "--quick", "--out", out], out / "big-little.md"),
        ("Phone-class constraints", [PY, BENCH / "mobile.py", "--package", b / "smollm2-int4", "--out", out], None),
        ("Whisper tiny.en", [PY, BENCH / "whisper.py", "--rounds", "2", "--beams", "1", "--out", docs / "whisper.md"],
         docs / "whisper.md"),
        ("Encoder-decoder vs decoder-only", [PY, BENCH / "encoder_vs_decoder.py", "--rounds", "3"],
         docs / "encoder-vs-decoder.md"),
        ("Sparse MoE under memory budgets", [PY, BENCH / "moe.py", "all", "--models", "moefied,moefied-int8",
                                              "--repeats", "1", "--no-doc"], None),
        ("Quality against llama.cpp", [PY, BENCH / "quality.py"], docs / "quality.md"),
        ("Prompt cache after a restart", [PY, BENCH / "prompt_cache.py", "--rounds", "5", "--markdown",
                                          out / "prompt-cache.md"], out / "prompt-cache.md"),
        ("KV cache precision", [PY, BENCH / "kv_dtype.py"], docs / "kv-cache-bench.md"),
        ("Many clients: continuous batching", [PY, BENCH / "batching.py", "--clients", "1,2,4,8", "--rounds", "2",
                                               "--markdown", out / "batching.md", "--json", b / "batching.json"],
         out / "batching.md"),
    ]


def install_peers() -> None:
    for script in ("install_peers.sh", "install_whisper_peer.sh", "install_llama_server.sh"):
        path = BENCH / "peers" / script
        if path.exists():
            subprocess.run(["bash", str(path)], cwd=ROOT, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short forms, output under build/bench/quick/")
    ap.add_argument("--no-install", action="store_true", help="use only the peers already installed")
    args = ap.parse_args()
    out = ROOT / "build" / "bench" / ("quick" if args.quick else "report")
    out.mkdir(parents=True, exist_ok=True)
    t_start, started = time.perf_counter(), time.time()
    if not args.no_install:
        install_peers()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = []
    for title, cmd, page in steps(args.quick, out):
        cmd = [str(c) for c in cmd]
        print(f"\n=== {title}\n+ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        done.append({"title": title, "command": " ".join(Path(c).name if c == PY else
                                                         os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                                         for c in cmd),
                     "seconds": round(time.perf_counter() - t0, 1), "ok": rc == 0,
                     "page": os.path.relpath(page, ROOT) if page else None})
    total = time.perf_counter() - t_start
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "machine": {"cpu": _cpu(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
              "total_seconds": round(total, 1), "steps": done}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    index = out / "benchmarks.md" if args.quick else ROOT / "docs" / "benchmarks.md"
    src = summary.collect(started)
    pictures = summary.plots(src, index.parent)
    for name in ("mobile-sustained.png", "mobile-threads.png"):
        if (out / name).exists() and not args.quick:
            shutil.copy(out / name, index.parent / name)
            pictures.append(index.parent / name)
    body = markdown(report, out, index.parent).rstrip("\n").split("\n")
    at = next((i for i, ln in enumerate(body) if i > 0 and ln.startswith("#")), len(body))
    body[at:at] = [*summary.markdown(src, [os.path.relpath(p, index.parent) for p in pictures]), ""]
    index.write_text("\n".join(body) + "\n")
    print(f"\nwrote {index} in {total / 60:.1f} min")
    return 0 if all(s["ok"] for s in done) else 1


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def markdown(rep: dict, out: Path, index_dir: Path | None = None) -> str:
    """The index page; links are relative to INDEX_DIR (docs/ by default)."""
    index_dir = index_dir or ROOT / "docs"
    m = rep["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `.venv/bin/python apps/bench/report.py{' --quick' if rep['quick'] else ''}` on "
        f"{rep['date'][:16].replace('T', ' ')} — {m['cpu']}, {m['cpus']} CPU threads, Python {m['python']}; "
        f"{rep['total_seconds'] / 60:.1f} minutes in all. The steps ran one after the other; within each, "
        "engines and strategies were interleaved, and every figure to compare is a ratio measured in the same "
        "run (this machine is shared and noisy: absolute figures move by ±10–30% between runs).",
        "",
        "| step | command | minutes | result | page |",
        "|---|---|---|---|---|",
    ]
    for s in rep["steps"]:
        if not s["page"]:
            page = "below (raw: build/bench)"
        elif s["page"].startswith("build/"):  # git-ignored: name the local file, inlined below where it is a table
            page = f"`{s['page']}`"
        else:
            page = f"[{Path(s['page']).name}]({os.path.relpath(ROOT / s['page'], index_dir)})"
        lines.append(f"| {s['title']} | `{s['command']}` | {s['seconds'] / 60:.1f} | "
                     f"{'ok' if s['ok'] else '**failed**'} | {page} |")
    for name in ("compare-smollm2.md", "compare-gemma3.md"):
        path = out / name
        if path.exists():
            body = path.read_text().splitlines()
            lines += ["", *[("#" + ln if ln.startswith("#") else ln) for ln in body]]
    mobile = out / "mobile.json"
    if mobile.exists():
        lines += ["", "## Phone-class constraints (SmolLM2-135M int4)", "",
                  *_mobile_lines(json.loads(mobile.read_text()))]
    return "\n".join(lines) + "\n"


def _mobile_lines(rep: dict) -> list[str]:
    lines = [f"Measured memory bandwidth {rep['bandwidth_gbs']:.1f} GB/s; roofline "
             f"{rep['roofline_tok_s']:.0f} tok/s for {rep['weight_bytes'] / 1e6:.0f} MB of weights per token.", "",
             "| run | decode tok/s | TTFT ms | CPU-ms / token | peak RSS MB |", "|---|---|---|---|---|"]
    capped = dict(rep["memory_cap"], label=f"{rep['memory_cap'].get('cap_mb')} MB address-space cap")
    for r in rep["threads"] + [capped]:
        if r.get("ok"):
            lines.append(f"| {r.get('label') or str(r['threads']) + ' thread(s)'} | {r['decode_tok_s_median']:.1f} | "
                         f"{1000 * r['ttft_s_median']:.0f} | {1000 * r['cpu_s_per_token']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    s = rep["sustained"][0]
    if s.get("windows"):
        rates = [w["tok_s"] for w in s["windows"]]
        lines += ["", f"Sustained decode for {s['windows'][-1].get('t', len(rates)):.0f} s: first window "
                  f"{rates[0]:.1f} tok/s, last {rates[-1]:.1f}, min {min(rates):.1f}, max {max(rates):.1f}."]
    for p in rep.get("plots", []):
        lines.append(f"Plot: `{os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else p}`")
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""Speculative decoding on the real Qwen2.5-Coder pair, edgeinfer against llama.cpp on the same GGUF files.

    .venv/bin/python apps/bench/peer_speculative.py                 # 24 prompts x 48 tokens
    .venv/bin/python apps/bench/peer_speculative.py --prompts 4     # a quick look

Both engines decode the same chat prompts (apps/bench/prompts/qwen_pair.json, as edgeinfer's tokenizer
templates them; llama-server is given the token ids), greedily, exactly --new-tokens tokens (EOS ignored),
on --threads threads:

- edgeinfer: the 1.5B package alone, and speculative decoding with the 0.5B package drafting (the same GGUF
  file as llama.cpp's draft model) and with edgeinfer's best drafter (the 0.5B re-quantized to int4 with a
  32k-token drafting head; apps/bench/big_little.py makes it), in one process;
- llama.cpp: `llama-server` (apps/bench/peers/install_llama_server.sh) on the 1.5B GGUF alone, and with
  `--model-draft` on the 0.5B GGUF at its default draft settings and at --llama-draft-max / --llama-p-min.

Per prompt the configurations run in a rotating order. Ratios are each engine's speculative decode time
against its own big model alone on the same prompts (decode: after the first token; llama-server's
`timings.predicted_ms`), and the absolute tokens/s of each are shown side by side. Quality: whether each
speculative output equals the same engine's plain greedy output, and how many of edgeinfer's plain greedy
tokens llama.cpp's plain output shares (same weights, different kernels). Writes build/bench/peer-speculative.json
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

import edgeinfer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "bench"
sys.path.insert(0, str(HERE))
from batching import LLAMA_SERVER, free_port, llama_server_weight_args, wait_ready  # noqa: E402
from big_little import BIG, LITTLE, decode_seconds, ensure_little, timed  # noqa: E402


def start_llama(name: str, big: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(LLAMA_SERVER), "-m", str(big), "--port", str(port), "--parallel", "1", "-c", "4096",
           "-t", str(threads), "-tb", str(threads), *llama_server_weight_args(), *extra]
    log = open(BUILD / f"peer-speculative-{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


def llama_complete(url: str, ids: list[int], n: int) -> dict:
    body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False, "return_tokens": True}
    t = time.perf_counter()
    r = httpx.post(url + "/completion", json=body, timeout=600)
    wall = time.perf_counter() - t
    r.raise_for_status()
    out = r.json()
    tm = out["timings"]
    return {"tokens": out["tokens"], "wall_s": wall, "decode_s": tm["predicted_ms"] / 1000,
            "decode_tokens": tm["predicted_n"], "draft_n": tm.get("draft_n", 0),
            "draft_accepted": tm.get("draft_n_accepted", 0)}


def edgeinfer_complete(model, ids: list[int], n: int, **opts) -> dict:
    res, wall = timed(model, ids, n, **opts)
    return {"tokens": list(res.tokens), "wall_s": wall, "decode_s": decode_seconds(res),
            "decode_tokens": res.new_tokens - 1, "acceptance": res.stats.get("acceptance_rate")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-draft-max", type=int, default=8, help="the tuned llama.cpp setting's --spec-draft-n-max")
    ap.add_argument("--llama-p-min", type=float, default=0.75, help="the tuned setting's --spec-draft-p-min")
    ap.add_argument("--json", type=Path, default=BUILD / "peer-speculative.json")
    args = ap.parse_args(argv)
    if not LLAMA_SERVER.exists():
        print(f"{LLAMA_SERVER} is missing: build it with apps/bench/peers/install_llama_server.sh", file=sys.stderr)
        return 2
    from edgeinfer.export.sources.aliases import resolve_alias

    BUILD.mkdir(parents=True, exist_ok=True)
    big_gguf, little_gguf = resolve_alias(BIG), resolve_alias(LITTLE)
    prompts = json.loads((HERE / "prompts" / "qwen_pair.json").read_text())[: args.prompts]
    big = edgeinfer.load(BIG, threads=args.threads)
    littles = {"source": edgeinfer.load(LITTLE, threads=args.threads),
               "trim": edgeinfer.load(ensure_little("qwen2.5-coder-0.5b-int4-trim32k", "--exits", "24",
                                                    "--exit-vocab", "32768"), threads=args.threads)}
    draft = ["--model-draft", str(little_gguf), "--spec-type", "draft-simple"]
    servers = {"llama.cpp 1.5B alone": start_llama("alone", big_gguf, args.threads, []),
               "llama.cpp speculative, default draft settings": start_llama("spec", big_gguf, args.threads, draft),
               f"llama.cpp speculative, draft max {args.llama_draft_max}, p-min {args.llama_p_min}":
                   start_llama("spec-tuned", big_gguf, args.threads,
                               [*draft, "--spec-draft-n-max", str(args.llama_draft_max),
                                "--spec-draft-p-min", str(args.llama_p_min)])}
    try:
        for proc, url in servers.values():
            wait_ready(url, proc)
        def spec(model, little, ids):
            model.attach_little(little)
            return edgeinfer_complete(model, ids, args.new_tokens, strategy="speculative")

        configs = {"edgeinfer 1.5B alone": lambda ids: edgeinfer_complete(big, ids, args.new_tokens),
                   "edgeinfer speculative, 0.5B GGUF drafts": lambda ids: spec(big, littles["source"], ids),
                   "edgeinfer speculative, 0.5B int4 32k-head drafts": lambda ids: spec(big, littles["trim"], ids)}
        for name, (_, url) in servers.items():
            configs[name] = lambda ids, url=url: llama_complete(url, ids, args.new_tokens)

        names = list(configs)
        runs = {name: [] for name in names}
        load0 = os.getloadavg()[0]
        for i, text in enumerate(prompts):
            ids = big.encode([{"role": "user", "content": text}])
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                runs[name].append(configs[name](ids))
            print(f"[{i + 1}/{len(prompts)}] " + ", ".join(
                f"{n.split(',')[0][:28]} {r[-1]['decode_tokens'] / r[-1]['decode_s']:.1f}" for n, r in runs.items()),
                file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
    report = summarize(runs, args, load0)
    args.json.write_text(json.dumps(report | {"runs": runs}, indent=1))
    print(markdown(report))
    return 0


def summarize(runs: dict, args, load0: float) -> dict:
    def plain_of(name: str) -> str:
        return "edgeinfer 1.5B alone" if name.startswith("edgeinfer") else "llama.cpp 1.5B alone"

    rows = {}
    for name, rs in runs.items():
        base = runs[plain_of(name)]
        decode = sum(r["decode_s"] for r in rs)
        tokens = sum(r["decode_tokens"] for r in rs)
        rows[name] = {
            "decode_tok_s": tokens / decode,
            "decode_vs_own_plain": sum(r["decode_s"] for r in base) / decode,
            "end_to_end_vs_own_plain": sum(r["wall_s"] for r in base) / sum(r["wall_s"] for r in rs),
            "identical_to_own_plain": sum(r["tokens"] == b["tokens"] for r, b in zip(rs, base)),
            "prompts": len(rs)}
        if rs[0].get("draft_n"):
            drafted = sum(r["draft_n"] for r in rs)
            rows[name]["draft_acceptance"] = sum(r["draft_accepted"] for r in rs) / max(1, drafted)
    mine, theirs = runs["edgeinfer 1.5B alone"], runs["llama.cpp 1.5B alone"]
    same = sum(a == b for m, t in zip(mine, theirs) for a, b in zip(m["tokens"], t["tokens"]))
    return {"date": datetime.datetime.now().isoformat(timespec="minutes"), "threads": args.threads,
            "cpus": len(os.sched_getaffinity(0)), "new_tokens": args.new_tokens, "prompts": len(mine),
            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "rows": rows,
            "plain_outputs_identical_across_engines": sum(m["tokens"] == t["tokens"] for m, t in zip(mine, theirs)),
            "plain_tokens_shared_across_engines": same / sum(len(m["tokens"]) for m in mine)}


def markdown(rep: dict) -> str:
    lines = [f"{rep['date']}, {rep['cpus']} cores, {rep['threads']} threads, {rep['prompts']} prompts x "
             f"{rep['new_tokens']} greedy tokens, load {rep['loadavg_start']:.1f} -> {rep['loadavg_end']:.1f}",
             "", "| configuration | decode tok/s | decode vs its own 1.5B alone | end to end vs its own 1.5B alone | "
             "same output as its own 1.5B alone | draft acceptance |", "|---|---|---|---|---|---|"]
    for name, r in rep["rows"].items():
        acc = f"{r['draft_acceptance']:.2f}" if "draft_acceptance" in r else ""
        lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {r['decode_vs_own_plain']:.2f}x | "
                     f"{r['end_to_end_vs_own_plain']:.2f}x | {r['identical_to_own_plain']}/{r['prompts']} | {acc} |")
    lines += ["", f"The two engines' plain greedy outputs: {rep['plain_outputs_identical_across_engines']}/"
              f"{rep['prompts']} identical, {rep['plain_tokens_shared_across_engines']:.3f} of positions the same."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

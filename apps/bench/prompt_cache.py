"""Time to first token of a ~1,000-token system prompt after a process restart: restored from the
persistent prompt cache (edgeinfer/prompt_cache/) against computed cold.

    python apps/bench/prompt_cache.py                    # 5 interleaved rounds, SmolLM2-135M int4
    python apps/bench/prompt_cache.py --rounds 2 --new-tokens 8 --json build/bench/quick/prompt-cache.json
    python apps/bench/prompt_cache.py --parallel 4     # a batched model: restored into its KV slot

The system prompt: news stories from gensim's test data (the Lee corpus, gensim/test/test_data/
lee_background.cor; no one here wrote it; installed with ``pip install --no-deps gensim==4.4.0`` if
missing, as apps/bench/quality.py does), as many whole stories as make ~1,000 tokens. One process
saves it first (with its own question). Then every round starts two fresh processes, in alternating
order, that load the package and answer the same new question (a different one each round) greedily:
one with the prompt cache off (cold), one with it on (the system prompt restored from disk). Each
reports its time to first token, measured around ``generate`` (the restore included), and its load
time; the two must produce the same token ids. Prints the median ratio and writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "build" / "bench"
WORK = BENCH / "prompt-cache"
QUESTIONS = [
    "Which countries are mentioned in the first story?",
    "Summarize the second story in one sentence.",
    "Who is quoted in the third story?",
    "What numbers appear in the stories above?",
    "Which story is about sport, if any?",
    "List three people named in the text.",
    "What happened most recently, according to the stories?",
    "Give a title to the first story.",
    "What is the tone of the stories?",
    "Which organisations are mentioned?",
]
SAVE_QUESTION = "Read the stories above. Reply with OK."
TARGET = 5.0


def system_prompt(model, tokens: int) -> tuple[str, dict]:
    """Whole stories of the Lee corpus until the chat prompt reaches TOKENS tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import leading_stories  # the same real text as the quality bench

    return leading_stories(tokens, lambda text: len(model.encode(messages(text, SAVE_QUESTION))))


def messages(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


# -- the child: one fresh process, one generation ---------------------------------------------------
def child(spec: dict) -> dict:
    t0 = time.perf_counter()
    import edgeinfer
    from edgeinfer.prompt_cache import PromptCache

    cache = PromptCache(spec["cache"]) if spec["cache"] else None
    model = edgeinfer.load(spec["package"], threads=spec["threads"], prompt_cache=cache,
                           parallel=spec.get("parallel", 1))
    load_s = time.perf_counter() - t0
    system = Path(spec["system"]).read_text(encoding="utf-8")
    t1 = time.perf_counter()
    gen = model.generate(messages(system, spec["question"]), max_new_tokens=spec["new_tokens"], temperature=0.0)
    tokens = []
    ttft = None
    t_last = t1
    for ev in gen:
        if ttft is None:
            ttft = time.perf_counter() - t1
        if ev.source != "flush":
            tokens.append(ev.token_id)
        t_last = time.perf_counter()
    t_end = time.perf_counter()  # after the generator ended: the prompt's KV copied if it is saved
    if cache is not None:
        cache.wait()
    t_written = time.perf_counter()
    res = gen.result
    pc = res.stats.get("prompt_cache", {})
    return {"ttft_s": ttft, "load_s": load_s, "tokens": tokens, "prompt_tokens": res.prompt_tokens,
            "restored_tokens": pc.get("restored_tokens", 0), "saved_tokens": pc.get("saved_tokens", 0),
            "save_copy_s": t_end - t_last, "save_write_s": t_written - t_end,
            "cache_bytes": cache.total_bytes() if cache is not None else 0, "text": res.text}


def spawn(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"a benchmark process failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_package(path: Path) -> Path:
    if not (path / "edgeinfer.json").exists():
        cmd = [sys.executable, "-m", "edgeinfer.cli", "export", "smollm2-135m", "-o", str(path), "--precision",
               "int4", "--force"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return path


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=None, help="decoder package (default: build/bench/smollm2-int4, "
                    "exported with --precision int4 if missing)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="system prompt length (whole stories)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=1, help="load with parallel=N (continuous batching: the prompt "
                    "is restored into and saved from a KV slot)")
    ap.add_argument("--json", default=str(BENCH / "prompt-cache.json"))
    ap.add_argument("--markdown", default=str(BENCH / "prompt-cache.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not 1 <= args.rounds <= len(QUESTIONS):
        ap.error(f"--rounds must be in 1..{len(QUESTIONS)}")
    import edgeinfer

    pkg = Path(args.package) if args.package else ensure_package(BENCH / "smollm2-int4")
    model = edgeinfer.load(pkg)
    system, source = system_prompt(model, args.prompt_tokens)
    del model
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "system.txt").write_text(system, encoding="utf-8")
    cache_dir = WORK / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    base = {"package": str(pkg), "system": str(WORK / "system.txt"), "new_tokens": args.new_tokens,
            "threads": args.threads, "parallel": args.parallel}
    saver = spawn({**base, "cache": str(cache_dir), "question": SAVE_QUESTION})
    print(f"saved: {saver['saved_tokens']} tokens, {saver['cache_bytes'] / 1e6:.1f} MB; copy "
          f"{saver['save_copy_s'] * 1000:.0f} ms after the last token, write {saver['save_write_s'] * 1000:.0f} ms "
          "on a background thread", flush=True)
    rounds = []
    for r in range(args.rounds):
        spec = {**base, "question": QUESTIONS[r]}
        order = ["cold", "restored"] if r % 2 == 0 else ["restored", "cold"]
        got = {}
        for kind in order:
            got[kind] = spawn({**spec, "cache": str(cache_dir) if kind == "restored" else None})
        c, w = got["cold"], got["restored"]
        rounds.append({"question": QUESTIONS[r], "order": order, "cold": c, "restored": w,
                       "identical": c["tokens"] == w["tokens"]})
        print(f"round {r + 1}: prompt {c['prompt_tokens']} tokens; TTFT cold {c['ttft_s'] * 1000:.0f} ms, "
              f"restored {w['ttft_s'] * 1000:.0f} ms ({w['restored_tokens']} from disk) -> "
              f"{c['ttft_s'] / w['ttft_s']:.1f}x; load {c['load_s']:.2f} / {w['load_s']:.2f} s; identical output: "
              f"{'yes' if c['tokens'] == w['tokens'] else 'NO'}", flush=True)
    cold = median([x["cold"]["ttft_s"] for x in rounds])
    warm = median([x["restored"]["ttft_s"] for x in rounds])
    cold_total = median([x["cold"]["ttft_s"] + x["cold"]["load_s"] for x in rounds])
    warm_total = median([x["restored"]["ttft_s"] + x["restored"]["load_s"] for x in rounds])
    identical = all(x["identical"] for x in rounds)
    used = all(x["restored"]["restored_tokens"] > 0 for x in rounds)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "package": str(pkg),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "text": source, "prompt_tokens": rounds[0]["cold"]["prompt_tokens"],
        "restored_tokens": rounds[0]["restored"]["restored_tokens"], "new_tokens": args.new_tokens,
        "threads": args.threads, "parallel": args.parallel, "rounds": rounds, "save": {k: saver[k] for k in (
            "saved_tokens", "cache_bytes", "save_copy_s", "save_write_s")},
        "median": {"cold_ttft_s": cold, "restored_ttft_s": warm, "ratio": cold / warm,
                   "cold_load_plus_ttft_s": cold_total, "restored_load_plus_ttft_s": warm_total,
                   "ratio_with_load": cold_total / warm_total},
        "identical": identical, "cache_used": used, "target": TARGET,
        "command": "python apps/bench/prompt_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for x in rounds:  # keep the JSON small
        for k in ("cold", "restored"):
            x[k].pop("text", None)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    Path(args.markdown).write_text(markdown(report))
    print(f"median TTFT: cold {cold * 1000:.0f} ms, restored {warm * 1000:.0f} ms -> {cold / warm:.1f}x "
          f"(target {TARGET:.0f}x: {'met' if cold / warm >= TARGET else 'not met'}); with the load: "
          f"{cold_total:.2f} s vs {warm_total:.2f} s -> {cold_total / warm_total:.2f}x; identical output: "
          f"{'yes' if identical else 'NO'}")
    print(f"wrote {args.json} and {args.markdown}")
    return 0 if identical and used else 1


def markdown(rep: dict) -> str:
    m = rep["median"]
    t = rep["text"]
    s = rep["save"]
    verdict = "met" if m["ratio"] >= rep["target"] else "not met"
    lines = [
        "# Prompt cache: time to first token after a restart", "",
        f"`{rep['command']}`, {rep['date']}, {rep['machine']['cpus']} CPUs, package `{rep['package']}`.", "",
        *([f"Loaded with `parallel={rep['parallel']}` (continuous batching): the prompt is restored into and saved "
           "from the request's KV slot.", ""] if rep.get("parallel", 1) > 1 else []),
        f"System prompt: {rep['prompt_tokens']} tokens with the chat template and the question (news stories of "
        f"the Lee corpus, {t['file']} in {t['package']} {t['version']}, sha256 {t['sha256'][:12]}…). Each round: "
        f"two fresh processes answer the same new question ({rep['new_tokens']} tokens, greedy), one cold, one "
        "with the system prompt restored from disk; the order alternates. TTFT is measured around `generate` "
        "(the restore included); load = the package's load time.", "",
        "| round | order | cold TTFT | restored TTFT | restored tokens | ratio | load cold / restored | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(rep["rounds"], 1):
        c, w = x["cold"], x["restored"]
        lines.append(f"| {i} | {' then '.join(x['order'])} | {c['ttft_s'] * 1000:.0f} ms | {w['ttft_s'] * 1000:.0f} ms "
                     f"| {w['restored_tokens']} | {c['ttft_s'] / w['ttft_s']:.1f}× | {c['load_s']:.2f} / "
                     f"{w['load_s']:.2f} s | {'yes' if x['identical'] else 'NO'} |")
    lines += [
        "",
        f"Median TTFT: cold {m['cold_ttft_s'] * 1000:.0f} ms, restored {m['restored_ttft_s'] * 1000:.0f} ms: "
        f"**{m['ratio']:.1f}×** (target ≥ {rep['target']:.0f}×: {verdict}). "
        f"Load + TTFT: {m['cold_load_plus_ttft_s']:.2f} s against {m['restored_load_plus_ttft_s']:.2f} s "
        f"({m['ratio_with_load']:.2f}×). Identical output in every round: {'yes' if rep['identical'] else 'NO'}.",
        "",
        f"Saving it (the first process): {s['saved_tokens']} tokens, {s['cache_bytes'] / 1e6:.1f} MB on disk; the "
        + (f"KV copy took {s['save_copy_s'] * 1000:.0f} ms after the last token, the write "
           f"{s['save_write_s'] * 1000:.0f} ms on a background thread." if rep.get("parallel", 1) == 1 else
           "KV copy is made by the batching engine when the prompt's prefill ends (part of that request's TTFT) "
           f"and written on the cache's thread during the generation ({s['save_write_s'] * 1000:.0f} ms left "
           "to wait after the last token)."), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

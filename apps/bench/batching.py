"""Many clients on one model: aggregate decode tokens/s with 1, 2, 4, 8 concurrent clients,
each client's tokens/s and time to first token, for `edgeinfer serve --parallel P` beside
llama.cpp's `llama-server --parallel P` on the same GGUF weights, with one load script.

    .venv/bin/python apps/bench/batching.py --clients 1,2,4,8 --parallel 4 --rounds 2

Each client sends REQUESTS streaming completions one after the other (a fixed prompt per
client, greedy, MAX_TOKENS new tokens, usage from stream_options.include_usage). Both servers
run for the whole benchmark; the rounds interleave the engines (ABBA), so a slow minute of the
machine lands on both. The ratio that matters is each engine's aggregate tokens/s at C
clients against its own at one client (what batching buys), and edgeinfer's against
llama.cpp's at the same C. Quality: the same GGUF weights in both (edgeinfer's default
`--precision source` package carries the file's blocks exactly); the script also reports
whether each engine's greedy reply to every prompt is the same batched as alone.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv" / "bin" / "python"
LLAMA_SERVER = ROOT / ".venv-peers" / "llamacpp-server" / "bin" / "llama-server"
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from runner_cli import llama_server_weight_args  # noqa: E402  (plain Python, shared with the peer runners)

# prompts that SmolLM2 continues for a while (a public-domain opening line each)
PROMPTS = ["It was the best of times, it was the worst of times, it was the age of wisdom,",
           "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money",
           "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
           "Happy families are all alike; every unhappy family is unhappy in its own way.",
           "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole,",
           "The sky above the port was the color of television, tuned to a dead channel.",
           "All this happened, more or less. The war parts, anyway, are pretty much true.",
           "Whether I shall turn out to be the hero of my own life, or whether that station"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not come up in {seconds:.0f} s")


def one_request(url: str, prompt: str, max_tokens: int, prefix: str = "") -> dict:
    """One streaming completion of PREFIX + PROMPT on a connection of its own (llama-server closes its
    connection after a stream, so a kept-alive client would reuse a dead one)."""
    body = {"prompt": prefix + prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    text, tokens = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            for choice in msg.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text.append(choice["text"])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    end = time.perf_counter()
    if tokens is None:
        raise RuntimeError("the stream carried no usage chunk")
    first = first or end
    return {"ttft_s": first - t0, "total_s": end - t0, "tokens": tokens, "text": "".join(text),
            "decode_tok_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0}


def load(url: str, clients: int, requests: int, max_tokens: int, prefix: str = "") -> dict:
    """CLIENTS threads, each REQUESTS streaming completions in a row (its own prompt after the shared
    PREFIX); aggregate and per-client figures."""
    results: list[list[dict]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def run(i: int) -> None:
        for _ in range(requests):
            try:
                results[i].append(one_request(url, PROMPTS[i % len(PROMPTS)], max_tokens, prefix))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    tokens = sum(r["tokens"] for r in flat)
    return {"clients": clients, "wall_s": wall, "tokens": tokens, "aggregate_tok_s": tokens / wall if wall else 0.0,
            "per_client_decode_tok_s": [sum(r["decode_tok_s"] for r in rs) / len(rs) if rs else 0.0 for rs in results],
            "ttft_s": sorted(r["ttft_s"] for r in flat), "errors": errors,
            "texts": {PROMPTS[i % len(PROMPTS)]: [r["text"] for r in rs] for i, rs in enumerate(results)}}


def shared_prefix(package: str, tokens: int) -> str:
    """Whole stories of the Lee corpus (apps/bench/quality.py's real text) until they reach TOKENS tokens
    of PACKAGE's tokenizer, then a blank line."""
    from quality import leading_stories
    from tokenizers import Tokenizer

    from edgeinfer.package_cache import resolve_model

    tok = Tokenizer.from_file(str(Path(resolve_model(package)) / "tokenizer.json"))
    return leading_stories(tokens, lambda text: len(tok.encode(text).ids))[0] + "\n\n"


def start_servers(args) -> dict:
    servers = {}
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "edgeinfer"), "serve", args.package, "--port", str(port), "--parallel",
           str(args.parallel), "--max-queue", str(max(args.clients) + 1), "--threads", str(args.threads)]
    logs = ROOT / "build" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    servers["edgeinfer"] = (subprocess.Popen(cmd, stderr=open(logs / "batching-edgeinfer.log", "w")),
                            f"http://127.0.0.1:{port}")
    if not args.no_peer:
        if not LLAMA_SERVER.exists():
            raise SystemExit(f"{LLAMA_SERVER} is missing: build it with apps/bench/peers/install_llama_server.sh "
                             "(or pass --no-peer).")
        port = free_port()
        cmd = [str(LLAMA_SERVER), "-m", args.gguf, "--port", str(port), "--parallel", str(args.parallel),
               "-c", str(args.context * args.parallel), "-t", str(args.threads), "-tb", str(args.threads),
               *llama_server_weight_args()]
        servers["llama.cpp"] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                 stderr=open(logs / "batching-llama.cpp.log", "w")),
                                f"http://127.0.0.1:{port}")
    for proc, url in servers.values():
        wait_ready(url, proc)
    return servers


def markdown(rep: dict) -> str:
    engines = list(rep["engines"])
    lines = [f"Aggregate decode tokens/s of streaming completions ({rep['max_tokens']} new tokens, greedy), "
             f"{rep['requests']} requests per client, `--parallel {rep['parallel']}` on both servers, "
             f"{rep['threads']} threads, median of {rep['rounds']} interleaved rounds; same GGUF weights"
             + (f"; every prompt after the same ~{rep['system_tokens']}-token prefix (news text)."
                if rep.get("system_tokens") else "."),
             "", "| clients | " + " | ".join(f"{e} tok/s | {e} × its 1 client | {e} TTFT p50 ms" for e in engines)
             + (" | edgeinfer / llama.cpp |" if "llama.cpp" in engines else ""),
             "|---|" + "---|---|---|" * len(engines) + ("---|" if "llama.cpp" in engines else "")]
    for c in rep["clients"]:
        row = [str(c)]
        for e in engines:
            m = rep["engines"][e][str(c)]
            row += [f"{m['aggregate_tok_s']:.1f}", f"{m['scaling']:.2f}×", f"{m['ttft_p50_ms']:.0f}"]
        if "llama.cpp" in engines:
            ours, peer = (rep["engines"][e][str(c)]["aggregate_tok_s"] for e in ("edgeinfer", "llama.cpp"))
            row.append(f"{ours / peer:.2f}×" if peer else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Greedy replies identical batched and alone: "
              + ", ".join(f"{e}: {rep['engines'][e]['same_as_alone']}" for e in engines) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="smollm2-135m", help="edgeinfer package or alias")
    ap.add_argument("--gguf", default=None, help="llama.cpp's weights (default: the alias's GGUF file)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024, help="context per slot (llama.cpp: -c context × parallel)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="edgeinfer only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--system-tokens", type=int, default=0,
                    help="a shared prefix of about this many tokens (real news text) before every client's prompt, "
                         "as a long system prompt: both servers reuse a slot's cached prefix")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.gguf is None and not args.no_peer:
        out = subprocess.run([str(PY), "-c", "from edgeinfer.export.sources.aliases import resolve_alias;"
                              f"print(resolve_alias({args.package!r}))"], capture_output=True, text=True, check=True)
        args.gguf = out.stdout.strip()
    prefix = shared_prefix(args.package, args.system_tokens) if args.system_tokens else ""
    args.context = max(args.context, args.system_tokens + 256)  # llama.cpp's slots must hold the prefix
    servers = start_servers(args)
    runs: dict = {e: {c: [] for c in args.clients} for e in servers}
    alone: dict = {}
    try:
        order = list(servers)
        for e, (_, url) in servers.items():  # every prompt's greedy reply with no other request running
            alone[e] = {p: one_request(url, p, args.max_tokens, prefix)["text"] for p in PROMPTS[:max(args.clients)]}
        for rnd in range(args.rounds):
            for e in (order if rnd % 2 == 0 else order[::-1]):
                url = servers[e][1]
                load(url, 1, 1, 8)  # warm-up
                for c in args.clients:
                    res = load(url, c, args.requests, args.max_tokens, prefix)
                    runs[e][c].append(res)
                    print(f"round {rnd + 1} {e:10s} {c} clients: {res['aggregate_tok_s']:.1f} tok/s aggregate, "
                          f"{len(res['errors'])} errors", file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    def median(xs):
        return statistics.median(xs) if xs else 0.0

    rep = {"system_tokens": args.system_tokens,
           "clients": args.clients, "parallel": args.parallel, "requests": args.requests, "max_tokens": args.max_tokens,
           "threads": args.threads, "rounds": args.rounds, "package": args.package, "gguf": args.gguf, "engines": {}}
    for e, by_c in runs.items():
        base = median([r["aggregate_tok_s"] for r in by_c[args.clients[0]]])
        differ = [(c, p, t) for c, rs in by_c.items() for r in rs for p, ts in r["texts"].items() for t in ts
                  if t != alone[e][p]]
        same = not differ
        for c, p, t in differ:
            print(f"{e}, {c} clients: the reply to {p[:40]!r} differs from the one alone: {t!r} against "
                  f"{alone[e][p]!r}", file=sys.stderr)
        rep["engines"][e] = {"same_as_alone": same, "errors": sum(len(r["errors"]) for rs in by_c.values() for r in rs)}
        for c, rs in by_c.items():
            agg = median([r["aggregate_tok_s"] for r in rs])
            ttft = median([median(r["ttft_s"]) for r in rs])
            rep["engines"][e][str(c)] = {"aggregate_tok_s": agg, "scaling": agg / base if base else 0.0,
                                         "ttft_p50_ms": 1000 * ttft,
                                         "per_client_decode_tok_s": [median(x) for x in
                                                                     zip(*[r["per_client_decode_tok_s"] for r in rs])]}
    md = markdown(rep)
    print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    return 0 if all(v["errors"] == 0 for v in rep["engines"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

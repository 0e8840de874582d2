"""KV cache precision: decode tokens/s after long prompts with fp32 / fp16 / int8 KV on one model,
ratios against fp32 KV (and against onnxruntime-genai on the same weights) measured in the same
interleaved rounds, and the quality the int8 cache costs.

    .venv/bin/python apps/bench/kv_dtype.py            # 512 and 2048-token prompts, 3 rounds, quality
    .venv/bin/python apps/bench/kv_dtype.py --quick    # 2048 only, 2 rounds, a short quality check

Each variant is the model's default package (for smollm2-135m: the GGUF's own Q4_1 blocks) exported
with ``--kv-dtype``; every engine runs in its own process through the runner the comparison uses
(apps/bench/run_edgeinfer.py, apps/bench/peers/run_genai.py), on the same prompt token ids,
in a rotating order (A, B, C, then B, C, A …) so machine noise hits all alike.

Quality (apps/bench/quality.py's text, edgeinfer/perplexity.py's scoring): perplexity of each KV
dtype and its top-1 agreement with the fp32-KV package of the same weights, in 256-token windows
and in one long window (the context where the KV precision matters). As a yardstick for what an
agreement figure means on this package, the same weights at --accuracy-level 0 (float activations
in the matmuls instead of int8) are scored against the default too: a perturbation of the
activations of about the same size.

Writes build/bench/kv-dtype.json and the markdown page (--markdown, default docs/kv-cache-bench.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "bench"
EDGEINFER_RUNNER = HERE / "run_edgeinfer.py"
GENAI_RUNNER = HERE / "peers" / "run_genai.py"


def sh(cmd: list) -> None:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def export(args, kv_dtype: str, extra: tuple = ()) -> Path:
    suffix = "-".join(str(e).lstrip("-") for e in extra)
    pkg = BUILD / f"{args.short}-kv-{kv_dtype}{'-' + suffix if suffix else ''}"
    if not (pkg / "edgeinfer.json").exists():
        sh([Path(sys.executable).with_name("edgeinfer"), "export", args.model, "-o", pkg, "--kv-dtype", kv_dtype,
            "--force", *extra])
    return pkg


def genai_model(args) -> Path | None:
    """onnxruntime-genai's int4 build of the model (compare.py's), built if its venv exists."""
    if args.no_genai or not Path(args.genai_python).exists():
        return None
    model = Path(args.genai_model) if args.genai_model else BUILD / f"{args.short}-genai-int4"
    if not (model / "genai_config.json").exists():
        hf = BUILD / f"{args.short}-hf"
        if not (hf / "config.json").exists():
            sh([sys.executable, HERE / "peers" / "prepare_hf.py", args.model, hf])
        try:
            subprocess.run(["bash", str(HERE / "peers" / "build_genai_model.sh"), str(hf), str(model)], check=True,
                           cwd=ROOT, env={**__import__("os").environ, "GENAI_PY": str(args.genai_python)})
        except subprocess.CalledProcessError:
            print("onnxruntime-genai's builder failed: left out", file=sys.stderr)
            return None
    return model


def prompt_file(pkg: Path, n: int, short: str) -> Path:
    code = ("import json, edgeinfer\nfrom edgeinfer.bench import synthetic_prompt\n"
            f"print(json.dumps(synthetic_prompt(edgeinfer.load({str(pkg)!r}), {n})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    path = BUILD / f"prompt-{short}-{n}.json"
    path.write_text(out.stdout.strip())
    return path


def speed(args, engines: dict, prompts: list[int]) -> list[dict]:
    names = list(engines)
    out = []
    for n in prompts:
        ids_file = prompt_file(engines["fp32"][2], n, args.short)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            got = {name: compare.run_engine(*engines[name], ids_file, args) for name in order}
            rounds.append(got)
            print(f"[{n}] round {r + 1}: " + ", ".join(
                f"{k} {statistics.median(x['decode_tok_s'] for x in got[k]['runs']):.1f}" for k in names),
                file=sys.stderr, flush=True)
        out.append(summarize(n, rounds, names))
    return out


def _decode(run: dict) -> float:
    return statistics.median(x["decode_tok_s"] for x in run["runs"])


def summarize(n: int, rounds: list[dict], names: list[str]) -> dict:
    res = {"prompt_tokens": n, "engines": {}, "ratios": {}}
    for name in names:
        dec = [_decode(rd[name]) for rd in rounds]
        ttft = [statistics.median(x["ttft_s"] for x in rd[name]["runs"]) for rd in rounds]
        res["engines"][name] = {"decode_tok_s": {"median": statistics.median(dec), "min": min(dec), "max": max(dec)},
                                "ttft_ms": 1000 * statistics.median(ttft),
                                "peak_rss_mb": max(rd[name]["peak_rss_mb"] for rd in rounds),
                                "version": rounds[0][name]["version"]}
    for a in names:
        for b in names:
            if a == b or a == "onnxruntime-genai-int4" or (b != "fp32" and b != "onnxruntime-genai-int4"):
                continue
            per = [_decode(rd[a]) / _decode(rd[b]) for rd in rounds]
            res["ratios"][f"{a} / {b}"] = {"median": statistics.median(per), "rounds": per}
    return res


def quality(args, packages: dict, yardstick: Path | None) -> dict:
    import numpy as np
    from quality import evaluation_text

    import edgeinfer
    from edgeinfer.perplexity import decode_path_argmax, evaluate

    text, meta = evaluation_text(install=not args.no_install)
    ref = edgeinfer.load(packages["fp32"], threads=args.threads)
    out = {"text": meta, "settings": []}
    others = {k: v for k, v in packages.items() if k != "fp32"}
    if yardstick is not None:
        others["fp32, accuracy level 0 (yardstick)"] = yardstick
    for context, chars in ((256, args.short_chars), (args.long_context, args.long_chars)):
        rows = {}
        for name, pkg in others.items():
            m = edgeinfer.load(pkg, threads=args.threads)
            rep = evaluate(m, text[:chars], context=context, against=ref, progress=False)
            rows[name] = {"perplexity": rep.perplexity, "fp32_perplexity": rep.against_perplexity,
                          "relative": rep.perplexity / rep.against_perplexity - 1,
                          "top1_agreement": rep.top1_agreement, "windows": rep.windows,
                          "scored_tokens": rep.scored_tokens}
            print(f"[quality {context}] {name}: ppl {rep.perplexity:.3f} vs {rep.against_perplexity:.3f}, "
                  f"agreement {rep.top1_agreement:.4f}", file=sys.stderr, flush=True)
            del m
        out["settings"].append({"context": context, "rows": rows})
    # the decode path: one step at a time, every prediction reading the stored cache
    ids = ref.tokenizer.encode(text, add_special_tokens=False)[:args.decode_tokens]
    theirs = decode_path_argmax(ref, ids)
    out["decode_path"] = {"tokens": int(len(theirs)), "window": 128, "rows": {}}
    for name, pkg in others.items():
        mine = decode_path_argmax(edgeinfer.load(pkg, threads=args.threads), ids)
        out["decode_path"]["rows"][name] = float(np.mean(mine == theirs))
        print(f"[decode path] {name}: agreement {out['decode_path']['rows'][name]:.4f}", file=sys.stderr, flush=True)
    return out


def markdown(rep: dict) -> str:
    m = rep["machine"]
    cmd = " ".join(rep["argv"])
    lines = [f"# KV cache precision on {rep['model']}", "",
             f"Generated by `.venv/bin/python apps/bench/kv_dtype.py {cmd}` on {rep['date'][:10]} — {m['cpu']}, "
             f"{m['cores']} cores, {rep['threads']} threads, greedy, {rep['new_tokens']} new tokens after the "
             f"prompt (EOS ignored), {rep['rounds']} interleaved rounds × {rep['repeats']} repeat(s) after a warm-up; "
             "medians of round medians (min–max over rounds). Packages: the model's default export with "
             "`--kv-dtype fp32|fp16|int8`; onnxruntime-genai: its int4 build of the same model (compare.py's).", "",
             "These machines are shared and noisy: compare the ratios, measured in the same rounds.", ""]
    for pr in rep["speed"]:
        lines += [f"## Decode after a {pr['prompt_tokens']}-token prompt", "",
                  "| engine | decode tok/s | TTFT ms | peak RSS MB |", "|---|---|---|---|"]
        for name, e in pr["engines"].items():
            d = e["decode_tok_s"]
            label = name if name.startswith("onnxruntime") else f"edgeinfer, {name} KV"
            lines.append(f"| {label} {e['version']} | {d['median']:.1f} ({d['min']:.0f}–{d['max']:.0f}) | "
                         f"{e['ttft_ms']:.0f} | {e['peak_rss_mb']:.0f} |")
        lines += ["", "| ratio | decode (median of per-round ratios) | per round |", "|---|---|---|"]
        for k, r in pr["ratios"].items():
            lines.append(f"| {k} | **{r['median']:.2f}×** | {', '.join(f'{x:.2f}' for x in r['rounds'])} |")
        lines.append("")
    q = rep.get("quality")
    if q:
        t = q["text"]
        lines += ["## Quality against fp32 KV (same weights)", "",
                  f"Text: {t.get('file')} from {t.get('package')} {t.get('version')} (apps/bench/quality.py's), "
                  "teacher-forced, each window from an empty cache (edgeinfer/perplexity.py).", "",
                  "| KV | context | windows × scored tokens | perplexity | fp32-KV perplexity | change | "
                  "top-1 agreement |", "|---|---|---|---|---|---|---|"]
        for s in q["settings"]:
            for name, r in s["rows"].items():
                lines.append(f"| {name} | {s['context']} | {r['windows']} × {r['scored_tokens'] // r['windows']} | "
                             f"{r['perplexity']:.3f} | {r['fp32_perplexity']:.3f} | {100 * r['relative']:+.2f}% | "
                             f"{r['top1_agreement']:.4f} |")
        lines.append("")
        dp = q.get("decode_path")
        if dp:
            lines += [f"Through the decode path ({dp['tokens']} predictions: windows of {dp['window']}, each "
                      "prefilled with 4 tokens and stepped one token at a time, so that every prediction reads "
                      "the stored cache; a batched prefill attends to fresh keys and values, which hides an fp16 "
                      "cache):", "", "| KV | top-1 agreement with fp32 KV, decode path |", "|---|---|"]
            lines += [f"| {name} | {a:.4f} |" for name, a in dp["rows"].items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", choices=list(compare.MODELS))
    p.add_argument("--quick", action="store_true", help="2048 only, 2 rounds, 32 new tokens, short quality check")
    p.add_argument("--kv-dtypes", default="fp32,fp16,int8")
    p.add_argument("--prompt-tokens", default="512,2048")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-genai", action="store_true", help="leave onnxruntime-genai out")
    p.add_argument("--genai-python", default=str(compare.GENAI_PY), help="the peer venv's python")
    p.add_argument("--genai-model", default=None, help="a genai model folder (default: build it as compare.py does)")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-install", action="store_true", help="do not pip-install the quality text")
    p.add_argument("--long-context", type=int, default=2048)
    p.add_argument("--short-chars", type=int, default=12000, help="characters of the text in 256-token windows")
    p.add_argument("--long-chars", type=int, default=40000, help="characters of the text in long windows")
    p.add_argument("--decode-tokens", type=int, default=1024, help="tokens of the text fed through the decode path")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "kv-cache-bench.md"))
    p.add_argument("--json", default=str(BUILD / "kv-dtype.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.prompt_tokens = 2, 32, "2048"
        args.short_chars, args.long_chars, args.decode_tokens = 4000, 12000, 256  # one 2048 window
    args.short = compare.MODELS[args.model][0]
    BUILD.mkdir(parents=True, exist_ok=True)

    packages = {d: export(args, d) for d in args.kv_dtypes.split(",")}
    if "fp32" not in packages:
        raise SystemExit("--kv-dtypes must include fp32: the ratios are against it")
    engines = {d: (sys.executable, EDGEINFER_RUNNER, pkg) for d, pkg in packages.items()}
    peer = genai_model(args)
    if peer is not None:
        engines["onnxruntime-genai-int4"] = (args.genai_python, GENAI_RUNNER, peer)
    rep = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": compare.machine(),
           "argv": list(argv if argv is not None else sys.argv[1:]), "model": args.model, "threads": args.threads,
           "new_tokens": args.new_tokens, "rounds": args.rounds, "repeats": args.repeats,
           "packages": {k: str(v) for k, v in packages.items()}}
    rep["speed"] = speed(args, engines, [int(n) for n in args.prompt_tokens.split(",")])
    if not args.no_quality:
        yardstick = export(args, "fp32", ("--accuracy-level", "0"))
        rep["quality"] = quality(args, packages, yardstick)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rep, indent=1))
    md = markdown(rep)
    Path(args.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

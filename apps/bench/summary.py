"""The report's summary: every engine and strategy in one table, the issue's
targets with the distance to each, and the report's plots.

Reads the JSON that the report's steps wrote during this run (files older than
the run are ignored, so a failed step leaves a gap, not a stale figure):

- build/bench/compare-<model>.json (apps/bench/compare.py): engines side by side;
- build/bench/strategies-a4.json (strategies.py): speed-ups over plain decoding;
- build/bench/big_little.json (big_little.py): speed over the big model alone;
- build/moe-bench/results-*.json (moe.py): tokens/s under memory budgets;
- build/whisper-bench/whisper.json (whisper.py): inverse real-time factors;
- build/bench/prompt-cache.json (prompt_cache.py): time to first token after a restart, restored vs cold;
- build/bench/batching.json (batching.py): aggregate tokens/s with 1–8 clients, against llama-server.

Strategy rows are measured against plain decoding of the same package in the
same process; their "vs onnxruntime-genai" column multiplies that speed-up by
the plain engine's ratio to onnxruntime-genai from the compare step (two
measurements, so marked as derived).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENAI = "onnxruntime-genai-int4"
OURS = "edgeinfer-int4"


def _load(path: Path, since: float) -> dict | None:
    try:
        if path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(since: float, build: Path = ROOT / "build") -> dict:
    """Every source this run produced under BUILD (None where a step did not run or failed)."""
    bench = build / "bench"
    moe = {}
    for path in sorted((build / "moe-bench").glob("results-*.json")):
        data = _load(path, since)
        if data:
            moe[data.get("model", path.stem)] = data
    return {"smollm2": _load(bench / "compare-smollm2.json", since),
            "gemma3": _load(bench / "compare-gemma3.json", since),
            "strategies": _load(bench / "strategies-a4.json", since),
            "big_little": _load(bench / "big_little.json", since),
            "whisper": _load(build / "whisper-bench" / "whisper.json", since),
            "prompt_cache": _load(bench / "prompt-cache.json", since),
            "batching": _load(bench / "batching.json", since),
            "moe": moe}


def _prompt(compare: dict | None, name: str) -> dict | None:
    return next((p for p in (compare or {}).get("prompts", []) if p["prompt"] == name), None)


def _ratio(prompt: dict | None, a: str, b: str) -> float | None:
    r = (prompt or {}).get("ratios", {}).get(f"{a} / {b}")
    return r["decode"] if r else None


def strategy_rows(src: dict) -> list[dict]:
    """One row per engine or strategy: name, kind, tok/s, × plain edgeinfer, × onnxruntime-genai."""
    rows = []
    chat = _prompt(src["smollm2"], "chat")
    plain_vs_genai = _ratio(chat, OURS, GENAI)
    if chat:
        ours = chat["engines"].get(OURS, {}).get("decode_tok_s", {}).get("median")
        for name, e in chat["engines"].items():
            tps = e["decode_tok_s"]["median"]
            rows.append({"name": name, "kind": "engine (plain decoding)", "prompts": "chat", "tok_s": tps,
                         "vs_plain": tps / ours if ours else None,
                         "vs_genai": tps / chat["engines"][GENAI]["decode_tok_s"]["median"]
                         if GENAI in chat["engines"] else None, "derived": False})
    st = src["strategies"]
    if st:
        for set_name, s in st["sets"].items():
            for key, r in s["strategies"].items():
                name, kind = key.split(" ", 1)[0], "lossless"
                rows.append({"name": f"{name} {key.split(' ', 1)[1] if ' ' in key else ''}".strip(),
                             "kind": f"{kind} strategy, int4", "prompts": set_name,
                             "tok_s": s["plain_tok_s"] * r["speedup_median"], "vs_plain": r["speedup_median"],
                             "vs_genai": plain_vs_genai * r["speedup_median"] if plain_vs_genai else None,
                             "derived": True, "identical": f"{r['lossless_prompts']}/{r['prompts']}"})
        for r in st.get("early_exit", []):
            if r["threshold"] in (0.95, 0.8, 0.6):
                rows.append({"name": f"early-exit threshold {r['threshold']}", "kind": "lossy strategy, int4",
                             "prompts": "chat", "tok_s": st["sets"]["chat"]["plain_tok_s"] * r["speedup"],
                             "vs_plain": r["speedup"],
                             "vs_genai": plain_vs_genai * r["speedup"] if plain_vs_genai else None,
                             "derived": True, "identical": f"agreement {r['agreement']:.2f}, "
                                                           f"depth {r['average_depth_fraction']:.2f}"})
    bl = src["big_little"]
    if bl:
        for r in bl["results"]:
            lossless = r["options"]["strategy"] == "speculative"
            rows.append({"name": r["strategy"], "kind": f"{'lossless' if lossless else 'lossy'} big/little, "
                                                        f"big = {r['big']}",
                         "prompts": f"{bl['prompts']} chat", "tok_s": bl["big_plain_tok_s_median"] * r["speed_vs_big"],
                         "vs_plain": r["speed_vs_big"], "vs_genai": None, "derived": False,
                         "identical": f"quality {r['quality_kept']:.2f}, big share {r['big_share']:.2f}"})
    for model, m in src["moe"].items():
        resident = next((r["tok_s"] for r in m["runs"] if r["mode"] == "resident"), None)
        for r in m["runs"]:
            if r["mode"] == "resident":
                continue
            rows.append({"name": f"MoE {model}: {r['mode']}, budget {r['budget_fraction']:.0%}",
                         "kind": "expert streaming",
                         "prompts": "docs text" if "moefied" in model else "random tokens", "tok_s": r["tok_s"],
                         "vs_plain": r["tok_s"] / resident if resident else None, "vs_genai": None,
                         "derived": False, "identical": f"hit rate {r['stats']['hit_rate']:.2f}"})
    return rows


def targets(src: dict) -> list[tuple[str, str, str]]:
    """(target, measured, distance) for the benchmark issue's targets."""
    out = []
    sm = src["smollm2"]
    for peer, goal in ((GENAI, 1.2), ("llama.cpp-Q4_1", 1.4)):
        got = {p["prompt"]: _ratio(p, OURS, peer) for p in (sm or {}).get("prompts", [])}
        got = {k: v for k, v in got.items() if v}
        if got:
            worst = min(got.values())
            out.append((f"plain int4 decode ≥ {goal}× {peer}",
                        ", ".join(f"{k}: {v:.2f}×" for k, v in got.items()),
                        "met" if worst >= goal else f"short by {goal - worst:.2f}× at worst "
                                                    f"({min(got, key=got.get)})"))
    rows = [r for r in strategy_rows(src) if r["kind"].startswith("lossless strategy") and r["vs_genai"]]
    if rows:
        best = max(rows, key=lambda r: r["vs_genai"])
        out.append(("best lossless strategy ≥ 2× onnxruntime-genai",
                    f"{best['name']} on {best['prompts']} prompts: {best['vs_genai']:.2f}× (derived: "
                    f"{best['vs_plain']:.2f}× plain × plain's ratio to genai)",
                    "met" if best["vs_genai"] >= 2 else f"short by {2 - best['vs_genai']:.2f}×"))
    for key in ("smollm2", "gemma3"):
        for p in (src[key] or {}).get("prompts", []):
            e = p["engines"].get(OURS)
            if e:
                frac = e["decode_tok_s"]["median"] / e["roofline_tok_s"]
                out.append((f"{key} int4 decode ≥ 50% of the memory roofline ({p['prompt']} prompt)",
                            f"{100 * frac:.0f}% ({e['decode_tok_s']['median']:.0f} of {e['roofline_tok_s']:.0f} "
                            "tok/s)", "met" if frac >= 0.5 else f"short by {100 * (0.5 - frac):.0f} points"))
    w = src["whisper"]
    if w:
        ours = {k: v for k, v in w["engines"].items() if k.startswith("edgeinfer")}
        peers = {k: v for k, v in w["engines"].items() if not k.startswith("edgeinfer")}
        for name, e in ours.items():
            for pname, p in peers.items():
                ratio = e["inverse_rtf"] / p["inverse_rtf"]
                out.append((f"Whisper tiny.en {name} ≥ 1.0× {pname} (inverse real-time factor)",
                            f"{ratio:.2f}× ({e['inverse_rtf']:.1f} vs {p['inverse_rtf']:.1f})",
                            "met" if ratio >= 1 else f"short by {1 - ratio:.2f}×"))
    pc = src.get("prompt_cache")
    if pc:
        m = pc["median"]
        cold, warm = m["cold_ttft_s"] * 1000, m["restored_ttft_s"] * 1000
        out.append((f"TTFT of a ~1,000-token system prompt after a restart, restored from disk ≥ {pc['target']:.0f}× "
                    "cold", f"{m['ratio']:.1f}× ({cold:.0f} ms cold, {warm:.0f} ms restored, "
                    f"{pc['prompt_tokens']} tokens; identical output: "
                    f"{'yes' if pc['identical'] else 'no'})",
                    "met" if m["ratio"] >= pc["target"] and pc["identical"] else
                    f"short by {pc['target'] - m['ratio']:.1f}×" if m["ratio"] < pc["target"] else "output differs"))
    bt = src.get("batching")
    if bt and "4" in bt["engines"].get("edgeinfer", {}):
        ours, peer = bt["engines"]["edgeinfer"]["4"], bt["engines"].get("llama.cpp", {}).get("4")
        vs_peer = f", {ours['aggregate_tok_s'] / peer['aggregate_tok_s']:.2f}× llama-server" if peer else ""
        out.append(("aggregate decode with 4 clients ≥ 2.5× one client (serve --parallel 4)",
                    f"{ours['scaling']:.2f}× ({ours['aggregate_tok_s']:.0f} tok/s{vs_peer}; replies the same as "
                    f"alone: {'yes' if bt['engines']['edgeinfer']['same_as_alone'] else 'no'})",
                    "met" if ours["scaling"] >= 2.5 else f"short by {2.5 - ours['scaling']:.2f}×"))
    return out


def markdown(src: dict, plot_links: list[str]) -> list[str]:
    lines = ["## Every engine and strategy (SmolLM2-135M unless named)", "",
             "× plain = against edgeinfer's own plain decoding of the same package (strategies: same process, "
             "interleaved; big/little: against the fp32 big model alone; MoE: against all experts resident). "
             "× genai for strategies is derived (strategy speed-up × plain int4's ratio to onnxruntime-genai "
             "on the chat prompt).", "",
             "| engine / strategy | kind | prompts | tok/s | × plain | × onnxruntime-genai | output |",
             "|---|---|---|---|---|---|---|"]
    for r in strategy_rows(src):
        vp = "–" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}×"
        vg = "–" if r["vs_genai"] is None else f"{r['vs_genai']:.2f}×{' (derived)' if r['derived'] else ''}"
        lines.append(f"| {r['name']} | {r['kind']} | {r['prompts']} | {r['tok_s']:.1f} | {vp} | {vg} | "
                     f"{r.get('identical', '')} |")
    lines += ["", "## Targets and the distance to each", "", "| target | measured | distance |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {d} |" for t, m, d in targets(src)]
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in plot_links]]
    return lines


def plots(src: dict, out_dir: Path) -> list[Path]:
    """Bar chart of tokens/s per engine and strategy; tokens/s against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in strategy_rows(src) if not r["name"].startswith("MoE")]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
        labels = [f"{r['name']} ({r['prompts']})" for r in rows]
        colors = ["tab:grey" if r["kind"].startswith("engine") else "tab:blue" if "lossless" in r["kind"]
                  else "tab:orange" for r in rows]
        ax.barh(range(len(rows)), [r["tok_s"] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (grey: engines, blue: lossless, orange: lossy)")
        ax.set_title("SmolLM2-135M: engines and strategies")
        fig.tight_layout()
        written.append(out_dir / "bench-strategies.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    for key in ("smollm2", "gemma3"):
        rep = src[key]
        numeric = [p for p in (rep or {}).get("prompts", []) if p["prompt"] != "chat"]
        if len(numeric) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in numeric[0]["engines"]:
            xs = [p["prompt_tokens"] for p in numeric if name in p["engines"]]
            ys = [p["engines"][name]["decode_tok_s"]["median"] for p in numeric if name in p["engines"]]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{rep['model']}: decode speed against prompt length")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"bench-prompt-length-{key}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


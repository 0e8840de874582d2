"""docs/moe.md and docs/moe-budget.png: tables and findings computed from the results of the runs
(results-<model>.json), plus the side measurements (ffn-options.json, routing-ahead.json,
formats.json, residency.json) when present."""

from __future__ import annotations

import json

import numpy as np

from .models import DOC, OUT

PLOT = DOC.with_name("moe-budget.png")
MODE_NAMES = {"resident": "all resident", "prefetch": "read-ahead", "naive": "on demand"}
VARIANTS = {"": "", "--readers 3": "reader threads", "--predict-from input": "guess from layer input"}


def _key(r: dict) -> tuple:
    return (r["mode"], r["budget_fraction"], r.get("threads"), r.get("variant", ""))


def summarize(result: dict) -> dict[tuple, dict]:
    """Per configuration (mode, budget, threads, variant): medians over the interleaved runs, the read
    bound and the fraction of it reached."""
    groups: dict = {}
    for r in result["runs"]:
        groups.setdefault(_key(r), []).append(r)
    bw = result["disk"]["gb_s"] * 1e9
    resident = {k[2]: float(np.median([r["tok_s"] for r in rs])) for k, rs in groups.items() if k[0] == "resident"}
    out = {}
    for key, rs in groups.items():
        tok = [r["tok_s"] for r in rs]
        med = sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2]
        s, n = med["stats"], med["tokens"]
        compute = resident.get(key[2], max(resident.values()))  # all resident on the same threads
        needed = float(np.median([r["missed_bytes_per_token"] for r in rs]))
        bound = min(compute, bw / needed) if needed > 0 else compute
        out[key] = {"mode": key[0], "frac": key[1], "threads": key[2], "variant": key[3],
                    "tok_s": float(np.median(tok)), "runs": tok, "hit_rate": s["hit_rate"],
                    "read_mb_tok": s["bytes_read_per_token"] / 1e6,
                    "needed_mb_tok": needed / 1e6, "wait_ms_tok": s["wait_s"] / n * 1e3,
                    "read_ms_tok": s["read_s"] / n * 1e3, "build_ms_tok": s["build_s"] / n * 1e3,
                    "accuracy": s["prefetch_accuracy"], "ahead_used": s["prefetch_used"], "ahead": s["prefetched"],
                    "bound": bound, "of_bound": float(np.median(tok)) / bound,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "budget_mb": med["budget_bytes"] / 1e6,
                    "load": float(np.median([r["loadavg"][0] for r in rs])) if "loadavg" in med else None}
    return out


def _streaming_threads(rows: dict) -> int | None:
    return next((k[2] for k in rows if k[0] == "prefetch"), None)


def headline(result: dict) -> list[dict]:
    """Per budget below 100%: read-ahead against on-demand (default settings), and against the bound."""
    rows = summarize(result)
    th = _streaming_threads(rows)
    out = []
    for frac in sorted({k[1] for k in rows if k[0] == "prefetch"}, reverse=True):
        p, n = rows.get(("prefetch", frac, th, "")), rows.get(("naive", frac, th, ""))
        if p and n:
            out.append({"frac": frac, "p": p, "n": n, "ratio": p["tok_s"] / n["tok_s"],
                        "ratios": [a / b for a, b in zip(p["runs"], n["runs"])]})
    return out


def summary_table(results: dict[str, dict]) -> list[str]:
    lines = ["| model | budget | read-ahead tok/s (runs) | on demand tok/s (runs) | read-ahead / on demand "
             "(per round) | read bound tok/s | read-ahead of bound | hit rate ahead / on demand | read MB/token "
             "ahead / on demand | wait ms/token ahead / on demand | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, result in results.items():
        for h in headline(result):
            p, n = h["p"], h["n"]
            lines.append(
                f"| {model} | {h['frac']:.0%} ({p['budget_mb']:.0f} MB) | **{p['tok_s']:.2f}** "
                f"({' / '.join(f'{t:.1f}' for t in p['runs'])}) | {n['tok_s']:.2f} "
                f"({' / '.join(f'{t:.1f}' for t in n['runs'])}) | **{h['ratio']:.2f}x** "
                f"({' / '.join(f'{t:.2f}' for t in h['ratios'])}) | {p['bound']:.1f} | **{p['of_bound']:.2f}** | "
                f"{p['hit_rate']} / {n['hit_rate']} | {p['read_mb_tok']:.1f} / {n['read_mb_tok']:.1f} | "
                f"{p['wait_ms_tok']:.1f} / {n['wait_ms_tok']:.1f} | {p['peak_rss_mb']:.0f} |")
    return lines


def _detail_table(result: dict) -> list[str]:
    rows = summarize(result)
    lines = ["| experts | variant | compute threads | budget | tok/s median (runs) | hit rate | needed MB/token | "
             "read MB/token | read ahead (used) | guess accuracy | wait ms/token | read ms/token | "
             "widen ms/token | bound tok/s | of bound | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"resident": 0, "prefetch": 1, "naive": 2}
    for r in sorted(rows.values(), key=lambda r: (-r["frac"], order[r["mode"]], r["variant"], r["threads"] or 0)):
        lines.append(
            f"| {MODE_NAMES[r['mode']]} | {VARIANTS.get(r['variant'], r['variant'])} | {r['threads'] or 'all'} | "
            f"{r['frac']:.0%} ({r['budget_mb']:.0f} MB) | **{r['tok_s']:.2f}** "
            f"({' / '.join(f'{t:.1f}' for t in r['runs'])}) | {r['hit_rate']} | {r['needed_mb_tok']:.2f} | "
            f"{r['read_mb_tok']:.2f} | {r['ahead']} ({r['ahead_used']}) | "
            f"{r['accuracy'] if r['accuracy'] is not None else '–'} | {r['wait_ms_tok']:.1f} | "
            f"{r['read_ms_tok']:.1f} | {r['build_ms_tok']:.1f} | {r['bound']:.1f} | {r['of_bound']:.2f} | "
            f"{r['peak_rss_mb']:.0f} |")
    d = result["disk"]
    lines += ["", f"Disk, measured in the script before and after the runs: one O_DIRECT record read at a time "
              f"{d['before']:.2f} / {d['after']:.2f} GB/s, {d.get('batch', 8)} records asked of the kernel at once "
              f"{d['batched_before']:.2f} / {d['batched_after']:.2f} GB/s; the bound uses the fastest, "
              f"{d['gb_s']:.2f} GB/s. Load average (1 min) at the start / end of the runs: {result['loadavg']} / "
              f"{result.get('loadavg_end', '?')}. {result['tokens']} tokens timed after {result['warmup']} of "
              f"warm-up, {len(result['runs']) // max(1, len(rows))} interleaved rounds (raw: "
              f"`build/moe-bench/results-{result['model']}.json`)."]
    return lines


def write_plot(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (model, result) in zip(axes[0], results.items()):
        rows = summarize(result)
        th = _streaming_threads(rows)
        for mode, style in (("prefetch", "o-"), ("naive", "s--")):
            pts = sorted((r["frac"], r) for k, r in rows.items() if k[0] == mode and k[2] == th and not k[3])
            if pts:
                x = [100 * f for f, _ in pts]
                y = [r["tok_s"] for _, r in pts]
                err = [[r["tok_s"] - min(r["runs"]) for _, r in pts], [max(r["runs"]) - r["tok_s"] for _, r in pts]]
                ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=MODE_NAMES[mode])
                if mode == "prefetch":
                    ax.plot(x, [0.8 * r["bound"] for _, r in pts], ":", color="gray", label="0.8 x read bound")
        res = rows.get(("resident", 1.0, th, ""))
        if res:
            ax.errorbar([100], [res["tok_s"]], yerr=[[res["tok_s"] - min(res["runs"])],
                                                      [max(res["runs"]) - res["tok_s"]]], fmt="k^", capsize=3,
                        label=f"all resident ({th} thread)")
        ax.set_title(f"{model} (load avg {result['loadavg'].split(' / ')[0]})")
        ax.set_xlabel("expert memory budget, % of all experts")
        ax.set_ylabel("decode tok/s (median, min-max)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {PLOT}")


def _side(name: str) -> dict | None:
    f = OUT / name
    return json.loads(f.read_text()) if f.is_file() else None


def _ffn_table(opt: dict) -> list[str]:
    rb = opt["record_bytes"]
    rows = [("a session per expert, int4 block-32 weights as initializers, prepacked (int4 store)",
             opt["session_run_ms"], f"{opt['session_build_ms']:.2f} ms (session build + prepack)", rb["int4"]),
            ("one shared graph, int4 block-32 weights as inputs (MatMulNBits, accuracy 4)",
             opt["matmulnbits_inputs_run_ms"], "0", rb["int4"])]
    for bits in (4, 8):
        if f"qmoe_int{bits}_run_ms" in opt:
            rows.append((f"onnxruntime QMoE, int{bits} block-32, accuracy 4, 16 experts as inputs, top-4; per expert",
                         opt[f"qmoe_int{bits}_run_ms"], "0 (a slot arena could be its input)",
                         rb["int4"] if bits == 4 else rb["int8-channel"]))
    rows += [("one shared graph, int8-channel weights as inputs (DynamicQuantizeMatMul; `--expert-bits 8`)",
              opt["int8_channel_run_ms"], f"{opt['int8_channel_load_ms']:.3f} ms (wrap as OrtValues)",
              rb["int8-channel"]),
             ("the same graph, int4-channel records widened to those int8 weights (`--expert-bits 4`)",
              opt["int8_channel_run_ms"], f"{opt['int4_channel_widen_ms']:.3f} ms (widen, numpy)", rb["int4-channel"])]
    lines = ["| option | per call | per load (CPU) | record bytes |", "|---|---|---|---|"]
    for name, call, load, nbytes in rows:
        lines.append(f"| {name} | {call:.3f} ms | {load} | {nbytes / 1e6:.2f} MB |")
    return lines + ["", f"onnxruntime {opt['onnxruntime']}, one compute thread, load average {opt['loadavg']} "
                    "(`python apps/bench/moe.py ffn-options`; medians of interleaved rounds)."]


def _routing_table(data: dict) -> list[str]:
    lines = ["| model | tokens fit / test | chance | stream after the previous layer's attention (kept) | "
             "previous layer's input (one attention earlier) | fitted extra router on that input | two layers ahead |",
             "|---|---|---|---|---|---|---|"]
    for r in data.values():
        m = r["mean"]
        lines.append(f"| {r['model']} | {r['fit_tokens']} / {r['test_tokens']} | {r['chance']:.2f} | "
                     f"**{m['stream']:.3f}** | {m['input']:.3f} | {m['fitted']:.3f} | {m['two_ahead']:.3f} |")
    return lines


FORMAT_NAMES = {"int4": "int4 blocks, a session per expert", "int8-channel": "int8-channel (`--expert-bits 8`)",
                "int4-channel": "int4-channel (`--expert-bits 4`)"}


def _formats_table() -> list[str]:
    """The store formats side by side (results-<model>-formats.json), with their quality (quality.json)."""
    found = {}
    for family in ("moefied", "random"):
        for suffix in ("", "-int8", "-int4ch"):
            f = OUT / f"results-{family}{suffix}-formats.json"
            if f.is_file():
                found[family + suffix] = json.loads(f.read_text())
    if not found:
        return []
    quality = _side("quality.json") or {}
    qname = {"int4": "int4 blocks, session per expert", "int8-channel": "int8-channel", "int4-channel": "int4-channel"}
    lines = ["| model | experts | record | cached expert | all resident tok/s | 50%: ahead / on demand tok/s | "
             "25%: ahead / on demand tok/s | perplexity (all 16 experts, docs) |", "|---|---|---|---|---|---|---|---|"]
    for model, result in found.items():
        rows = summarize(result)
        th = _streaming_threads(rows) or 1
        res = rows.get(("resident", 1.0, th, ""))

        def pair(frac, rows=rows, th=th):
            p, n = rows.get(("prefetch", frac, th, "")), rows.get(("naive", frac, th, ""))
            return f"{p['tok_s']:.2f} / {n['tok_s']:.2f}" if p and n else "–"

        fmt = result["expert_format"]
        q = quality.get(qname.get(fmt, fmt), {}) if model.startswith("moefied") else {}  # random weights: no text
        ppl = f"{q['perplexity']:.1f}" if q else "–"
        lines.append(f"| {model.split('-')[0]} | {FORMAT_NAMES.get(fmt, fmt)} | "
                     f"{result['record_bytes'] / 1e6:.2f} MB | "
                     f"{result['expert_memory'] / 1e6:.2f} MB | {res['tok_s'] if res else float('nan'):.2f} | "
                     f"{pair(0.5)} | {pair(0.25)} | {ppl} |")
    loads = sorted({r["loadavg"] for r in found.values()})
    return lines + ["", f"One compute thread throughout; {len(next(iter(found.values()))['runs']) // 5} interleaved "
                    f"rounds; load average at the start: {', '.join(loads)} (`python apps/bench/moe.py all --formats "
                    "--models moefied,moefied-int8,moefied-int4ch,random,random-int8,random-int4ch`). Perplexity: "
                    "`python apps/bench/moe.py quality` (SmolLM2 with all 16 experts active, the rest int4; "
                    "top-1 agreement with int8-channel in `build/moe-bench/quality.json`)."]


def write_doc(results: dict[str, dict]) -> None:
    """docs/moe.md (the measured parts; the prose around them is in NOTES)."""
    from .notes import INTRO, NOTES

    write_plot(results)
    lines = [*INTRO, "", "## Read-ahead against on demand, and against the read bound", "",
             *summary_table(results), "", f"![tok/s against budget]({PLOT.name})", ""]
    loaded = {m: json.loads(f.read_text()) for m in results if (f := OUT / f"results-{m}-loaded.json").is_file()}
    if loaded:
        loads = [r["loadavg"][0] for res in loaded.values() for r in res["runs"] if "loadavg" in r]
        lines += ["The same commands and code, three rounds, on the same machine while the other agents' jobs held it "
                  f"busier (1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs; "
                  "`build/moe-bench/results-*-loaded.json`):", "", *summary_table(loaded), ""]
    for model, result in results.items():
        lines += [f"### {model}: every configuration", "", *_detail_table(result), ""]
    formats = _formats_table()
    if formats:
        lines += ["## The store formats under a budget", "", *formats, ""]
    opt = _side("ffn-options.json")
    if opt:
        lines += ["## Expert compute that loads cheaply: the options measured", "", *_ffn_table(opt), ""]
    routing = _side("routing-ahead.json")
    if routing:
        lines += ["## Routing ahead: guessing a layer's experts before it runs", "",
                  "Recall of the top-k guess (share of the chosen experts that were guessed), mean over layers; "
                  "fit on the exporter's calibration text, tested on other text (`python apps/bench/moe.py "
                  "routing-ahead`):", "", *_routing_table(routing), ""]
    lines += NOTES
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")

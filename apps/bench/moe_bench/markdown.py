"""docs/moe.md: tables, findings and notes computed from the results of the runs."""

from __future__ import annotations

import json

import numpy as np

from .models import CONFIG, DOC, OUT


def summarize(result: dict) -> list[dict]:
    """Median per configuration, with the bound and our fraction of it."""
    groups: dict = {}
    for r in result["runs"]:
        groups.setdefault((r["mode"], r["budget_fraction"]), []).append(r)
    resident = float(np.median([r["tok_s"] for r in groups[("resident", 1.0)]]))
    bw = result["disk"]["gb_s"] * 1e9
    rows = []
    for (mode, frac), rs in groups.items():
        med = sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2]
        missed = float(np.median([r["missed_bytes_per_token"] for r in rs]))
        bound = min(resident, bw / missed) if missed > 0 else resident
        rows.append({"mode": mode, "frac": frac, "threads": med.get("threads"), "tok_s": med["tok_s"],
                     "all_tok_s": [r["tok_s"] for r in rs],
                     "hit_rate": med["stats"]["hit_rate"], "read_mb_tok": med["stats"]["bytes_read_per_token"] / 1e6,
                     "missed_mb_tok": missed / 1e6, "accuracy": med["stats"]["prefetch_accuracy"],
                     "wait_ms_tok": med["stats"]["wait_s"] / med["tokens"] * 1e3,
                     "read_ms_tok": med["stats"]["read_s"] / med["tokens"] * 1e3,
                     "build_ms_tok": med["stats"]["build_s"] / med["tokens"] * 1e3,
                     "late": med["stats"]["late_prefetches"], "misses": med["stats"]["misses"],
                     "bound": bound, "of_bound": med["tok_s"] / bound, "of_resident": med["tok_s"] / resident,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "budget_mb": med["budget_bytes"] / 1e6,
                     "dense_mb": med["dense_bytes"] / 1e6})
    return rows


MODE_NAMES = {"resident": "all resident", "prefetch": "cache + read-ahead",
              "prefetch_build": "cache + read-and-build ahead", "naive": "cache, on demand"}


def _table(result: dict) -> list[str]:
    rows = summarize(result)
    lines = [
        "| experts | compute threads | budget | tok/s: median (runs) | of all-resident | hit rate | missed MB/token "
        "| read MB/token | prefetch accuracy | wait ms/token | read ms/token | build ms/token | bound tok/s "
        "| of bound | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"resident": 0, "prefetch": 1, "prefetch_build": 2, "naive": 3}
    for r in sorted(rows, key=lambda r: (-r["frac"], order[r["mode"]])):
        name = MODE_NAMES[r["mode"]]
        lines.append(f"| {name} | {r['threads'] or 'all'} | {r['frac']:.0%} ({r['budget_mb']:.0f} MB) | "
                     f"**{r['tok_s']:.2f}** ({' / '.join(f'{t:.2f}' for t in r['all_tok_s'])}) | "
                     f"{r['of_resident']:.2f} | {r['hit_rate']} | {r['missed_mb_tok']:.1f} | {r['read_mb_tok']:.1f} | "
                     f"{r['accuracy'] if r['accuracy'] is not None else '–'} | {r['wait_ms_tok']:.1f} | "
                     f"{r['read_ms_tok']:.1f} | {r['build_ms_tok']:.1f} | {r['bound']:.2f} | {r['of_bound']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    dense = rows[0]["dense_mb"]
    lines += ["", f"Dense weights (graphs, embeddings, head, routers) on disk: {dense:.0f} MB. Disk measured in the "
              f"script: {result['disk']['gb_s']:.2f} GB/s ("
              + (f"the faster of before/after the runs: {result['disk']['before']:.2f} / "
                 f"{result['disk']['after']:.2f}; " if "before" in result["disk"] else "")
              + f"{result['disk']['ms_per_read']:.2f} ms per "
              f"{result['disk']['read_bytes'] / 1e6:.2f} MB O_DIRECT random read, one reader). "
              f"{len(result['runs']) // len(rows)} runs per configuration, interleaved; median shown "
              f"(all runs' tok/s in `build/moe-bench/results-{result['model']}.json`)."]
    return lines


def findings(result: dict) -> list[str]:
    """What the table says, computed from it: gain over on-demand, the overlap there was, the budget that
    keeps 0.9x of all-resident speed."""
    rows = {(r["mode"], r["frac"]): r for r in summarize(result)}
    resident = rows[("resident", 1.0)]
    c_ms = 1000 / resident["tok_s"]
    out = []
    for frac in (0.5, 0.25):
        p, n, pb = rows.get(("prefetch", frac)), rows.get(("naive", frac)), rows.get(("prefetch_build", frac))
        if not (p and n):
            continue
        load_ms = n["read_ms_tok"] + n["build_ms_tok"]  # on demand, loads are serial with compute
        overlap = (c_ms + load_ms) / max(c_ms, load_ms)
        out.append(f"- {frac:.0%} budget: read-ahead {p['tok_s']:.2f} tok/s vs on-demand {n['tok_s']:.2f} "
                   f"(**{p['tok_s'] / n['tok_s']:.2f}x**); hit rate {p['hit_rate']} vs {n['hit_rate']}. "
                   f"Overlap available: compute {c_ms:.0f} ms/token (all-resident) beside "
                   f"{load_ms:.0f} ms/token of loading (read {n['read_ms_tok']:.0f} + build "
                   f"{n['build_ms_tok']:.0f}), so hiding all of it could gain at most {overlap:.2f}x. "
                   f"Against the disk-only bound ({p['bound']:.2f} tok/s) read-ahead reaches "
                   f"**{p['of_bound']:.2f}** of it."
                   + (f" Building ahead in the reader too: {pb['tok_s']:.2f} tok/s ({pb['tok_s'] / n['tok_s']:.2f}x "
                      "on-demand)." if pb else ""))
    ok = [r for r in rows.values() if r["mode"] == "prefetch" and r["tok_s"] >= 0.9 * resident["tok_s"]]
    smallest = min((r["frac"] for r in ok), default=None)
    out.append(f"- Smallest measured budget with read-ahead at >= 0.9x all-resident speed (all-resident ran on "
               "all cores, streaming on one: see the notes): "
               f"{f'{smallest:.0%}' if smallest is not None else 'none of those measured'}.")
    return out


def _threads_table(rows: list[dict]) -> list[str]:
    """The compute-thread experiment: random model, 50% budget, both modes, interleaved rounds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["mode"], r["threads"]), []).append(r)
    lines = ["## Compute threads while experts stream", "",
             "Random model, 50% budget, interleaved rounds (each run its own process, page cache dropped), "
             "recorded in `build/moe-bench/threads.jsonl`:", "",
             "| experts | compute threads | tok/s (runs) | hit rate | wait s | read s | build s |",
             "|---|---|---|---|---|---|---|"]
    for (mode, threads), rs in sorted(groups.items()):
        name = {"prefetch": "cache + read-and-build ahead", "naive": "cache, on demand"}[mode]
        lines.append(f"| {name} | {threads} | {', '.join(str(r['tok_s']) for r in rs)} | {rs[0]['hit']} | "
                     f"{', '.join(str(r['wait_s']) for r in rs)} | {', '.join(str(r['read_s']) for r in rs)} | "
                     f"{', '.join(str(r['build_s']) for r in rs)} |")
    lines += ["", "With two compute threads the pool's spinning worker takes the second core, and the background "
              "reader, whose session builds are CPU work, has none left: prefetch then gains nothing. With one "
              "compute thread the reader builds on the other core while the decoder computes, and prefetch runs "
              "~2x faster than with two threads (and faster than on-demand with either). Pass `threads=1` "
              "(`--threads 1`) when streaming experts on a 2-core machine; the tables above do.", ""]
    return lines


READING_NOTES = [
    "## Reading the numbers",
    "",
    "- An int4 expert costs CPU as well as disk to load: besides its read it needs its session built "
    "(*build ms/token*; onnxruntime prepacks the int4 weights), ~2 ms on a free core and several under "
    "load, more than its read (1.1-1.5 ms). On "
    "2 cores that work competes with the decode for CPU, so read-ahead can only hide it as far as the "
    "second core is free, and no budget below 100% comes near the disk-only bound. The int8-channel store "
    "removes that work (*build ms/token* near 0: wrapping arrays), leaving the read of 1.6x the bytes; "
    "what is left is reading, which the disk, not a core, does.",
    "- All experts resident, int8-channel experts compute slower than prepacked int4 ones "
    "(DynamicQuantizeMatMul packs the weights on every call: ~0.16 against ~0.06 ms per expert call, "
    "table at the end): where every expert fits in memory, int4 (the default) is the faster store; "
    "`--expert-bits 8` is for packages meant to stream their experts. The all-resident rows above are too "
    "noisy to show it (two compute threads with a spinning pool lose most when another job takes a core: "
    "the same configuration ranged 1.5-2.4x between rounds); measured apart, 3 interleaved rounds at load "
    "average ~1.5 (`apps/bench/moe.py run-one --model random|random-int8 --mode resident --frac 1 "
    "--tokens 24 --warmup 16`): int4 49.4 / 64.5 / 61.6 tok/s, int8-channel 35.2 / 38.3 / 38.8.",
    "- What still keeps int8-channel streaming under the issue's 0.8x of the bound at 50% and 25%: the "
    "reader, now that loading is only reading. It reads one layer ahead at queue depth 1, wrong guesses "
    "(15%) cost reads and evict experts that are needed later (*read MB/token* well above *missed "
    "MB/token*), and its reads took ~2-4 ms per 2.4 MB record on this shared disk, against ~1.1 ms for the "
    "lone read of the disk measurement. A second reader thread (`run-one --readers 2`, 2 interleaved "
    "rounds, random-int8): 7.57 / 8.13 tok/s against 7.01 / 9.01 at 50%, 6.00 / 6.48 against 5.47 / 5.24 "
    "at 25%: within the noise at 50%, maybe +15% at 25%; not made the default.",
    "- One compute thread stays the better choice with int8-channel experts, though their loads need "
    "little CPU (the reader still copies and waits on the second core): `run-one --model random-int8 "
    "--mode prefetch`, 2 interleaved rounds, 1 against 2 threads: 6.06 / 8.63 against 4.42 / 6.34 tok/s at "
    "50%, 4.15 / 5.15 against 4.32 / 3.22 at 25%. A shorter GIL switch interval (0.5 ms) for the reader "
    "changed nothing measurable.",
    "- Options of the table at the end not taken: disabling prepacking makes the build cheap but every "
    "call ~100x slower; what it leaves of the build (creating the session: graph, kernels, plans) is the "
    "most that an ORT-format graph or `session.use_ort_model_bytes_*` could save (not measured), and the "
    "prepack itself remains. onnxruntime's fused QMoE has a CPU kernel and takes weights as inputs, but "
    "runs slower per expert than DynamicQuantizeMatMul and needs a layer's experts gathered into one tensor "
    "(a copy per call). Batching a layer's top-k into one call would save 3 onnxruntime run overheads per "
    "layer; not measured, not done.",
    "- Load averages are given per table. When the machine is shared with other jobs the same "
    "configuration varies up to 2x between rounds (all runs shown; with two, the median is the faster). "
    "Differences between read-ahead and on-demand smaller than that are not established.",
    "- *read-ahead* (the default): the background reader only reads records; the decode thread makes a "
    "read-ahead expert runnable when it first uses it (int4: builds its session; int8-channel: wraps its "
    "arrays). Its *hit rate* counts those as hits (no disk wait); *read-and-build ahead* (`--full`, int4 "
    "only) builds in the reader too. Wrong guesses cost reads and evict experts: *read MB/token* above "
    "*missed MB/token* is that waste.",
    "- All-resident ran with every core, the streaming rows with one compute thread (see the thread "
    "table): on the small MoEfied model one thread is itself faster than two, so its streaming rows "
    "can exceed 1.0x all-resident.",
    "- Budgets are fractions of all experts resident, counted as the cache counts them: two store records "
    "per int4 expert (onnxruntime keeps the record's arrays and its prepacked copy; 2.3-2.6 MB measured per "
    "1.47 MB record), one per int8-channel expert (the arrays are the graph's inputs, nothing else is "
    "kept). Peak RSS stays below budget + dense weights + ~150 MB (Python, onnxruntime, KV).",
    "- The random model's routing is not perfectly uniform (on demand, a 50% budget hits ~70%, where "
    "uniform routing would give 50%): its residual stream is dominated by the token embedding, so "
    "routing follows the token.",
    "- Prefill runs each chosen expert once over the prompt rows that chose it, pinning one expert at a "
    "time; decode runs the chosen top-k on prebuilt bindings (for int8-channel experts the binding also "
    "binds the cached record's arrays to the shared graph's weight inputs).",
]


def write_doc(results: dict[str, dict]) -> None:
    """docs/moe.md from the results of the models measured (results-<model>.json)."""
    rnd = results.get("random") or results.get("random-int8")
    if rnd is None:
        raise SystemExit("no results for the random model: run 'all' first")
    opt = (results.get("random") or {}).get("ffn_options") or {}
    lines = [
        "# Sparse MoE: streaming experts under a memory budget",
        "",
        "Generated by `python apps/bench/moe.py all` (raw numbers: `build/moe-bench/results-*.json`; 7.5 min "
        "on this 2-core machine for the four packages x 6 configurations x 2 rounds, once they are built; "
        "`all --quick`: 100/50/25% budgets, one round, 12 tokens, 2.6 min).",
        "",
        *_load_cost_summary(results),
        "",
        "## Random MoE, near-uniform routing",
        "",
        f"Random Qwen3-MoE-shaped decoder, {CONFIG['num_hidden_layers']} layers x {CONFIG['num_experts']} "
        f"experts, top-{CONFIG['num_experts_per_tok']}, hidden {CONFIG['hidden_size']}, expert width "
        f"{CONFIG['moe_intermediate_size']}, int4 attention and head. Random routers spread tokens over "
        "all experts, close to the worst case for caching (not perfectly uniform: see below). Each run: its "
        "own process, page cache dropped, experts read with O_DIRECT, "
        f"{rnd['warmup']} tokens of warm-up (the cache fills), then {rnd['tokens']} random "
        "tokens decoded one at a time.",
        "",
    ]
    for model in ("random", "random-int8"):
        if model in results:
            lines += _model_section(results[model])
    lines += [
        "Bound = min(all-resident tok/s, disk GB/s ÷ missed bytes per token), missed = experts needed but not "
        "cached when the layer asked (each costs one record read, by the reader or the decoder). "
        "*read ms/token* and *build ms/token* add up both threads' time to read records and to make them "
        "runnable (int4: build a session, onnxruntime prepacks the weights; int8-channel: wrap the arrays); "
        "*wait* is what the decode thread stood still for experts.",
        "",
    ]
    moefied = [results[m] for m in ("moefied", "moefied-int8") if m in results]
    if moefied:
        m = moefied[0]["config"]
        lines += [
            "## MoEfied SmolLM2-135M on real text (routing with real locality)",
            "",
            f"SmolLM2-135M's MLPs cut into {m['num_experts']} experts of {m['expert_intermediate']} neurons "
            f"(balanced k-means on the gate vectors), top-{m['top_k']}, router = the clusters' mean gate vectors, "
            "int4 attention and head. Without fine-tuning the MoEfied model's text is worse than the dense "
            "model's; the point here is the routing of real hidden states. Tokens: this repository's docs, fed "
            "one at a time.",
            "",
        ]
        for r in moefied:
            lines += _model_section(r)
    threads_file = OUT / "threads.jsonl"
    if threads_file.is_file():
        lines += _threads_table([json.loads(x) for x in threads_file.read_text().splitlines() if x.strip()])
    lines += READING_NOTES + ["", *_options_table(opt), ""]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


STORE_FORMATS = {
    "int4": "int4 experts (block 32, symmetric), a session per loaded expert (onnxruntime prepacks it)",
    "int8-channel": "int8-channel experts (one scale per output channel), fed to one shared graph "
                    "(`--expert-bits 8`)",
}


def _load_cost_summary(results: dict[str, dict]) -> list[str]:
    """The int4 and int8-channel stores side by side, computed from the runs: what a load costs, and
    tokens/s at each budget (the better of read-ahead and on-demand, and each against its bound)."""
    lines = ["## What loading an expert costs, and the store format for streaming", ""]
    opt = (results.get("random") or {}).get("ffn_options") or {}
    if opt.get("int8_channel_build_ms") is not None:
        disk = results["random"]["disk"]
        ms_per_byte = disk["ms_per_read"] / disk["read_bytes"]
        lines += [
            f"An int4 expert (a {opt['record_bytes'] / 1e6:.2f} MB record, ~{disk['ms_per_read']:.1f} ms to read "
            f"here) needs its own onnxruntime session: {opt['session_build_ms']:.1f} ms of CPU, of which "
            f"{opt['noprepack_build_ms']:.1f} ms remain with prepacking disabled (creating the session "
            f"itself; calls then cost {opt['noprepack_run_ms']:.1f} ms instead of {opt['session_run_ms']:.2f}). "
            f"Leaner session options do not change it ({opt['lean_build_ms']:.1f} ms: table at the end), "
            "MatMulNBits fed int4 weights as inputs unpacks them on every call, and whatever the build costs "
            "is CPU work that competes with the decode on 2 cores. An *int8-channel* expert "
            f"(`--expert-bits 8`: int8, one scale per output channel; {opt['int8_channel_record_bytes'] / 1e6:.2f} "
            f"MB, ~{opt['int8_channel_record_bytes'] * ms_per_byte:.1f} ms to read) needs no session: one "
            "shared `DynamicQuantizeMatMul` graph takes its weights as inputs, bound without a copy "
            f"({opt['int8_channel_build_ms'] * 1e3:.0f} us per load); a call costs "
            f"{opt['int8_channel_run_ms']:.2f} ms (the int8 GEMM packs its operand every call). Its record is "
            "1.6x the int4 bytes on disk, but a cached expert holds only its record, where an int4 one holds "
            "the record and onnxruntime's prepacked copy (counted as two records): the same memory holds "
            f"{2 * opt['record_bytes'] / opt['int8_channel_record_bytes']:.2f}x as many int8-channel experts.",
            "",
        ]
    pairs = [(a, b) for a, b in (("random", "random-int8"), ("moefied", "moefied-int8"))
             if a in results and b in results]
    if not pairs:
        return lines
    lines += ["| model | budget | int4 tok/s (of bound) | int8-channel tok/s (of bound) | int8-channel / int4 | "
              "build ms/token int4 → int8-channel |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
        ra = {(r["mode"], r["frac"]): r for r in summarize(results[a])}
        rb = {(r["mode"], r["frac"]): r for r in summarize(results[b])}
        for frac in sorted({f for _, f in ra} & {f for _, f in rb}, reverse=True):
            x, y = _best_at(ra, frac), _best_at(rb, frac)
            if x is None or y is None:
                continue
            lines.append(f"| {a} | {frac:.0%} ({x['budget_mb']:.0f} / {y['budget_mb']:.0f} MB) | "
                         f"{x['tok_s']:.2f} ({x['of_bound']:.2f}, {MODE_NAMES[x['mode']]}) | "
                         f"{y['tok_s']:.2f} ({y['of_bound']:.2f}, {MODE_NAMES[y['mode']]}) | "
                         f"**{y['tok_s'] / x['tok_s']:.2f}x** | {x['build_ms_tok']:.0f} → {y['build_ms_tok']:.1f} |")
    lines += ["", "Budgets are fractions of each store's all-resident memory, so an int8-channel budget is the "
              "smaller one in bytes (both shown). Best of read-ahead and on-demand per budget; every row is in the "
              "tables below."]
    return lines


def _best_at(rows: dict, frac: float) -> dict | None:
    """The fastest of all-resident, read-ahead and on-demand at budget FRAC."""
    found = [rows[k] for k in (("resident", frac), ("prefetch", frac), ("naive", frac)) if k in rows]
    return max(found, key=lambda r: r["tok_s"]) if found else None


def _model_section(result: dict) -> list[str]:
    fmt = result.get("expert_format", "int4")
    return [
        f"### {STORE_FORMATS.get(fmt, fmt)}",
        "",
        f"{result['expert_store_bytes'] / 1e9:.2f} GB of expert store, {result['record_bytes'] / 1e6:.2f} MB per "
        f"expert record; a cached expert counts {result.get('resident_records', 2)} record(s) of memory. "
        f"Machine load average at the start of the runs: {result.get('loadavg', '?')}.",
        "",
        *_table(result),
        "",
        *findings(result),
        "",
    ]


def _options_table(opt: dict) -> list[str]:
    if not opt:
        return []
    rows = [
        ("a session per expert, int4 weights as external initializers, prepacked (int4 store)",
         opt["session_run_ms"], f"{opt['session_build_ms']:.2f} ms (build)", opt["record_bytes"], 2),
    ]
    if "noprepack_build_ms" in opt:
        rows += [
            ("the same session with `session.disable_prepacking=1`", opt["noprepack_run_ms"],
             f"{opt['noprepack_build_ms']:.2f} ms (build)", opt["record_bytes"], 1),
            ("the same session, no arena / memory patterns / spinning", opt["lean_run_ms"],
             f"{opt['lean_build_ms']:.2f} ms (build)", opt["record_bytes"], 2),
        ]
    rows.append(("one shared graph, int4 weights fed as inputs (MatMulNBits unpacks them every call)",
                 opt["weights_as_inputs_ms"], "0", opt["record_bytes"], 1))
    if "int8_channel_run_ms" in opt:
        rows.append(("one shared graph, int8-channel weights bound as inputs (DynamicQuantizeMatMul; "
                     "`--expert-bits 8`)", opt["int8_channel_run_ms"],
                     f"{opt['int8_channel_build_ms']:.3f} ms (wrap as OrtValues, bind)",
                     opt["int8_channel_record_bytes"], 1))
    for bits in (4, 8):
        if f"qmoe_int{bits}_run_ms" in opt:
            name = (f"onnxruntime's fused QMoE (int{bits}, SwiGLU), a layer's top-{CONFIG['num_experts_per_tok']} "
                    "gathered as inputs; per expert")
            record = opt["record_bytes"] if bits == 4 else opt.get("int8_channel_record_bytes", 0)
            rows.append((name, opt[f"qmoe_int{bits}_run_ms"], "a copy into the gathered tensor", record, 1))
    rows.append(("numpy matmul on weights dequantized to fp32 at load", opt["numpy_fp32_ms"],
                 f"{opt['numpy_dequantize_ms']:.1f} ms (dequantize)", opt["numpy_fp32_bytes"], 1))
    lines = [
        "## Expert FFN from cached weights: the options",
        "",
        f"One expert (gate/up {2 * CONFIG['moe_intermediate_size']}x{CONFIG['hidden_size']}, down "
        f"{CONFIG['hidden_size']}x{CONFIG['moe_intermediate_size']}), one token, measured by "
        "`python apps/bench/moe.py ffn-options` (load average at the time: "
        f"{opt.get('loadavg', '?')}). Per load = the CPU work after the read; the read itself is the "
        "record's bytes at the disk's speed (above).",
        "",
        "| option | per call | per load (CPU) | record on disk | cached bytes |",
        "|---|---|---|---|---|",
    ]
    for name, call, load, record, resident in rows:
        lines.append(f"| {name} | {call:.3f} ms | {load} | {record / 1e6:.2f} MB | "
                     f"{'~' if resident == 2 else ''}{resident * record / 1e6:.2f} MB |")
    return lines

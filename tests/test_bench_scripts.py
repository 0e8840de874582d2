"""The benchmark code runs and reports what it promises (tiny model, quick mode).
No speed is asserted: benchmarks are reports, not tests."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_mobile_quick_report(tiny_packages, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "apps" / "bench" / "mobile.py"), "--package",
                        str(tiny_packages("llama", "int4")), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "mobile.json").read_text())
    for key in ("bandwidth_gbs", "roofline_tok_s", "threads", "memory_cap", "sustained", "plots"):
        assert key in rep
    one = rep["threads"][0]
    assert one["ok"] and one["decode_tok_s_median"] > 0 and one["cpu_s_per_token"] > 0 and one["peak_rss_mb"] > 0
    assert rep["memory_cap"]["ok"] and rep["sustained"][0]["windows"]
    assert all(Path(p).stat().st_size > 1000 for p in rep["plots"])


def test_compare_summary_and_markdown():
    from apps.bench.compare import markdown, summarize

    def run(tok_s, ttft):
        return {"runs": [{"decode_tok_s": tok_s, "ttft_s": ttft}], "peak_rss_mb": 100.0, "version": "x",
                "loadavg_before": 0.1}

    rounds = [{"edgeinfer-int4": run(120, 0.05), "peer": run(100, 0.06)},
              {"edgeinfer-int4": run(130, 0.05), "peer": run(100, 0.05)}]
    engines = {"edgeinfer-int4": (None, None, ROOT / "pyproject.toml"), "peer": (None, None, ROOT / "pyproject.toml")}
    s = summarize("chat", 37, rounds, engines, bandwidth=20.0)
    assert abs(s["ratios"]["edgeinfer-int4 / peer"]["decode"] - 1.25) < 1e-9
    md = markdown({"date": "2026-11-22T00:00", "machine": {"cpu": "cpu", "cores": 2}, "threads": 2,
                   "new_tokens": 128, "rounds": 2, "repeats": 1, "bandwidth_gbs": 20.0, "prompts": [s]})
    assert "**1.25×**" in md and "| edgeinfer-int4 x |" in md


def test_compare_pairs_precisions_and_reports_prompt_speed():
    """edgeinfer int4 is compared with every peer, other precisions with peers of the same precision."""
    from apps.bench.compare import summarize

    def run(tok_s):
        return {"runs": [{"decode_tok_s": tok_s, "ttft_s": 0.1}], "peak_rss_mb": 1.0, "version": "v",
                "loadavg_before": 0.0}

    names = ["edgeinfer-int4", "edgeinfer-fp32", "llama.cpp-Q4_1", "transformers-fp32"]
    rounds = [{n: run(100.0 + i) for i, n in enumerate(names)}]
    engines = {n: (None, None, ROOT / "pyproject.toml") for n in names}
    s = summarize("128", 128, rounds, engines, bandwidth=20.0)
    assert set(s["ratios"]) == {"edgeinfer-int4 / llama.cpp-Q4_1", "edgeinfer-int4 / transformers-fp32",
                                "edgeinfer-fp32 / transformers-fp32"}
    assert abs(s["engines"]["edgeinfer-int4"]["prompt_tok_s"] - 1280.0) < 1e-6


def test_report_index_lists_every_step(tmp_path):
    from apps.bench.report import markdown

    (tmp_path / "compare-smollm2.md").write_text("# smollm2-135m: edgeinfer and the peers\n\n| a | b |\n")
    rep = {"date": "2026-11-22T03:00:00", "quick": True, "total_seconds": 240.0,
           "machine": {"cpu": "x86", "cpus": 2, "python": "3.11"},
           "steps": [{"title": "SmolLM2", "command": "python apps/bench/compare.py --quick", "seconds": 60.0,
                      "ok": True, "page": "build/bench/quick/compare-smollm2.md"},
                     {"title": "Whisper", "command": "python apps/bench/whisper.py", "seconds": 30.0, "ok": False,
                      "page": None}]}
    md = markdown(rep, tmp_path)
    assert "report.py --quick" in md and "4.0 minutes" in md and "**failed**" in md
    assert "## smollm2-135m: edgeinfer and the peers" in md


def test_summary_tables_targets_and_plots(tmp_path):
    """The report's summary reads this run's JSON, ignores older files, states each target's distance."""
    import os

    from apps.bench.summary import collect, markdown, plots, targets

    def engine(tok_s, roofline):
        return {"decode_tok_s": {"median": tok_s}, "roofline_tok_s": roofline}

    def prompt(name, n, ours, genai, llama):
        return {"prompt": name, "prompt_tokens": n,
                "engines": {"edgeinfer-int4": engine(ours, 300.0), "onnxruntime-genai-int4": engine(genai, 300.0),
                            "llama.cpp-Q4_1": engine(llama, 300.0)},
                "ratios": {"edgeinfer-int4 / onnxruntime-genai-int4": {"decode": ours / genai},
                           "edgeinfer-int4 / llama.cpp-Q4_1": {"decode": ours / llama}}}

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "compare-smollm2.json").write_text(json.dumps({"model": "smollm2-135m", "prompts": [
        prompt("chat", 37, 180.0, 150.0, 100.0), prompt("512", 512, 150.0, 150.0, 100.0),
        prompt("2048", 2048, 100.0, 125.0, 100.0)]}))
    (bench / "strategies-a4.json").write_text(json.dumps({"sets": {"editing": {"plain_tok_s": 180.0, "strategies": {
        'lookup {"draft_len": 8}': {"speedup_median": 1.5, "lossless_prompts": 6, "prompts": 6}}}},
        "early_exit": []}))
    old = bench / "big_little.json"
    old.write_text("{}")
    os.utime(old, (1, 1))  # from an earlier run: ignored
    src = collect(since=1000.0, build=tmp_path)
    assert src["big_little"] is None and src["gemma3"] is None
    got = {t: (m, d) for t, m, d in targets(src)}
    assert got["plain int4 decode ≥ 1.2× onnxruntime-genai-int4"][1] == "short by 0.40× at worst (2048)"
    assert got["plain int4 decode ≥ 1.4× llama.cpp-Q4_1"][1] == "short by 0.40× at worst (2048)"
    best = got["best lossless strategy ≥ 2× onnxruntime-genai"]
    assert best[0].startswith("lookup") and "1.80×" in best[0] and best[1] == "short by 0.20×"
    assert got["smollm2 int4 decode ≥ 50% of the memory roofline (chat prompt)"][1] == "met"
    pictures = plots(src, tmp_path)
    assert [p.name for p in pictures] == ["bench-strategies.png", "bench-prompt-length-smollm2.png"]
    assert all(p.stat().st_size > 1000 for p in pictures)
    md = "\n".join(markdown(src, [p.name for p in pictures]))
    assert "| lookup {\"draft_len\": 8} | lossless strategy, int4 | editing | 270.0 | 1.50× | 1.80× (derived) |" in md


def test_lookup_ceiling_replay_counts_accepted_copies():
    """The replay charges 1 + row_cost × drafted per round and emits accepted + 1 tokens."""
    from apps.bench.lookup_ceiling import POLICIES, replay

    prompt = list(range(100, 140))
    copied = prompt[:30]  # the output repeats the prompt: every proposal after the first tokens is right
    fresh = list(range(500, 530))  # nothing to copy: lookup proposes nothing, plain steps
    verify_all = POLICIES["verify all (≤ 8)"]
    assert replay(prompt, fresh, verify_all, 0.1) == 1.0
    fast = replay(prompt, copied, verify_all, 0.1)
    assert fast > 3.0  # 9 tokens per round at a cost of 1.8 once the n-gram index matches
    assert replay(prompt, copied, verify_all, 1.0) < fast  # rows as dear as steps: little to gain
    assert replay(prompt, copied, POLICIES["DraftLengthPolicy"], 0.1) > 2.0


def test_quality_scores_every_engine_alike_and_writes_the_page(tiny_packages, tmp_path):
    """apps/bench/quality.py on tiny packages (no llama.cpp): the same windows for each engine,
    agreement with the fp32 reference, the questions asked, a refused precision named on the page."""
    from conftest import CORPUS

    from apps.bench.quality import QUESTIONS, answer_is_right, evaluate_packages, markdown, write_page

    assert answer_is_right("A week has 7 days.", ["7", "seven"])
    assert not answer_is_right("A week has 31 days.", ["7", "seven"])
    assert not answer_is_right("Open 24-7, every day.", ["7"])
    assert answer_is_right("There are twenty-four hours in a day.", ["twenty-four"])
    assert not answer_is_right("It has 17 legs.", ["7", "seven"]) and answer_is_right("So, SEVEN.", ["7", "seven"])
    packages = {"int4": tiny_packages("llama", "int4"), "fp32": tiny_packages("llama", "fp32")}
    res = evaluate_packages(packages, "\n".join(CORPUS), windows_n=3, context=32, threads=None, chat=True)
    e = res["engines"]
    assert list(e) == ["edgeinfer fp32", "edgeinfer int4"]  # the reference first
    assert res["windows"] == 3 and res["scored_tokens"] == 3 * 31
    assert e["edgeinfer fp32"]["top1_agreement"] is None and 0.0 < e["edgeinfer int4"]["top1_agreement"] <= 1.0
    assert all(x["asked"] == len(QUESTIONS) == len(x["answers"]) and x["perplexity"] > 1 for x in e.values())
    res.update({"description": "tiny", "gguf": "none.gguf", "refused": {"source": "needs a GGUF file."}})
    md = markdown({"date": "2026-12-04T03:00:00", "command": "python apps/bench/quality.py", "threads": 2,
                   "machine": {"cpu": "x86", "cpus": 2, "python": "3.11", "loadavg": "0.10"}, "total_s": 60.0,
                   "context": 32, "versions": {"edgeinfer": "0.1.0"}, "models": {"tiny": res},
                   "text": {"file": "f.txt", "package": "p", "version": "1", "sha256": "0" * 64}})
    assert "| edgeinfer int4 | int4, block 32" in md and "refused by the exporter: needs a GGUF file." in md
    assert f"| {QUESTIONS[0][0]} |" in md and "3 windows × 32 tokens = 93 scored tokens" in md
    page = tmp_path / "quality.md"
    page.write_text("# Quality\n\nIntro.\n\n## Parity\n\nhand-written\n")
    write_page(page, md)
    write_page(page, md.replace("93 scored", "94 scored"))  # a second run replaces its own section only
    text = page.read_text()
    assert text.count("scored tokens") == 1 and "94 scored" in text and text.startswith("# Quality\n\n<!--")
    assert text.index("94 scored") < text.index("Intro.") < text.index("## Parity")
    assert text.endswith("hand-written\n")


def test_moe_bench_entry_script_and_tables():
    """apps/bench/moe.py finds its parts (apps/bench/moe_bench/); the page's rows come from the runs: bound =
    min(all resident on the same threads, disk bandwidth / needed bytes per token), read-ahead against on
    demand per round."""
    r = subprocess.run([sys.executable, str(ROOT / "apps" / "bench" / "moe.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "run-one" in r.stdout, r.stderr[-2000:]
    from apps.bench.moe_bench.markdown import headline, summarize, summary_table

    def run(mode, frac, tok_s, needed, threads=1):
        stats = {"hit_rate": 0.5, "bytes_read_per_token": needed, "prefetch_accuracy": 0.8, "wait_s": 0.1,
                 "read_s": 0.24, "build_s": 0.0, "prefetch_used": 0, "prefetched": 0}
        return {"mode": mode, "budget_fraction": frac, "tok_s": tok_s, "missed_bytes_per_token": needed,
                "threads": threads, "tokens": 24, "peak_rss_mb": 100.0, "budget_bytes": 10**8, "stats": stats}

    result = {"disk": {"gb_s": 1.0}, "runs": [run("resident", 1.0, 20.0, 0.0, None), run("resident", 1.0, 40.0, 0.0),
                                              run("prefetch", 0.5, 8.0, 1e8), run("naive", 0.5, 4.0, 1e8)]}
    ahead = summarize(result)[("prefetch", 0.5, 1, "")]
    assert ahead["bound"] == 10.0 and abs(ahead["of_bound"] - 0.8) < 1e-9  # the 1-thread all-resident run
    (h,) = headline(result)
    assert h["ratio"] == 2.0 and h["ratios"] == [2.0]
    assert "| **2.00x** (2.00) | 10.0 | **0.80** |" in "\n".join(summary_table({"m": result}))
    # neither mode always runs first: odd rounds swap each read-ahead run with the on-demand run after it
    sys.path.insert(0, str(ROOT / "apps" / "bench"))
    try:
        from moe import bench_configs, round_order
    finally:
        sys.path.remove(str(ROOT / "apps" / "bench"))
    configs = bench_configs("moefied-int4ch", "full")
    assert round_order(configs, 0) == configs
    assert sorted(map(repr, round_order(configs, 1))) == sorted(map(repr, configs))
    swapped = [c[0] for c in round_order(configs, 1) if c[1] == 0.75]
    assert swapped == ["naive", "prefetch"] and [c[0] for c in configs if c[1] == 0.75] == ["prefetch", "naive"]


def test_prompt_cache_bench_page_and_target(tmp_path):
    """apps/bench/prompt_cache.py's page states its ratio and verdict; the summary's target row reads its JSON."""
    from apps.bench.prompt_cache import markdown
    from apps.bench.summary import collect, targets

    def side(ttft, restored):
        return {"ttft_s": ttft, "load_s": 0.5, "restored_tokens": restored, "prompt_tokens": 1010, "tokens": [1, 2]}

    rep = {"command": "python apps/bench/prompt_cache.py", "date": "2026-12-04", "machine": {"cpus": 2},
           "package": "p", "prompt_tokens": 1010, "new_tokens": 8, "target": 5.0, "identical": True,
           "text": {"file": "lee_background.cor", "package": "gensim", "version": "4.4.0", "sha256": "ab" * 32},
           "rounds": [{"order": ["cold", "restored"], "cold": side(2.0, 0), "restored": side(0.5, 995),
                       "identical": True}],
           "median": {"cold_ttft_s": 2.0, "restored_ttft_s": 0.5, "ratio": 4.0, "cold_load_plus_ttft_s": 2.5,
                      "restored_load_plus_ttft_s": 1.0, "ratio_with_load": 2.5},
           "save": {"saved_tokens": 1010, "cache_bytes": 46e6, "save_copy_s": 0.05, "save_write_s": 0.2}}
    md = markdown(rep)
    assert "**4.0×** (target ≥ 5×: not met)" in md
    assert "| 1 | cold then restored | 2000 ms | 500 ms | 995 | 4.0× |" in md
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "prompt-cache.json").write_text(json.dumps(rep))
    got = {t: (m, d) for t, m, d in targets(collect(since=0.0, build=tmp_path))}
    row = got["TTFT of a ~1,000-token system prompt after a restart, restored from disk ≥ 5× cold"]
    assert row[0].startswith("4.0× (2000 ms cold, 500 ms restored") and row[1] == "short by 1.0×"


def test_kv_dtype_ratios_and_markdown():
    from apps.bench.kv_dtype import markdown, summarize

    def run(tok_s):
        return {"runs": [{"decode_tok_s": tok_s, "ttft_s": 0.5}], "peak_rss_mb": 300.0, "version": "x"}

    names = ["fp32", "int8", "onnxruntime-genai-int4"]
    rounds = [{"fp32": run(50.0), "int8": run(70.0), "onnxruntime-genai-int4": run(40.0)},
              {"fp32": run(40.0), "int8": run(60.0), "onnxruntime-genai-int4": run(50.0)}]
    res = summarize(2048, rounds, names)
    assert res["ratios"]["int8 / fp32"]["rounds"] == [1.4, 1.5]
    assert res["ratios"]["int8 / onnxruntime-genai-int4"]["rounds"] == [1.75, 1.2]
    assert "fp32 / int8" not in res["ratios"] and "onnxruntime-genai-int4 / fp32" not in res["ratios"]
    rep = {"machine": {"cpu": "cpu", "cores": 2}, "argv": ["--quick"], "date": "2026-12-04T00:00:00",
           "model": "smollm2-135m", "threads": 2, "new_tokens": 32, "rounds": 2, "repeats": 1, "speed": [res],
           "quality": {"text": {"file": "t.cor", "package": "p", "version": "1"}, "settings": [
               {"context": 256, "rows": {"int8": {"perplexity": 36.0, "fp32_perplexity": 35.9, "relative": 0.0028,
                                                  "top1_agreement": 0.95, "windows": 4, "scored_tokens": 1020}}}]}}
    md = markdown(rep)
    assert "| int8 / fp32 | **1.45×** | 1.40, 1.50 |" in md and "edgeinfer, int8 KV x" in md
    assert "| int8 | 256 | 4 × 255 | 36.000 | 35.900 | +0.28% | 0.9500 |" in md


def test_peer_speculative_ratios_are_against_each_engines_own_plain_run():
    from types import SimpleNamespace

    from apps.bench.peer_speculative import markdown, summarize

    def run(tokens, decode_s, wall_s, **extra):
        return {"tokens": tokens, "decode_s": decode_s, "wall_s": wall_s, "decode_tokens": 10, **extra}

    runs = {"edgeinfer 1.5B alone": [run([1, 2, 3], 1.0, 1.5), run([4, 5], 1.0, 1.5)],
            "edgeinfer speculative, 0.5B GGUF drafts": [run([1, 2, 3], 0.5, 1.0), run([4, 6], 0.5, 1.0)],
            "llama.cpp 1.5B alone": [run([1, 2, 9], 0.8, 1.0), run([4, 5], 0.8, 1.0)],
            "llama.cpp speculative, default draft settings": [run([1, 2, 9], 0.4, 0.8, draft_n=8, draft_accepted=6),
                                                               run([4, 5], 0.8, 1.2, draft_n=8, draft_accepted=2)]}
    rep = summarize(runs, SimpleNamespace(threads=2, new_tokens=3), 1.0)
    mine, theirs = rep["rows"]["edgeinfer speculative, 0.5B GGUF drafts"], rep["rows"][
        "llama.cpp speculative, default draft settings"]
    assert mine["decode_vs_own_plain"] == 2.0 and mine["identical_to_own_plain"] == 1
    assert abs(theirs["decode_vs_own_plain"] - 1.6 / 1.2) < 1e-9 and theirs["draft_acceptance"] == 0.5
    assert abs(theirs["end_to_end_vs_own_plain"] - 1.0) < 1e-9 and theirs["identical_to_own_plain"] == 2
    assert rep["plain_outputs_identical_across_engines"] == 1
    assert abs(rep["plain_tokens_shared_across_engines"] - 0.8) < 1e-9
    md = markdown(rep)
    assert "| edgeinfer speculative, 0.5B GGUF drafts | 20.0 | 2.00x | 1.50x | 1/2 |  |" in md
    assert "| llama.cpp speculative, default draft settings | 16.7 | 1.33x | 1.00x | 2/2 | 0.50 |" in md


def test_kv_profile_splits_the_prefill_from_the_steps(tiny_packages):
    from apps.bench.kv_profile import OPS, profile

    r = profile(str(tiny_packages("llama", "int4")), prompt=12, steps=3, threads=1)
    assert r["prompt_tokens"] == 12 and r["steps"] == 3
    assert all(r["prefill_ms"][op] > 0 and r["step_ms"][op] > 0 for op in OPS)
    assert r["attention_us_per_layer"] > 0


def test_attention_probe_graphs_compute_groupqueryattention():
    """apps/bench/attention_probe.py's plain-operator attentions give GroupQueryAttention's output (the timings
    it prints compare the same computation)."""
    from apps.bench.attention_probe import probe

    r = probe(past=20, h=6, kv=2, d=16, capacity=64, threads=1, rounds=1, calls=1)
    assert set(r["max_abs_diff"]) == {"blockdiag", "per-head", "attention23"}
    assert max(r["max_abs_diff"].values()) < 1e-5, r["max_abs_diff"]
    assert all(v > 0 for v in r["median_us"].values())

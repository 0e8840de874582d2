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

"""Coverage-guided fuzzing (atheris) of every untrusted-input parser: 3,000 inputs per
target from a fixed seed in CI (deterministic); apps/fuzz/run.py --seconds N runs them
longer for docs/fuzzing.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("atheris", reason="atheris does not install on this platform")


def test_every_parser_survives_a_bounded_fuzz_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "apps" / "fuzz" / "run.py"), "--runs", "3000", "--no-docs"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    found = [r for r in report["results"] if r["finding"]]
    assert not found, found
    assert {r["target"] for r in report["results"]} == {"manifest", "gguf", "ct2", "wav", "tokenizer",
                                                         "chat_template", "json_schema", "regex", "grammar",
                                                         "tool_request"}
    assert all(r["executions"] > 0 for r in report["results"]), report
    assert proc.returncode == 0

"""An export killed at any moment (SIGKILL: no cleanup code runs) leaves the
previous package whole or the new one whole, never a half one; re-running
completes and sweeps the killed runs' temporary folders."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest

import edgeinfer
import edgeinfer.package
from edgeinfer.package import MANIFEST

RUNS = 20


def _export_cmd(src, out, precision):
    return [sys.executable, "-m", "edgeinfer.cli", "export", str(src), "-o", str(out), "--precision", precision,
            "--max-context", "128", "--force"]


@pytest.mark.slow
def test_kill_during_export_never_leaves_half_a_package(tiny_models, tmp_path, record_property):
    src = tiny_models("llama")
    out = tmp_path / "pkg"
    subprocess.run(_export_cmd(src, out, "int4"), check=True, capture_output=True)
    old_manifest = (out / MANIFEST).read_text()
    t0 = time.perf_counter()
    subprocess.run(_export_cmd(src, out, "fp32"), check=True, capture_output=True)
    duration = time.perf_counter() - t0
    subprocess.run(_export_cmd(src, out, "int4"), check=True, capture_output=True)
    old_manifest = (out / MANIFEST).read_text()

    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    for _ in range(RUNS):
        proc = subprocess.Popen(_export_cmd(src, out, "fp32"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, duration * 1.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pkg = edgeinfer.package.open_package(out, verify=True)  # whole, every sha256 right
        precision = pkg.manifest["quantization"]["weights"]
        outcomes["old" if precision == "int4" else "new"] += 1
        if precision == "int4":
            assert (out / MANIFEST).read_text() == old_manifest
        else:  # the new one finished before the kill: put the old one back for the next round
            subprocess.run(_export_cmd(src, out, "int4"), check=True, capture_output=True)
            old_manifest = (out / MANIFEST).read_text()
    record_property("kill_outcomes", outcomes)
    print(f"\n{RUNS} kills over a {duration:.1f} s export: {outcomes}")
    # Re-running completes and removes what the killed runs left beside the package.
    subprocess.run(_export_cmd(src, out, "fp32"), check=True, capture_output=True)
    assert edgeinfer.package.open_package(out, verify=True).manifest["quantization"]["weights"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert json.loads((out / MANIFEST).read_text())["format"] == "edgeinfer-package"
    assert outcomes["old"] > 0

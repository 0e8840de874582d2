"""The runtime stays lean: importing and using it pulls no torch/transformers/optimum."""

import subprocess
import sys


def test_import_edgeinfer_pulls_no_heavy_modules(tiny_packages):
    pkg = tiny_packages("llama", "int4")
    code = (
        "import sys, edgeinfer\n"
        f"m = edgeinfer.load({str(pkg)!r})\n"
        "m.complete('hello', max_new_tokens=3)\n"
        "import edgeinfer.cli\n"
        "heavy = [n for n in ('torch', 'transformers', 'optimum', 'onnx') if n in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

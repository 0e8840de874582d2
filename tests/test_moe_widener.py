"""int4-channel records read and widened in a worker process (edgeinfer/moe/widener.py): what it computes
equals the decoder's own path bit for bit, a corrupt record is refused by its checksum, a worker that
dies is a clear error, and closing the decoder leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_moe import PROMPT, few_experts_budget, moe_models  # noqa: F401
from test_moe_int4_experts import int4_expert_packages  # noqa: F401

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the widener needs memfd (Linux)")


def _decoder(pkg, budget_of=None, widener=True, **kw):
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    return MoEDecoder(open_package(pkg, verify=False), resolve_provider("cpu"), max_context=128,
                      memory_budget=few_experts_budget(budget_of or pkg), widener=widener, **kw)


@pytest.mark.parametrize("prefetch", [False, True])
def test_records_read_and_widened_by_the_widener_change_nothing(int4_expert_packages, prefetch):  # noqa: F811
    import edgeinfer

    _, pkg = int4_expert_packages("qwen3_moe")
    plain = edgeinfer.load(pkg).decoder
    plain.forward(PROMPT[:3])
    want = np.stack([plain.step(t).copy() for t in PROMPT[3:]])
    plain.close()
    dec = _decoder(pkg, prefetch=prefetch)
    widener = dec.cache.filler.widener
    assert widener is not None and widener.proc.poll() is None
    dec.forward(PROMPT[:3])
    got = np.stack([dec.step(t).copy() for t in PROMPT[3:]])
    assert np.array_equal(got, want)
    assert dec.expert_stats().misses > 0 and widener._seq > 0  # the misses went through the worker
    assert not dec.cache.pinned and dec.cache.count <= dec.cache.capacity
    dec.close()
    assert widener.proc.returncode == 0  # stopped with the decoder


def test_a_corrupt_record_read_by_the_widener_is_refused_by_its_checksum(int4_expert_packages, tmp_path):  # noqa: F811
    from edgeinfer.errors import PackageError

    _, src = int4_expert_packages("qwen3_moe")
    pkg = tmp_path / "pkg"
    shutil.copytree(src, pkg)
    index = json.loads((pkg / "edgeinfer.json").read_text())["moe"]["expert_store"]
    layer = next(iter(index["layers"]))
    with open(pkg / index["file"], "r+b") as f:  # every record of one layer: whichever the router picks
        for offset, _ in index["layers"][layer]:
            f.seek(offset + 8)
            flipped = bytes(b ^ 0xFF for b in f.read(4))
            f.seek(offset + 8)
            f.write(flipped)
    dec = _decoder(pkg, budget_of=src, prefetch=False)  # its sha256 is not checked at open: the record's CRC is
    with pytest.raises(PackageError, match=f"of layer {layer} could not be read or does not match its checksum"):
        for t in PROMPT:  # one token at a time: the misses are the worker's reads (a prompt's go through the queue)
            dec.step(t)
    dec.close()


def test_a_widener_that_dies_is_a_clear_error(int4_expert_packages):  # noqa: F811
    from edgeinfer.errors import PackageError

    _, pkg = int4_expert_packages("qwen3_moe")
    dec = _decoder(pkg, prefetch=False)
    dec.forward(PROMPT[:3])
    dec.cache.filler.widener.proc.kill()
    with pytest.raises(PackageError, match="widener process exited"):
        for t in PROMPT[3:] * 4:
            dec.step(t)
    dec.close()


def test_without_a_widener_process_the_decode_thread_widens(int4_expert_packages, monkeypatch, caplog):  # noqa: F811
    """Where the worker cannot start (a frozen app's executable is no Python), decoding goes on without it, saying
    so; asked for explicitly, its failure is the error."""
    import sys

    from edgeinfer.moe import decoder as decoder_mod

    _, pkg = int4_expert_packages("qwen3_moe")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    monkeypatch.setattr(decoder_mod, "worker_cpu", lambda threads: 0)
    with caplog.at_level("WARNING", logger="edgeinfer.moe"):
        dec = _decoder(pkg, prefetch=False, widener=None)
    assert dec.cache.filler.widener is None and "decoding thread" in caplog.text
    for t in PROMPT:
        dec.step(t)
    assert dec.expert_stats().misses > 0
    dec.close()
    with pytest.raises(OSError):
        _decoder(pkg, prefetch=False)


def test_asking_for_a_widener_where_it_cannot_run_is_refused(moe_models):  # noqa: F811
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    _, _, pkg = moe_models("qwen3_moe")  # int4 blocks with a session per expert: nothing to widen
    with pytest.raises(ValueError, match="widener=True needs an int4-channel expert store"):
        MoEDecoder(open_package(pkg), resolve_provider("cpu"), memory_budget=few_experts_budget(pkg), widener=True)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs (/dev/shm) to lack O_DIRECT")
def test_the_widener_reads_synchronously_where_the_file_system_refuses_o_direct(int4_expert_packages):  # noqa: F811
    import tempfile

    import edgeinfer

    _, src = int4_expert_packages("qwen3_moe")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        pkg = os.path.join(tmp, "pkg")
        shutil.copytree(src, pkg)
        plain = edgeinfer.load(pkg).decoder
        want = np.stack([plain.step(t).copy() for t in PROMPT])
        plain.close()
        dec = _decoder(pkg, prefetch=False)
        got = np.stack([dec.step(t).copy() for t in PROMPT])
        assert np.array_equal(got, want) and dec.expert_stats().misses > 0
        dec.close()

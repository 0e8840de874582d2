"""The disk under the expert store: dropping the page cache, O_DIRECT read bandwidth."""

from __future__ import annotations

import json
import mmap
import os
import random
import time
from pathlib import Path


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_bandwidth(pkg: Path, reads: int = 300) -> dict:
    """O_DIRECT reads of whole expert records at random record offsets: GB/s and ms per read."""
    manifest = json.loads((pkg / "edgeinfer.json").read_text())
    store = manifest["moe"]["expert_store"]
    offsets = [off for recs in store["layers"].values() for off, _ in recs]
    size = store["record_size"]
    fd = os.open(pkg / store["file"], os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    rnd = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(reads):
        os.preadv(fd, [buf], rnd.choice(offsets))
    dt = time.perf_counter() - t0
    os.close(fd)
    return {"gb_s": reads * size / dt / 1e9, "ms_per_read": dt / reads * 1e3, "read_bytes": size, "reads": reads}


def disk_bandwidth_batched(pkg: Path, batch: int = 8, reads: int = 256) -> dict:
    """Records asked of the kernel BATCH at a time (POSIX_FADV_WILLNEED, then read and dropped from the
    page cache), as the runtime reads a layer's misses: GB/s with several reads in flight."""
    manifest = json.loads((pkg / "edgeinfer.json").read_text())
    store = manifest["moe"]["expert_store"]
    offsets = [off for recs in store["layers"].values() for off, _ in recs]
    size = store["record_size"]
    fd = os.open(pkg / store["file"], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    buf = mmap.mmap(-1, size)
    rnd = random.Random(1)
    t0 = time.perf_counter()
    for _ in range(reads // batch):
        group = rnd.sample(offsets, batch)
        for off in group:
            os.posix_fadvise(fd, off, size, os.POSIX_FADV_WILLNEED)
        for off in group:
            os.preadv(fd, [buf], off)
            os.posix_fadvise(fd, off, size, os.POSIX_FADV_DONTNEED)
    dt = time.perf_counter() - t0
    os.close(fd)
    n = reads // batch * batch
    return {"gb_s": n * size / dt / 1e9, "ms_per_read": dt / n * 1e3, "read_bytes": size, "reads": n,
            "batch": batch}

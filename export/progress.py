"""A progress bar on stderr (tqdm) when it is a terminal and asked for; else one that does nothing."""

from __future__ import annotations

import sys


class NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "layer"):
    if not enabled or not sys.stderr.isatty():
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

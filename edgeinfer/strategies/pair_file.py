"""Calibrated settings of one big/little pair: a small JSON file that ``edgeinfer calibrate`` writes into
the package cache (``$EDGEINFER_HOME/pairs/``) and the big/little strategies read as their defaults.

The file names both packages by identity (the sha256 of their manifests' file tables, which hold the sha256
of every file), so settings measured for one pair are never applied to another: a stored file is found by
those identities, and a file given by hand (``pair=PATH``, CLI ``--pair FILE``) for other packages, or one
that is not a pair file of this format, is refused with a sentence that says what to do. Explicit options
always win over stored ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer.errors import PackageError

from .cost_model import CostModel
from .ead import ENTROPY_OF

FORMAT = 1
KIND = "edgeinfer-pair"


def package_identity(pkg) -> str:
    """sha256 of a package's file table (name, size and sha256 of every file): changes when it is re-exported."""
    files = pkg.manifest.get("files") or {}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def pairs_dir() -> Path:
    from edgeinfer.package_cache import cache_root

    return cache_root() / "pairs"


def pair_file_path(big_pkg, little_pkg) -> Path:
    """Where the calibration of BIG_PKG with LITTLE_PKG is stored."""
    slug = lambda p: re.sub(r"[^A-Za-z0-9._-]+", "-", p.root.name).strip("-.")[:60] or "package"  # noqa: E731
    digest = hashlib.sha256((package_identity(big_pkg) + package_identity(little_pkg)).encode()).hexdigest()
    return pairs_dir() / f"{slug(big_pkg)}+{slug(little_pkg)}-{digest[:16]}.json"


@dataclass
class PairSettings:
    """What a calibration measured and chose for one pair (see edgeinfer/cli/calibrate.py)."""

    big: dict  # {"name", "identity"}
    little: dict
    quality_target: float
    tau: float | None = None  # EAD
    window: int | None = None
    entropy_of: str | None = None  # EAD: whose entropy decides (None in files written before it was calibrated)
    fallback_threshold: float | None = None  # BiLD
    rollback_threshold: float | None = None
    cost_model: CostModel | None = None  # speculative: seeds its online estimates
    measured: dict = field(default_factory=dict)  # the calibration's own figures, for the record
    path: Path | None = None

    def defaults(self, strategy: str) -> dict:
        """The options STRATEGY takes from this file."""
        if strategy == "ead" and self.tau is not None:
            return {"tau": self.tau, **({"window": self.window} if self.window else {}),
                    **({"entropy_of": self.entropy_of} if self.entropy_of else {})}
        if strategy == "bild" and self.fallback_threshold is not None:
            return {"fallback_threshold": self.fallback_threshold, "rollback_threshold": self.rollback_threshold}
        if strategy == "speculative" and self.cost_model is not None:
            return {"cost_model": self.cost_model}
        return {}

    def to_dict(self) -> dict:
        return {"kind": KIND, "format": FORMAT, "big": self.big, "little": self.little,
                "quality_target": self.quality_target,
                "ead": {"tau": self.tau, "window": self.window, "entropy_of": self.entropy_of},
                "bild": {"fallback_threshold": self.fallback_threshold,
                         "rollback_threshold": self.rollback_threshold},
                "speculative": {"cost_model": self.cost_model.to_dict() if self.cost_model else None},
                "measured": self.measured}


def write_pair_file(settings: PairSettings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings.to_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_pair_file(path: str | os.PathLike, big_pkg, little_pkg) -> PairSettings:
    """The settings in PATH, refused unless it is a pair file of this format for these two packages."""
    path = Path(path).expanduser()
    redo = f"run 'edgeinfer calibrate {big_pkg.root} --little {little_pkg.root}' to calibrate this pair"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackageError(f"pair file '{path}' does not exist: {redo}.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PackageError(f"pair file '{path}' cannot be read as JSON ({e}): delete it and {redo}.") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise PackageError(f"'{path}' is not an edgeinfer pair file: {redo}.")
    if data.get("format") != FORMAT:
        raise PackageError(f"pair file '{path}' has format {data.get('format')!r}, this edgeinfer reads format "
                           f"{FORMAT}: {redo}.")
    try:
        big, little = data["big"], data["little"]
        if big["identity"] != package_identity(big_pkg) or little["identity"] != package_identity(little_pkg):
            raise PackageError(f"pair file '{path}' was calibrated for '{big.get('name')}' with little "
                               f"'{little.get('name')}', not for these packages (or they were exported again "
                               f"since): {redo}.")
        cm = (data.get("speculative") or {}).get("cost_model")
        settings = PairSettings(
            big=big, little=little, quality_target=float(data["quality_target"]),
            tau=_number(data["ead"].get("tau")), window=_window(data["ead"].get("window")),
            entropy_of=_entropy_of(data["ead"].get("entropy_of")),
            fallback_threshold=_number(data["bild"].get("fallback_threshold")),
            rollback_threshold=_number(data["bild"].get("rollback_threshold")),
            cost_model=CostModel.from_dict(cm) if cm else None, measured=data.get("measured") or {}, path=path)
    except PackageError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PackageError(f"pair file '{path}' is damaged ({type(e).__name__}: {e}): delete it and {redo}.") from None
    if settings.tau is not None and settings.tau < 0 or settings.fallback_threshold is not None and not (
            0 <= settings.fallback_threshold <= 1):
        raise PackageError(f"pair file '{path}' holds out-of-range thresholds: delete it and {redo}.")
    return settings


def stored_settings(big_pkg, little_pkg, path: str | os.PathLike | None = None) -> PairSettings | None:
    """The pair file PATH (checked), else the one the cache holds for these packages, else None."""
    if path is not None:
        return read_pair_file(path, big_pkg, little_pkg)
    found = pair_file_path(big_pkg, little_pkg)
    return read_pair_file(found, big_pkg, little_pkg) if found.is_file() else None


def _number(x) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{x!r} is not a number")
    return float(x)


def _window(x) -> int | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"window {x!r} is not an integer >= 1")
    return x


def _entropy_of(x) -> str | None:
    if x is not None and x not in ENTROPY_OF:
        raise ValueError(f"entropy_of {x!r} is not one of {', '.join(ENTROPY_OF)}")
    return x

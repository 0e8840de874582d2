"""Helpers the provider modules share."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.package import Manifest


def needs_target(spec: Manifest | None, targets: tuple[str, ...], provider: str, why: str) -> str | None:
    """A refusal unless the package was exported for one of TARGETS."""
    target = spec.target if spec is not None else "cpu"
    if target in targets:
        return None
    wanted = " or ".join(f"--target {t}" for t in targets)
    return f"the {provider} provider {why}; this package was exported for {target} (export it with {wanted})"

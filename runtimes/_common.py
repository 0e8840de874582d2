"""Helpers the provider modules share."""

from __future__ import annotations


def needs_target(manifest: dict, targets: tuple[str, ...], provider: str, why: str) -> str | None:
    """A refusal unless the package was exported for one of TARGETS."""
    target = manifest.get("target", "cpu") if manifest else "cpu"
    if target in targets:
        return None
    wanted = " or ".join(f"--target {t}" for t in targets)
    return f"the {provider} provider {why}; this package was exported for {target} (export it with {wanted})"

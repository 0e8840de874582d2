"""Execution providers: which exist here, which one a package runs on, and how
a session is configured for it. One module per provider."""

from __future__ import annotations

from .base import (
    PROVIDERS,
    ExecutionTarget,
    available_providers,
    create_session,
    ep_devices,
    node_placement,
    provider_report,
    resolve_provider,
)

__all__ = ["PROVIDERS", "ExecutionTarget", "available_providers", "create_session", "ep_devices", "node_placement",
           "provider_report", "resolve_provider"]

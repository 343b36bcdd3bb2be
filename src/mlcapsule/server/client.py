"""Moved to :mod:`mlcapsule.provider_client` (the client's HTTP transport is not server code).

Kept so that ``from mlcapsule.server.client import ProviderClient`` still works.
"""

from __future__ import annotations

from ..provider_client import API as API, ProviderClient as ProviderClient

__all__ = ["API", "ProviderClient"]

"""Reaching Ray: the optional import with its install hint, and joining or starting a cluster."""

from __future__ import annotations

import os
from typing import Any

from kiln.errors import KilnError


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KilnError("this needs Ray, which is not installed", hint="pip install 'kiln[ray]'") from None
    return ray


def init(address: str | None) -> None:
    """Connect to the cluster at `address` (or at $RAY_ADDRESS), or start a local Ray of its own bound to loopback
    (it serves this machine only). Without an address Ray itself would join whatever cluster `ray start` left
    running on this machine, and `kiln serve --ray` would deploy onto another user's Serve application (its route
    "/" taken: seen when two test runs shared a machine); "local" starts a new one."""
    ray = require_ray()
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        address = "local"
        options["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:
        raise KilnError(f"cannot reach the Ray cluster at {address}: {e}",
                        hint="check the address (ray status on the head node)") from None

"""Reaching Ray: the optional import with its install hint, and joining or starting a cluster."""

from __future__ import annotations

from typing import Any

from kiln.errors import KilnError


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KilnError("this needs Ray, which is not installed", hint="pip install 'kiln[ray]'") from None
    return ray


def init(address: str | None) -> None:
    """Connect to the cluster at `address`, or start a local Ray bound to loopback (it serves this machine only)."""
    ray = require_ray()
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is None:
        options["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:
        raise KilnError(f"cannot reach the Ray cluster at {address}: {e}",
                        hint="check the address (ray status on the head node)") from None

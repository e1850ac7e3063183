"""Ray integration (optional: pip install 'kiln[ray]'): Ray Data batch inference, Ray Serve deployments."""

from __future__ import annotations

from typing import Any

from kiln.ray.cluster import init, require_ray


def deployment(repo: str, **kwargs: Any) -> Any:
    """A Ray Serve application serving repo's models over the KServe v2 API; see kiln.ray.serve.deployment.

    >>> serve.run(kiln.ray.deployment("models", models=["digits"], max_replicas=4), route_prefix="/")
    """
    from kiln.ray.serve import deployment as _deployment

    return _deployment(repo, **kwargs)


__all__ = ["deployment", "init", "require_ray"]

"""Ray integration (optional: pip install 'kiln[ray]'): Ray Data batch inference, Ray Serve deployments."""

from __future__ import annotations

from typing import Any

from kiln.errors import KilnError


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KilnError("this needs Ray, which is not installed", hint="pip install 'kiln[ray]'") from None
    return ray


def deployment(repo: str, **kwargs: Any) -> Any:
    """A Ray Serve application serving repo's models over the KServe v2 API; see kiln.ray.serve.deployment.

    >>> serve.run(kiln.ray.deployment("models", models=["digits"], max_replicas=4), route_prefix="/")
    """
    from kiln.ray.serve import deployment as _deployment

    return _deployment(repo, **kwargs)


__all__ = ["deployment", "require_ray"]

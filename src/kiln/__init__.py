"""kiln: turn a trained PyTorch model into a fast, verified artifact, and serve it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kiln.build import BuildResult
    from kiln.runner import Runner


def build(source: str, **kwargs: Any) -> BuildResult:
    """Build, verify and select variants of a model; see `kiln.build.build`.

    >>> kiln.build("examples/digits/model.py:DigitsNet", weights="examples/digits/digits.safetensors")
    """
    from kiln.build import build as _build

    return _build(source, **kwargs)


def load(path: str, *, device: str = "cpu", variant: str | None = None) -> Runner:
    """Load the selected variant of repo/<model>[/<version>] as a Runner.

    >>> runner = kiln.load("models/digits"); logits = runner(images)
    """
    from kiln.repository import load as _load

    return _load(path, device=device, variant=variant)


__all__ = ["__version__", "build", "load"]

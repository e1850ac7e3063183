"""kiln: turn a trained PyTorch model into a fast, verified artifact, and serve it.

>>> result = kiln.build("examples/digits/model.py:DigitsNet", weights="examples/digits/digits.safetensors")
>>> runner = kiln.load("models/digits")

The package is lazy (PEP 562): `import kiln` and `kiln --help` load neither torch nor the build path; the
functions below are imported on first use. No public function shadows a submodule: `kiln.build` is the
function, the module that holds it is `kiln.builder`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "build": "kiln.builder", "BuildResult": "kiln.builder",
    "distill": "kiln.distiller", "DistillResult": "kiln.distiller",
    "load": "kiln.repository",
    "KilnError": "kiln.errors",
    "Runner": "kiln.runner",
    "TensorSpec": "kiln.spec",
}

if TYPE_CHECKING:
    from kiln.builder import BuildResult, build
    from kiln.distiller import DistillResult, distill
    from kiln.errors import KilnError
    from kiln.repository import load
    from kiln.runner import Runner
    from kiln.spec import TensorSpec

__all__ = ["BuildResult", "DistillResult", "KilnError", "Runner", "TensorSpec", "__version__", "build", "distill", "load"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

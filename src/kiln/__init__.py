"""kiln: turn a trained PyTorch model into a fast, verified artifact, and serve it.

>>> result = kiln.build("examples/digits/model.py:DigitsNet", weights="examples/digits/digits.safetensors")
>>> runner = kiln.load("models/digits")
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported eagerly so that the functions, not the submodules of the same name, are kiln.build / kiln.load.
from kiln.build import BuildResult, build  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.repository import load  # noqa: E402
from kiln.runner import Runner  # noqa: E402
from kiln.spec import TensorSpec  # noqa: E402

__all__ = ["BuildResult", "KilnError", "Runner", "TensorSpec", "__version__", "build", "load"]

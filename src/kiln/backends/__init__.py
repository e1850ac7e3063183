"""One module per runtime. Each has NAME, `export(subject, dir, options=) -> meta` and
`load(dir, meta, inputs, outputs, device=) -> Runner`; optionally `compatible(meta) -> reason | None`."""

from __future__ import annotations

import importlib
from types import ModuleType

from kiln.errors import KilnError

ORDER = ("eager", "torchscript", "aoti", "onnxruntime", "compile", "tensorrt")


def get(name: str) -> ModuleType:
    if name not in ORDER:
        raise KilnError(f"unknown backend {name!r}", hint=f"choose from {', '.join(ORDER)}")
    return importlib.import_module(f"kiln.backends.{name}")

"""Runtimes as plug-ins: every module of this package that defines `NAME` is a backend (it must also define
`RANK`, `variants`, `export` and `load`; see kiln.backends.common), and so is every `kiln.backends` entry point
of an installed distribution. Adding a runtime is adding one module; the planner collects their declarations."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from types import ModuleType

from kiln.errors import KilnError

_CONTRACT = ("NAME", "RANK", "variants", "export", "load")


@cache
def _discover() -> dict[str, ModuleType]:
    found: list[ModuleType] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NAME"):  # helpers (common, cuda) define no NAME
            found.append(mod)
    for ep in entry_points(group="kiln.backends"):
        found.append(ep.load())
    out: dict[str, ModuleType] = {}
    for mod in sorted(found, key=lambda m: getattr(m, "RANK", 1000)):
        missing = [a for a in _CONTRACT if not hasattr(mod, a)]
        if missing:
            raise KilnError(f"backend module {mod.__name__} lacks {', '.join(missing)}",
                            hint="a backend defines NAME, RANK, variants(target), export(...) and load(...)")
        out.setdefault(mod.NAME, mod)
    return out


def names() -> list[str]:
    """Every backend, in table order (eager first)."""
    return list(_discover())


def defaults() -> list[str]:
    """The backends a build tries when none are named: all but those declaring `DEFAULT = False` (the optional
    runtimes, whose builds take longer: OpenVINO, ExecuTorch, TVM). `--backends all` names every one."""
    return [n for n, m in _discover().items() if getattr(m, "DEFAULT", True)]


def get(name: str) -> ModuleType:
    found = _discover()
    if name not in found:
        raise KilnError(f"unknown backend {name!r}", hint=f"choose from {', '.join(found)}")
    return found[name]
